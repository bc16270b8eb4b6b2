"""Retrieval sources. Each returns its top items for a query as (catalogue position, raw score), best first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from retrieval.cf import CFModels, recency_weights, slit_rows
from retrieval.filter_blocks import FilterBlocks
from retrieval.filters import Filters
from retrieval.sasrec import sasrec_scores
from retrieval.vector_store import ItemVectorStore


@dataclass
class SourceQuery:
    history: list[int]  # catalogue positions, oldest first
    allowed: np.ndarray  # bool over positions: passes the filters and is not in the history
    filters: Filters | None = None
    text: str | None = None
    passes: np.ndarray | None = None  # bool over positions: passes the filters, history or not (None: not known)


class Source(Protocol):
    name: str

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]: ...


def top_of_dense(scores: np.ndarray, allowed: np.ndarray, n: int,
                 positive_only: bool = False) -> list[tuple[int, float]]:
    """Best ``n`` allowed positions of a dense score vector; ties broken by position."""
    valid = allowed & np.isfinite(scores)
    if positive_only:
        valid &= scores > 0
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return []
    vals = scores[idx]
    if idx.size > n:
        part = np.argpartition(-vals, n - 1)[:n]
        idx, vals = idx[part], vals[part]
    order = np.lexsort((idx, -vals))
    return [(int(idx[i]), float(vals[i])) for i in order]


class PopularitySource:
    name = "mostpop"

    def __init__(self, cf: CFModels) -> None:
        self.scores = cf.popularity.astype(np.float64)

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        return top_of_dense(self.scores, query.allowed, n)


class EaseSource:
    """EASE's item-item weights summed over the user's history items, each weighted by how recently it was seen
    (``CFConfig.ease_decay`` to the power of the steps since its latest occurrence; 1: plain EASE)."""

    name = "ease"

    def __init__(self, cf: CFModels) -> None:
        if cf.ease is None:
            raise ValueError("EASE was not fitted for this catalogue (too many items)")
        self.weights = cf.ease
        self.decay = cf.config.ease_decay

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        if not query.history:
            return []
        if self.decay >= 1.0:
            scores = self.weights[sorted(set(query.history))].sum(axis=0).astype(np.float64)
        else:
            positions, weights = latest_recency(query.history, self.decay)
            scores = weights @ self.weights[positions].astype(np.float64)
        return top_of_dense(scores, query.allowed, n)


class SlitSource:
    """SLIT's next-item scores (:func:`retrieval.cf.fit_slit`): the recency-weighted latest history items times its
    learned item-to-next-item weights."""

    name = "slit"

    def __init__(self, cf: CFModels) -> None:
        if cf.slit is None:
            raise ValueError("SLIT was not fitted for this catalogue (it comes with EASE)")
        self.weights = cf.slit
        self.config = cf.config

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        if not query.history:
            return []
        prev, weights = slit_rows(query.history, self.config)
        scores = weights @ self.weights[prev].astype(np.float64)
        return top_of_dense(scores, query.allowed, n)


class SasrecSource:
    """The SASRec-style Transformer's next-item logits after the user's latest items (:mod:`retrieval.sasrec`)."""

    name = "sasrec"

    def __init__(self, cf: CFModels) -> None:
        if cf.sasrec is None:
            raise ValueError("SASRec was not trained for this index (its CF config gives it no epochs)")
        self.model = cf.sasrec
        self.n_items = len(cf.popularity)

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        if not query.history:
            return []
        scores = sasrec_scores(self.model, [query.history], self.n_items)[0].astype(np.float64)
        return top_of_dense(scores, query.allowed, n)


def latest_recency(history: Sequence[int], decay: float) -> tuple[np.ndarray, np.ndarray]:
    """The distinct items of ``history`` (ascending) and ``decay`` to the power of the steps from each one's latest
    occurrence to the end (the latest item: 1)."""
    positions, steps = np.unique(np.asarray(history, dtype=np.int64)[::-1], return_index=True)
    return positions, decay ** steps.astype(np.float64)


class SequentialSource:
    """Item-to-item transitions from the last few history items, the latest weighing most."""

    name = "sequential"

    def __init__(self, cf: CFModels) -> None:
        self.transitions = cf.transitions
        self.last = cf.config.seq_last
        self.decay = cf.config.seq_decay

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        recent = query.history[-self.last:]
        if not recent:
            return []
        weights = recency_weights(len(recent), self.decay)
        scores = np.asarray(self.transitions[recent].T @ weights).ravel()
        return top_of_dense(scores, query.allowed, n, positive_only=True)


PRIOR_OVERFETCH = 300  # extra neighbours fetched when a popularity prior re-ranks them
DENSE_MAX_ITEMS = 100_000  # up to this many items the content source scores them all in memory, not via Chroma
OVERFETCH_MIN_SHARE = 0.05  # via Chroma: below this share of items passing the filters, query with ``where``
OVERFETCH_SLACK = 1.25  # via Chroma: unfiltered neighbours fetched per one needed, over the share that passes


PRIOR_NEIGHBOURS = 10  # a never-seen item's prior: the mean log-count of this many nearest seen items (issue #12)
PRIOR_PAIRS_BUDGET = 50_000_000  # never-seen x seen similarities computed at most (about a second); past it, or
PRIOR_POOL_MAX = 50_000  # past this many seen items, a seeded sample of the seen items is searched


def popularity_prior(counts: np.ndarray, weight: float, item_vectors: np.ndarray | None = None,
                     neighbours: int = PRIOR_NEIGHBOURS) -> np.ndarray:
    """The content source's popularity prior per item: ``weight * log(1 + interactions)`` from the training
    ``counts``; an item with no interactions gets a guess from its text instead.

    An item the training data has never seen (a cold item, or one added to a live catalogue after CF was fitted)
    says nothing about its popularity; a prior of 0 would put it below every warm item with the same cosine and, at
    the weights chosen on validation, out of the top 50 altogether. Given ``item_vectors`` (the encoder's vectors of
    every item), it gets the mean log-count of its ``neighbours`` nearest items that have interactions (cosine):
    films like it in text are about as popular (:func:`neighbour_log_counts`). Without vectors it gets the median,
    a neutral value. Items with interactions keep ``weight * log(1 + n)``. With no interactions at all the prior is
    0 everywhere."""
    counts = np.asarray(counts, dtype=np.float64)
    log_counts = np.log1p(np.clip(counts, 0.0, None))
    seen = counts > 0
    if seen.any() and not seen.all():
        if item_vectors is None:
            guess = np.full(len(counts), float(np.median(log_counts[seen])))
        else:
            guess = neighbour_log_counts(item_vectors, log_counts, seen, neighbours)
        log_counts = np.where(seen, log_counts, guess)
    return weight * log_counts


def neighbour_log_counts(item_vectors: np.ndarray, log_counts: np.ndarray, seen: np.ndarray, neighbours: int,
                         budget: int = PRIOR_PAIRS_BUDGET, chunk_cells: int = 8_000_000) -> np.ndarray:
    """Per item (meaningful where ``~seen``): the mean of ``log_counts`` over its ``neighbours`` nearest seen items
    by cosine of ``item_vectors``. When never-seen x seen pairs exceed ``budget``, or the seen items
    :data:`PRIOR_POOL_MAX`, the neighbours come from a seeded sample of the seen items that fits (never fewer than
    ``neighbours``)."""
    if len(item_vectors) != len(log_counts):
        raise ValueError(f"{len(item_vectors)} item vectors for {len(log_counts)} items' counts")
    out = np.zeros(len(log_counts), dtype=np.float64)
    unseen = np.flatnonzero(~seen)
    pool = np.flatnonzero(seen)
    if pool.size == 0 or unseen.size == 0:
        return out
    most = max(neighbours, min(budget // len(unseen), PRIOR_POOL_MAX))
    if len(pool) > most:
        pool = np.sort(np.random.default_rng(0).choice(pool, size=most, replace=False))
    k = min(neighbours, len(pool))
    pool_unit = unit_rows(item_vectors[pool])
    pool_log_counts = log_counts[pool]
    chunk = max(1, chunk_cells // len(pool))  # similarity rows per block, about 32 MB of them
    for start in range(0, len(unseen), chunk):
        rows = unseen[start:start + chunk]
        sims = unit_rows(item_vectors[rows]) @ pool_unit.T
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[rows] = pool_log_counts[nearest].mean(axis=1)
    return out


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class ContentSource:
    """Nearest neighbours (cosine, over the item vectors Chroma holds) of the user's vector, blended with an
    embedded free-text query when one is given. The user's vector is the encoder over their history text when
    the index has a tuned encoder (``user_vector``), else the recency-weighted mean of their items' embeddings.
    A tuned encoder also brings a popularity prior (``prior``: its weight times log(1 + interactions), from the
    CF models in use, never-seen items guessed from their nearest seen items: :func:`popularity_prior`) that
    re-ranks the over-fetched neighbours.

    The neighbours are exact: a catalogue of up to ``dense_max_items`` items is scored in memory with one
    matrix product over the unit item vectors (the vectors Chroma holds; cosine, as Chroma's space), the filters
    applied as the query's mask, so a filtered request costs what an unfiltered one does. Larger catalogues ask
    Chroma for unfiltered neighbours; filtered ones are scored exactly over the block of items that pass the
    filter (``retrieval.filter_blocks``, gathered once per filter and kept), and only a filter that passes too
    many items to block asks Chroma: unfiltered neighbours over-fetched by the share of items that pass and
    masked, or, when too few of those pass, with the filters' ``where`` clause."""

    name = "content"
    overfetch_min_share = OVERFETCH_MIN_SHARE

    def __init__(self, store: ItemVectorStore, item_vectors: np.ndarray, item_index: dict[str, int],
                 embed_text: Callable[[str], np.ndarray], decay: float = 0.9, query_weight: float = 1.0,
                 user_vector: Callable[[Sequence[int]], np.ndarray] | None = None,
                 prior: np.ndarray | None = None, dense_max_items: int = DENSE_MAX_ITEMS,
                 blocks: FilterBlocks | None = None) -> None:
        self.store = store
        self.item_vectors = item_vectors
        self.item_index = item_index
        self.embed_text = embed_text
        self.decay = decay
        self.query_weight = query_weight
        self.user_vector = user_vector
        self.prior = prior  # per item, added to the cosine of the nearest neighbours (over-fetched to re-rank)
        self.unit: np.ndarray | None = None  # unit item vectors, when neighbours are scored in memory
        self.blocks: FilterBlocks | None = None  # per-filter vector blocks, when neighbours come from Chroma
        if len(item_vectors) <= dense_max_items:
            self.unit = unit_rows(item_vectors)
        else:
            self.blocks = blocks if blocks is not None else FilterBlocks(item_vectors)

    def profile(self, history: list[int], text: str | None) -> np.ndarray | None:
        vec = np.zeros(self.item_vectors.shape[1], dtype=np.float64)
        if history and self.user_vector is not None:
            vec += self.user_vector(history).astype(np.float64)
        elif history:
            w = recency_weights(len(history), self.decay)
            prof = (self.item_vectors[history] * w[:, None]).sum(axis=0)
            vec += prof / (np.linalg.norm(prof) or 1.0)
        if text:
            vec += self.query_weight * self.embed_text(text).astype(np.float64)
        norm = np.linalg.norm(vec)
        return None if norm == 0 else (vec / norm).astype(np.float32)

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        vec = self.profile(query.history, query.text)
        if vec is None:
            return []
        fetch = n + len(set(query.history))
        if self.prior is not None:
            fetch += max(3 * n, PRIOR_OVERFETCH)
        out = []
        for pos, sim in self.neighbours(vec, fetch, query):
            if query.allowed[pos]:
                out.append((pos, sim if self.prior is None else sim + float(self.prior[pos])))
        if self.prior is not None:
            out.sort(key=lambda h: (-h[1], h[0]))
        return out[:n]

    def neighbours(self, vec: np.ndarray, fetch: int, query: SourceQuery) -> list[tuple[int, float]]:
        """The ``fetch`` items nearest to ``vec`` that pass the query's filters (history items included, as a
        Chroma ``where`` query returns them), as (position, cosine similarity), best first."""
        passes = query.passes
        if passes is None and query.filters is None:
            passes = np.ones(len(self.item_vectors), dtype=bool)
        if self.unit is not None and passes is not None:
            scores = (self.unit @ vec.astype(np.float32)).astype(np.float64)
            return top_of_dense(scores, passes, fetch)
        if query.filters is None or passes is None:
            return self._positions(self.store.query(vec, fetch, where=query.filters.where() if query.filters else None))
        if self.blocks is not None:
            block = self.blocks.scores(query.filters.model_dump_json(), passes, vec)
            if block is not None:
                positions, scores = block  # positions ascending: ties broken by position, as everywhere
                return [(int(positions[i]), s) for i, s in top_of_dense(scores.astype(np.float64),
                                                                        np.ones(len(scores), dtype=bool), fetch)]
        share = float(passes.mean())
        if share == 0:
            return []
        if share >= self.overfetch_min_share:
            count = len(self.item_vectors)
            want = min(count, int(np.ceil(fetch / share * OVERFETCH_SLACK)) + 10)
            kept = [(pos, sim) for pos, sim in self._positions(self.store.query(vec, want)) if passes[pos]]
            if len(kept) >= fetch or want >= count:
                return kept[:fetch]
        return self._positions(self.store.query(vec, fetch, where=query.filters.where()))

    def _positions(self, hits: list[tuple[str, float]]) -> list[tuple[int, float]]:
        out = []
        for item_id, sim in hits:
            pos = self.item_index.get(item_id)
            if pos is not None:
                out.append((pos, sim))
        return out


class AlsSource:
    """Implicit-feedback ALS (catalogues past EASE's size): the user's factors solved from their history on the
    fly (one f x f system, as ``implicit``'s recalculate_user does), then item factors x user factors."""

    name = "als"

    def __init__(self, cf: CFModels) -> None:
        if cf.als_items is None:
            raise ValueError("ALS was not fitted for this catalogue (EASE was)")
        self.items = cf.als_items.astype(np.float32)
        self.alpha = cf.config.als_alpha
        f = self.items.shape[1]
        self.gram = (self.items.T @ self.items).astype(np.float64) + cf.config.als_regularization * np.eye(f)

    def user_factors(self, history: Sequence[int]) -> np.ndarray:
        seen = self.items[sorted(set(history))].astype(np.float64)
        a = self.gram + (self.alpha - 1.0) * (seen.T @ seen)
        b = self.alpha * seen.sum(axis=0)
        return np.linalg.solve(a, b).astype(np.float32)

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        if not query.history:
            return []
        scores = self.items @ self.user_factors(query.history)
        return top_of_dense(scores, query.allowed, n)
