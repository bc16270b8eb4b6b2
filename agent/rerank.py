"""LLM reranking and explanations over any candidate list.

Modes:
* ``score``: one forward pass per permutation. With the zero-shot model (scorer ``labels``) the label letters'
  log-probabilities rank every candidate; position bias is reduced by averaging over permutations and by
  calibrating against a content-free prompt. With a trained ranker (scorer ``markers``, ``recagent train
  ranker``) each candidate line ends in a marker token, and the log-odds of the marker after each line is that
  candidate's score (the same computation as in training); one pass scores the whole window (up to 100
  candidates), presented as the ranker was trained: in retrieval order (``rerank_trained.v2``) or in a seeded
  shuffled order with each line naming its retrieval rank (``v1``).
* ``generate``: the model lists the candidates. ``letters`` (the default style): it writes their letters one per
  line, each step a score pass restricted to the letters not yet written, so it cannot repeat one. ``json``: one
  JSON list of candidate ids under a schema whose ids are an enum of the candidates (repeated ids are counted in
  ``raw_duplicates``, dropped, and the list completed in retrieval order).

Reasons are not written here: :mod:`agent.explain` writes them for the final list.

The final score blends per-user min-max normalised LLM and retrieval scores:
``alpha * llm + (1 - alpha) * retrieval``; ``alpha = 0`` reproduces the retrieval order exactly.
Any backend failure gets one retry, then the retrieval order with ``degraded=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

import prompts
from agent.llm.base import LLMBackend, LLMError, MarkerRequest, ScoreRequest
from agent.schemas import Mode, RecommendationAnswer, RecommendedItem
from agent.scoring import fuse, log_odds, minmax
from retrieval.candidates import SourceHit
from retrieval.item_text import without_year

if TYPE_CHECKING:
    from retrieval.index import Index

logger = logging.getLogger(__name__)
LABELS = string.ascii_uppercase
#: How a trained ranker's prompt presents the candidates: seeded shuffles (each line naming its retrieval rank) or
#: the retrieval order. A ranker is served in the order it was trained with.
TrainedOrder = Literal["shuffled", "retrieval"]
RERANK_FILE = "rerank.json"


@dataclass
class RankInput:
    """A candidate (or history item) as the reranker sees it."""

    item_id: str
    title: str
    text: str
    retrieval_score: float = 0.0
    sources: list[SourceHit] = field(default_factory=list)
    genres: list[str] = field(default_factory=list)
    year: int | None = None


class ModeConfig(BaseModel):
    alpha: float = Field(default=0.0, ge=0.0, le=1.0, description="weight of the LLM in the final score")
    tuned: bool = False


class TunedRerank(BaseModel):
    """What tuning stores with the index (everything else keeps the code's defaults)."""

    calibrate: bool = True
    modes: dict[str, ModeConfig] = Field(default_factory=dict)


class RerankConfig(BaseModel):
    scorer: Literal["labels", "markers"] = Field(default="labels", description="labels: the zero-shot model "
                                                 "picks a letter; markers: a trained ranker scores each line")
    ranker: str = Field(default="zero-shot", description="which ranker scores (reported in answers)")
    adapter: str | None = Field(default=None, description="folder of the trained ranker's LoRA adapter")
    trained_prompt: str = Field(default="v1", description="version of prompts/rerank_trained.*.jinja")
    trained_order: TrainedOrder = Field(default="shuffled", description="how a trained ranker's prompt presents "
                                        "the candidates (as it was trained)")
    marker: str = Field(default=" §", description="single token closing each candidate line (markers scorer)")
    score_prompt: str = Field(default="v3", description="version of prompts/rerank_score.*.jinja")
    generate_style: Literal["letters", "json"] = Field(
        default="letters", description="generate mode's listing. letters: the model writes the candidates' letters "
        "one per line, each step restricted to the letters not yet written (one short pass per letter over the "
        "prompt's KV cache; no repeats by construction); json: one JSON document of item ids under a schema "
        "(slower, and the model repeats ids)")
    list_prompt: str = Field(default="v1", description="version of prompts/rerank_list.*.jinja (letters)")
    generate_prompt: str = Field(default="v2", description="version of prompts/rerank_generate.*.jinja (json)")
    max_candidates: int = Field(default=20, ge=1, le=100, description="the rerank window: candidates past it "
                                "keep their retrieval order (the labels scorer takes at most 26)")
    generate_window: int = Field(default=20, ge=1, le=50, description="candidates a generate-mode prompt holds "
                                 "(letters: at most 26)")
    history_token_budget: int = Field(default=40, ge=16, description="history trimmed oldest-first to this")
    text_chars: int = Field(default=90, ge=10, description="item text cut to this many characters in prompts")
    score_years: bool = Field(default=False, description="keep the release year in score-prompt titles "
                              "(about 6 tokens each: the digits are single tokens)")
    perms: int = Field(default=1, ge=1, description="candidate orders averaged in score mode")
    calibrate: bool = Field(default=True, description="subtract a content-free prompt's label bias")
    retries: int = Field(default=1, ge=0)
    modes: dict[str, ModeConfig] = Field(default_factory=lambda: {"score": ModeConfig(), "generate": ModeConfig()})

    @model_validator(mode="after")
    def _letters_fit(self) -> RerankConfig:
        if self.generate_style == "letters" and self.generate_window > len(LABELS):
            raise ValueError(f"generate_window {self.generate_window}: the letters style takes at most "
                             f"{len(LABELS)} candidates (one letter each); use generate_style 'json' for more")
        return self

    def generate_prompt_id(self) -> str:
        """The prompt template generate mode uses (name.version)."""
        if self.generate_style == "letters":
            return f"rerank_list.{self.list_prompt}"
        return f"rerank_generate.{self.generate_prompt}"

    @classmethod
    def load(cls, index: Index, ranker: str | None = None) -> RerankConfig:
        """Defaults, with the tuned choices (per-mode alpha, calibration) that ``recagent eval rerank --tune``
        stored for the catalogue, then the catalogue's trained ranker when there is one (``ranker``: ``auto``,
        ``zero-shot`` or a folder; default ``RECAGENT_RANKER``, else ``auto``)."""
        from agent.ranker.artifact import resolve_ranker

        config = cls()
        tuned = cls.stored_tuning(index)
        config.calibrate = tuned.calibrate
        config.modes.update(tuned.modes)
        artifact = resolve_ranker(index.catalog.name, index.manifest.content_hash, ranker)
        if artifact is not None:
            config.use_trained(str(artifact.folder), artifact.name, artifact.provenance.prompt,
                               artifact.provenance.marker, artifact.provenance.choices.alpha,
                               artifact.provenance.choices.window, artifact.provenance.order)
        return config

    def use_trained(self, adapter: str | None, name: str, prompt: str, marker: str, alpha: float,
                    window: int, order: TrainedOrder = "shuffled") -> None:
        """Score with a trained ranker: its prompt, marker and adapter, with the alpha and window chosen for it
        on validation (no content-free calibration: the ranker was trained on these prompts)."""
        self.scorer = "markers"
        self.adapter = adapter
        self.ranker = name
        self.trained_prompt = prompt.rsplit(".", 1)[-1]
        self.trained_order = order
        self.marker = marker
        self.calibrate = False
        self.max_candidates = window
        self.modes["score"] = ModeConfig(alpha=alpha, tuned=True)

    @classmethod
    def stored_tuning(cls, index: Index) -> TunedRerank:
        """The zero-shot choices ``eval rerank --tune`` stored for the catalogue (defaults when none)."""
        path = cls.path(index)
        if path is None or not path.exists():
            return TunedRerank()
        return TunedRerank.model_validate(json.loads(path.read_text()))

    @staticmethod
    def path(index: Index) -> Path | None:
        """Where ``eval rerank --tune`` keeps the zero-shot choices: beside the catalogue's trained rankers under
        ``RECAGENT_HOME/rankers/``, outside the index folder, so that a re-index or an ingest keeps them."""
        from agent.ranker.artifact import rankers_dir

        return None if index.catalog.root is None else rankers_dir(index.catalog.name).with_name(
            f"{index.catalog.name}.{RERANK_FILE}")

    def window(self, mode: str) -> int:
        """Candidates a pass of ``mode`` reranks: the score window; generate mode at most its own
        (``generate_window``), so a trained ranker's larger score window does not widen it."""
        return self.max_candidates if mode == "score" else min(self.max_candidates, self.generate_window)

    def alpha(self, mode: str) -> float:
        return self.modes.get(mode, ModeConfig()).alpha


def retrieval_answer(candidates: Sequence[RankInput], k: int, degraded: bool = False, reason: str | None = None,
                     mode: Mode = "retrieval", model: str | None = None) -> RecommendationAnswer:
    """The retrieval order as an answer (no LLM, or the LLM failed)."""
    final, order = fuse([c.retrieval_score for c in candidates], None, 0.0)
    ret = minmax([c.retrieval_score for c in candidates])
    items = [_item(candidates[i], rank, float(final[i]), None, float(ret[i])) for rank, i in enumerate(order[:k], 1)]
    return RecommendationAnswer(items=items, model=model, mode=mode, degraded=degraded, reason=reason)


def _item(c: RankInput, rank: int, score: float, llm: float | None, ret: float) -> RecommendedItem:
    return RecommendedItem(item_id=c.item_id, title=c.title, rank=rank, score=round(score, 6),
                           llm_score=None if llm is None else round(llm, 6), retrieval_score=round(ret, 6),
                           sources=c.sources, genres=c.genres, year=c.year)


def _seed(history: Sequence[RankInput], candidates: Sequence[RankInput]) -> int:
    key = "|".join(h.item_id for h in history) + "#" + "|".join(c.item_id for c in candidates)
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def permutations(n: int, count: int, seed: int) -> list[list[int]]:
    """Identity first, then reversed, then seeded shuffles."""
    perms = [list(range(n))]
    if count > 1:
        perms.append(list(reversed(range(n))))
    rng = random.Random(seed)
    while len(perms) < count:
        p = list(range(n))
        rng.shuffle(p)
        perms.append(p)
    return perms[:count]


class Reranker:
    def __init__(self, backend: LLMBackend, config: RerankConfig | None = None) -> None:
        self.backend = backend
        self.config = config or RerankConfig()
        self._bias: dict[int, np.ndarray] = {}
        self._token_counts: dict[str, int] = {}
        self.dropped_evidence_total = 0

    # --- prompt pieces -------------------------------------------------------------------------------------
    def _text(self, item: RankInput, detailed: bool = False) -> str:
        """Item text for prompts: the bare title for the compact score prompt (its year only with
        ``score_years``); with ``detailed`` the title, year and genres, so written reasons can refer to them.
        Free items without a title use their text."""
        if detailed and item.genres:
            return prompts.clean_text(f"{item.title} ({', '.join(item.genres[:3])})", self.config.text_chars)
        if item.title and not detailed and not self.config.score_years:
            text = prompts.clean_text(without_year(item.title), self.config.text_chars)
        else:
            text = prompts.clean_text(item.title or item.text, self.config.text_chars)
        return text.replace(self.config.marker.strip(), "") if self.config.scorer == "markers" else text

    def _tokens(self, text: str) -> int:
        """Prompt tokens of one history line (cached); an estimate when the backend cannot count."""
        if text not in self._token_counts:
            try:
                self._token_counts[text] = self.backend.count_tokens(text) + 3
            except Exception as exc:  # an unreachable backend must not break trimming (nor be cached)
                logger.debug("count_tokens failed error=%s", exc)
                return len(text) // 3 + 3
        return self._token_counts[text]

    def trim_history(self, history: Sequence[RankInput]) -> list[RankInput]:
        """Newest items that fit the token budget, returned oldest first."""
        kept: list[RankInput] = []
        used = 0
        for item in reversed(history):
            cost = self._tokens(self._text(item))
            if used + cost > self.config.history_token_budget and kept:
                break
            kept.append(item)
            used += cost
        return list(reversed(kept))

    def score_request(self, history: Sequence[RankInput], ordered: Sequence[RankInput]) -> ScoreRequest:
        tpl = prompts.load("rerank_score", self.config.score_prompt)
        rendered = tpl.render(
            history=[{"text": self._text(h)} for h in history],
            candidates=[{"label": LABELS[i], "text": self._text(c)} for i, c in enumerate(ordered)],
        )
        return ScoreRequest(messages=rendered.messages, answer_prefix=rendered.answer_prefix,  # type: ignore[arg-type]
                            labels=list(LABELS[: len(ordered)]))

    def marker_request(self, history: Sequence[RankInput], candidates: Sequence[RankInput],
                       order: Sequence[int]) -> MarkerRequest:
        """The trained ranker's prompt: candidates (given in retrieval order) presented in ``order``, each line
        with its retrieval rank, bare title and two-digit year, closed by the marker token."""
        tpl = prompts.load("rerank_trained", self.config.trained_prompt)
        lines = [{"rank": i + 1, "text": self._text(candidates[i]), "year": _two_digit_year(candidates[i].year)}
                 for i in order]
        rendered = tpl.render(history=[{"text": self._text(h)} for h in history], candidates=lines,
                              marker=self.config.marker)
        return MarkerRequest(messages=rendered.messages, marker=self.config.marker,  # type: ignore[arg-type]
                             expected=len(order), adapter=self.config.adapter)

    def warm_up(self) -> None:
        """Load the trained ranker now (one tiny pass) rather than on the first request; failures are logged and
        requests then degrade as usual."""
        if self.config.scorer != "markers":
            return
        probe = RankInput(item_id="", title="N/A", text="N/A")
        try:
            self.marker_scores([probe], [probe, probe])
        except Exception as exc:
            logger.warning("trained ranker warm-up failed adapter=%s error=%s", self.config.adapter, exc)

    @property
    def biases(self) -> dict[int, np.ndarray]:
        """Content-free label biases computed so far, by number of candidates."""
        return self._bias

    def label_bias(self, n: int) -> np.ndarray:
        """Label log-probs for a content-free prompt with ``n`` candidates (calibration)."""
        if n not in self._bias:
            blank = RankInput(item_id="", title="N/A", text="N/A")
            req = self.score_request([blank], [blank] * n)
            self._bias[n] = np.asarray(self.backend.score_labels(req), dtype=np.float64)
        return self._bias[n]

    # --- modes ---------------------------------------------------------------------------------------------
    def llm_scores(self, history: Sequence[RankInput], candidates: Sequence[RankInput],
                   perms: int | None = None, calibrate: bool | None = None) -> np.ndarray:
        """Mean (calibrated) label log-probability of each candidate over ``perms`` orders."""
        perms = perms or self.config.perms
        n = len(candidates)
        if self.config.scorer == "markers":
            return self.marker_scores(history, candidates, perms)
        if n > len(LABELS):
            raise ValueError(f"the label scorer takes at most {len(LABELS)} candidates, got {n}")
        calibrate = self.config.calibrate if calibrate is None else calibrate
        bias = self.label_bias(n) if calibrate else np.zeros(n)
        orders = permutations(n, perms, _seed(history, candidates))
        requests = [self.score_request(history, [candidates[i] for i in order]) for order in orders]
        results = self.backend.score_labels_batch(requests)
        total = np.zeros(n)
        for order, logps in zip(orders, results, strict=True):
            if len(logps) != n or not np.all(np.isfinite(logps)):
                raise LLMError(f"backend returned {len(logps)} label scores for {n} candidates")
            for slot, cand in enumerate(order):
                total[cand] += logps[slot] - bias[slot]
        return total / len(orders)

    def marker_scores(self, history: Sequence[RankInput], candidates: Sequence[RankInput],
                      perms: int = 1) -> np.ndarray:
        """The trained ranker's mean marker log-odds per candidate over ``perms`` seeded shuffles."""
        n = len(candidates)
        orders = self.marker_orders(history, candidates, perms)
        results = self.backend.score_markers_batch([self.marker_request(history, candidates, o) for o in orders])
        total = np.zeros(n)
        for order, logps in zip(orders, results, strict=True):
            if len(logps) != n or not np.all(np.isfinite(logps)):
                raise LLMError(f"backend returned {len(logps)} marker scores for {n} candidates")
            odds = log_odds(logps)
            for slot, cand in enumerate(order):
                total[cand] += odds[slot]
        return total / len(orders)

    def marker_orders(self, history: Sequence[RankInput], candidates: Sequence[RankInput],
                      perms: int) -> list[list[int]]:
        """Presentation orders of the trained ranker's prompt, as it was trained: the retrieval order (one pass
        whatever ``perms``), or seeded shuffles, each line naming its retrieval rank."""
        if self.config.trained_order == "retrieval":
            return [list(range(len(candidates)))]
        rng = random.Random(_seed(history, candidates))
        orders = []
        for _ in range(perms):
            order = list(range(len(candidates)))
            rng.shuffle(order)
            orders.append(order)
        return orders

    # --- public --------------------------------------------------------------------------------------------
    def rerank(self, history: Sequence[RankInput], candidates: Sequence[RankInput], k: int = 10,
               mode: Mode = "score", deadline: float | None = None,
               alpha: float | None = None) -> RecommendationAnswer:
        t0 = time.perf_counter()
        seen = {h.item_id for h in history}
        everything = [c for c in candidates if c.item_id not in seen]
        candidates = everything[:self.config.window(mode)]
        tail = everything[len(candidates): max(k, len(candidates))]
        k = min(k, len(candidates))
        answer = self._rerank_window(history, candidates, k, mode, deadline, alpha, t0)
        answer.ranker = self.config.ranker if mode == "score" else "zero-shot"
        answer.reranked = 0 if answer.degraded else len(candidates)
        if tail:
            _append_tail(answer, tail)
        if len(everything) > len(candidates):
            shown = f"; ranks {len(candidates) + 1}-{len(answer.items)} here" if tail else ""
            answer.note = (f"the LLM ranked the first {len(candidates)} of {len(everything)} candidates; the other "
                           f"{len(everything) - len(candidates)} follow them in retrieval order, without an LLM "
                           f"score{shown}")
        return answer

    def _rerank_window(self, history: Sequence[RankInput], candidates: list[RankInput], k: int, mode: Mode,
                       deadline: float | None, alpha: float | None, t0: float) -> RecommendationAnswer:
        trimmed = self.trim_history(history)
        alpha = self.config.alpha(mode) if alpha is None else alpha
        attempts = self.config.retries + 1
        last_error = ""
        for attempt in range(attempts):
            if deadline is not None and time.monotonic() > deadline:
                last_error = "deadline exceeded"
                break
            try:
                if mode == "score":
                    answer = self._score_answer(trimmed, candidates, k, alpha)
                elif mode == "generate":
                    answer = self._generate_answer(trimmed, candidates, k, alpha)
                else:
                    raise ValueError(f"unknown mode '{mode}' (choose score or generate)")
                answer.timings.llm_ms = round((time.perf_counter() - t0) * 1000, 2)
                return answer
            except ValueError:
                raise
            except Exception as exc:  # backend failures of any kind degrade, never propagate
                last_error = f"{type(exc).__name__}: {exc}"[:300]
                logger.warning("llm rerank failed attempt=%d mode=%s error=%s", attempt + 1, mode, last_error)
        answer = retrieval_answer(candidates, k, degraded=True, reason=f"LLM failed: {last_error}",
                                  mode=mode, model=self.backend.model_name)
        answer.timings.llm_ms = round((time.perf_counter() - t0) * 1000, 2)
        return answer

    def _score_answer(self, history: Sequence[RankInput], candidates: Sequence[RankInput], k: int,
                      alpha: float) -> RecommendationAnswer:
        llm = self.llm_scores(history, candidates)
        final, order = fuse([c.retrieval_score for c in candidates], llm.tolist(), alpha)
        llm_n, ret_n = minmax(llm), minmax([c.retrieval_score for c in candidates])
        items = [_item(candidates[i], r, float(final[i]), float(llm_n[i]), float(ret_n[i]))
                 for r, i in enumerate(order[:k], 1)]
        return RecommendationAnswer(items=items, model=self.backend.model_name, mode="score")

    def _generate_answer(self, history: Sequence[RankInput], candidates: Sequence[RankInput], k: int,
                         alpha: float) -> RecommendationAnswer:
        raw = self._listing(history, candidates, k)
        by_id = {c.item_id: i for i, c in enumerate(candidates)}
        known = [by_id[i] for i in raw if i in by_id]  # the grammar forbids unknown ids; repeats it cannot
        order = list(dict.fromkeys(known))
        duplicates = len(known) - len(order)
        order += [i for i in range(len(candidates)) if i not in set(order)]  # left out: retrieval order
        n = len(candidates)
        llm = np.zeros(n)
        for rank, i in enumerate(order):
            llm[i] = (n - rank) / n
        final, fused_order = fuse([c.retrieval_score for c in candidates], llm.tolist(), alpha)
        llm_n, ret_n = minmax(llm), minmax([c.retrieval_score for c in candidates])
        items = [_item(candidates[i], r, float(final[i]), float(llm_n[i]), float(ret_n[i]))
                 for r, i in enumerate(fused_order[:k], 1)]
        return RecommendationAnswer(items=items, model=self.backend.model_name, mode="generate",
                                    raw_duplicates=duplicates)

    def _listing(self, history: Sequence[RankInput], candidates: Sequence[RankInput], k: int) -> list[str]:
        """The model's raw list of ``k`` candidate ids, in the configured ``generate_style``."""
        if self.config.generate_style == "letters":
            return self._letter_listing(history, candidates, k)
        return self._json_listing(history, candidates, k)

    def _letter_listing(self, history: Sequence[RankInput], candidates: Sequence[RankInput], k: int) -> list[str]:
        """The candidates' letters as the model writes them, one per line: each letter is the model's most likely
        next token among the letters not yet written (a score pass whose prompt is the previous one plus one
        line, so backends with a prefix cache compute two new tokens per step)."""
        n = len(candidates)  # at most len(LABELS): the config's window check
        rendered = prompts.load("rerank_list", self.config.list_prompt).render(
            history=[{"text": self._text(h)} for h in history],
            candidates=[{"label": LABELS[i], "text": self._text(c)} for i, c in enumerate(candidates)],
            k=min(k, n))
        chosen: list[int] = []
        for _ in range(min(k, n)):
            taken = set(chosen)
            left = [i for i in range(n) if i not in taken]
            written = "".join(f"{LABELS[i]}\n" for i in chosen)
            logps = self.backend.score_labels(ScoreRequest(messages=rendered.messages,  # type: ignore[arg-type]
                                                           answer_prefix=rendered.answer_prefix + written,
                                                           labels=[LABELS[i] for i in left]))
            if len(logps) != len(left) or not np.all(np.isfinite(logps)):
                raise LLMError(f"backend returned {len(logps)} label scores for {len(left)} letters")
            chosen.append(left[int(np.argmax(logps))])
        return [candidates[i].item_id for i in chosen]

    def _json_listing(self, history: Sequence[RankInput], candidates: Sequence[RankInput], k: int) -> list[str]:
        """The model's raw list of ``k`` candidate ids (JSON under an enum schema; may repeat ids)."""
        tpl = prompts.load("rerank_generate", self.config.generate_prompt)
        rendered = tpl.render(history=[{"item_id": h.item_id, "text": self._text(h, True)} for h in history],
                              candidates=[{"item_id": c.item_id, "text": self._text(c, True)} for c in candidates],
                              k=k)
        schema = {"type": "object", "properties": {"ranking": {
            "type": "array", "items": {"type": "string", "enum": [c.item_id for c in candidates]},
            "minItems": k, "maxItems": k}}, "required": ["ranking"], "additionalProperties": False}
        max_tokens = k * 12 + 16
        raw = self.backend.generate_json(rendered.messages, schema, max_tokens=max_tokens)  # type: ignore[arg-type]
        try:
            ids = json.loads(raw)["ranking"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise TypeError("ranking is not a list of ids")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LLMError(f"invalid JSON from the model: {exc}; output starts {raw[:120]!r}") from exc
        return list(ids)


def _two_digit_year(year: int | None) -> str:
    return "" if year is None else f" {year % 100:02d}"


def _append_tail(answer: RecommendationAnswer, tail: Sequence[RankInput]) -> None:
    """Candidates past the rerank window follow the ranked ones in their retrieval order, unscored by the LLM:
    never a silent cut."""
    start = len(answer.items)
    for rank, c in enumerate(tail, start + 1):
        answer.items.append(_item(c, rank, 0.0, None, 0.0))


__all__ = ["RankInput", "RerankConfig", "Reranker", "fuse", "retrieval_answer"]
