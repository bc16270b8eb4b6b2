"""Score arithmetic shared by serving (:mod:`agent.rerank`) and training (:mod:`agent.ranker.loop`): the marker's
log-odds, per-list min-max normalisation and the alpha blend of LLM and retrieval scores. numpy (and torch tensors
where said) only, so the training loop can run on a machine that has none of the project's other packages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def log_odds(logp: Any) -> Any:
    """A trained ranker's score from a marker's log-probability: its log-odds, ``log p - log(1 - p)``. Ranking by
    log p would be the same, but training on it saturates: once every line's marker is near-certain, log p sits at
    0 for all candidates and the gradient vanishes (the loss stalls at ln n); the log-odds has no ceiling. Works on
    numpy arrays and torch tensors alike."""
    if hasattr(logp, "clamp"):  # a torch tensor
        lp = logp.clamp(max=-1e-6)
        return lp - (-lp.expm1()).log()
    arr = np.minimum(np.asarray(logp, dtype=np.float64), -1e-12)
    return arr - np.log(-np.expm1(arr))


def minmax(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return arr
    lo, hi = float(arr.min()), float(arr.max())
    return np.ones_like(arr) if hi - lo <= 1e-12 else (arr - lo) / (hi - lo)


def fuse(retrieval: Sequence[float], llm: Sequence[float] | None, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(final scores, order). Ties go to the earlier retrieval rank, so alpha = 0 keeps the retrieval order."""
    ret = minmax(retrieval)
    final = ret.copy() if llm is None else alpha * minmax(llm) + (1.0 - alpha) * ret
    order = np.lexsort((np.arange(len(final)), -final))
    return final, order
