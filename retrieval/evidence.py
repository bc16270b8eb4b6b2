"""Which history item a recommendation rests on, chosen by the system's own signals (no LLM).

For a candidate and a user's history, the evidence is the history item with the strongest item-item
collaborative weight to the candidate (EASE's learned weight, plus the sequential transition weight); when no
history item has a positive CF weight, the history item whose embedding is most similar to the candidate's.
The explainer hands that pair to the LLM, which writes one sentence about it instead of choosing ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from retrieval.cf import CFModels

Signal = Literal["cf", "content"]


@dataclass(frozen=True)
class Link:
    """The history item (``evidence``, a catalogue id) that best explains ``item``, and by which signal."""

    item: str
    evidence: str
    signal: Signal
    strength: float


def strongest_links(cf: CFModels, item_vectors: np.ndarray, item_index: dict[str, int], item_ids: Sequence[str],
                    history: Sequence[str], candidates: Sequence[str]) -> dict[str, Link]:
    """The :class:`Link` of each catalogue candidate with at least one known history item (vectorised over the
    history: one row slice per candidate). Candidates or history items outside the catalogue are skipped."""
    hist = [item_index[h] for h in dict.fromkeys(history) if h in item_index]
    if not hist:
        return {}
    hist_arr = np.asarray(hist)
    # the latest occurrence wins ties: scan the history newest first
    newest_first = hist_arr[::-1]
    out: dict[str, Link] = {}
    for cand in candidates:
        c = item_index.get(cand)
        if c is None:
            continue
        cf_weight = np.asarray(cf.transitions[newest_first, c].toarray()).ravel().astype(np.float64)
        if cf.ease is not None:
            ease = cf.ease[newest_first, c].astype(np.float64)
            cf_weight = cf_weight + np.maximum(ease, 0.0)
        if cf_weight.size and float(cf_weight.max()) > 0:
            j = int(np.argmax(cf_weight))
            out[cand] = Link(cand, item_ids[int(newest_first[j])], "cf", float(cf_weight[j]))
            continue
        sims = item_vectors[newest_first] @ item_vectors[c]
        j = int(np.argmax(sims))
        out[cand] = Link(cand, item_ids[int(newest_first[j])], "content", float(sims[j]))
    return out
