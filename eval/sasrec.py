"""The SASRec-style baseline of the embedder report (the model: :mod:`retrieval.sasrec`).

Protocol of :func:`evaluate_sasrec` (no held-out label reaches training or any choice): fit on the validation
fit histories with early stopping on the validation cases, which picks the number of epochs E; then refit from
scratch (same seed) on the test fit histories for exactly E epochs, with no early stopping, and score the test
cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retrieval.catalog import Catalog
from retrieval.full_ranking import full_ranks as target_ranks
from retrieval.sasrec import SASRecConfig, fit_sasrec, sasrec_scores
from retrieval.splits import Split


def evaluate_sasrec(catalog: Catalog, split: Split, config: SASRecConfig | None = None, progress: bool = True,
                    item_vectors: np.ndarray | None = None) -> dict[str, Any]:
    """Validation ranks from the early-stopped fit, test ranks from a refit for exactly the best epoch count; the two
    models too (``models``), for a fusion that includes them. ``item_vectors``: the content encoder's, where the
    item embeddings start (``SASRecConfig.init_scale``)."""
    config = config or SASRecConfig()
    index = catalog.item_index
    n_items = catalog.n_items

    def positions(histories: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
        return {u: [index[i] for i in h] for u, h in histories.items()}

    val_cases = [([index[i] for i in c.history], index[c.target]) for c in split.validation]
    val_model, val_log = fit_sasrec(positions(split.fit_histories("validation")), n_items, config,
                                    val=val_cases, progress=progress, item_vectors=item_vectors)
    val_hists = [h for h, _ in val_cases]
    val_ranks = target_ranks(sasrec_scores(val_model, val_hists, n_items), val_hists, [t for _, t in val_cases])
    best_epochs = max(int(val_log["best_epoch"]), 1)

    # Refit from scratch for exactly E epochs: no validation, no early stopping, no time cap.
    refit_config = config.model_copy(update={"epochs": best_epochs, "max_minutes": math.inf})
    model, test_log = fit_sasrec(positions(split.fit_histories("test")), n_items, refit_config, progress=progress,
                                  item_vectors=item_vectors)
    test_cases = [([index[i] for i in c.history], index[c.target]) for c in split.test]
    test_hists = [h for h, _ in test_cases]
    test_ranks = target_ranks(sasrec_scores(model, test_hists, n_items), test_hists, [t for _, t in test_cases])
    return {
        "validation": [int(r) for r in val_ranks],
        "test": [int(r) for r in test_ranks],
        "log": {"validation_fit": val_log, "test_fit": test_log, "config": config.model_dump()},
        "best_epochs": best_epochs,
        "models": {"validation": val_model, "test": model},  # each fitted on what its part may see
    }
