"""`recagent eval retrieval`: baselines and the fused retriever under the leave-last-out protocol.

Each user's source lists are computed once per split part with CF models fitted only on what that part may
see; every method (single sources and blends, including the weight grid of ``--tune``) is then ranked from
those lists with the same rule as ``BlendRetriever.retrieve`` (a test checks they agree). ``--tune`` chooses
the fusion weights and EASE's lambda jointly on validation: per lambda only the EASE lists are recomputed.
The fused retriever is also reported under the other tie rule of the split (a sensitivity row).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from eval.metrics import METRICS, summarise
from retrieval.catalog import Catalog
from retrieval.cf import CFConfig
from retrieval.index import Index
from retrieval.retriever import normalise
from retrieval.splits import Split, SplitSpec, split_catalog

logger = logging.getLogger(__name__)

BASELINES = ("mostpop", "ease", "sequential", "content")
SOURCE_NAMES = ("mostpop", "ease", "sequential", "content")
TUNE_GRID = {
    "sequential": (1.0,),
    "ease": (0.0, 0.25, 0.5, 1.0),
    "content": (0.0, 0.1, 0.2, 0.4, 0.7, 1.0),  # up to 1: a tuned encoder can weigh as much as the sequential source
    "mostpop": (0.0, 0.1, 0.2, 0.4),
}
EASE_LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
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

    def ranks(self, weights: Mapping[str, float]) -> list[int | None]:
        """Target rank per user under ``weights`` (None beyond 50), same rule as BlendRetriever.retrieve."""
        active = [s for s, w in weights.items() if w > 0 and s in self.norm]
        n_users, n_items = self.allowed.shape
        present = np.zeros((n_users, n_items), dtype=bool)
        fused = np.zeros((n_users, n_items), dtype=np.float64)
        for s in active:
            listed = ~np.isnan(self.norm[s])
            present |= listed
            fused += weights[s] * np.where(listed, self.norm[s], 0.0)
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
                  weights: Mapping[str, float] | None = None) -> PartLists:
    """The source lists of every case of ``part``: the sources of ``weights`` (default: all), with CF fitted
    under ``cf_config`` (default: the index's) on what ``part`` may see."""
    cf = index.fit_cf(split.fit_histories(part), cf_config)
    retriever = index.retriever("fused", cf=cf, weights=weights or {s: 1.0 for s in SOURCE_NAMES})
    cases = split.cases(part)
    n_items = index.catalog.n_items
    norm = {s: np.full((len(cases), n_items), np.nan, dtype=np.float64) for s in retriever.sources}
    allowed = np.zeros((len(cases), n_items), dtype=bool)
    targets = np.zeros(len(cases), dtype=np.int64)
    for u, case in enumerate(tqdm(cases, desc=f"retrieving ({part})", unit="user", disable=not progress)):
        q = retriever.query(case.history, None, None)  # the target is never passed to inference
        allowed[u] = q.allowed
        targets[u] = index.catalog.item_index[case.target]
        for name, ranked in retriever.source_lists(q, retriever.pool).items():
            if ranked:
                positions = [p for p, _ in ranked]
                norm[name][u, positions] = normalise([s for _, s in ranked])
    return PartLists(norm=norm, allowed=allowed, targets=targets, popularity=cf.popularity.astype(np.float64))


def with_cf_config(lists: PartLists, index: Index, split: Split, part: str, cf_config: CFConfig,
                   progress: bool = True) -> PartLists:
    """``lists`` with the EASE lists recomputed under ``cf_config``; the other sources do not depend on EASE's
    lambda, the only setting tuned here."""
    ease = collect_lists(index, split, part, progress, cf_config=cf_config, weights={"ease": 1.0})
    return dataclasses.replace(lists, norm={**lists.norm, **ease.norm})


@dataclass(frozen=True)
class GridPoint:
    weights: dict[str, float]
    score: float  # the tuned metric on validation
    recall50: float  # the tie-break

    @property
    def key(self) -> tuple[float, float]:
        return (self.score, self.recall50)


def tune_weights(lists: PartLists, metric: str = "ndcg@10") -> GridPoint:
    """The best point of the weight grid on ``lists`` (validation): ``metric``, then Recall@50."""
    best: GridPoint | None = None
    names = list(TUNE_GRID)
    for combo in itertools.product(*(TUNE_GRID[n] for n in names)):
        weights = dict(zip(names, combo, strict=True))
        table = summarise(lists.ranks(weights), n_boot=1)
        point = GridPoint(weights, table[metric]["mean"], table["recall@50"]["mean"])
        if best is None or point.key > best.key:
            best = point
    assert best is not None
    return best


@dataclass
class Tuning:
    weights: dict[str, float]
    cf: CFConfig
    score: float  # validation metric of the choice
    by_lambda: dict[float, GridPoint]  # the best weights per EASE lambda
    lists: PartLists  # validation lists under the chosen CF config


def tune(index: Index, split: Split, validation: PartLists, lambdas: Sequence[float] = EASE_LAMBDAS,
         metric: str = "ndcg@10", progress: bool = True) -> Tuning:
    """Fusion weights and EASE's lambda chosen jointly on validation (``validation``: lists under the index's CF
    config). Without EASE (a catalogue too large for it) only the weights are tuned."""
    base = index.manifest.cf
    if "ease" not in validation.norm:
        lambdas = [base.ease_lambda]
    by_lambda: dict[float, GridPoint] = {}
    best: tuple[GridPoint, CFConfig, PartLists] | None = None
    for lam in lambdas:
        config = base.model_copy(update={"ease_lambda": float(lam)})
        lists = validation if config == base else with_cf_config(validation, index, split, "validation", config,
                                                                 progress)
        point = by_lambda[float(lam)] = tune_weights(lists, metric)
        logger.info("tuned lambda=%s weights=%s %s=%.4f", lam, point.weights, metric, point.score)
        if best is None or point.key > best[0].key:
            best = (point, config, lists)
    assert best is not None
    point, config, lists = best
    return Tuning(weights=point.weights, cf=config, score=point.score, by_lambda=by_lambda, lists=lists)


def tune_and_store(index: Index, split: Split, spec: SplitSpec, validation: PartLists | None = None,
                   progress: bool = True) -> Tuning:
    """Tune the fusion weights and EASE's lambda on validation and store them with the index (its manifest and
    CF models), so that serving and later rebuilds use them."""
    from retrieval.index import save_cf, save_fusion

    validation = validation or collect_lists(index, split, "validation", progress)
    tuning = tune(index, split, validation, progress=progress)
    how = f"validation ndcg@10, ties {spec.ties}, seed {spec.seed}"
    fusion = index.manifest.fusion.model_copy(update={"weights": tuning.weights, "tuned": True, "tuned_on": how})
    catalog = index.catalog
    assert catalog.root is not None
    save_fusion(catalog.root / "index", fusion)
    save_cf(catalog.root / "index", catalog, tuning.cf)
    index.manifest.fusion, index.manifest.cf = fusion, tuning.cf
    return tuning


def evaluate(lists: Mapping[str, PartLists], weights: Mapping[str, float], n_boot: int = 1000,
             seed: int = 0) -> Results:
    """``{part: {method: {metric: {mean, lo, hi}}}}``: the single sources and the fused retriever."""
    out: Results = {}
    for part, pl in lists.items():
        methods: dict[str, Mapping[str, float]] = {b: {b: 1.0} for b in BASELINES if b in pl.norm}
        methods["fused"] = weights
        out[part] = {m: summarise(pl.ranks(w), n_boot=n_boot, seed=seed) for m, w in methods.items()}
    return out


def fused_label(spec: SplitSpec) -> str:
    return f"fused, ties {spec.ties}" + (f" (seed {spec.seed})" if spec.ties == "random" else "")


def tie_sensitivity(index: Index, catalog: Catalog, spec: SplitSpec, results: Results, weights: Mapping[str, float],
                    cf_config: CFConfig, n_boot: int = 1000, progress: bool = True) -> Results:
    """The fused retriever (same weights and CF config) under both tie rules: ``{part: {label: metrics}}``.
    ``results`` holds the fused rows under ``spec``; the other rule's split is made and evaluated here."""
    other = spec.other_rule()
    other_split = split_catalog(catalog, other)
    out: Results = {}
    for part in results:
        pl = collect_lists(index, other_split, part, progress, cf_config=cf_config, weights=weights)
        out[part] = {fused_label(spec): results[part]["fused"],
                     fused_label(other): summarise(pl.ranks(weights), n_boot=n_boot, seed=spec.seed)}
    return out


def flat(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """The ``--json`` shape: ``{part: {method: {metric: mean}}}``."""
    return {part: {m: {k: round(v["mean"], 6) for k, v in metrics.items()} for m, metrics in methods.items()}
            for part, methods in results.items()}


def _table(methods: Mapping[str, Metrics], label: str = "method") -> list[str]:
    lines = [f"| {label} | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for method, metrics in methods.items():
        cells = [f"{metrics[m]['mean']:.4f} [{metrics[m]['lo']:.3f}, {metrics[m]['hi']:.3f}]" for m in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: Results, title: str, notes: list[str], sensitivity: Results | None = None,
             tuning: Tuning | None = None) -> str:
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    for part, methods in results.items():
        lines += [f"## {part}", "", *_table(methods)]
    if sensitivity:
        lines += ["## Tie-rule sensitivity", "",
                  "The fused retriever (the same weights and EASE lambda) on splits whose ties in time are broken "
                  "by each rule.", ""]
        for part, methods in sensitivity.items():
            lines += [f"### {part}", "", *_table(methods, "retriever, tie rule")]
    if tuning:
        lines += ["## Tuning on validation", "",
                  "Best fusion weights per EASE lambda (validation NDCG@10, then Recall@50 as tie-break).", "",
                  "| EASE lambda | weights | NDCG@10 | Recall@50 |", "|---|---|---|---|"]
        lines += [f"| {lam:g}{' (chosen)' if lam == tuning.cf.ease_lambda else ''} | {_weights(p.weights)} | "
                  f"{p.score:.4f} | {p.recall50:.4f} |" for lam, p in tuning.by_lambda.items()]
        lines.append("")
    lines.append("Cells: mean over users [bootstrap 95% interval].")
    return "\n".join(lines) + "\n"


def _weights(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(weights.items()))
