"""`recagent eval all`: every offline evaluation on one sample of test users, cached per stage.

Stages (each cached as ``reports/<run-id>/cache/<stage>.json``; a rerun with the same configuration reuses it):

* ``retrieval``  baselines and the fused retriever (full ranking) on the sampled users;
* ``score``      the LLM in score mode over each user's retrieved top-20, with exact ablations derived from the
                 same pass (no calibration) and a reversed-order pass on a subset (2 permutations);
* ``bias``       the position-bias curve (the LLM's top-1 rate of a validation target moved to fixed slots);
* ``generate``   listwise generate mode on a subset, keeping its reasons;
* ``explain``    score mode plus explanations of the final top few on a subset;
* ``chat``       the simulated-user chat evaluation, when ``eval.chat_sim`` is present;
* ``judge``      the LLM judge: rubric on the explanations, pairwise LLM vs a code-only template explanation;
* ``validity``   the judge on the author-written reference labels on constructed cases
                 (``eval/data/judge_labels.jsonl``, MovieLens-100k only).

The held-out target never reaches inference: stages call the retriever and the LLM with the visible history
only, and the target is used afterwards to compute metrics. Nothing is re-queried depending on the target.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, field_validator
from tqdm import tqdm

from agent import explanation_checks as xc
from agent.explain import Explainer
from agent.explain import template_reason as explained_by_template
from agent.llm.base import LLMBackend
from agent.rerank import RankInput, RerankConfig, Reranker
from eval import rerank_eval as rx
from eval.judge import ExplanationInput, Judge, JudgeConfig, PairwiseResult, load_labels
from eval.metrics import metric_values
from eval.retrieval_eval import BASELINES, collect_lists
from retrieval.catalog import check_ties
from retrieval.index import Index
from retrieval.splits import Case, Split, SplitSpec, split_catalog

logger = logging.getLogger(__name__)
STAGES = ("retrieval", "score", "bias", "generate", "explain", "chat", "judge", "validity")
ROW_METRICS = ("ndcg@10", "recall@10")
_EXPLANATIONS = ("generate_users", "generate_k", "explain_users", "explain_k")
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "retrieval": (), "score": ("perms_users",), "bias": ("bias_users", "bias_positions"),
    "generate": ("generate_users", "generate_k"), "explain": ("explain_users", "explain_k"),
    "chat": ("chat_users", "chat_turns", "n_boot"), "judge": ("judge_items", "pairwise_items", *_EXPLANATIONS),
    "validity": ("validity",),
}


class SuiteConfig(BaseModel):
    catalog: str = "movielens-100k"
    users: int = Field(default=200, ge=1, description="test users sampled (seeded) for every stage")
    seed: int = Field(default=0, description="seeds the user sample and the random tie order of the split")
    ties: str = Field(default="random", description="how ties in time are broken in the split (id | random)")
    n_boot: int = Field(default=1000, ge=10)
    n_candidates: int = Field(default=20, ge=2)
    perms_users: int = Field(default=40, ge=0, description="subset for the 2-permutation ablation")
    bias_users: int = Field(default=16, ge=0, description="validation users sampled (retrieved targets count)")
    bias_positions: list[int] = Field(default_factory=lambda: [0, 4, 9, 14, 19])
    generate_users: int = Field(default=10, ge=0)
    generate_k: int = Field(default=5, ge=1, description="items the LLM lists; the rest keep retrieval order")
    explain_users: int = Field(default=15, ge=0)
    explain_k: int = Field(default=2, ge=1)
    judge_items: int = Field(default=16, ge=0, description="explanations scored with the rubric")
    pairwise_items: int = Field(default=8, ge=0, description="pairs judged, each in both orders")
    chat_users: int = Field(default=30, ge=0)
    chat_turns: int = Field(default=5, ge=1)
    validity: bool = True

    @field_validator("ties")
    @classmethod
    def _known_rule(cls, ties: str) -> str:
        return check_ties(ties)

    def split_spec(self) -> SplitSpec:
        return SplitSpec(ties=self.ties, seed=self.seed)

    def cap(self, n: int) -> int:
        return min(n, self.users)

    def key(self, stage: str) -> str:
        """Cache key of a stage: the configuration fields that stage depends on (not the code version: use
        ``--fresh`` or another ``--run-id`` after changing code)."""
        fields = {f: getattr(self, f) for f in ("catalog", "users", "seed", "ties", "n_candidates",
                                                *STAGE_FIELDS[stage])}
        return hashlib.sha256(f"{stage}:{json.dumps(fields, sort_keys=True)}".encode()).hexdigest()[:16]


class RecordingBackend(LLMBackend):
    """Delegates to ``inner`` and keeps the last raw JSON output (to check the model before the guards)."""

    def __init__(self, inner: LLMBackend) -> None:
        super().__init__()
        self.inner = inner
        self.usage = inner.usage
        self.name = inner.name
        self.outputs: list[str] = []

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    def score_labels(self, request: Any) -> list[float]:
        return self.inner.score_labels(request)

    def score_labels_batch(self, requests: Any) -> list[list[float]]:
        return self.inner.score_labels_batch(requests)

    def generate_json(self, messages: Any, schema: dict[str, Any], max_tokens: int = 512,
                      temperature: float = 0.0) -> str:
        raw = self.inner.generate_json(messages, schema, max_tokens=max_tokens, temperature=temperature)
        self.outputs.append(raw)
        return raw

    def stream_text(self, messages: Any, max_tokens: int = 256, temperature: float = 0.0) -> Any:
        return self.inner.stream_text(messages, max_tokens=max_tokens, temperature=temperature)

    def complete_batch(self, requests: Any, cancelled: Any = None) -> Any:
        return self.inner.complete_batch(requests, cancelled)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)


@dataclasses.dataclass
class Context:
    """What every stage may use. ``split`` holds the full validation part (CF for the test part is fitted on
    train + validation) and only the sampled test users."""

    config: SuiteConfig
    index: Index
    split: Split
    cases: list[Case]
    backend_factory: Callable[[], LLMBackend]
    judge_factory: Callable[[], Judge]
    progress: bool = True
    _evaluator: rx.RerankEvaluator | None = None

    @property
    def evaluator(self) -> rx.RerankEvaluator:
        if self._evaluator is None:
            self._evaluator = rx.RerankEvaluator(self.index, self.backend_factory(), RerankConfig.load(self.index),
                                                 n_candidates=self.config.n_candidates)
        return self._evaluator

    def subset(self, n: int) -> list[Case]:
        return self.cases[: self.config.cap(n)]  # cases are in a seeded random order

    def inputs(self, cases: Sequence[Case]) -> list[tuple[Case, list[RankInput], list[RankInput]]]:
        """(case, trimmed visible history, retrieved candidates) -- built from the visible history only."""
        ev = self.evaluator
        out = []
        for case, cands in ev.candidates(self.split, "test", cases):
            out.append((case, ev.reranker.trim_history(ev.service.history_inputs(case.history)), cands))
        return out


def sample(split: Split, users: int, seed: int) -> list[Case]:
    """Seeded sample of test users, in a seeded random order (prefix subsets are random subsets)."""
    import random

    chosen = rx.sample_cases(split.test, users, seed)
    random.Random(seed + 7).shuffle(chosen)
    return chosen


# --- stages --------------------------------------------------------------------------------------------------


def per_user_rows(users: Sequence[rx.UserResult], orders: dict[str, tuple[str, float]], seed: int,
                  llm_override: dict[str, list[list[float] | None]] | None = None) -> dict[str, dict[str, Any]]:
    """Per-user NDCG@10 and Recall@10 of each named order ``{row: (kind, alpha)}`` over the candidates."""
    rows: dict[str, dict[str, Any]] = {}
    for row, (kind, alpha) in orders.items():
        vals = []
        for i, u in enumerate(users):
            if llm_override and row in llm_override:
                u = dataclasses.replace(u, llm=llm_override[row][i])
            vals.append(rx.ndcg_recall_at(rx.order_for(u, kind, alpha, seed), u.target_pos))
        rows[row] = {"users": [u.user_id for u in users], "ndcg@10": [v[0] for v in vals],
                     "recall@10": [v[1] for v in vals]}
    return rows


def stage_retrieval(ctx: Context) -> dict[str, Any]:
    lists = collect_lists(ctx.index, ctx.split, "test", progress=ctx.progress)
    methods = {b: {b: 1.0} for b in BASELINES if b in lists.norm}
    methods["fused"] = ctx.index.manifest.fusion.weights
    rows = {}
    for name, weights in methods.items():
        vals = [metric_values(r) for r in lists.ranks(weights, ctx.index.manifest.fusion.cold if name == "fused"
                                                      else 0.0)]
        rows[f"baseline: {name}"] = {"users": [c.user_id for c in ctx.cases],
                                     **{m: [v[m] for v in vals] for m in ROW_METRICS}}
    return {"rows": rows, "weights": methods["fused"]}


def stage_score(ctx: Context) -> dict[str, Any]:
    ev = ctx.evaluator
    part = ev.run_part(ctx.split, "test", ctx.cases, mode="score", progress=ctx.progress)
    users = part.users
    alpha = ev.config.alpha("score")
    orders = {"random order (top-20)": ("random", 0.0), "retrieval order (top-20)": ("retrieval", 0.0),
              f"LLM score: final (alpha={alpha})": ("final", alpha), "LLM score: LLM only": ("llm", 1.0)}
    rows = per_user_rows(users, orders, ctx.config.seed)
    ablations: dict[str, Any] = {}
    if ev.config.perms == 1 and ev.config.calibrate:  # raw = calibrated + bias, exactly, from the same pass
        raw = [None if u.llm is None else (np.asarray(u.llm) + ev.reranker.label_bias(len(u.llm))).tolist()
               for u in users]
        name = "ablation: score, no calibration, LLM only"
        rows.update(per_user_rows(users, {name: ("llm", 1.0)}, ctx.config.seed, {name: raw}))
    perm_cases = {c.user_id for c in ctx.subset(ctx.config.perms_users)}
    if perm_cases and ev.config.perms == 1:
        sub = [u for u in users if u.user_id in perm_cases]
        by_user = {case.user_id: (trimmed, cands) for case, trimmed, cands in
                   ctx.inputs([c for c in ctx.cases if c.user_id in perm_cases])}
        two: list[list[float] | None] = []
        for u in tqdm(sub, desc="score: reversed-order pass", unit="user", disable=not ctx.progress):
            trimmed, cands = by_user[u.user_id]
            if u.llm is None:
                two.append(None)
                continue
            rev = ev.reranker.llm_scores(trimmed, list(reversed(cands)), perms=1)[::-1]
            two.append(((np.asarray(u.llm) + rev) / 2).tolist())
        name = "ablation: score, 2 permutations, LLM only"
        rows.update(per_user_rows(sub, {name: ("llm", 1.0)}, ctx.config.seed, {name: two}))
    grid = {str(a): float(np.mean([rx.ndcg_recall_at(rx.order_for(u, "final", a, ctx.config.seed),
                                                     u.target_pos)[0] for u in users]))
            for a in rx.ALPHAS}
    ablations["alpha_sensitivity_test"] = grid
    return {"rows": rows, "alpha": alpha, "ablations": ablations, "rates": rx.rates(part),
            "latency_s": [u.latency_s for u in users], "latency": rx.latency_summary(part),
            "perms": ev.config.perms, "calibrate": ev.config.calibrate, "rerank": rerank_provenance(ctx.index),
            "users": [dataclasses.asdict(u) for u in users]}


def stage_bias(ctx: Context) -> dict[str, Any]:
    n = ctx.config.bias_users
    if n == 0:
        return {"skipped": "bias_users = 0"}
    full = split_catalog(ctx.index.catalog, ctx.config.split_spec())
    cases = rx.sample_cases(full.validation, n, ctx.config.seed + 1)
    positions = [p for p in ctx.config.bias_positions if p < ctx.config.n_candidates]
    settings = {"raw": {"calibrate": False, "perms": 1}, "calibrated": {"calibrate": True, "perms": 1}}
    return {"curves": ctx.evaluator.position_bias(full, cases, settings, positions=positions,
                                                  progress=ctx.progress)}


def _answer_records(case: Case, answer: Any, system: str) -> list[dict[str, Any]]:
    return [{"system": system, "user_id": case.user_id, "history": list(case.history), "item_id": it.item_id,
             "rank": it.rank, "reason": it.reason or "", "evidence": list(it.evidence),
             "reason_source": it.reason_source or "template"}
            for it in answer.items if it.reason]


def stage_generate(ctx: Context) -> dict[str, Any]:
    cases = ctx.subset(ctx.config.generate_users)
    if not cases:
        return {"skipped": "generate_users = 0"}
    ev = ctx.evaluator
    rec = RecordingBackend(ev.backend)
    reranker = Reranker(rec, ev.config)
    users, explanations, lists = [], [], []
    for case, _trimmed, cands in tqdm(ctx.inputs(cases), desc="generate mode", unit="user",
                                      disable=not ctx.progress):
        history = ev.service.history_inputs(case.history)
        before, t0 = len(rec.outputs), time.perf_counter()
        answer = reranker.rerank(history, cands, k=min(ctx.config.generate_k, len(cands)), mode="generate",
                                 alpha=1.0)
        Explainer(rec, ctx.index).explain(answer, history, cands)
        latency = time.perf_counter() - t0
        raw_ids = _raw_ids(rec.outputs[before:], "ranking")
        lists.append({**xc.list_checks(raw_ids, case.history, [c.item_id for c in cands]),
                      "degraded": answer.degraded})
        n = len(cands)
        ids = [c.item_id for c in cands]
        listed = [it.item_id for it in answer.items]
        order = listed + [i for i in ids if i not in set(listed)]  # as the reranker orders them
        llm = None if answer.degraded else [float(n - order.index(i)) / n for i in ids]
        users.append(rx.UserResult(user_id=case.user_id, candidates=ids, retrieval=[c.retrieval_score for c in cands],
                                   llm=llm, target_pos=ids.index(case.target) if case.target in ids else None,
                                   latency_s=latency, degraded=answer.degraded, invalid=answer.degraded,
                                   dropped_evidence=answer.dropped_evidence))
        explanations += _answer_records(case, answer, "generate")
    alpha = ev.config.alpha("generate")
    orders = {"retrieval order (top-20)": ("retrieval", 0.0), f"LLM generate: final (alpha={alpha})": ("final", alpha),
              "LLM generate: LLM only": ("llm", 1.0)}
    rows = per_user_rows(users, orders, ctx.config.seed)
    rows.pop("retrieval order (top-20)")
    return {"rows": rows, "alpha": alpha, "latency_s": [u.latency_s for u in users],
            "lists": lists, "explanations": explanations, "users": [u.user_id for u in users]}


def _raw_ids(outputs: Sequence[str], key: str) -> list[str]:
    """Item ids of the model's last raw JSON (before the reranker's guards)."""
    for raw in reversed(outputs):
        try:
            return [str(e) for e in json.loads(raw)[key]]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return []


def stage_explain(ctx: Context) -> dict[str, Any]:
    cases = ctx.subset(ctx.config.explain_users)
    if not cases:
        return {"skipped": "explain_users = 0"}
    ev = ctx.evaluator
    reranker = Reranker(ev.backend, ev.config)
    explainer = Explainer(ev.backend, ctx.index)
    explanations, latencies, failures = [], [], 0
    for case, _trimmed, cands in tqdm(ctx.inputs(cases), desc="score + explain", unit="user",
                                      disable=not ctx.progress):
        t0 = time.perf_counter()
        history = ev.service.history_inputs(case.history)
        answer = explainer.explain(reranker.rerank(history, cands, k=ctx.config.explain_k, mode="score"), history,
                                   cands)
        latencies.append(answer.timings.explain_ms / 1000)
        failures += int(answer.degraded or bool(answer.reason))
        got = _answer_records(case, answer, "score+explain")
        explanations += got
        logger.debug("explained user=%s n=%d seconds=%.1f", case.user_id, len(got), time.perf_counter() - t0)
    return {"explanations": explanations, "latency_s": latencies, "failures": failures, "users": len(cases)}


def stage_chat(ctx: Context) -> dict[str, Any]:
    try:
        from eval import chat_sim
    except ImportError as exc:
        return {"skipped": f"not available ({exc})"}
    if ctx.config.chat_users == 0:
        return {"skipped": "chat_users = 0"}
    from agent.service import RecommenderService

    service = RecommenderService(ctx.index, backend=ctx.evaluator.backend, config=ctx.evaluator.config)
    bar = tqdm(total=2 * ctx.config.chat_users, desc="chat simulation", unit="episode", disable=not ctx.progress)

    def progress(name: str, done: int, total: int) -> None:
        bar.update(1)

    payload = chat_sim.evaluate_chat(service, n_users=ctx.config.chat_users, max_turns=ctx.config.chat_turns,
                                     seed=ctx.config.seed, n_boot=ctx.config.n_boot, progress=progress,
                                     spec=ctx.config.split_spec())
    bar.close()
    payload.pop("episodes", None)
    return payload


def template_reason(history: Sequence[str], item_id: str, catalog: Any) -> tuple[str, list[str]]:
    """The code-only baseline explanation: the reranker's metadata-only reason (the most recent history item
    sharing most genres), from catalogue ids."""

    def rank_input(i: str) -> RankInput:
        item = catalog.item(i)
        return RankInput(item_id=i, title=str(item["title"]), text="", genres=list(item["genres"]))

    return explained_by_template(rank_input(item_id), [rank_input(h) for h in history if catalog.has_item(h)])


def stage_judge(ctx: Context, explanations: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = ctx.config
    if not explanations or (cfg.judge_items == 0 and cfg.pairwise_items == 0):
        return {"skipped": "no explanations to judge"}
    judge = ctx.judge_factory()
    catalog = ctx.index.catalog
    by_system: dict[str, list[dict[str, Any]]] = {}
    for e in explanations:
        by_system.setdefault(e["system"], []).append(e)
    per_system = max(1, cfg.judge_items // max(len(by_system), 1))
    picked = [e for rows in by_system.values() for e in _first_per_user(rows)[:per_system]]
    rubric, latencies, failures = [], [], 0
    for e in tqdm(picked, desc="judge: rubric", unit="expl", disable=not ctx.progress):
        t0 = time.perf_counter()
        try:
            s = judge.rubric(ExplanationInput(history=e["history"], item_id=e["item_id"], reason=e["reason"],
                                              evidence=e["evidence"]))
            rubric.append({"system": e["system"], "user_id": e["user_id"], "item_id": e["item_id"], **s.model_dump()})
        except Exception as exc:  # a judge failure is counted, never fatal
            failures += 1
            logger.warning("judge rubric failed item=%s error=%s", e["item_id"], exc)
        latencies.append(time.perf_counter() - t0)
    pairs: list[dict[str, Any]] = []
    source = _first_per_user(by_system.get("score+explain") or next(iter(by_system.values())))
    for e in tqdm(source[: cfg.pairwise_items], desc="judge: pairwise", unit="pair", disable=not ctx.progress):
        tmpl, _ = template_reason(e["history"], e["item_id"], catalog)
        try:
            r = judge.pairwise(e["history"], e["item_id"], e["reason"], tmpl)
            pairs.append({"user_id": e["user_id"], "item_id": e["item_id"], **dataclasses.asdict(r)})
        except Exception as exc:
            failures += 1
            logger.warning("judge pairwise failed item=%s error=%s", e["item_id"], exc)
    return {"rubric": rubric, "pairs": pairs, "pair_systems": {"a": source[0]["system"] if source else None,
                                                               "b": "template (code only)"},
            "failures": failures, "latency_s": latencies, "meta": judge.metadata()}


def _first_per_user(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["user_id"] not in seen:
            seen.add(r["user_id"])
            out.append(r)
    return out


def stage_validity(ctx: Context) -> dict[str, Any]:
    if not ctx.config.validity:
        return {"skipped": "disabled"}
    labels = load_labels()
    catalog = ctx.index.catalog
    missing = [lab["item_id"] for lab in labels if not catalog.has_item(lab["item_id"])]
    if missing or catalog.name != "movielens-100k":
        return {"skipped": f"the labelled set is on movielens-100k items; catalogue '{catalog.name}' differs"}
    judge = ctx.judge_factory()
    judged: list[dict[str, int] | None] = []
    for lab in tqdm(labels, desc="judge: author-labelled constructed cases", unit="expl", disable=not ctx.progress):
        try:
            judged.append(judge.rubric(ExplanationInput.model_validate(lab)).scores())
        except Exception as exc:
            logger.warning("judge failed on label line=%s error=%s", lab.get("line"), exc)
            judged.append(None)
    return {"labels": [lab["labels"] for lab in labels], "judged": judged, "meta": judge.metadata()}


def pairwise_results(stage: dict[str, Any]) -> list[PairwiseResult]:
    return [PairwiseResult(first=p["first"], second=p["second"], len_a=p["len_a"], len_b=p["len_b"])
            for p in stage.get("pairs", [])]


# --- orchestration ---------------------------------------------------------------------------------------------


class StageCache:
    def __init__(self, run_dir: Path, config: SuiteConfig, fresh: bool = False) -> None:
        self.dir = run_dir / "cache"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.fresh = fresh
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []

    def run(self, stage: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.dir / f"{stage}.json"
        key = self.config.key(stage)
        if path.exists() and not self.fresh:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                logger.info("stage cached stage=%s", stage)
                self.cached.append(stage)
                self.seconds[stage] = stored["seconds"]
                return dict(stored["result"])
        t0 = time.perf_counter()
        result = fn()
        self.seconds[stage] = round(time.perf_counter() - t0, 2)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "stage": stage, "seconds": self.seconds[stage], "result": result}))
        tmp.replace(path)
        return result


def run_suite(index: Index, config: SuiteConfig, run_dir: Path, backend_factory: Callable[[], LLMBackend],
              judge_factory: Callable[[LLMBackend], Judge], progress: bool = True, fresh: bool = False,
              on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or reuse) every stage; returns ``{stage: result}`` plus ``_seconds`` and ``_cached``."""
    full = split_catalog(index.catalog, config.split_spec())
    cases = sample(full, config.users, config.seed)
    split = Split(train=full.train, validation=full.validation, test=cases)
    backend: list[LLMBackend] = []

    def get_backend() -> LLMBackend:
        if not backend:
            backend.append(backend_factory())
        return backend[0]

    judges: list[Judge] = []

    def get_judge() -> Judge:
        if not judges:
            judges.append(judge_factory(get_backend()))
        return judges[0]

    ctx = Context(config=config, index=index, split=split, cases=cases, backend_factory=get_backend,
                  judge_factory=get_judge, progress=progress)
    cache = StageCache(run_dir, config, fresh=fresh)
    results: dict[str, Any] = {}
    for stage in STAGES:
        if on_stage:
            on_stage(stage)
        if stage == "judge":
            expl = results["explain"].get("explanations", []) + results["generate"].get("explanations", [])
            results[stage] = cache.run(stage, lambda e=expl: stage_judge(ctx, e))  # type: ignore[misc]
        else:
            fn = globals()[f"stage_{stage}"]
            results[stage] = cache.run(stage, lambda f=fn: f(ctx))  # type: ignore[misc]
    results["_seconds"] = cache.seconds
    results["_cached"] = cache.cached
    results["_users"] = [c.user_id for c in cases]
    if backend:
        results["_model"] = {"backend": backend[0].name, "model": backend[0].model_name}
    return results


def default_judge_factory(catalog: Any, config: JudgeConfig | None = None) -> Callable[[LLMBackend], Judge]:
    """Reuse the main backend when the judge configuration is the same; else build the judge's own."""
    from agent.llm.config import LLMConfig

    cfg = config or JudgeConfig.from_env()

    def make(main: LLMBackend) -> Judge:
        if cfg.same_backend_as(LLMConfig.from_env()):
            return Judge(main, catalog, cfg)
        from agent.llm.registry import make_backend

        return Judge(make_backend(cfg.llm), catalog, cfg)

    return make


# --- provenance ------------------------------------------------------------------------------------------------


def git_info(repo: Path | None = None) -> dict[str, Any]:
    import subprocess

    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def model_fingerprint(backend: LLMBackend | None, llm_config: Any) -> dict[str, Any]:
    """Name and sha256 (of config + weights) of the local model folder; the served name for remote backends."""
    out: dict[str, Any] = {"backend": llm_config.backend}
    folder: Path | None = None
    if backend is not None and getattr(backend, "model_dir", None):
        folder = Path(backend.model_dir)  # type: ignore[attr-defined]
    elif llm_config.backend == "transformers":
        from agent.llm.model_files import ensure_llm_model

        folder = Path(llm_config.model_path) if llm_config.model_path else ensure_llm_model()
    if backend is not None:
        out["model"] = backend.model_name
    if folder is not None and folder.exists():
        digest = hashlib.sha256()
        for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
            digest.update(f.name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):  # type: ignore[misc]
                    digest.update(block)
        out.update(model=out.get("model", folder.name), path=str(folder), sha256=digest.hexdigest()[:16])
    elif llm_config.backend == "openai":
        out.update(url=llm_config.url, served_model=llm_config.served_model)
    return out


def default_run_id(config: SuiteConfig, commit: str) -> str:
    return f"{config.catalog}-u{config.users}-s{config.seed}-{commit[:8]}"


def rerank_provenance(index: Index) -> dict[str, Any]:
    """The reranker configuration in use and the hashes of every prompt template the suite renders."""
    import prompts

    config = RerankConfig.load(index)
    dump = config.model_dump()
    versions = {name: dump.get(f"{key}_prompt", dump.get("prompt_version", "v1"))
                for name, key in (("rerank_score", "score"), ("rerank_generate", "generate"), ("explain", "explain"))}
    versions.update({"judge_rubric": "v1", "judge_pairwise": "v1"})
    hashes = {}
    for name, version in versions.items():
        try:
            t = prompts.load(name, str(version))
            hashes[t.id] = t.sha256
        except ValueError:
            hashes[f"{name}.{version}"] = "missing"
    return {"config": dump, "prompts": hashes}
