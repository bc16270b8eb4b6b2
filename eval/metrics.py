"""Ranking metrics for one held-out item, and bootstrap confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "mrr@20")


def rank_of(ranked: Sequence[str], target: str) -> int | None:
    """1-based rank of the target, or None when absent."""
    for i, item in enumerate(ranked, start=1):
        if item == target:
            return i
    return None


def metric_values(rank: int | None) -> dict[str, float]:
    """All metrics for a single relevant item at ``rank``."""
    out = {}
    for name in METRICS:
        kind, cut = name.split("@")
        k = int(cut)
        hit = rank is not None and rank <= k
        if kind == "recall":
            out[name] = 1.0 if hit else 0.0
        elif kind == "ndcg":
            out[name] = 1.0 / math.log2(rank + 1) if hit and rank else 0.0
        else:
            out[name] = 1.0 / rank if hit and rank else 0.0
    return out


def per_user_table(ranks: Sequence[int | None]) -> dict[str, np.ndarray]:
    rows = [metric_values(r) for r in ranks]
    return {m: np.array([r[m] for r in rows], dtype=np.float64) for m in METRICS}


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0
                          ) -> tuple[float, float, float]:
    """Mean of a - b with its percentile bootstrap interval (users resampled together)."""
    diff = a - b
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    return float(diff.mean()), lo, hi


def interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """``{mean, lo, hi}`` of per-user ``values``: the mean (NaN where there are none) and its bootstrap interval."""
    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"mean": float(values.mean()) if values.size else float("nan"), "lo": lo, "hi": hi}


def summarise(ranks: Sequence[int | None], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    return {m: interval(vals, n_boot, seed) for m, vals in per_user_table(ranks).items()}


def interval_cell(m: Mapping[str, float]) -> str:
    """A report cell for ``{mean, lo, hi}``: "0.1337 [0.116, 0.152]"."""
    return f"{m['mean']:.4f} [{m['lo']:.3f}, {m['hi']:.3f}]"
