"""The recommender service: retrieval, then (optionally) LLM reranking and explanations.

One object that the CLI, the HTTP API and the chat agent all call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from agent.explain import Explainer, Reason
from agent.llm.base import LLMBackend
from agent.rerank import RankInput, RerankConfig, Reranker, retrieval_answer
from agent.schemas import Mode, RecommendationAnswer
from retrieval.candidates import Candidate, UnknownItemsError
from retrieval.catalog import Catalog
from retrieval.filters import Filters
from retrieval.index import Index
from retrieval.item_text import item_text

logger = logging.getLogger(__name__)


class UnknownUserError(LookupError):
    def __init__(self, user_id: str, catalog: str) -> None:
        super().__init__(f"user '{user_id}' has no interactions in catalogue '{catalog}'")
        self.user_id = user_id

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Ranked:
    """A ranked answer and what its reasons are written from: the history and the candidates as ranked."""

    answer: RecommendationAnswer
    history: list[RankInput]
    candidates: list[RankInput]


@dataclass
class FreeItem:
    """A caller-supplied candidate that need not be in the catalogue."""

    id: str
    title: str
    text: str = ""


class RecommenderService:
    def __init__(self, index: Index, backend: LLMBackend | None = None, config: RerankConfig | None = None,
                 n_candidates: int | None = None) -> None:
        """``n_candidates``: how many candidates retrieval passes on (default: the reranker's window, else 20)."""
        self.index = index
        self.catalog: Catalog = index.catalog
        self.backend = backend
        self.reranker = Reranker(backend, config or RerankConfig.load(index)) if backend is not None else None
        self.n_candidates = n_candidates or (self.reranker.config.max_candidates if self.reranker else 20)
        self.retriever = index.retriever("fused")
        self.explainer = Explainer(backend, index)

    # --- lookups -------------------------------------------------------------------------------------------
    def user_history(self, user_id: str) -> list[str]:
        try:
            return self.catalog.user_history(str(user_id))
        except KeyError:
            raise UnknownUserError(str(user_id), self.catalog.name) from None

    def item(self, item_id: str) -> dict[str, object]:
        if not self.catalog.has_item(item_id):
            raise UnknownItemsError([item_id], self.catalog.name, field="item_id")
        return self.catalog.item(item_id)

    def search(self, query: str, k: int = 10, filters: Filters | None = None) -> list[dict[str, object]]:
        candidates = self.retriever.retrieve([], k=k, filters=filters, query=query) if query.strip() else []
        return [{**self.catalog.item(c.item_id), "score": c.score} for c in candidates]

    def rank_input(self, candidate: Candidate) -> RankInput:
        item = self.catalog.item(candidate.item_id)
        genres = list(item["genres"])  # type: ignore[call-overload]
        year = item["year"]
        return RankInput(item_id=candidate.item_id, title=str(item["title"]),
                         text=item_text(str(item["title"]), year if isinstance(year, int) else None, genres,
                                        str(item["description"])),
                         retrieval_score=candidate.score, sources=candidate.sources, genres=genres,
                         year=year if isinstance(year, int) else None)

    def history_inputs(self, history: Sequence[str]) -> list[RankInput]:
        return [self.rank_input(Candidate(item_id=i, score=0.0)) for i in history]

    # --- recommendation ------------------------------------------------------------------------------------
    def recommend(self, history: Sequence[str], k: int = 10, filters: Filters | None = None,
                  query: str | None = None, use_llm: bool = True, explain: bool = False, mode: Mode = "score",
                  exclude: Sequence[str] = (), deadline: float | None = None,
                  cancelled: Callable[[], bool] | None = None) -> RecommendationAnswer:
        """Top ``k`` for the history. ``exclude`` ids are never returned (besides the history itself)."""
        ranked = self.rank(history, k, filters, query, use_llm, mode, exclude, deadline)
        return self.explained(ranked, cancelled) if explain else ranked.answer

    def rank(self, history: Sequence[str], k: int = 10, filters: Filters | None = None, query: str | None = None,
             use_llm: bool = True, mode: Mode = "score", exclude: Sequence[str] = (),
             deadline: float | None = None) -> Ranked:
        """The ranked top ``k`` without reasons (:meth:`explained` or :meth:`reasons` add them)."""
        t0 = time.perf_counter()
        pool = max(self.n_candidates, k) + len(exclude)
        candidates = [c for c in self.retriever.retrieve(history, k=pool, filters=filters, query=query)
                      if c.item_id not in set(exclude)][: max(self.n_candidates, k)]
        retrieval_ms = (time.perf_counter() - t0) * 1000
        inputs = [self.rank_input(c) for c in candidates]
        history_inputs = self.history_inputs(history)
        if not use_llm or self.reranker is None or not inputs:
            answer = retrieval_answer(inputs, k)
        else:
            answer = self.reranker.rerank(history_inputs, inputs, k=k, mode=mode, deadline=deadline)
        answer.timings.retrieval_ms = round(retrieval_ms, 2)
        answer.timings.total_ms = round((time.perf_counter() - t0) * 1000, 2)
        return Ranked(answer, history_inputs, inputs)

    def rerank(self, history: Sequence[str], candidates: Sequence[str | FreeItem], k: int = 10,
               explain: bool = False, mode: Mode = "score", deadline: float | None = None,
               cancelled: Callable[[], bool] | None = None) -> RecommendationAnswer:
        """Rerank caller-given candidates (catalogue ids or free items); their given order is the retrieval
        order."""
        ranked = self.rank_given(history, candidates, k, mode, deadline)
        return self.explained(ranked, cancelled) if explain else ranked.answer

    def rank_given(self, history: Sequence[str], candidates: Sequence[str | FreeItem], k: int = 10,
                   mode: Mode = "score", deadline: float | None = None, use_llm: bool = True) -> Ranked:
        t0 = time.perf_counter()
        unknown = [c for c in candidates if isinstance(c, str) and not self.catalog.has_item(c)]
        if unknown:
            raise UnknownItemsError([str(u) for u in unknown], self.catalog.name, field="candidates")
        hist_set = set(history)
        inputs: list[RankInput] = []
        seen: set[str] = set()
        n = len(candidates)
        for i, c in enumerate(candidates):
            score = 1.0 - i / max(n, 1)
            if isinstance(c, str):
                if c in hist_set or c in seen:
                    continue
                ri = self.rank_input(Candidate(item_id=c, score=score))
            else:
                if c.id in seen:
                    continue
                ri = RankInput(item_id=c.id, title=c.title, text=item_text(c.title, None, (), c.text),
                               retrieval_score=score)
            seen.add(ri.item_id)
            inputs.append(ri)
        history_inputs = self.history_inputs(history)
        if not use_llm or self.reranker is None or not inputs:
            answer = retrieval_answer(inputs, k)
        else:
            answer = self.reranker.rerank(history_inputs, inputs, k=k, mode=mode, deadline=deadline)
        answer.timings.total_ms = round((time.perf_counter() - t0) * 1000, 2)
        return Ranked(answer, history_inputs, inputs)

    # --- explanations --------------------------------------------------------------------------------------
    def explained(self, ranked: Ranked, cancelled: Callable[[], bool] | None = None) -> RecommendationAnswer:
        """The ranked answer with a reason on every item (LLM-written where the LLM delivers, else templates)."""
        return self.explainer.explain(ranked.answer, ranked.history, ranked.candidates, cancelled)

    def reasons(self, ranked: Ranked, cancelled: Callable[[], bool] | None = None) -> Iterator[Reason]:
        """The items' reasons one by one as they are ready (see :meth:`agent.explain.Explainer.stream`)."""
        by_id = {c.item_id: c for c in ranked.candidates}
        items = [by_id[i.item_id] for i in ranked.answer.items if i.item_id in by_id]
        return self.explainer.stream(ranked.history, items, cancelled)


def build_service(catalog_name: str, use_llm: bool = True, backend: LLMBackend | None = None) -> RecommenderService:
    """Load (fetching MovieLens when needed) the catalogue, its index and, unless ``use_llm`` is False, the LLM
    backend chosen by ``RECAGENT_LLM``."""
    from retrieval.catalog_store import ensure_catalog
    from retrieval.index import load_index

    catalog = ensure_catalog(catalog_name)
    index = load_index(catalog)
    if use_llm and backend is None:
        from agent.llm.registry import make_backend

        backend = make_backend()
    return RecommenderService(index, backend=backend if use_llm else None)
