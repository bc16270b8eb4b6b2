"""`recagent eval rerank`: the LLM reranker over each user's retrieved top-20 under the leave-last-out protocol.

For every evaluated user the retriever (CF fitted only on what the part may see) yields 20 candidates; the
LLM scores them once (``score``) or ranks them in JSON (``generate``). From the same raw outputs we rank four
ways: final (alpha-blend), LLM only, retrieval order and a seeded random order. Alpha is tuned offline on
validation from the stored raw scores. The held-out target is used only to compute metrics afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from agent.llm.base import LLMBackend
from agent.rerank import RankInput, RerankConfig, Reranker
from agent.scoring import fuse
from agent.service import RecommenderService
from eval.metrics import bootstrap_ci, paired_bootstrap_diff
from retrieval.index import Index
from retrieval.splits import Case, Split

logger = logging.getLogger(__name__)
ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
ORDERS = ("final", "llm", "retrieval", "random")


@dataclass
class UserResult:
    user_id: str
    candidates: list[str]
    retrieval: list[float]
    llm: list[float] | None  # raw LLM scores per candidate (None when the LLM failed)
    target_pos: int | None  # index of the target among the candidates
    latency_s: float
    degraded: bool
    invalid: bool = False
    dropped_evidence: int = 0
    evidence_total: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_uncalibrated: list[float] | None = None  # score mode, one pass: the same scores before calibration


@dataclass
class PartResult:
    users: list[UserResult] = field(default_factory=list)


def ndcg_recall_at(order: Sequence[int], target_pos: int | None, k: int = 10) -> tuple[float, float]:
    if target_pos is None:
        return 0.0, 0.0
    for rank, idx in enumerate(order[:k], start=1):
        if idx == target_pos:
            return 1.0 / float(np.log2(rank + 1)), 1.0
    return 0.0, 0.0


def order_for(u: UserResult, kind: str, alpha: float, seed: int) -> list[int]:
    n = len(u.candidates)
    if kind == "retrieval" or (u.llm is None and kind in ("final", "llm")):
        return list(range(n))
    if kind == "random":
        rng = random.Random(f"{seed}:{u.user_id}")
        order = list(range(n))
        rng.shuffle(order)
        return order
    a = 1.0 if kind == "llm" else alpha
    _, fused = fuse(u.retrieval, u.llm, a)
    return [int(i) for i in fused]


def table(part: PartResult, alpha: float, seed: int, n_boot: int = 1000) -> dict[str, Any]:
    """Metrics of every order with bootstrap intervals, all users and users whose target was retrieved."""
    out: dict[str, Any] = {}
    per_order: dict[str, dict[str, np.ndarray]] = {}
    for kind in ORDERS:
        pairs = [ndcg_recall_at(order_for(u, kind, alpha, seed), u.target_pos) for u in part.users]
        nd = np.array([p[0] for p in pairs])
        rc = np.array([p[1] for p in pairs])
        per_order[kind] = {"ndcg@10": nd, "recall@10": rc}
    hit = np.array([u.target_pos is not None for u in part.users])
    for scope, mask in (("all", np.ones_like(hit)), ("target_retrieved", hit)):
        out[scope] = {}
        for kind, metrics in per_order.items():
            out[scope][kind] = {}
            for m, vals in metrics.items():
                v = vals[mask]
                lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
                out[scope][kind][m] = {"mean": float(v.mean()) if v.size else float("nan"), "lo": lo, "hi": hi}
        out[scope]["n_users"] = int(mask.sum())
    diff = {}
    for kind in ("final", "llm"):
        d, lo, hi = paired_bootstrap_diff(per_order[kind]["ndcg@10"], per_order["retrieval"]["ndcg@10"],
                                          n_boot=n_boot, seed=seed)
        diff[f"{kind}-retrieval ndcg@10"] = {"mean": d, "lo": lo, "hi": hi}
    out["paired_diff"] = diff
    return out


def tune_alpha(part: PartResult, seed: int) -> tuple[float, dict[float, float]]:
    scores = {}
    for a in ALPHAS:
        vals = [ndcg_recall_at(order_for(u, "final", a, seed), u.target_pos)[0] for u in part.users]
        scores[a] = float(np.mean(vals)) if vals else 0.0
    best = max(ALPHAS, key=lambda a: (scores[a], -a))  # ties prefer the smaller alpha
    return best, scores


def with_calibration(part: PartResult, bias: dict[int, np.ndarray], calibrate: bool) -> PartResult:
    """The same users with LLM scores calibrated (uncalibrated minus the label bias) or not."""
    out = PartResult()
    for u in part.users:
        llm = u.llm
        if u.llm_uncalibrated is not None:
            raw = np.asarray(u.llm_uncalibrated)
            llm = (raw - bias[len(raw)]).tolist() if calibrate else raw.tolist()
        out.users.append(dataclasses.replace(u, llm=llm))
    return out


def sample_cases(cases: Sequence[Case], users: int | None, seed: int) -> list[Case]:
    if users is None or users >= len(cases):
        return list(cases)
    rng = random.Random(seed)
    return sorted(rng.sample(list(cases), users), key=lambda c: c.user_id)


class RerankEvaluator:
    def __init__(self, index: Index, backend: LLMBackend, config: RerankConfig | None = None,
                 n_candidates: int | None = None) -> None:
        """``n_candidates``: the retrieved window reranked per user (default: the config's window)."""
        self.index = index
        self.backend = backend
        self.config = config or RerankConfig.load(index)
        n_candidates = n_candidates or self.config.max_candidates
        self.service = RecommenderService(index, backend=backend, config=self.config, n_candidates=n_candidates)
        self.reranker: Reranker = self.service.reranker  # type: ignore[assignment]
        self.n_candidates = n_candidates

    def candidates(self, split: Split, part: str, cases: Sequence[Case]) -> list[tuple[Case, list[RankInput]]]:
        cf = self.index.fit_cf(split.fit_histories(part))
        retriever = self.index.retriever("fused", cf=cf)
        out = []
        for case in cases:  # the target is never passed to retrieval or the LLM
            cands = retriever.retrieve(case.history, k=self.n_candidates)
            out.append((case, [self.service.rank_input(c) for c in cands]))
        return out

    def run_part(self, split: Split, part: str, cases: Sequence[Case], mode: str = "score",
                 progress: bool = True) -> PartResult:
        result = PartResult()
        pairs = self.candidates(split, part, cases)
        for case, cands in tqdm(pairs, desc=f"rerank {mode} ({part})", unit="user", disable=not progress):
            history = self.service.history_inputs(case.history)
            before = (self.backend.usage.prompt_tokens, self.backend.usage.completion_tokens)
            t0 = time.perf_counter()
            llm: list[float] | None
            uncalibrated: list[float] | None = None
            invalid = degraded = False
            dropped = total_evidence = 0
            trimmed = self.reranker.trim_history(history)
            try:
                if mode == "score" and self.config.scorer == "markers":  # a trained ranker: no calibration
                    llm = self.reranker.llm_scores(trimmed, cands).tolist()
                elif mode == "score" and self.config.perms == 1:
                    # one pass without calibration; the calibrated scores subtract the content-free prompt's
                    # label bias slot by slot, so both variants come from the same forward pass
                    uncal = self.reranker.llm_scores(trimmed, cands, calibrate=False)
                    cal = uncal - self.reranker.label_bias(len(cands))
                    llm = (cal if self.config.calibrate else uncal).tolist()
                    uncalibrated = uncal.tolist()
                elif mode == "score":
                    llm = self.reranker.llm_scores(trimmed, cands).tolist()
                else:
                    # the model writes the top 10 (what NDCG@10 reads); the rest follow in retrieval order
                    answer = self.reranker.rerank(history, cands, k=min(10, len(cands)), mode="generate", alpha=1.0)
                    degraded = answer.degraded
                    invalid = degraded
                    dropped = answer.dropped_evidence
                    total_evidence = sum(len(i.evidence) for i in answer.items) + dropped
                    rank_of = {it.item_id: it.rank for it in answer.items}
                    n = len(cands)
                    llm = None if degraded else [float(n - rank_of.get(c.item_id, n)) for c in cands]
            except Exception as exc:
                logger.warning("rerank eval failure user=%s error=%s", case.user_id, exc)
                llm, invalid, degraded = None, True, True
            latency = time.perf_counter() - t0
            ids = [c.item_id for c in cands]
            result.users.append(UserResult(
                user_id=case.user_id, candidates=ids, retrieval=[c.retrieval_score for c in cands], llm=llm,
                target_pos=ids.index(case.target) if case.target in ids else None, latency_s=latency,
                degraded=degraded, invalid=invalid, dropped_evidence=dropped, evidence_total=total_evidence,
                prompt_tokens=self.backend.usage.prompt_tokens - before[0],
                completion_tokens=self.backend.usage.completion_tokens - before[1], llm_uncalibrated=uncalibrated))
        return result

    def position_bias(self, split: Split, cases: Sequence[Case], settings: dict[str, dict[str, Any]],
                      positions: Sequence[int] | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
        """Move the validation target to each fixed slot (others keep retrieval order) and record how often the
        LLM puts it first, and its mean rank, per slot and per setting (calibration / permutations)."""
        pairs = [(c, cands) for c, cands in self.candidates(split, "validation", cases)
                 if c.target in [x.item_id for x in cands]]
        n = self.n_candidates
        positions = list(positions or range(n))
        out: dict[str, dict[str, Any]] = {}
        for name, kwargs in settings.items():
            top1 = np.zeros(len(positions))
            mean_rank = np.zeros(len(positions))
            for case, cands in tqdm(pairs, desc=f"position bias ({name})", unit="user", disable=not progress):
                if len(cands) < n:
                    continue
                trimmed = self.reranker.trim_history(self.service.history_inputs(case.history))
                target = next(c for c in cands if c.item_id == case.target)
                others = [c for c in cands if c.item_id != case.target]
                for j, p in enumerate(positions):
                    ordered = others[:p] + [target] + others[p:]
                    scores = self.reranker.llm_scores(trimmed, ordered, **kwargs)
                    rank = 1 + int((scores > scores[p]).sum())
                    top1[j] += rank == 1
                    mean_rank[j] += rank
            m = max(len(pairs), 1)
            out[name] = {"positions": [p + 1 for p in positions], "top1_rate": (top1 / m).tolist(),
                         "mean_rank": (mean_rank / m).tolist(), "users": len(pairs),
                         "spread_top1": float(np.max(top1 / m) - np.min(top1 / m)) if positions else 0.0}
        return out


def latency_summary(part: PartResult) -> dict[str, float]:
    lat = np.array([u.latency_s for u in part.users]) if part.users else np.zeros(1)
    toks = np.array([u.prompt_tokens for u in part.users]) if part.users else np.zeros(1)
    return {"p50_s": float(np.median(lat)), "p95_s": float(np.quantile(lat, 0.95)),
            "mean_prompt_tokens": float(toks.mean()),
            "mean_completion_tokens": float(np.mean([u.completion_tokens for u in part.users] or [0]))}


def rates(part: PartResult) -> dict[str, float]:
    n = max(len(part.users), 1)
    ev = sum(u.evidence_total for u in part.users)
    return {"invalid_output_rate": sum(u.invalid for u in part.users) / n,
            "degraded_rate": sum(u.degraded for u in part.users) / n,
            "dropped_evidence_rate": (sum(u.dropped_evidence for u in part.users) / ev) if ev else 0.0,
            "target_retrieved_rate": sum(u.target_pos is not None for u in part.users) / n}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Rerank evaluation: {report['catalog']} ({report['mode']} mode)", ""]
    lines += [f"- {k}: {v}" for k, v in report["notes"].items()] + [""]
    for part in ("validation", "test"):
        if part not in report["parts"]:
            continue
        p = report["parts"][part]
        lines += [f"## {part} (alpha = {report['alpha']})", ""]
        for scope in ("all", "target_retrieved"):
            lines += [f"### {scope.replace('_', ' ')} users (n = {p['metrics'][scope]['n_users']})", "",
                      "| order | NDCG@10 | Recall@10 |", "|---|---|---|"]
            for kind in ORDERS:
                cells = [f"{p['metrics'][scope][kind][m]['mean']:.4f} [{p['metrics'][scope][kind][m]['lo']:.3f}, "
                         f"{p['metrics'][scope][kind][m]['hi']:.3f}]" for m in ("ndcg@10", "recall@10")]
                lines.append(f"| {kind} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["Paired bootstrap differences (NDCG@10; relative to the retrieval order in parentheses):", ""]
        base = p["metrics"]["all"]["retrieval"]["ndcg@10"]["mean"]
        for name, d in p["metrics"]["paired_diff"].items():
            rel = f" ({d['mean'] / base:+.1%})" if base > 0 else ""
            lines.append(f"- {name}: {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]{rel}")
        lines += ["", f"Rates: {json.dumps({k: round(v, 4) for k, v in p['rates'].items()})}",
                  f"Latency per user: {json.dumps({k: round(v, 3) for k, v in p['latency'].items()})}", ""]
    if report.get("zero_shot"):
        zs = report["zero_shot"]
        lines += ["## The zero-shot model on the same users, same run", "",
                  f"Label scoring ({zs['prompt']}, {zs['candidates']} candidates, calibrate {zs['calibrate']}, "
                  f"alpha {zs['alpha']}).", "",
                  "| part | final NDCG@10 | LLM-only NDCG@10 | retrieval NDCG@10 | p50 s per user | "
                  "this run's p50 / zero-shot p50 |", "|---|---|---|---|---|---|"]
        for part in ("validation", "test"):
            if part in zs:
                z = zs[part]
                lines.append(f"| {part} | {z['final_ndcg@10']['mean']:.4f} | {z['llm_ndcg@10']['mean']:.4f} | "
                             f"{z['retrieval_ndcg@10']['mean']:.4f} | {z['latency']['p50_s']:.3f} | "
                             f"{z.get('p50_ratio_this_over_zero_shot', float('nan')):.2f} |")
        lines.append("")
    if report.get("calibration_choice"):
        lines += ["## Calibration chosen on validation", "",
                  "Best validation NDCG@10 of the final list (over alpha) with and without content-free "
                  f"calibration: {json.dumps(report['calibration_choice'])}.", ""]
    if report.get("alpha_grid"):
        lines += ["## Alpha tuned on validation (NDCG@10 of the final list)", "",
                  "| alpha | NDCG@10 |", "|---|---|"]
        lines += [f"| {a} | {v:.4f} |" for a, v in report["alpha_grid"].items()] + [""]
    if report.get("position_bias"):
        lines += ["## Position bias (validation users whose target was retrieved)", "",
                  "Top-1 rate of the target when placed at each slot; a flat curve means no position bias.", ""]
        for name, pb in report["position_bias"].items():
            lines.append(f"- {name} (n = {pb['users']}): spread of top-1 rate {pb['spread_top1']:.3f}; "
                         f"by slot: {', '.join(f'{x:.2f}' for x in pb['top1_rate'])}")
        lines.append("")
        if report.get("position_bias_plot"):
            lines += [f"![position bias]({report['position_bias_plot']})", ""]
    return "\n".join(lines) + "\n"
