"""The SASRec-style baseline: the ranking rule by hand, and learning a deterministic cycle."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.full_ranking import full_ranks as target_ranks
from retrieval.sasrec import SASRecConfig, fit_sasrec, sasrec_scores, windows

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_target_ranks_by_hand() -> None:
    scores = np.array([
        [0.9, 0.5, 0.5, 0.1, 0.7],  # item 0 in history: -inf
        [0.2, 0.2, 0.2, 0.2, 0.2],  # all tied: rank by position
        [0.3, 0.8, 0.3, 0.9, 0.3],
    ])
    histories = [[0], [], [3]]
    targets = [2, 3, 4]
    # row 0: above 0.5 -> item 4 (0.7); tie 0.5 at lower index -> item 1  => rank 3
    # row 1: four ties, three at lower index => rank 4
    # row 2: item 3 excluded; above 0.3 -> item 1; ties at lower index -> items 0, 2 => rank 4
    assert target_ranks(scores, histories, targets) == [3, 4, 4]
    # excluded items fall below everything; a target in its own history is excluded too
    assert target_ranks(scores[:1], [[0, 4]], [1]) == [1]
    assert target_ranks(scores[:1], [[2]], [2]) == [5]
    assert all(isinstance(r, int) for r in target_ranks(scores, histories, targets))


def test_learns_a_cycle() -> None:
    n_items, period = 8, 6  # items 6 and 7 never occur
    rng = np.random.default_rng(0)
    histories: dict[str, list[int]] = {}
    held_out: list[tuple[list[int], int]] = []
    for u in range(40):
        offset, length = int(rng.integers(period)), int(rng.integers(8, 30))
        seq = [(offset + k) % period for k in range(length + 1)]
        histories[f"u{u}"] = seq[:-1]
        held_out.append((seq[:-1], seq[-1]))
    config = SASRecConfig(max_len=20, hidden=32, n_layer=1, n_head=2, dropout=0.0, lr=5e-3,
                          batch_size=16, epochs=5, seed=0)
    model, log = fit_sasrec(histories, n_items, config, progress=False)
    assert log["epochs"] == 5 and log["best_epoch"] == 5 and log["parameters"] > 0
    assert log["loss"][-1] < log["loss"][0]
    scores = sasrec_scores(model, [h for h, _ in held_out], n_items)
    assert scores.shape == (40, n_items)
    predicted = scores.argmax(axis=1)
    hits = float(np.mean(predicted == np.array([t for _, t in held_out])))
    assert hits >= 0.8, hits


def test_early_stopping_keeps_the_best_epoch() -> None:
    histories = {f"u{u}": [(u + k) % 5 for k in range(12)] for u in range(20)}
    val = [([0, 1], 2), ([3, 4], 0), ([1, 2], 3)]
    config = SASRecConfig(max_len=10, hidden=16, n_layer=1, n_head=1, epochs=6, patience=2, batch_size=8)
    model, log = fit_sasrec(histories, 5, config, val=val, progress=False)
    assert 1 <= log["best_epoch"] <= log["epochs"] <= 6
    assert len(log["val_ndcg"]) == log["epochs"]
    assert log["val_ndcg"][log["best_epoch"] - 1] == max(log["val_ndcg"])
    # the returned model is the best epoch's: scoring it again reproduces that epoch's NDCG@10
    hists = [h for h, _ in val]
    ranks = target_ranks(sasrec_scores(model, hists, 5), hists, [t for _, t in val])
    ndcg = float(np.mean([1 / np.log2(r + 1) if r <= 10 else 0.0 for r in ranks]))
    assert ndcg == pytest.approx(max(log["val_ndcg"]))


def test_windows_cover_the_history_from_its_end() -> None:
    h = list(range(10))
    assert windows(h, max_len=4, stride=3) == [[5, 6, 7, 8, 9], [2, 3, 4, 5, 6], [0, 1, 2, 3]]
    assert windows(h, max_len=4, stride=0) == [[5, 6, 7, 8, 9]]
    assert windows([1], max_len=4, stride=3) == windows([], max_len=4, stride=0) == []
    # every training step (an item with one before it) is the label of some window
    labelled = {w[k] for w in windows(h, max_len=4, stride=3) for k in range(1, len(w))}
    assert labelled == set(h[1:])


def test_the_early_stopped_model_is_the_one_a_fixed_epoch_fit_trains() -> None:
    """Tuning keeps the early-stopped model for its lists instead of refitting for its epochs: training is
    deterministic, and scoring the validation users between epochs does not change it."""
    histories = {f"u{u}": [(u + 2 * k) % 9 for k in range(15)] for u in range(30)}
    val = [([0, 2], 4), ([3, 5], 7), ([1, 3, 5], 7), ([8, 1], 3)]
    config = SASRecConfig(max_len=10, hidden=16, n_layer=1, n_head=1, epochs=5, patience=5, batch_size=8, stride=4)
    stopped, log = fit_sasrec(histories, 9, config, val=val, progress=False)
    assert log["epochs"] > log["best_epoch"]  # trained past its best epoch, then restored it
    fixed, _ = fit_sasrec(histories, 9, config.model_copy(update={"epochs": log["best_epoch"]}), progress=False)
    hists = [h for h, _ in val] + [list(h) for h in histories.values()]
    np.testing.assert_array_equal(sasrec_scores(stopped, hists, 9), sasrec_scores(fixed, hists, 9))


def test_item_embeddings_start_from_the_content_vectors() -> None:
    from retrieval.sasrec import _build_model, item_init

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 6)) @ np.diag([5.0, 3.0, 1.0, 0.5, 0.1, 0.01])  # content vectors, d = 6
    init = item_init(vectors, hidden=4, scale=10.0)
    assert init.shape == (12, 4) and abs(float(init.std()) - 0.2) < 1e-5
    # the top principal axes: item distances are kept where the vectors vary most
    centred = vectors - vectors.mean(axis=0)
    np.testing.assert_allclose(np.abs(np.corrcoef(init[:, 0], centred[:, 0])[0, 1]), 1.0, atol=0.05)
    wide = item_init(vectors, hidden=8, scale=1.0)  # more dimensions than the vectors: zero columns
    assert wide.shape == (12, 8) and np.all(wide[:, 6:] == 0)

    config = SASRecConfig(max_len=5, hidden=8, n_layer=1, n_head=1, init_scale=1.0)
    model = _build_model(12, config, vectors)
    np.testing.assert_allclose(model.transformer.wte.weight[:12].detach().numpy(), wide, atol=1e-6)
    random = _build_model(12, config.model_copy(update={"init_scale": 0.0}), vectors)
    assert not np.allclose(random.transformer.wte.weight[:12].detach().numpy(), wide)
    with pytest.raises(ValueError, match="item vectors hold 11 items, the model 12"):
        _build_model(12, config, vectors[:11])


def test_content_initialised_items_are_told_apart_before_training() -> None:
    """Two item groups whose content vectors differ: SASRec started from them scores a group's items above the
    other group's after a history in it, with no training at all (epochs 0); a random start cannot."""
    rng = np.random.default_rng(1)
    groups = np.repeat([0, 1], 10)
    vectors = rng.normal(size=(20, 16)) * 0.1 + np.where(groups[:, None] == 0, 1.0, -1.0)
    config = SASRecConfig(max_len=6, hidden=8, n_layer=1, n_head=1, dropout=0.0, epochs=0, init_scale=10.0)
    model, _ = fit_sasrec({"u": [0, 1]}, 20, config, progress=False, item_vectors=vectors)
    scores = sasrec_scores(model, [[0, 1, 2], [10, 11, 12]], 20)
    assert scores[0, :10].mean() > scores[0, 10:].mean() and scores[1, 10:].mean() > scores[1, :10].mean()


def test_a_config_stored_before_the_content_start_reads_back_as_random_init() -> None:
    stored = SASRecConfig().model_dump()
    del stored["init_scale"]  # as an index manifest written before the field existed holds it
    assert SASRecConfig.model_validate(stored).init_scale == 0.0
    assert SASRecConfig().init_scale == 10.0 and SASRecConfig(hidden=32, stride=10).init_scale == 10.0
    assert SASRecConfig.model_validate(SASRecConfig().model_dump()).init_scale == 10.0
