"""Full-ranking ranks of one held-out item per user from a users x items score matrix (the rule every fast
evaluation here shares with ``BlendRetriever.retrieve``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def full_ranks(scores: np.ndarray, histories: Sequence[Sequence[int]], targets: Sequence[int]) -> list[int]:
    """1-based rank of each target with its history's items excluded (scored -inf); ties broken by catalogue
    position: rank = #(score > t) + #(score == t at a lower position) + 1."""
    ranks: list[int] = []
    for row, history, target in zip(scores, histories, targets, strict=True):
        s = np.asarray(row, dtype=np.float64).copy()
        if len(history):
            s[np.asarray(list(history), dtype=np.int64)] = -np.inf  # a target seen before is excluded too
        t = s[target]
        ranks.append(int(np.sum(s > t) + np.sum(s[:target] == t) + 1))
    return ranks


def ndcg_at_10(ranks: Sequence[int | None]) -> float:
    """Mean NDCG@10 of one held-out item per user (rank 1 = best; None = not ranked)."""
    gains = [1.0 / math.log2(r + 1) if r is not None and r <= 10 else 0.0 for r in ranks]
    return float(np.mean(gains)) if gains else float("nan")
