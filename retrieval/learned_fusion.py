"""Learned fusion: a LightGBM ranker over what the sources know about each candidate.

The linear fusion (:func:`retrieval.retriever.blend`) adds fixed multiples of per-user min-max scores; it cannot
trust a source more where it is sure, nor use what is known about the user and the item beside the scores. The
learned fusion scores every candidate any source lists from these features (:data:`BASE_FEATURES` and, per
source, its normalised score and rank):

- each source's min-max normalised score (-1 where it did not list the item) and log rank (its rank among the
  items that source listed; :data:`ABSENT_RANK` where it did not);
- the linear fusion's score under the tuned weights (the learned model starts from it);
- the item's log popularity and the user's log history length;
- how the item fits the user's recent genres (cosine with the genre profile of the last :data:`RECENT` items) and
  years (the gap to their median year, signed and absolute).

It is trained on behaviour data only (``eval.retrieval_eval.fit_learned``: examples cut from the training part of
each history, with CF fitted without each example's own future), kept only where it beats the linear fusion on
validation, and stored in the index manifest as LightGBM's model text, so that it survives a rebuild as the weights
do. A request with free text is ranked by the linear fusion (the ranker was not trained on text queries).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from retrieval.candidates import Candidate, SourceHit
from retrieval.catalog import Catalog
from retrieval.filters import Filters
from retrieval.retriever import BlendRetriever, normalise
from retrieval.sources import Source

logger = logging.getLogger(__name__)

RECENT = 20  # the latest history items that make the user's genre and year profile
ABSENT_SCORE = -1.0
ABSENT_RANK = 10_000
BASE_FEATURES = ("linear", "log_popularity", "log_history", "genre_fit", "year_gap", "abs_year_gap")


class LearnedFusionParams(BaseModel):
    """How the ranker is trained (LightGBM's LGBMRanker) and on how many cuts of each training history. Defaults
    chosen on ML-100k validation NDCG@10 among cuts 4 / 8 and min_child_samples 200 / 50 (.1218, .1222, .1238,
    .1271; the tuned weights: .1241)."""

    cuts: int = Field(default=8, ge=1, le=20, description="examples per user: the last `cuts` training items, each "
                      "predicted from the items before it with CF fitted without it")
    objective: str = Field(default="rank_xendcg", description="LightGBM ranking objective")
    n_estimators: int = Field(default=300, ge=1)
    learning_rate: float = Field(default=0.05, gt=0)
    num_leaves: int = Field(default=7, ge=2)
    min_child_samples: int = Field(default=50, ge=1)
    seed: int = 0


class LearnedFusion(BaseModel):
    """A trained fusion ranker: its LightGBM model text, the sources and linear weights its features name, and
    what it was measured at on validation against the linear fusion."""

    sources: list[str]
    linear_weights: dict[str, float]
    model: str = Field(repr=False, description="LightGBM model text (Booster.model_to_string)")
    params: LearnedFusionParams = Field(default_factory=LearnedFusionParams)
    trained_on: str = ""
    validation: dict[str, float] = Field(default_factory=dict, description="validation metrics of the ranker "
                                         "trained on the cuts alone, and of the linear fusion, on the same users")
    examples: int = 0

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.sources)

    @cached_property
    def booster(self) -> Any:
        import lightgbm as lgb

        return lgb.Booster(model_str=self.model)

    def score(self, features: np.ndarray) -> np.ndarray:
        if features.shape[0] == 0:
            return np.zeros(0)
        return np.asarray(self.booster.predict(features, num_threads=1), dtype=np.float64)


def feature_names(sources: Sequence[str]) -> list[str]:
    return [*BASE_FEATURES, *(f"{s}_score" for s in sources), *(f"{s}_log_rank" for s in sources)]


@dataclass(frozen=True)
class ItemSide:
    """Per-item arrays the features read: unit genre rows, years (missing: the median) and log popularity."""

    genres: np.ndarray  # items x genres, rows of unit length (zero rows for items without genres)
    years: np.ndarray
    log_popularity: np.ndarray

    @classmethod
    def of(cls, catalog: Catalog, popularity: np.ndarray) -> ItemSide:
        genres = catalog.genre_matrix.T.astype(np.float32)
        genres /= np.maximum(np.linalg.norm(genres, axis=1, keepdims=True), 1e-9)
        years = catalog.years_by_pos.astype(np.float32)
        known = ~np.isnan(years)
        years = np.where(known, years, np.median(years[known]) if known.any() else 0.0).astype(np.float32)
        return cls(genres=genres, years=years, log_popularity=np.log1p(popularity.astype(np.float64)))


def source_ranks(norm: np.ndarray) -> np.ndarray:
    """1-based rank of each listed value among the listed values (equal values share the best rank);
    :data:`ABSENT_RANK` where NaN."""
    listed = ~np.isnan(norm)
    values = norm[listed]
    ranks = np.full(norm.shape, float(ABSENT_RANK))
    if values.size:
        ordered = np.sort(-values)
        ranks[listed] = np.searchsorted(ordered, -values, side="left") + 1
    return ranks


def features(side: ItemSide, history: Sequence[int], positions: np.ndarray, norm: Mapping[str, np.ndarray],
             sources: Sequence[str], linear_weights: Mapping[str, float]) -> np.ndarray:
    """Feature rows (candidates x :func:`feature_names`) of the candidates at ``positions``; ``norm[s]`` holds
    source ``s``'s normalised scores of those candidates (NaN where it did not list one)."""
    n = len(positions)
    recent = np.asarray(list(history)[-RECENT:], dtype=np.int64)
    if recent.size:
        profile = side.genres[recent].mean(0)
        year = float(np.median(side.years[recent]))
    else:
        profile, year = np.zeros(side.genres.shape[1], dtype=np.float32), float(np.median(side.years))
    columns = {s: norm.get(s, np.full(n, np.nan)) for s in sources}
    linear = sum((linear_weights.get(s, 0.0) * np.nan_to_num(v, nan=0.0) for s, v in columns.items()), np.zeros(n))
    gap = side.years[positions] - year
    base = [linear, side.log_popularity[positions], np.full(n, np.log1p(len(history))),
            side.genres[positions] @ profile, gap, np.abs(gap)]
    scores = [np.where(np.isnan(v), ABSENT_SCORE, v) for v in columns.values()]
    ranks = [np.log(source_ranks(v)) for v in columns.values()]
    return np.stack([*base, *scores, *ranks], axis=1).astype(np.float32) if n else np.zeros(
        (0, len(feature_names(sources))), dtype=np.float32)


def fit(groups: Sequence[tuple[np.ndarray, np.ndarray]], sources: Sequence[str], linear_weights: Mapping[str, float],
        params: LearnedFusionParams, trained_on: str = "") -> LearnedFusion:
    """Train the ranker on ``groups`` (one (features, 0/1 labels) pair per example user; groups without a
    positive teach nothing and are dropped)."""
    import lightgbm as lgb

    kept = [(x, y) for x, y in groups if y.any() and len(y) > 1]
    if not kept:
        raise ValueError("no training example has its next item among the candidates; nothing to learn from")
    X = np.concatenate([x for x, _ in kept])
    y = np.concatenate([y for _, y in kept])
    ranker = lgb.LGBMRanker(objective=params.objective, n_estimators=params.n_estimators,
                            learning_rate=params.learning_rate, num_leaves=params.num_leaves,
                            min_child_samples=params.min_child_samples, random_state=params.seed,
                            deterministic=True, force_row_wise=True, n_jobs=2, verbose=-1)
    ranker.fit(X, y, group=[len(y) for _, y in kept], feature_name=feature_names(sources))
    return LearnedFusion(sources=list(sources), linear_weights=dict(linear_weights),
                         model=ranker.booster_.model_to_string(), params=params, trained_on=trained_on,
                         examples=len(kept))


class LearnedRetriever(BlendRetriever):
    """The fused retriever with the learned ranker in place of the linear blend (text queries: the blend)."""

    def __init__(self, catalog: Catalog, sources: Mapping[str, Source], fusion: LearnedFusion,
                 popularity: np.ndarray, pool: int = 200) -> None:
        weights = {n: w for n, w in fusion.linear_weights.items() if n in sources}
        super().__init__(catalog, sources, weights, popularity=popularity, pool=pool)
        missing = [s for s in fusion.sources if s not in sources]
        if missing:
            raise ValueError(f"the learned fusion reads sources {missing} that this index lacks "
                             f"(it has {sorted(sources)}); re-tune with `recagent eval retrieval --tune`")
        self.learned_sources = {n: sources[n] for n in fusion.sources}  # self.sources: the blend's, for text
        self.fusion = fusion
        self.side = ItemSide.of(catalog, popularity)

    def retrieve(self, history: Sequence[str], k: int, filters: Filters | None = None,
                 query: str | None = None) -> list[Candidate]:
        if query:
            return super().retrieve(history, k, filters, query)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = self.query(history, filters, None)
        n = max(self.pool, k)
        lists = {name: source.top(q, n) for name, source in self.learned_sources.items()}
        positions = np.asarray(sorted({p for ranked in lists.values() for p, _ in ranked}), dtype=np.int64)
        slot = {int(p): i for i, p in enumerate(positions)}
        norm: dict[str, np.ndarray] = {}
        hits: dict[int, list[SourceHit]] = {}
        for name, ranked in lists.items():
            column = np.full(len(positions), np.nan)
            if ranked:
                column[[slot[p] for p, _ in ranked]] = normalise([s for _, s in ranked])
                for rank, (pos, raw) in enumerate(ranked, start=1):
                    hits.setdefault(pos, []).append(SourceHit(source=name, rank=rank, score=raw))
            norm[name] = column
        scores = self.fusion.score(features(self.side, q.history, positions, norm, self.fusion.sources,
                                            self.fusion.linear_weights))
        order = np.lexsort((positions, -scores))[:k]
        out = [Candidate(item_id=self.catalog.item_ids[int(positions[i])], score=float(scores[i]),
                         sources=hits[int(positions[i])]) for i in order]
        if len(out) < k:  # top up with popular items, as the blend does
            allowed = q.allowed.copy()
            allowed[positions] = False
            extra = self.popular_order[allowed[self.popular_order]][: k - len(out)]
            floor = float(scores.min()) - 1.0 if scores.size else 0.0
            out.extend(Candidate(item_id=self.catalog.item_ids[int(p)], score=floor, sources=[]) for p in extra)
        return out
