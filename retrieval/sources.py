"""Retrieval sources. Each returns its top items for a query as (catalogue position, raw score), best first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from retrieval.cf import CFModels
from retrieval.filters import Filters
from retrieval.vector_store import ItemVectorStore


@dataclass
class SourceQuery:
    history: list[int]  # catalogue positions, oldest first
    allowed: np.ndarray  # bool over positions: passes the filters and is not in the history
    filters: Filters | None = None
    text: str | None = None


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


def recency_weights(length: int, decay: float) -> np.ndarray:
    """Weight 1 for the latest item, ``decay`` for the one before, and so on."""
    return decay ** np.arange(length - 1, -1, -1, dtype=np.float64)


class PopularitySource:
    name = "mostpop"

    def __init__(self, cf: CFModels) -> None:
        self.scores = cf.popularity.astype(np.float64)

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        return top_of_dense(self.scores, query.allowed, n)


class EaseSource:
    name = "ease"

    def __init__(self, cf: CFModels) -> None:
        if cf.ease is None:
            raise ValueError("EASE was not fitted for this catalogue (too many items)")
        self.weights = cf.ease

    def top(self, query: SourceQuery, n: int) -> list[tuple[int, float]]:
        if not query.history:
            return []
        scores = self.weights[sorted(set(query.history))].sum(axis=0).astype(np.float64)
        return top_of_dense(scores, query.allowed, n)


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


class ContentSource:
    """Chroma nearest neighbours of the user's vector, blended with an embedded free-text query when one is
    given. The user's vector is the encoder over their history text when the index has a tuned encoder
    (``user_vector``), else the recency-weighted mean of their items' embeddings. A tuned encoder also brings a
    popularity prior (``prior``: its weight times log(1 + interactions), from the CF models in use) that
    re-ranks the over-fetched neighbours."""

    name = "content"

    def __init__(self, store: ItemVectorStore, item_vectors: np.ndarray, item_index: dict[str, int],
                 embed_text: Callable[[str], np.ndarray], decay: float = 0.9, query_weight: float = 1.0,
                 user_vector: Callable[[Sequence[int]], np.ndarray] | None = None,
                 prior: np.ndarray | None = None) -> None:
        self.store = store
        self.item_vectors = item_vectors
        self.item_index = item_index
        self.embed_text = embed_text
        self.decay = decay
        self.query_weight = query_weight
        self.user_vector = user_vector
        self.prior = prior  # per item, added to the cosine of the nearest neighbours (over-fetched to re-rank)

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
        where = query.filters.where() if query.filters else None
        fetch = n + len(set(query.history))
        if self.prior is not None:
            fetch += max(3 * n, PRIOR_OVERFETCH)
        hits = self.store.query(vec, fetch, where=where)
        out = []
        for item_id, sim in hits:
            pos = self.item_index.get(item_id)
            if pos is not None and query.allowed[pos]:
                out.append((pos, sim if self.prior is None else sim + float(self.prior[pos])))
        if self.prior is not None:
            out.sort(key=lambda h: (-h[1], h[0]))
        return out[:n]
