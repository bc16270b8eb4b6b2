"""The fused retriever's cold-item path (``FusionConfig.cold``), chosen and measured where there are cold items.

On the catalogue's own split almost no held-out item is new (ML-100k: 2 validation targets of 943 have no
interactions before them), so ``eval retrieval --tune`` cannot choose the weight. Here a seeded share of the items
is made cold: removed from every history before CF and the encoder (trained without them, by the caller) are
fitted, as if they had just been added to the catalogue. On validation, every user, with their cold items gone
from their history, the weight of :data:`COLD_GRID` with the best Recall@50 over all users among those within
:data:`NDCG_TIE` of the best NDCG@10 (then the smaller weight) is chosen: the users whose next item is cold gain, the
others may lose. On test (CF fitted on the training and validation items, the cold ones left out), the same
world, the fusion with the chosen weight against the fusion without the path: NDCG@10 and Recall@50 over all
users (paired per user) and the share of the cold-target users whose item is in the top 50.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval import retrieval_eval as rv
from eval.metrics import interval, interval_cell, paired_bootstrap_diff, per_user_table, summarise
from retrieval.cf import CFConfig
from retrieval.index import Index
from retrieval.splits import Case, Split

COLD_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
# NDCG@10 differences this small count as ties (one user's item moving one place inside the top 10 of 943 users
# moves it by 3e-5 to 3e-4): the path works mostly past the top 10, so Recall@50 decides between such weights
NDCG_TIE = 1e-4


def cold_world(split: Split, cold: set[str], part: str) -> Split:
    """The cases of ``part`` in the world where the ``cold`` items are new, as the validation part of a split: what
    that part may be fitted on (the validation items too, for test) and each case's history without the cold
    items; the held-out items stay, cold ones included (so a cold item is cold for every case of either part)."""
    def strip(history: list[str]) -> list[str]:
        return [i for i in history if i not in cold]

    return Split(train={u: strip(h) for u, h in split.fit_histories(part).items()},
                 validation=[Case(c.user_id, strip(c.history), c.target) for c in split.cases(part)], test=[])


@dataclass(frozen=True)
class GridRow:
    weight: float
    ndcg10: float  # all users
    recall50: float  # all users
    cold_hit50: float  # the users whose held-out item is cold: top-50 hit rate
    warm_ndcg10: float  # the other users


@dataclass
class ColdPathStudy:
    weights: dict[str, float]  # the fusion weights the path is added to
    chosen: float
    grid: list[GridRow]  # validation
    test: dict[str, Any]  # {"off"|"on": {metric: {mean, lo, hi}}, "on_minus_off": {metric: {mean, lo, hi}}, ...}
    users: dict[str, int]  # part -> users; part + "_cold" -> of them, those whose held-out item is cold

    def as_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "chosen": self.chosen, "grid": [asdict(r) for r in self.grid],
                "test": self.test, "users": self.users}


def choose(grid: list[GridRow]) -> float:
    """The weight with the best Recall@50 among those whose NDCG@10 is within :data:`NDCG_TIE` of the best (then the
    smaller weight)."""
    best = max(r.ndcg10 for r in grid)
    return max((r for r in grid if r.ndcg10 >= best - NDCG_TIE), key=lambda r: (r.recall50, -r.weight)).weight


def _row(lists: rv.PartLists, weights: Mapping[str, float], cold: float,
         is_cold: np.ndarray) -> tuple[GridRow, list[int | None]]:
    ranks = lists.ranks(weights, cold)
    table = summarise(ranks, n_boot=1)
    warm = summarise([r for r, c in zip(ranks, is_cold, strict=True) if not c], n_boot=1)
    hits = [r is not None for r, c in zip(ranks, is_cold, strict=True) if c]
    return GridRow(cold, table["ndcg@10"]["mean"], table["recall@50"]["mean"],
                   float(np.mean(hits)) if hits else float("nan"), warm["ndcg@10"]["mean"]), ranks


def study(index: Index, split: Split, cold: set[str], weights: Mapping[str, float], cf: CFConfig,
          n_boot: int = 1000, seed: int = 0, progress: bool = True) -> ColdPathStudy:
    """Choose the cold-item weight on validation in the world where ``cold`` items are new (``index``: its encoder
    must not have been trained on them) and measure it on test. ``weights``: the fusion's (the content source's
    lists are collected whatever its weight)."""
    weights = dict(weights)
    collect = rv.listed(weights, max(COLD_GRID))
    lists = {part: rv.collect_lists(index, cold_world(split, cold, part), "validation", progress, cf_config=cf,
                                    weights=collect) for part in rv.PARTS}
    positions = [index.catalog.item_index[i] for i in cold]
    cold_target = {part: np.isin(pl.targets, positions) for part, pl in lists.items()}  # the cases counted as cold
    grid = [_row(lists["validation"], weights, w, cold_target["validation"])[0] for w in COLD_GRID]
    chosen = choose(grid)
    test, is_cold = lists["test"], cold_target["test"]
    runs = {"off": _row(test, weights, 0.0, is_cold), "on": _row(test, weights, chosen, is_cold)}
    tables = {name: per_user_table(ranks) for name, (_, ranks) in runs.items()}
    result: dict[str, Any] = {}
    for name, (row, ranks) in runs.items():
        hits = np.array([1.0 if r is not None else 0.0 for r, c in zip(ranks, is_cold, strict=True) if c])
        result[name] = {**{m: interval(tables[name][m], n_boot, seed) for m in ("ndcg@10", "recall@50")},
                        "cold_hit@50": interval(hits, n_boot, seed), "warm_ndcg@10": row.warm_ndcg10}
    result["on_minus_off"] = {}
    for m in ("ndcg@10", "recall@50"):
        mean, lo, hi = paired_bootstrap_diff(tables["on"][m], tables["off"][m], n_boot=n_boot, seed=seed)
        result["on_minus_off"][m] = {"mean": mean, "lo": lo, "hi": hi}
    users = {}
    for part, pl in lists.items():
        users[part] = len(pl.targets)
        users[f"{part}_cold"] = int(cold_target[part].sum())
    return ColdPathStudy(weights=weights, chosen=chosen, grid=grid, test=result, users=users)


def plot(result: Mapping[str, Any], path: Path | str) -> None:
    """The validation grid of :meth:`ColdPathStudy.as_dict`: what each cold-item weight costs the ranking of all users
    (left) against how often it finds the cold items (right), the chosen weight marked."""
    from eval.plots import pyplot, save

    grid = result["grid"]
    weights = [r["weight"] for r in grid]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    left.plot(weights, [r["ndcg10"] for r in grid], marker="o", label="NDCG@10, all users")
    left.plot(weights, [r["warm_ndcg10"] for r in grid], marker="o", label="NDCG@10, users without a cold item")
    right.plot(weights, [r["cold_hit50"] for r in grid], marker="o", label="cold items hit@50")
    right.plot(weights, [r["recall50"] for r in grid], marker="o", label="Recall@50, all users")
    for ax in (left, right):
        ax.axvline(result["chosen"], color="grey", linestyle="--", label=f"chosen ({result['chosen']:g})")
        ax.set_xlabel("cold-item weight")
        ax.legend(fontsize=8)
    left.set_title("Validation: the ranking it costs")
    right.set_title("Validation: the cold items it finds")
    save(fig, path)


def markdown(result: Mapping[str, Any], served: float, plot_name: str | None = None) -> list[str]:
    """The report's section from :meth:`ColdPathStudy.as_dict`; ``served``: the weight the code serves by default;
    ``plot_name``: the image of :func:`plot` beside the report."""
    u = result["users"]
    lines = ["## Cold-item path", "",
             "The fused retriever hears items no one has interacted with through the content source, its weight "
             "raised by the cold-item weight for them (`FusionConfig.cold`). Chosen here, in the world above (the "
             "cold items removed from every history, CF and the cold encoder fitted without them), on validation: "
             f"all {u['validation']} users, {u['validation_cold']} of them holding out a cold item; the best Recall@50 "
             f"among the weights within {NDCG_TIE:g} of the best NDCG@10 (then the smaller weight). Fusion weights "
             + ", ".join(f"{k} {v:g}" for k, v in sorted(result["weights"].items())) + ".", "",
             "| cold-item weight | NDCG@10, all users | Recall@50, all users | cold items hit@50 "
             "| NDCG@10, other users |",
             "|---|---|---|---|---|"]
    if plot_name:
        lines[-2:-2] = [f"![cold-item path]({plot_name})", ""]
    for r in result["grid"]:
        mark = " (chosen)" if r["weight"] == result["chosen"] else ""
        lines.append(f"| {r['weight']:g}{mark} | {r['ndcg10']:.4f} | {r['recall50']:.4f} | {r['cold_hit50']:.3f} | "
                     f"{r['warm_ndcg10']:.4f} |")
    t = result["test"]
    lines += ["", f"Test, the same world ({u['test']} users, {u['test_cold']} holding out a cold item), the fusion "
              f"without the path and with the chosen weight {result['chosen']:g}:", "",
              "| fusion | NDCG@10, all users | Recall@50, all users | cold items hit@50 |", "|---|---|---|---|"]
    for name, label in (("off", "without the path (weight 0)"), ("on", f"cold-item weight {result['chosen']:g}")):
        lines.append(f"| {label} | {interval_cell(t[name]['ndcg@10'])} | {interval_cell(t[name]['recall@50'])} | "
                     f"{interval_cell(t[name]['cold_hit@50'])} |")
    d = t["on_minus_off"]
    lines += ["", f"Paired per user, with minus without: NDCG@10 {d['ndcg@10']['mean']:+.4f} "
              f"[{d['ndcg@10']['lo']:+.4f}, {d['ndcg@10']['hi']:+.4f}], Recall@50 {d['recall@50']['mean']:+.4f} "
              f"[{d['recall@50']['lo']:+.4f}, {d['recall@50']['hi']:+.4f}]."]
    if result["chosen"] != served:
        lines.append(f"**The weight chosen here ({result['chosen']:g}) is not the one served by default "
                     f"({served:g}, `retrieval.index.COLD_WEIGHT`).**")
    else:
        lines.append(f"Served by default (`retrieval.index.COLD_WEIGHT` = {served:g}).")
    return lines + [""]
