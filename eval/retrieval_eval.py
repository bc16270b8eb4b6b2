"""`recagent eval retrieval`: baselines and the fused retriever under the leave-last-out protocol.

Each user's source lists are computed once per split part with CF models fitted only on what that part may
see; every method (single sources and blends, including the weight grid of ``--tune``) is then ranked from
those lists with the same rule as ``BlendRetriever.retrieve`` (a test checks they agree).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from eval.metrics import METRICS, summarise
from eval.splits import Split
from retrieval.index import FusionConfig, Index
from retrieval.retriever import normalise

logger = logging.getLogger(__name__)

BASELINES = ("mostpop", "ease", "sequential", "content")
SOURCE_NAMES = ("mostpop", "ease", "sequential", "content")
TUNE_GRID = {
    "sequential": (1.0,),
    "ease": (0.0, 0.25, 0.5, 1.0),
    "content": (0.0, 0.1, 0.2, 0.4),
    "mostpop": (0.0, 0.1, 0.2, 0.4),
}


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


def collect_lists(index: Index, split: Split, part: str, progress: bool = True) -> PartLists:
    cf = index.fit_cf(split.fit_histories(part))
    retriever = index.retriever("fused", cf=cf, weights={s: 1.0 for s in SOURCE_NAMES})
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


def tune_weights(lists: PartLists, metric: str = "ndcg@10") -> tuple[dict[str, float], float]:
    best: tuple[float, float, dict[str, float]] | None = None
    names = list(TUNE_GRID)
    for combo in itertools.product(*(TUNE_GRID[n] for n in names)):
        weights = dict(zip(names, combo, strict=True))
        ranks = lists.ranks(weights)
        table = summarise(ranks, n_boot=1)
        score = table[metric]["mean"]
        tiebreak = table["recall@50"]["mean"]
        if best is None or (score, tiebreak) > (best[0], best[1]):
            best = (score, tiebreak, weights)
    assert best is not None
    return best[2], best[0]


def evaluate(index: Index, split: Split, fusion: FusionConfig, parts: tuple[str, ...] = ("validation", "test"),
             n_boot: int = 1000, seed: int = 0, progress: bool = True,
             lists: dict[str, PartLists] | None = None) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{part: {method: {metric: {mean, lo, hi}}}}``."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for part in parts:
        pl = lists[part] if lists and part in lists else collect_lists(index, split, part, progress)
        methods = {b: {b: 1.0} for b in BASELINES if b in pl.norm}
        methods["fused"] = fusion.weights
        out[part] = {m: summarise(pl.ranks(w), n_boot=n_boot, seed=seed) for m, w in methods.items()}
    return out


Results = Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]


def flat(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """The ``--json`` shape: ``{part: {method: {metric: mean}}}``."""
    return {part: {m: {k: round(v["mean"], 6) for k, v in metrics.items()} for m, metrics in methods.items()}
            for part, methods in results.items()}


def markdown(results: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], title: str,
             notes: list[str]) -> str:
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    for part, methods in results.items():
        lines += [f"## {part}", "", "| method | " + " | ".join(METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for method, metrics in methods.items():
            cells = [f"{metrics[m]['mean']:.4f} [{metrics[m]['lo']:.3f}, {metrics[m]['hi']:.3f}]" for m in METRICS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Cells: mean over users [bootstrap 95% interval].")
    return "\n".join(lines) + "\n"
