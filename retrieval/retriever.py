"""The retrieval seam: ``Retriever.retrieve(history, k, filters=None, query=None) -> list[Candidate]``.

Every retriever here is a linear blend of per-user min-max normalised source scores; a single-source baseline is
a blend with one weight. Implementations are chosen by name from :data:`RETRIEVERS`; "fused" is the learned fusion
(:mod:`retrieval.learned_fusion`, a subclass of the blend) where the index holds one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from retrieval.candidates import Candidate, SourceHit, UnknownItemsError
from retrieval.catalog import Catalog
from retrieval.filters import Filters
from retrieval.sources import Source, SourceQuery

logger = logging.getLogger(__name__)

RETRIEVERS = ("fused", "mostpop", "ease", "als", "sequential", "slit", "sasrec", "content")
QUERY_CONTENT_WEIGHT = 1.0  # the content source's least weight when a request carries free text


class Retriever(Protocol):
    def retrieve(self, history: Sequence[str], k: int, filters: Filters | None = None,
                 query: str | None = None) -> list[Candidate]: ...


def normalise(scores: Sequence[float]) -> np.ndarray:
    """Min-max to [0, 1] within one user's list (a single or constant list maps to 1)."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.size == 0:
        return arr
    lo, hi = arr.min(), arr.max()
    return np.ones_like(arr) if hi - lo <= 1e-12 else (arr - lo) / (hi - lo)


def blend(per_source: Mapping[str, list[tuple[int, float]]], weights: Mapping[str, float],
          k: int) -> list[tuple[int, float, list[SourceHit]]]:
    """Fuse source lists: sum of weight * normalised score; ties by catalogue position."""
    fused: dict[int, float] = {}
    hits: dict[int, list[tuple[str, int, float]]] = {}  # validated as SourceHit for the k kept only
    for name, ranked in per_source.items():
        weight = weights.get(name, 0.0)
        if not ranked:
            continue
        norm = normalise([s for _, s in ranked])
        for rank, ((pos, raw), value) in enumerate(zip(ranked, norm, strict=True), start=1):
            fused[pos] = fused.get(pos, 0.0) + weight * float(value)
            hits.setdefault(pos, []).append((name, rank, raw))
    order = sorted(fused, key=lambda p: (-fused[p], p))[:k]
    return [(pos, fused[pos], [SourceHit(source=n, rank=r, score=s) for n, r, s in hits[pos]]) for pos in order]


class BlendRetriever:
    """Retrieves from several sources and blends them with fixed weights."""

    def __init__(self, catalog: Catalog, sources: Mapping[str, Source], weights: Mapping[str, float],
                 popularity: np.ndarray, pool: int = 200) -> None:
        missing = set(weights) - set(sources)
        if missing:
            raise ValueError(f"weights name unknown sources {sorted(missing)}; sources: {sorted(sources)}")
        self.catalog = catalog
        self.sources = {n: s for n, s in sources.items() if weights.get(n, 0.0) > 0}
        self.weights = dict(weights)
        self.content = sources.get("content")
        self.pool = pool
        self.popularity = popularity.astype(np.float64)
        # catalogue positions by popularity, ties by position: the top-up order, sorted once
        self.popular_order = np.lexsort((np.arange(catalog.n_items), -self.popularity))

    def positions(self, history: Sequence[str]) -> list[int]:
        unknown = [i for i in history if not self.catalog.has_item(str(i))]
        if unknown:
            raise UnknownItemsError(unknown, self.catalog.name)
        return [self.catalog.item_index[str(i)] for i in history]

    def query(self, history: Sequence[str], filters: Filters | None, query: str | None) -> SourceQuery:
        positions = self.positions(history)
        if filters is not None and filters.is_empty():
            filters = None
        if filters is not None:
            filters = filters.canonical(self.catalog.all_genres)
            passes = filters.mask(self.catalog.genre_masks, self.catalog.years_by_pos)
        else:
            passes = np.ones(self.catalog.n_items, dtype=bool)
        allowed = passes.copy()
        allowed[positions] = False
        return SourceQuery(history=positions, allowed=allowed, filters=filters, text=query or None, passes=passes)

    def active(self, q: SourceQuery) -> tuple[dict[str, Source], dict[str, float]]:
        """The sources and weights that answer ``q``. Fusion weights are tuned on histories alone, so a caller's
        free text is heard through the content source even where that tuning gave it no weight."""
        if not q.text or self.content is None:
            return self.sources, self.weights
        weight = max(self.weights.get("content", 0.0), QUERY_CONTENT_WEIGHT)
        return {**self.sources, "content": self.content}, {**self.weights, "content": weight}

    def source_lists(self, q: SourceQuery, n: int) -> dict[str, list[tuple[int, float]]]:
        return {name: source.top(q, n) for name, source in self.active(q)[0].items()}

    def retrieve(self, history: Sequence[str], k: int, filters: Filters | None = None,
                 query: str | None = None) -> list[Candidate]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = self.query(history, filters, query)
        lists = self.source_lists(q, max(self.pool, k))
        fused = blend(lists, self.active(q)[1], k)
        if len(fused) < k:  # top up with popular items so callers get k when the filters allow it
            allowed = q.allowed.copy()
            allowed[[p for p, _, _ in fused]] = False
            order = self.popular_order
            extra = order[allowed[order]][: k - len(fused)]
            fused.extend((int(p), 0.0, []) for p in extra)
        return [Candidate(item_id=self.catalog.item_ids[p], score=s, sources=h) for p, s, h in fused]
