"""The retrieval seam: ``Retriever.retrieve(history, k, filters=None, query=None) -> list[Candidate]``.

Every retriever here is a linear blend of per-user min-max normalised source scores; a single-source baseline is
a blend with one weight. The fused blend has a cold-item path: items no one has interacted with are heard through
the content source with an extra weight (``FusionConfig.cold``), as no behaviour source can list them.
Implementations are chosen by name from :data:`RETRIEVERS`; "fused" is the learned fusion
(:mod:`retrieval.learned_fusion`, a subclass of the blend, without the cold-item path) where the index holds one.
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
          k: int, cold: float = 0.0, cold_items: np.ndarray | None = None) -> list[tuple[int, float, list[SourceHit]]]:
    """Fuse source lists: sum of weight * normalised score; ties by catalogue position. ``cold``: weight added to
    the content source's for the items of ``cold_items`` (a mask over positions: the items no one has interacted
    with, which no behaviour source can list). An item whose weight is 0 in every list that holds it is left out."""
    fused: dict[int, float] = {}
    hits: dict[int, list[tuple[str, int, float]]] = {}  # validated as SourceHit for the k kept only
    for name, ranked in per_source.items():
        weight = weights.get(name, 0.0)
        if not ranked:
            continue
        norm = normalise([s for _, s in ranked])
        boosted = cold_items if name == "content" and cold > 0 else None
        for rank, ((pos, raw), value) in enumerate(zip(ranked, norm, strict=True), start=1):
            w = weight + cold if boosted is not None and boosted[pos] else weight
            if w <= 0:
                continue
            fused[pos] = fused.get(pos, 0.0) + w * float(value)
            hits.setdefault(pos, []).append((name, rank, raw))
    order = sorted(fused, key=lambda p: (-fused[p], p))[:k]
    return [(pos, fused[pos], [SourceHit(source=n, rank=r, score=s) for n, r, s in hits[pos]]) for pos in order]


class BlendRetriever:
    """Retrieves from several sources and blends them with fixed weights.

    ``cold`` > 0 is the cold-item path: items with no interactions (``popularity`` 0), which no behaviour source
    can list, are heard through the content source with ``cold`` added to its weight, so a history-only request
    can be answered with a new item whose text matches the user, even where the content source's own weight is 0.
    """

    def __init__(self, catalog: Catalog, sources: Mapping[str, Source], weights: Mapping[str, float],
                 popularity: np.ndarray, pool: int = 200, cold: float = 0.0) -> None:
        missing = set(weights) - set(sources)
        if missing:
            raise ValueError(f"weights name unknown sources {sorted(missing)}; sources: {sorted(sources)}")
        if cold < 0:
            raise ValueError(f"the cold-item weight must be at least 0, got {cold}")
        self.catalog = catalog
        self.sources = {n: s for n, s in sources.items() if weights.get(n, 0.0) > 0}
        self.weights = dict(weights)
        self.content = sources.get("content")
        self.pool = pool
        self.popularity = popularity.astype(np.float64)
        self.cold_items = self.popularity == 0
        # the cold-item path runs only where there is a content source and an item it is for
        self.cold = float(cold) if self.content is not None and self.cold_items.any() else 0.0
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
        free text is heard through the content source even where that tuning gave it no weight; the cold-item
        path asks the content source too (with its own weight, maybe 0) when ``q`` allows a cold item."""
        if self.content is None:
            return self.sources, self.weights
        if q.text:
            weight = max(self.weights.get("content", 0.0), QUERY_CONTENT_WEIGHT)
            return {**self.sources, "content": self.content}, {**self.weights, "content": weight}
        if self.cold > 0 and "content" not in self.sources and bool((q.allowed & self.cold_items).any()):
            return {**self.sources, "content": self.content}, self.weights
        return self.sources, self.weights

    def source_lists(self, q: SourceQuery, n: int) -> dict[str, list[tuple[int, float]]]:
        return {name: source.top(q, n) for name, source in self.active(q)[0].items()}

    def retrieve(self, history: Sequence[str], k: int, filters: Filters | None = None,
                 query: str | None = None) -> list[Candidate]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = self.query(history, filters, query)
        lists = self.source_lists(q, max(self.pool, k))
        fused = blend(lists, self.active(q)[1], k, self.cold, self.cold_items)
        if len(fused) < k:  # top up with popular items so callers get k when the filters allow it
            allowed = q.allowed.copy()
            allowed[[p for p, _, _ in fused]] = False
            order = self.popular_order
            extra = order[allowed[order]][: k - len(fused)]
            fused.extend((int(p), 0.0, []) for p in extra)
        return [Candidate(item_id=self.catalog.item_ids[p], score=s, sources=h) for p, s, h in fused]
