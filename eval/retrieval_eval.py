"""`recagent eval retrieval`: baselines and the fused retriever under the leave-last-out protocol.

Each user's source lists are computed once per split part with CF models fitted only on what that part may
see; every method (single sources and blends, including the weight grid of ``--tune``) is then ranked from
those lists with the same rule as ``BlendRetriever.retrieve`` (a test checks they agree). ``--tune`` chooses
the fusion weights and EASE's lambda jointly on validation: per lambda only the EASE lists are recomputed; its last
stage chooses the weights again on a finer grid (:data:`REFINE_GRID`) over the chosen lists.
The fused retriever is also reported under the other tie rule of the split (a sensitivity row). ``--tune`` also
trains the learned fusion (:mod:`retrieval.learned_fusion`) on examples cut from the training part of each history
and keeps it where it beats the tuned weights on validation (:func:`fit_learned`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from eval.metrics import METRICS, interval_cell, metric_values, paired_bootstrap_diff, summarise
from retrieval.catalog import Catalog
from retrieval.cf import CFConfig
from retrieval.index import Index
from retrieval.learned_fusion import ItemSide, LearnedFusion, LearnedFusionParams, features, fit
from retrieval.retriever import normalise
from retrieval.splits import Case, Split, SplitSpec, split_catalog

logger = logging.getLogger(__name__)

BASELINES = ("mostpop", "ease", "sequential", "slit", "sasrec", "content")
SOURCE_NAMES = ("mostpop", "ease", "sequential", "slit", "sasrec", "content")
TUNE_GRID = {
    "sequential": (1.0,),
    "ease": (0.0, 0.25, 0.5, 1.0),
    "slit": (0.0, 0.5, 1.0),
    "sasrec": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0),  # only where the lists hold it: tuned after EASE's settings (``tune``)
    "content": (0.0, 0.1, 0.2, 0.4, 0.7, 1.0),  # up to 1: a tuned encoder can weigh as much as the sequential source
    "mostpop": (0.0, 0.1, 0.2, 0.4),
}
#: the last stage of ``--tune``: a finer grid, reaching past the coarse grid's edges, over the lists of the chosen EASE
#: settings and SASRec (7,840 points for ML-100k's sources, 5.1 min in the committed report's run). Scratch check on
#: ML-100k validation (943 users, seeded random ties, seed 0; 10 random halvings, weights chosen on one half, scored on
#: the other): NDCG@10 .1500 with this grid against .1458 with TUNE_GRID's, out-of-fold difference +.0060 (higher in
#: 16 of the 20 halves).
REFINE_GRID = {
    "sequential": (1.0,),
    "ease": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
    "slit": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
    "sasrec": (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
    "content": (0.0, 0.05, 0.1, 0.2, 0.4),
    "mostpop": (0.0, 0.05, 0.1, 0.2),
}
EASE_LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
EASE_DECAYS = (1.0, 0.99, 0.98, 0.95, 0.9)  # recency weights of the history in the EASE source
PARTS = ("validation", "test")
Metrics = dict[str, dict[str, float]]  # {metric: {mean, lo, hi}}
Results = dict[str, dict[str, Metrics]]  # {part: {method: metrics}}


@dataclass
class PartLists:
    """Per-source normalised scores (users x items, NaN where the source did not list the item)."""

    norm: dict[str, np.ndarray]
    allowed: np.ndarray  # users x items
    targets: np.ndarray  # target position per user
    popularity: np.ndarray
    histories: list[list[int]] = dataclasses.field(default_factory=list)  # each case's history (positions)

    def ranks(self, weights: Mapping[str, float], cold: float = 0.0) -> list[int | None]:
        """Target rank per user under ``weights`` and the cold-item weight ``cold`` (None beyond 50), same rule as
        BlendRetriever.retrieve: ``cold`` is added to the content source's weight for items of popularity 0."""
        active = [s for s, w in weights.items() if w > 0 and s in self.norm]
        n_users, n_items = self.allowed.shape
        present = np.zeros((n_users, n_items), dtype=bool)
        fused = np.zeros((n_users, n_items), dtype=np.float64)
        for s in active:
            listed = ~np.isnan(self.norm[s])
            present |= listed
            fused += weights[s] * np.where(listed, self.norm[s], 0.0)
        if cold > 0 and "content" in self.norm:
            listed = ~np.isnan(self.norm["content"]) & (self.popularity == 0)[None, :]
            present |= listed
            fused += cold * np.where(listed, self.norm["content"], 0.0)
        return self.ranks_of(fused, present)

    def candidates(self, u: int, sources: Sequence[str]) -> np.ndarray:
        """Positions some source of ``sources`` listed for user ``u`` (what the learned fusion scores)."""
        listed = np.zeros(self.allowed.shape[1], dtype=bool)
        for s in sources:
            listed |= ~np.isnan(self.norm[s][u])
        return np.flatnonzero(listed & self.allowed[u])

    def features(self, u: int, fusion_sources: Sequence[str], weights: Mapping[str, float],
                 side: ItemSide) -> tuple[np.ndarray, np.ndarray]:
        """(candidate positions, feature rows) of user ``u``, as ``LearnedRetriever.retrieve`` builds them."""
        positions = self.candidates(u, fusion_sources)
        norm = {s: self.norm[s][u, positions] for s in fusion_sources}
        return positions, features(side, self.histories[u], positions, norm, fusion_sources, weights)

    def examples(self, fusion_sources: Sequence[str], weights: Mapping[str, float],
                 side: ItemSide) -> list[tuple[np.ndarray, np.ndarray]]:
        """One (features, labels) group per user: label 1 at the target."""
        out = []
        for u in range(len(self.targets)):
            positions, x = self.features(u, fusion_sources, weights, side)
            out.append((x, (positions == self.targets[u]).astype(np.int8)))
        return out

    def learned_ranks(self, fusion: LearnedFusion, side: ItemSide) -> list[int | None]:
        """Target rank per user under the learned fusion, same rule as LearnedRetriever.retrieve."""
        n_users, n_items = self.allowed.shape
        scores = np.zeros((n_users, n_items), dtype=np.float64)
        present = np.zeros((n_users, n_items), dtype=bool)
        for u in range(n_users):
            positions, x = self.features(u, fusion.sources, fusion.linear_weights, side)
            scores[u, positions] = fusion.score(x)
            present[u, positions] = True
        return self.ranks_of(scores, present)

    def ranks_of(self, fused: np.ndarray, present: np.ndarray) -> list[int | None]:
        """Target rank per user when the ``present`` items are ranked by ``fused`` (ties by position) and the
        others follow by popularity (None beyond 50)."""
        n_users, n_items = self.allowed.shape
        pos = np.arange(n_items)
        out: list[int | None] = []
        for u in range(n_users):
            t = int(self.targets[u])
            allowed = self.allowed[u]
            pres = present[u] & allowed
            if pres[t]:
                better = pres & ((fused[u] > fused[u, t]) | ((fused[u] == fused[u, t]) & (pos < t)))
                rank = int(better.sum()) + 1
            elif allowed[t]:
                absent = allowed & ~present[u]
                pop = self.popularity
                better = absent & ((pop > pop[t]) | ((pop == pop[t]) & (pos < t)))
                rank = int(pres.sum()) + int(better.sum()) + 1
            else:
                rank = None
            out.append(rank if rank is not None and rank <= 50 else None)
        return out


def collect_lists(index: Index, split: Split, part: str, progress: bool = True, cf_config: CFConfig | None = None,
                  weights: Mapping[str, float] | None = None, sasrec: Any = None) -> PartLists:
    """The source lists of every case of ``part``: the sources of ``weights`` (default: all), with CF fitted
    under ``cf_config`` (default: the index's) on what ``part`` may see (``sasrec``: a SASRec model already trained
    on it)."""
    cf = index.fit_cf(split.fit_histories(part), cf_config, sasrec=sasrec)
    # the lists only: the cold-item path is applied when they are ranked (PartLists.ranks)
    retriever = index.retriever("fused", cf=cf, weights=weights or {s: 1.0 for s in SOURCE_NAMES}, cold=0.0)
    cases = split.cases(part)
    n_items = index.catalog.n_items
    norm = {s: np.full((len(cases), n_items), np.nan, dtype=np.float64) for s in retriever.sources}
    allowed = np.zeros((len(cases), n_items), dtype=bool)
    targets = np.zeros(len(cases), dtype=np.int64)
    histories = [[index.catalog.item_index[i] for i in case.history] for case in cases]
    for u, case in enumerate(tqdm(cases, desc=f"retrieving ({part})", unit="user", disable=not progress)):
        q = retriever.query(case.history, None, None)  # the target is never passed to inference
        allowed[u] = q.allowed
        targets[u] = index.catalog.item_index[case.target]
        for name, ranked in retriever.source_lists(q, retriever.pool).items():
            if ranked:
                positions = [p for p, _ in ranked]
                norm[name][u, positions] = normalise([s for _, s in ranked])
    return PartLists(norm=norm, allowed=allowed, targets=targets, popularity=cf.popularity.astype(np.float64),
                     histories=histories)


def with_cf_config(lists: PartLists, index: Index, split: Split, part: str, cf_config: CFConfig,
                   progress: bool = True) -> PartLists:
    """``lists`` with the EASE lists recomputed under ``cf_config``; the other sources do not depend on EASE's
    lambda and recency decay, the only settings tuned here (SASRec is not trained for it)."""
    ease = collect_lists(index, split, part, progress, cf_config=without_sasrec(cf_config), weights={"ease": 1.0})
    return dataclasses.replace(lists, norm={**lists.norm, **ease.norm})


def without_sasrec(config: CFConfig) -> CFConfig:
    return config.model_copy(update={"sasrec_epochs": 0})


def with_sasrec_lists(index: Index, split: Split, part: str, lists: PartLists, cf: CFConfig, model: Any,
                      epochs: int, progress: bool = False) -> PartLists:
    """``lists`` with the SASRec source's lists added: ``model``, trained on what ``part`` may see for ``epochs``
    epochs, scores that part's users."""
    config = cf.model_copy(update={"sasrec_epochs": max(int(epochs), 1)})
    sasrec = collect_lists(index, split, part, progress, cf_config=config, weights={"sasrec": 1.0}, sasrec=model)
    return dataclasses.replace(lists, norm={**lists.norm, **sasrec.norm})


def listed(weights: Mapping[str, float], cold: float) -> dict[str, float]:
    """The sources :func:`collect_lists` must gather for :meth:`PartLists.ranks` under ``weights`` and the cold-item
    weight ``cold`` (which reads the content source's lists whatever its weight)."""
    return {**weights, "content": 1.0} if cold > 0 else dict(weights)


def drop_source(lists: PartLists, name: str) -> PartLists:
    return dataclasses.replace(lists, norm={s: v for s, v in lists.norm.items() if s != name})


@dataclass(frozen=True)
class GridPoint:
    weights: dict[str, float]
    score: float  # the tuned metric on validation
    recall50: float  # the tie-break

    @property
    def key(self) -> tuple[float, float]:
        return (self.score, self.recall50)


def tune_weights(lists: PartLists, metric: str = "ndcg@10", grid: Mapping[str, Sequence[float]] = TUNE_GRID,
                 progress: bool = False) -> GridPoint:
    """The best point of the weight ``grid`` on ``lists`` (validation): ``metric``, then Recall@50."""
    best: GridPoint | None = None
    names = [n for n in grid if n in lists.norm]
    combos = list(itertools.product(*(grid[n] for n in names)))
    for combo in tqdm(combos, desc="weight grid", unit="point", disable=not progress, leave=False):
        weights = dict(zip(names, combo, strict=True))
        table = summarise(lists.ranks(weights), n_boot=1)
        point = GridPoint(weights, table[metric]["mean"], table["recall@50"]["mean"])
        if best is None or point.key > best.key:
            best = point
    assert best is not None
    return best


@dataclass
class LearnedChoice:
    """The learned fusion against the tuned weights on validation."""

    fusion: LearnedFusion  # trained on the cuts: what is stored when it wins
    learned: GridPoint  # its validation NDCG@10 and Recall@50
    linear: GridPoint  # the tuned weights' on the same users
    seconds: float

    @property
    def better(self) -> bool:
        return self.learned.key > self.linear.key


@dataclass
class SasrecChoice:
    """The SASRec source on validation: its epoch count by early stopping, and the weights tuned with it."""

    epochs: int
    curve: list[float]  # validation NDCG@10 of SASRec alone after each epoch
    with_it: GridPoint  # the best weights with SASRec in the grid
    without: GridPoint  # the best weights without it (the EASE settings' stage)
    seconds: float

    @property
    def kept(self) -> bool:
        return self.with_it.weights.get("sasrec", 0.0) > 0 and self.with_it.key > self.without.key


@dataclass
class Tuning:
    weights: dict[str, float]
    cf: CFConfig
    score: float  # validation metric of the choice
    grid: dict[tuple[float, float], GridPoint]  # the best weights per (EASE lambda, EASE recency decay)
    lists: PartLists  # validation lists under the chosen CF config
    learned: LearnedChoice | None = None
    sasrec: SasrecChoice | None = None
    coarse: GridPoint | None = None  # the coarse grid's choice, where the finer grid (``refine``) then ran


def cut_splits(split: Split, cuts: int) -> list[Split]:
    """Examples from the training part alone: cut ``c`` (1..``cuts``) predicts each user's c-th last training item
    from the items before it, with CF fitted on every user's training part less its last ``c`` items (so no
    example's own next item, and no validation or test item, is seen by the models that make its candidates)."""
    out = []
    for c in range(1, cuts + 1):
        fit_histories = {u: h[: max(len(h) - c, 0)] for u, h in split.train.items()}
        cases = [Case(u, h[:-c], h[-c]) for u, h in split.train.items() if len(h) > c]
        out.append(Split(train=fit_histories, validation=cases, test=[]))
    return out


def fit_learned(index: Index, split: Split, validation: PartLists, weights: Mapping[str, float],
                cf_config: CFConfig | None = None, params: LearnedFusionParams | None = None,
                progress: bool = True) -> LearnedChoice:
    """Train the learned fusion on cuts of the training histories (:func:`cut_splits`) and measure it on validation
    against ``weights``. It is not refitted with the validation items: every later choice made on validation with the
    fused retriever (the reranker's alpha, the ranker's checkpoints) stays out of its sample. It does not read the
    SASRec source (training SASRec on each cut would cost minutes per cut); ``weights`` are compared with it."""
    import time

    t0 = time.perf_counter()
    params = params or LearnedFusionParams()
    cf_config = without_sasrec(cf_config) if cf_config is not None else None
    # every source but SASRec, the popularity list included (without it as a source, popularity only a feature:
    # ML-100k validation NDCG@10 .1187 against .1218 with it)
    sources = [s for s in SOURCE_NAMES if s in validation.norm and s != "sasrec"]
    compared = weights
    weights = {s: w for s, w in weights.items() if s != "sasrec"}
    groups: list[tuple[np.ndarray, np.ndarray]] = []
    for n, cut in enumerate(cut_splits(split, params.cuts), start=1):
        logger.info("learned fusion: collecting cut %d of %d (%d users)", n, params.cuts, len(cut.validation))
        lists = collect_lists(index, cut, "validation", progress, cf_config=cf_config)
        groups += lists.examples(sources, weights, ItemSide.of(index.catalog, lists.popularity))
    side = ItemSide.of(index.catalog, validation.popularity)
    trained_on = f"{params.cuts} cuts of the training part of each history"
    kept = fit(groups, sources, weights, params, trained_on=trained_on)
    ranks = validation.learned_ranks(kept, side)
    learned, linear = (summarise(r, n_boot=1) for r in (ranks, validation.ranks(compared)))
    points = [GridPoint(dict(w), t["ndcg@10"]["mean"], t["recall@50"]["mean"])
              for w, t in ((weights, learned), (compared, linear))]
    kept.validation = {"learned_ndcg@10": round(points[0].score, 5), "learned_recall@50": round(points[0].recall50, 5),
                       "linear_ndcg@10": round(points[1].score, 5), "linear_recall@50": round(points[1].recall50, 5),
                       "users": len(validation.targets)}
    logger.info("learned fusion: validation ndcg@10 %.4f (weights %.4f)", points[0].score, points[1].score)
    return LearnedChoice(kept, points[0], points[1], round(time.perf_counter() - t0, 1))


def tune(index: Index, split: Split, validation: PartLists, lambdas: Sequence[float] = EASE_LAMBDAS,
         decays: Sequence[float] = EASE_DECAYS, metric: str = "ndcg@10", progress: bool = True,
         sasrec: bool = True, refine: bool = True) -> Tuning:
    """Fusion weights, EASE's lambda and its recency decay chosen jointly on validation (``validation``: lists under
    the index's CF config). Without EASE (a catalogue too large for it) only the weights are tuned. Then, with
    ``sasrec``, the SASRec source (:func:`tune_sasrec`): its epochs by early stopping on validation, and the weights
    again with it in the grid; it is kept where it raises the validation metric. Last, with ``refine``, the weights
    on :data:`REFINE_GRID` over the chosen lists (:func:`refine_weights`)."""
    base = without_sasrec(index.manifest.cf)
    validation = drop_source(validation, "sasrec")
    if "ease" not in validation.norm:
        lambdas, decays = [base.ease_lambda], [base.ease_decay]
    grid: dict[tuple[float, float], GridPoint] = {}
    best: tuple[GridPoint, CFConfig, PartLists] | None = None
    for lam in lambdas:
        for decay in decays:
            config = base.model_copy(update={"ease_lambda": float(lam), "ease_decay": float(decay)})
            lists = validation if config == base else with_cf_config(validation, index, split, "validation",
                                                                     config, progress)
            point = grid[(float(lam), float(decay))] = tune_weights(lists, metric)
            logger.info("tuned lambda=%s decay=%s weights=%s %s=%.4f", lam, decay, point.weights, metric,
                        point.score)
            if best is None or point.key > best[0].key:
                best = (point, config, lists)
    assert best is not None
    point, config, lists = best
    tuning = Tuning(weights=point.weights, cf=config, score=point.score, grid=grid, lists=lists)
    tuning = tune_sasrec(index, split, tuning, metric, progress) if sasrec else tuning
    return refine_weights(tuning, metric, progress) if refine else tuning


def refine_weights(tuning: Tuning, metric: str = "ndcg@10", progress: bool = True) -> Tuning:
    """The weights chosen again on :data:`REFINE_GRID` over ``tuning``'s lists (the chosen EASE settings and
    SASRec); the coarse choice is kept in ``Tuning.coarse`` and stays where the finer grid does not beat it."""
    coarse = GridPoint(dict(tuning.weights), tuning.score, summarise(tuning.lists.ranks(tuning.weights),
                                                                      n_boot=1)["recall@50"]["mean"])
    point = refined(tuning.lists, coarse, metric, progress)
    return dataclasses.replace(tuning, weights=point.weights, score=point.score, coarse=coarse)


def refined(lists: PartLists, coarse: GridPoint, metric: str = "ndcg@10", progress: bool = False) -> GridPoint:
    """The best of :data:`REFINE_GRID` on ``lists`` where it beats ``coarse`` (the coarse grid's choice), else
    ``coarse``."""
    fine = tune_weights(lists, metric, REFINE_GRID, progress)
    logger.info("finer grid: weights %s %s=%.4f (coarse grid %.4f)", fine.weights, metric, fine.score, coarse.score)
    return fine if fine.key > coarse.key else coarse


def tune_sasrec(index: Index, split: Split, tuning: Tuning, metric: str = "ndcg@10",
                progress: bool = True) -> Tuning:
    """Train SASRec on what validation may see with early stopping on the validation cases (the epoch count E),
    add its lists and tune the weights again. Kept (``CFConfig.sasrec_epochs = E``) only where the validation metric
    rises. The early-stopped model is the one a fit of exactly E epochs trains (training is deterministic; a test
    checks it), so its lists are what an index fitted with the choice would give."""
    import time

    from retrieval.sasrec import fit_sasrec

    t0 = time.perf_counter()
    positions = index.catalog.item_index
    fit = {u: [positions[i] for i in h] for u, h in split.fit_histories("validation").items()}
    cases = [([positions[i] for i in c.history], positions[c.target]) for c in split.cases("validation")]
    logger.info("SASRec: choosing its epochs on %d validation users", len(cases))
    model, log = fit_sasrec(fit, index.catalog.n_items, tuning.cf.sasrec, val=cases, progress=progress,
                            item_vectors=index.item_vectors)
    epochs = max(int(log["best_epoch"]), 1)
    config = tuning.cf.model_copy(update={"sasrec_epochs": epochs})
    lists = with_sasrec_lists(index, split, "validation", tuning.lists, tuning.cf, model, epochs, progress)
    with_it = tune_weights(lists, metric)
    without = tuning.grid[(tuning.cf.ease_lambda, tuning.cf.ease_decay)]
    choice = SasrecChoice(epochs, [float(v) for v in log["val_ndcg"]], with_it, without,
                          round(time.perf_counter() - t0, 1))
    logger.info("SASRec: %d epochs, weights %s %s=%.4f (without it %.4f): %s", epochs, with_it.weights, metric,
                with_it.score, without.score, "kept" if choice.kept else "not kept")
    if not choice.kept:
        return dataclasses.replace(tuning, sasrec=choice)
    return dataclasses.replace(tuning, weights=with_it.weights, cf=config, score=with_it.score, lists=lists,
                               sasrec=choice)


def tune_and_store(index: Index, split: Split, spec: SplitSpec, validation: PartLists | None = None,
                   progress: bool = True) -> Tuning:
    """Tune the fusion weights and EASE's lambda and recency decay on validation and store them with the index (its
    manifest and CF models), so that serving and later rebuilds use them."""
    from retrieval.index import save_cf, save_fusion

    validation = validation or collect_lists(index, split, "validation", progress,
                                             cf_config=without_sasrec(index.manifest.cf))
    tuning = tune(index, split, validation, progress=progress)
    how = f"validation ndcg@10, ties {spec.ties}, seed {spec.seed}"
    try:
        tuning.learned = fit_learned(index, split, tuning.lists, tuning.weights, tuning.cf, progress=progress)
    except ValueError as exc:  # histories too short to cut examples from: the weights rank
        logger.warning("learned fusion not trained: %s", exc)
    learned = tuning.learned.fusion if tuning.learned and tuning.learned.better else None
    fusion = index.manifest.fusion.model_copy(update={"weights": tuning.weights, "tuned": True, "tuned_on": how,
                                                      "learned": learned})
    catalog = index.catalog
    assert catalog.root is not None
    save_fusion(catalog.root / "index", fusion)
    save_cf(catalog.root / "index", catalog, tuning.cf)
    index.manifest.fusion, index.manifest.cf = fusion, tuning.cf
    return tuning


LEARNED = "fused (learned)"


def evaluate(lists: Mapping[str, PartLists], weights: Mapping[str, float], n_boot: int = 1000,
             seed: int = 0, learned: LearnedFusion | None = None, catalog: Catalog | None = None,
             cold: float = 0.0) -> Results:
    """``{part: {method: {metric: {mean, lo, hi}}}}``: the single sources and the fused retriever (the weights and
    the cold-item weight ``cold``); with ``learned`` and ``catalog``, also the learned fusion (trained on the training
    part alone)."""
    out: Results = {}
    for part, pl in lists.items():
        methods: dict[str, Mapping[str, float]] = {b: {b: 1.0} for b in BASELINES if b in pl.norm}
        methods["fused"] = weights
        out[part] = {m: summarise(pl.ranks(w, cold if m == "fused" else 0.0), n_boot=n_boot, seed=seed)
                     for m, w in methods.items()}
        if learned is not None and catalog is not None:
            ranks = pl.learned_ranks(learned, ItemSide.of(catalog, pl.popularity))
            out[part][LEARNED] = summarise(ranks, n_boot=n_boot, seed=seed)
    return out


def learned_gain(lists: Mapping[str, PartLists], weights: Mapping[str, float], learned: LearnedFusion,
                 catalog: Catalog, n_boot: int = 1000, seed: int = 0,
                 cold: float = 0.0) -> dict[str, dict[str, dict[str, float]]]:
    """``{part: {metric: {mean, lo, hi}}}``: the learned fusion minus the weights (with the cold-item weight
    ``cold``), per user, with the paired bootstrap interval (NDCG@10 and Recall@50)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for part, pl in lists.items():
        a = [metric_values(r) for r in pl.learned_ranks(learned, ItemSide.of(catalog, pl.popularity))]
        b = [metric_values(r) for r in pl.ranks(weights, cold)]
        out[part] = {}
        for m in ("ndcg@10", "recall@50"):
            mean, lo, hi = paired_bootstrap_diff(np.array([x[m] for x in a]), np.array([x[m] for x in b]),
                                                 n_boot=n_boot, seed=seed)
            out[part][m] = {"mean": mean, "lo": lo, "hi": hi}
    return out


def served_line(learned: LearnedFusion | None) -> str:
    if learned is None:
        return "served fusion: the weights"
    v = learned.validation
    return (f"served fusion: the learned ranker (validation NDCG@10 {v.get('learned_ndcg@10', float('nan')):.4f} "
            f"against the weights' {v.get('linear_ndcg@10', float('nan')):.4f})")


def fused_label(spec: SplitSpec) -> str:
    return f"fused, ties {spec.ties}" + (f" (seed {spec.seed})" if spec.ties == "random" else "")


def tie_sensitivity(index: Index, catalog: Catalog, spec: SplitSpec, results: Results, weights: Mapping[str, float],
                    cf_config: CFConfig, n_boot: int = 1000, progress: bool = True, cold: float = 0.0) -> Results:
    """The fused retriever (same weights, cold-item weight and CF config) under both tie rules:
    ``{part: {label: metrics}}``.
    ``results`` holds the fused rows under ``spec``; the other rule's split is made and evaluated here."""
    other = spec.other_rule()
    other_split = split_catalog(catalog, other)
    out: Results = {}
    for part in results:
        pl = collect_lists(index, other_split, part, progress, cf_config=cf_config, weights=listed(weights, cold))
        out[part] = {fused_label(spec): results[part]["fused"],
                     fused_label(other): summarise(pl.ranks(weights, cold), n_boot=n_boot, seed=spec.seed)}
    return out


def flat(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """The ``--json`` shape: ``{part: {method: {metric: mean}}}``."""
    return {part: {m: {k: round(v["mean"], 6) for k, v in metrics.items()} for m, metrics in methods.items()}
            for part, methods in results.items()}


def _table(methods: Mapping[str, Metrics], label: str = "method") -> list[str]:
    lines = [f"| {label} | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for method, metrics in methods.items():
        lines.append(f"| {method} | " + " | ".join(interval_cell(metrics[m]) for m in METRICS) + " |")
    return lines + [""]


def markdown(results: Results, title: str, notes: list[str], sensitivity: Results | None = None,
             tuning: Tuning | None = None, gain: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None) -> str:
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    for part, methods in results.items():
        lines += [f"## {part}", "", *_table(methods)]
    if sensitivity:
        lines += ["## Tie-rule sensitivity", "",
                  "The fused retriever (the same weights and EASE lambda) on splits whose ties in time are broken "
                  "by each rule.", ""]
        for part, methods in sensitivity.items():
            lines += [f"### {part}", "", *_table(methods, "retriever, tie rule")]
    if tuning and tuning.learned:
        c = tuning.learned
        lines += ["## Learned fusion", "",
                  f"A LightGBM ranker ({c.fusion.params.objective}, {c.fusion.params.n_estimators} trees of "
                  f"{c.fusion.params.num_leaves} leaves) over each candidate's per-source scores and ranks, the "
                  "weights' score, its popularity and its fit to the user's recent genres and years "
                  f"(`retrieval/learned_fusion.py`), trained on {c.fusion.params.cuts} cuts of the training part of "
                  f"each history ({c.seconds:.0f} s), never on a validation or test item. On validation: "
                  f"NDCG@10 {c.learned.score:.4f}, Recall@50 {c.learned.recall50:.4f}, against the tuned weights' "
                  f"{c.linear.score:.4f} / {c.linear.recall50:.4f}: "
                  + ("kept: the fused retriever ranks with it." if c.better else "not kept: the weights rank."), ""]
    if gain:
        lines += ["Learned fusion minus the weights, per user, paired bootstrap 95% interval:", "",
                  "| part | NDCG@10 | Recall@50 |", "|---|---|---|"]
        lines += [f"| {part} | " + " | ".join(f"{g[m]['mean']:+.4f} [{g[m]['lo']:+.4f}, {g[m]['hi']:+.4f}]"
                                               for m in ("ndcg@10", "recall@50")) + " |" for part, g in gain.items()]
        lines.append("")
    if tuning:
        lines += ["## Tuning on validation", "",
                  "Best fusion weights per EASE lambda and EASE recency decay (validation NDCG@10, then Recall@50 "
                  "as tie-break).", "",
                  "| EASE lambda | EASE decay | weights | NDCG@10 | Recall@50 |", "|---|---|---|---|---|"]
        chosen = (tuning.cf.ease_lambda, tuning.cf.ease_decay)
        lines += [f"| {lam:g} | {decay:g}{' (chosen)' if (lam, decay) == chosen else ''} | {_weights(p.weights)} | "
                  f"{p.score:.4f} | {p.recall50:.4f} |" for (lam, decay), p in tuning.grid.items()]
        lines.append("")
        if tuning.sasrec:
            sc = tuning.sasrec
            lines += [f"Then the SASRec source (`retrieval/sasrec.py`, a {tuning.cf.sasrec.n_layer}-layer causal "
                      "Transformer over item ids trained on windows of each history): trained on the training part "
                      "with early stopping on "
                      f"the validation users ({sc.seconds:.0f} s in all), best after {sc.epochs} epochs (validation "
                      "NDCG@10 of SASRec alone per epoch: " + ", ".join(f"{v:.4f}" for v in sc.curve) + "); the "
                      f"weights tuned again with it: {_weights(sc.with_it.weights)}, NDCG@10 {sc.with_it.score:.4f} / "
                      f"Recall@50 {sc.with_it.recall50:.4f}, against {sc.without.score:.4f} / "
                      f"{sc.without.recall50:.4f} without it: "
                      + ("kept (the index trains it for that many epochs)." if sc.kept else "not kept."), ""]
        if tuning.coarse:
            before = tuning.coarse
            points = math.prod(len(v) for n, v in REFINE_GRID.items() if n in tuning.lists.norm)
            lines += [f"Last, the weights on a finer grid ({points:,} points, reaching past the coarse grid's edges) "
                      f"over the same lists: {_weights(tuning.weights)}, NDCG@10 {tuning.score:.4f}, against the "
                      f"coarse grid's {_weights(before.weights)}, {before.score:.4f} / Recall@50 "
                      f"{before.recall50:.4f}" + (": the finer grid's weights are chosen." if tuning.weights !=
                                                  before.weights else ": the coarse grid's weights stay."), ""]
    lines.append("Cells: mean over users [bootstrap 95% interval].")
    return "\n".join(lines) + "\n"


def _weights(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(weights.items()))
