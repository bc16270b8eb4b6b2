"""LLM-as-judge of explanations: a 1-5 rubric and pairwise comparisons, over any :class:`LLMBackend`.

The judge is configured apart from the recommender (``RECAGENT_JUDGE_LLM``, ``RECAGENT_JUDGE_MODEL``,
``RECAGENT_JUDGE_URL``; anything unset falls back to the main ``RECAGENT_LLM*`` configuration) so that another
model than the one judged can be used. Every output is constrained JSON (integer enums 1..5). Length control:
reasons are clipped to the same number of characters, the prompts say length is no merit, and pairwise
summaries report how often the longer explanation wins and the win rate over length-matched pairs.
Its validity is measured as agreement with the author-written reference labels on constructed cases in
``eval/data/judge_labels.jsonl``: explanations written and labelled by the evaluation's author to span good and
bad cases (one labeller, no inter-annotator figure), not judgements collected from users or outside raters.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator

import prompts
from agent.llm.base import LLMBackend, LLMError
from agent.llm.config import LLMConfig
from eval.metrics import bootstrap_ci, interval
from retrieval.item_text import item_text

logger = logging.getLogger(__name__)

CRITERIA = ("relevance", "faithfulness", "specificity", "persuasiveness")
LABELS_PATH = Path(__file__).parent / "data" / "judge_labels.jsonl"
Verdict = Literal["a", "b", "tie"]
# What the labels in LABELS_PATH are; every report and help text names them this way.
LABELS_DESCRIPTION = "author-written reference labels on constructed cases"
# Agreement thresholds below which the report calls the judge untrustworthy (per criterion).
MIN_SPEARMAN = 0.5
MIN_KAPPA = 0.4


class JudgeConfig(BaseModel):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    prompt_version: str = "v1"
    temperature: float = Field(default=0.0, ge=0.0)
    reason_chars: int = Field(default=200, ge=20, description="length control: reasons clipped to this")
    text_chars: int = Field(default=90, ge=10)
    history_items: int = Field(default=6, ge=1, description="newest history items shown to the judge")
    justification_chars: int = Field(default=60, ge=10)

    @classmethod
    def from_env(cls) -> JudgeConfig:
        """The main LLM configuration, overridden by the ``RECAGENT_JUDGE_*`` variables."""
        base = LLMConfig.from_env()
        env = os.environ
        update: dict[str, Any] = {}
        if env.get("RECAGENT_JUDGE_LLM"):
            update["backend"] = env["RECAGENT_JUDGE_LLM"]
        backend = update.get("backend", base.backend)
        if env.get("RECAGENT_JUDGE_MODEL"):
            update["served_model" if backend == "openai" else "model_path"] = env["RECAGENT_JUDGE_MODEL"]
        if env.get("RECAGENT_JUDGE_URL"):
            update["url"] = env["RECAGENT_JUDGE_URL"]
        return cls(llm=LLMConfig.model_validate({**base.model_dump(), **update}))

    def same_backend_as(self, other: LLMConfig) -> bool:
        return self.llm.model_dump() == other.model_dump()


class ExplanationInput(BaseModel):
    """One line of ``recagent eval judge --input``."""

    history: list[str]
    item_id: str
    reason: str
    evidence: list[str] = Field(default_factory=list)

    @field_validator("item_id", mode="before")
    @classmethod
    def _id(cls, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("history", "evidence", mode="before")
    @classmethod
    def _ids(cls, v: object) -> object:
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v


class RubricScores(BaseModel):
    relevance: int = Field(ge=1, le=5)
    faithfulness: int = Field(ge=1, le=5)
    specificity: int = Field(ge=1, le=5)
    persuasiveness: int = Field(ge=1, le=5)
    justification: str = ""

    def scores(self) -> dict[str, int]:
        return {c: int(getattr(self, c)) for c in CRITERIA}


class _PairOut(BaseModel):
    winner: Literal["A", "B", "tie"]
    justification: str = ""


@dataclass
class PairwiseResult:
    """``first``: verdict with system a shown as A; ``second``: with b shown as A, mapped back to a/b."""

    first: Verdict
    second: Verdict
    len_a: int = 0
    len_b: int = 0

    @property
    def consistent(self) -> bool:
        return self.first == self.second

    @property
    def winner(self) -> str:
        return self.first if self.consistent else "inconsistent"


@dataclass
class ItemInfo:
    item_id: str
    text: str


@dataclass
class Judge:
    backend: LLMBackend
    catalog: Any  # retrieval.catalog.Catalog (any object with has_item/item)
    config: JudgeConfig = field(default_factory=JudgeConfig)

    # --- prompt pieces -------------------------------------------------------------------------------------
    def item_info(self, item_id: str) -> ItemInfo:
        if not self.catalog.has_item(item_id):
            return ItemInfo(item_id, "unknown item (not in the catalogue)")
        it = self.catalog.item(item_id)
        year = it.get("year")
        text = item_text(str(it["title"]), year if isinstance(year, int) else None, list(it["genres"]),
                         str(it.get("description") or ""))
        return ItemInfo(item_id, prompts.clean_text(text, self.config.text_chars))

    def history_info(self, history: Sequence[str]) -> list[dict[str, str]]:
        known = [h for h in history if self.catalog.has_item(h)][-self.config.history_items:]
        return [{"item_id": i.item_id, "text": i.text} for i in map(self.item_info, known)]

    def clip(self, reason: str) -> str:
        return prompts.clean_text(reason, self.config.reason_chars)

    def _schema(self, props: dict[str, Any]) -> dict[str, Any]:
        props = {**props, "justification": {"type": "string", "minLength": 5,
                                            "maxLength": self.config.justification_chars}}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    def _call(self, name: str, schema: dict[str, Any], **variables: Any) -> dict[str, Any]:
        rendered = prompts.load(name, self.config.prompt_version).render(**variables)
        max_tokens = self.config.justification_chars // 2 + 8 * len(schema["properties"]) + 16
        raw = self.backend.generate_json(rendered.messages, schema, max_tokens=max_tokens,  # type: ignore[arg-type]
                                         temperature=self.config.temperature)
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LLMError(f"judge output is not JSON: {raw[:120]!r}") from exc
        if not isinstance(parsed, dict):
            raise LLMError(f"judge output is not an object: {raw[:120]!r}")
        return parsed

    # --- judging -------------------------------------------------------------------------------------------
    def rubric(self, exp: ExplanationInput) -> RubricScores:
        """Scores 1-5 on the four criteria; raises LLMError when the output does not validate."""
        score = {"type": "integer", "enum": [1, 2, 3, 4, 5]}
        schema = self._schema({c: dict(score) for c in CRITERIA})
        item = self.item_info(exp.item_id)
        evidence = ", ".join(self.item_info(e).text for e in exp.evidence) or "none"
        out = self._call("judge_rubric", schema, history=self.history_info(exp.history),
                         item={"item_id": item.item_id, "text": item.text}, reason=self.clip(exp.reason),
                         evidence=evidence)
        try:
            return RubricScores.model_validate(out)
        except ValidationError as exc:
            raise LLMError(f"judge scores do not validate: {exc.errors()[:1]}") from exc

    def _verdict(self, history: Sequence[str], item: ItemInfo, shown_a: str, shown_b: str) -> str:
        schema = self._schema({"winner": {"type": "string", "enum": ["A", "B", "tie"]}})
        out = self._call("judge_pairwise", schema, history=self.history_info(history),
                         item={"item_id": item.item_id, "text": item.text}, reason_a=shown_a, reason_b=shown_b)
        try:
            return _PairOut.model_validate(out).winner
        except ValidationError as exc:
            raise LLMError(f"judge verdict does not validate: {exc.errors()[:1]}") from exc

    def pairwise(self, history: Sequence[str], item_id: str, reason_a: str, reason_b: str) -> PairwiseResult:
        """Both orders; the verdict counts only when it names the same system in both."""
        a, b = self.clip(reason_a), self.clip(reason_b)
        item = self.item_info(item_id)
        v1 = self._verdict(history, item, a, b)
        v2 = self._verdict(history, item, b, a)
        first: Verdict = {"A": "a", "B": "b"}.get(v1, "tie")  # type: ignore[assignment]
        second: Verdict = {"A": "b", "B": "a"}.get(v2, "tie")  # type: ignore[assignment]
        return PairwiseResult(first=first, second=second, len_a=len(a), len_b=len(b))

    def metadata(self) -> dict[str, Any]:
        v = self.config.prompt_version
        return {"backend": self.backend.name, "model": self.backend.model_name,
                "temperature": self.config.temperature, "reason_chars": self.config.reason_chars,
                "prompts": {t.id: t.sha256 for t in (prompts.load("judge_rubric", v),
                                                     prompts.load("judge_pairwise", v))}}


# --- summaries -------------------------------------------------------------------------------------------------


def rubric_summary(scores: Sequence[Mapping[str, int]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(scores)}
    for c in CRITERIA:
        out[c] = interval(np.array([s[c] for s in scores], dtype=np.float64), n_boot, seed)
    return out


def pairwise_summary(results: Sequence[PairwiseResult], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Consistency rate; net preference for a (+1 a wins in both orders, -1 b does, else 0) with its interval;
    and the length checks."""
    n = len(results)
    net = np.array([1.0 if r.winner == "a" else -1.0 if r.winner == "b" else 0.0 for r in results])
    lo, hi = bootstrap_ci(net, n_boot=n_boot, seed=seed)
    decisive = [r for r in results if r.winner in ("a", "b") and r.len_a != r.len_b]
    longer_wins = [(r.winner == "a") == (r.len_a > r.len_b) for r in decisive]
    matched = [r for r in results if max(r.len_a, r.len_b) <= 1.25 * max(min(r.len_a, r.len_b), 1)]
    return {
        "n": n,
        "consistency_rate": (sum(r.consistent for r in results) / n) if n else float("nan"),
        "a_wins": sum(r.winner == "a" for r in results), "b_wins": sum(r.winner == "b" for r in results),
        "ties": sum(r.winner == "tie" for r in results),
        "inconsistent": sum(r.winner == "inconsistent" for r in results),
        "net_preference_a": {"mean": float(net.mean()) if n else float("nan"), "lo": lo, "hi": hi},
        "longer_wins_rate": (sum(longer_wins) / len(longer_wins)) if longer_wins else float("nan"),
        "length_matched": {"n": len(matched),
                           "a_win_rate": (sum(r.winner == "a" for r in matched) / len(matched)) if matched
                           else float("nan")},
    }


# --- validity: agreement with author-written reference labels on constructed cases --------------------------


def weighted_kappa(a: Sequence[int], b: Sequence[int], categories: Sequence[int] = (1, 2, 3, 4, 5)) -> float:
    """Cohen's kappa with quadratic weights (NaN when undefined, e.g. both raters constant)."""
    k = len(categories)
    pos = {c: i for i, c in enumerate(categories)}
    obs = np.zeros((k, k))
    for x, y in zip(a, b, strict=True):
        obs[pos[x], pos[y]] += 1
    n = obs.sum()
    if n == 0:
        return float("nan")
    obs /= n
    expected = np.outer(obs.sum(axis=1), obs.sum(axis=0))
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / (k - 1) ** 2
    denom = float((w * expected).sum())
    return float("nan") if denom == 0 else float(1.0 - (w * obs).sum() / denom)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def agreement(reference: Sequence[int], judge: Sequence[int], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Spearman (with a bootstrap interval), quadratic-weighted kappa and exact-match rate of the judge's scores
    against the reference labels (author-written labels on constructed cases)."""
    h, j = np.asarray(reference), np.asarray(judge)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(h) >= 3 else 0):
        idx = rng.integers(0, len(h), len(h))
        r = spearman(h[idx].tolist(), j[idx].tolist())
        if r == r:
            boots.append(r)
    lo, hi = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if boots else (
        float("nan"), float("nan"))
    return {"n": len(h), "spearman": spearman(h.tolist(), j.tolist()), "spearman_lo": lo, "spearman_hi": hi,
            "kappa_quadratic": weighted_kappa(h.tolist(), j.tolist()),
            "exact": float((h == j).mean()) if len(h) else float("nan"),
            "judge_distinct_scores": len(set(j.tolist()))}


def validity(labels: Sequence[Mapping[str, Any]], judged: Sequence[Mapping[str, int] | None],
             n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Agreement per criterion between the judge and the author-written reference labels on constructed cases
    (items the judge failed on are counted and left out), and a plain verdict that names what was agreed with."""
    pairs = [(lab["labels"], j) for lab, j in zip(labels, judged, strict=True) if j is not None]
    out: dict[str, Any] = {"n_labels": len(labels), "n_judged": len(pairs), "judge_failures": len(labels) - len(pairs)}
    ok = bool(pairs)
    for c in CRITERIA:
        ag = agreement([int(h[c]) for h, _ in pairs], [int(j[c]) for _, j in pairs], n_boot=n_boot, seed=seed)
        out[c] = ag
        sp, kp = ag["spearman"], ag["kappa_quadratic"]
        ok = ok and sp == sp and kp == kp and sp >= MIN_SPEARMAN and kp >= MIN_KAPPA
    out["trustworthy"] = ok
    out["thresholds"] = {"spearman": MIN_SPEARMAN, "kappa_quadratic": MIN_KAPPA}
    out["reference_labels"] = LABELS_DESCRIPTION
    if ok:
        out["verdict"] = (f"The judge agrees with the {LABELS_DESCRIPTION} on every criterion (Spearman >= "
                          f"{MIN_SPEARMAN}, weighted kappa >= {MIN_KAPPA}); its scores can be used, with their "
                          "intervals, as far as one author's labels on constructed cases can vouch for them.")
    else:
        weak = [c for c in CRITERIA if not (out[c]["spearman"] >= MIN_SPEARMAN
                                            and out[c]["kappa_quadratic"] >= MIN_KAPPA)]
        out["verdict"] = (f"NOT TRUSTWORTHY: the judge's agreement with the {LABELS_DESCRIPTION} is below the bar "
                          f"(Spearman >= {MIN_SPEARMAN} and weighted kappa >= {MIN_KAPPA}) on "
                          f"{', '.join(weak) or 'all criteria'}; treat its scores as noise, not as evidence.")
    return out


def load_labels(path: Path = LABELS_PATH) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            row["line"] = n
            rows.append(row)
    return rows


def read_explanations(lines: Sequence[str]) -> tuple[list[tuple[int, ExplanationInput]], list[tuple[int, str]]]:
    """Valid explanations and (line, error) for malformed lines; blank lines are skipped. Lines count from 1."""
    good: list[tuple[int, ExplanationInput]] = []
    bad: list[tuple[int, str]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            good.append((n, ExplanationInput.model_validate_json(line)))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "line"
            bad.append((n, f"{where}: {first.get('msg', 'invalid')}"))
    return good, bad
