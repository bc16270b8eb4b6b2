"""Retrieval on the tiny synthetic catalogue, the fast evaluation path, metrics and splits."""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from cli.main import app
from eval.cold_path import NDCG_TIE, GridRow, choose, cold_world
from eval.metrics import METRICS, bootstrap_ci, metric_values, paired_bootstrap_diff, rank_of, summarise
from eval.retrieval_eval import (
    EASE_DECAYS,
    EASE_LAMBDAS,
    REFINE_GRID,
    TUNE_GRID,
    GridPoint,
    PartLists,
    collect_lists,
    evaluate,
    refine_weights,
    refined,
    tie_sensitivity,
    tune,
    tune_weights,
    with_cf_config,
)
from retrieval.candidates import UnknownItemsError
from retrieval.catalog import Catalog, load_catalog
from retrieval.catalog_store import reindex, save_and_index
from retrieval.cf import CFConfig, CFModels, fit_cf
from retrieval.embeddings import Embedder
from retrieval.filters import Filters
from retrieval.index import (
    COLD_WEIGHT,
    DEFAULT_WEIGHTS,
    FusionConfig,
    Index,
    item_texts,
    load_index,
    position_histories,
    sasrec_init,
    save_cf,
)
from retrieval.item_text import item_text
from retrieval.learned_fusion import LearnedFusion, LearnedRetriever
from retrieval.retriever import RETRIEVERS, BlendRetriever
from retrieval.sasrec import SASRecConfig, fit_sasrec, histories_digest, ship_sasrec, shipped_sasrec
from retrieval.sources import EaseSource, SasrecSource, SlitSource, SourceQuery, latest_recency
from retrieval.splits import Case, SplitSpec, leave_last_out, split_catalog


def ids(candidates: list) -> list[str]:
    return [c.item_id for c in candidates]


# --- item text ----------------------------------------------------------------------------------------------


def test_item_text_is_deterministic() -> None:
    args = ("  Star   Voyager ", 1994, ["Sci-Fi", "Adventure"], " A crew  explores\na galaxy ")
    text = item_text(*args)
    assert text == "Star Voyager (1994). Genres: Sci-Fi, Adventure. A crew explores a galaxy."
    assert item_text(*args) == text
    assert item_text("Toy Story (1995)", 1995) == "Toy Story (1995)."  # year not repeated
    assert item_text("Untitled") == "Untitled."
    assert item_text("Quiz", None, [], "Who wins?") == "Quiz. Who wins?"


def test_item_texts_of_catalogue_are_stable(tiny_catalog: Catalog) -> None:
    first = item_texts(tiny_catalog)
    assert first == item_texts(load_catalog(tiny_catalog.name))
    assert first[tiny_catalog.item_index["d4"]].startswith("Witness for the Court. Genres: Drama. ")


# --- filters ------------------------------------------------------------------------------------------------

FILTER_CASES = [
    Filters(genres=["Sci-Fi"]),
    Filters(genres=["Animation", "Drama"]),
    Filters(exclude_genres=["Crime"]),
    Filters(genres=["Fantasy"], exclude_genres=["Children's"]),
    Filters(year_min=1990),
    Filters(year_max=1999),
    Filters(year_min=1986, year_max=2004),
    Filters(genres=["Drama"], year_max=1988),
    Filters(exclude_genres=["Sci-Fi"], year_min=2000, year_max=2008),
]


@pytest.mark.parametrize("filters", FILTER_CASES, ids=lambda f: str(f.model_dump(exclude_defaults=True)))
def test_filter_mask_agrees_with_chroma_where(tiny_index: Index, filters: Filters) -> None:
    catalog = tiny_index.catalog
    mask = filters.mask(catalog.genres_by_pos, catalog.years_by_pos)
    expected = {catalog.item_ids[p] for p in np.flatnonzero(mask)}
    assert expected, "every case should keep something"
    hits = tiny_index.store.query(tiny_index.item_vectors[0], catalog.n_items, where=filters.where())
    assert {item_id for item_id, _ in hits} == expected


def test_empty_filter_has_no_where() -> None:
    assert Filters().where() is None
    assert Filters().is_empty()


# --- retrieval ----------------------------------------------------------------------------------------------


LEARNED = "fused (learned)"
TINY_SASREC = CFConfig(sasrec_epochs=2, sasrec=SASRecConfig(max_len=8, hidden=16, n_layer=1, n_head=1, stride=4))


def retriever_named(index: Index, name: str, learned: LearnedFusion | None = None) -> BlendRetriever:
    """Every retriever of the registry; "als" over ALS fitted on purpose (the tiny catalogue is EASE's size);
    LEARNED: "fused" where the manifest holds a learned fusion."""
    if name == LEARNED:
        assert learned is not None
        fusion = index.manifest.fusion.model_copy(update={"learned": learned})
        index = dataclasses.replace(index, manifest=index.manifest.model_copy(update={"fusion": fusion}))
        retriever = index.retriever("fused")
        assert isinstance(retriever, LearnedRetriever)
        return retriever
    if name == "als":
        cf = index.fit_cf(index.catalog.histories(), CFConfig(collaborative="als", als_factors=8, als_iterations=5))
        return index.retriever("als", cf=cf)
    if name == "sasrec":
        return index.retriever("sasrec", cf=index.fit_cf(index.catalog.histories(), TINY_SASREC))
    return index.retriever(name)


@pytest.mark.parametrize("name", [*RETRIEVERS, LEARNED])
def test_history_is_never_returned(tiny_index: Index, tiny_learned_fusion: LearnedFusion, name: str) -> None:
    retriever = retriever_named(tiny_index, name, tiny_learned_fusion)
    n_items = tiny_index.catalog.n_items
    for user, history in tiny_index.catalog.histories().items():
        got = ids(retriever.retrieve(history, k=n_items))
        assert not set(got) & set(history), user
        assert len(got) == len(set(got)) == n_items - len(set(history))


@pytest.mark.parametrize("name", [*RETRIEVERS, LEARNED])
def test_cold_user_with_two_items_gets_k(tiny_index: Index, tiny_learned_fusion: LearnedFusion, name: str) -> None:
    got = retriever_named(tiny_index, name, tiny_learned_fusion).retrieve(["s1", "a1"], k=5)
    assert len(got) == 5
    assert {"s1", "a1"}.isdisjoint(ids(got))


@pytest.mark.parametrize("name", ["fused", "sequential"])
def test_known_next_item_comes_first(tiny_index: Index, name: str) -> None:
    retriever = tiny_index.retriever(name)
    assert ids(retriever.retrieve(["s1", "s2"], k=3))[0] == "s3"
    assert ids(retriever.retrieve(["a1", "a2"], k=3))[0] == "a3"


def test_ease_weighs_each_history_item_by_how_recently_it_was_seen(tiny_index: Index) -> None:
    positions, weights = latest_recency([4, 7, 4, 9], 0.5)  # 4 last seen one step before the latest item
    assert positions.tolist() == [4, 7, 9] and weights.tolist() == [0.5, 0.25, 1.0]
    cf = tiny_index.cf
    assert cf.ease is not None
    history = [0, 1, 2, 1, 3]
    allowed = np.ones(tiny_index.catalog.n_items, dtype=bool)
    allowed[history] = False
    query = SourceQuery(history=history, allowed=allowed)
    plain = EaseSource(cf).top(query, 5)
    assert plain == EaseSource(dataclasses.replace(cf, config=cf.config.model_copy(update={"ease_decay": 1.0}))).top(
        query, 5)  # decay 1: every item alike, plain EASE
    expected = np.array([0.9**4, 0.9, 0.9**2, 1.0]) @ cf.ease[[0, 1, 2, 3]].astype(np.float64)
    decayed = EaseSource(dataclasses.replace(cf, config=cf.config.model_copy(update={"ease_decay": 0.9})))
    got = decayed.top(query, 5)
    assert [s for _, s in got] != pytest.approx([s for _, s in plain])
    for pos, score in got:
        assert score == pytest.approx(float(expected[pos]))
    latest_only = EaseSource(dataclasses.replace(cf, config=cf.config.model_copy(update={"ease_decay": 1e-6})))
    row = cf.ease[3].astype(np.float64)  # a steep decay: the latest item alone ranks
    top = latest_only.top(query, 5)
    assert [s for _, s in top] == pytest.approx([row[p] for p, _ in top], abs=1e-4)
    assert top[0][1] == pytest.approx(row[allowed].max(), abs=1e-4)


def test_slit_learns_what_comes_next_and_scores_the_weighted_latest_items(tmp_path: Path) -> None:
    from retrieval.cf import CFModels, fit_cf, slit_rows

    # item 0 is always followed by 1, item 2 by 3; 4 and 5 are seen, never right after 0
    histories = {f"u{i}": [4, 0, 1, 5] if i % 2 else [5, 2, 3, 4, 0, 1] for i in range(20)}
    config = CFConfig(slit_lambda=1.0, slit_decay=0.5, slit_last=3)
    cf = fit_cf(histories, 6, config)
    assert cf.slit is not None and cf.slit.shape == (6, 6)
    assert int(np.argmax(cf.slit[0])) == 1 and int(np.argmax(cf.slit[2])) == 3
    prev, weights = slit_rows([9, 8, 0, 2, 7], config)  # the latest 3, the latest weighing 1
    assert prev == [0, 2, 7] and weights.tolist() == [0.25, 0.5, 1.0]
    # the fit builds, per training step, the rows slit_rows makes of the history before it (here solved directly)
    x = np.array([np.bincount(slit_rows(h[:t], config)[0], weights=slit_rows(h[:t], config)[1], minlength=6)
                  for h in histories.values() for t in range(1, len(h))])
    y = np.eye(6)[[h[t] for h in histories.values() for t in range(1, len(h))]]
    np.testing.assert_allclose(cf.slit, np.linalg.solve(x.T @ x + np.eye(6), x.T @ y), rtol=1e-4, atol=1e-6)
    allowed = np.ones(6, dtype=bool)
    allowed[[4, 0]] = False
    top = SlitSource(cf).top(SourceQuery(history=[4, 0], allowed=allowed), 3)
    assert top[0][0] == 1  # after 0 comes 1
    expected = np.array([0.5, 1.0]) @ cf.slit[[4, 0]].astype(np.float64)
    assert all(score == pytest.approx(float(expected[pos])) for pos, score in top)
    cf.save(tmp_path)  # stored and loaded with the other CF models, as an index keeps them
    loaded = CFModels.load(tmp_path, cf.config)
    assert loaded.slit is not None
    np.testing.assert_array_equal(loaded.slit, cf.slit)
    als = fit_cf(histories, 6, CFConfig(collaborative="als", als_factors=4, als_iterations=2))
    assert als.slit is None  # SLIT comes with EASE's dense size only


def test_content_neighbours_stay_in_cluster(tiny_index: Index) -> None:
    got = ids(tiny_index.retriever("content").retrieve(["d1", "d2"], k=2))
    assert set(got) <= {"d3", "d4"}


def test_free_text_is_heard_where_tuning_gave_content_no_weight(tiny_index: Index) -> None:
    retriever = tiny_index.retriever("fused", weights={"sequential": 1.0, "ease": 0.5, "content": 0.0})
    assert "content" not in retriever.sources  # history-only requests skip it, as tuned
    got = ids(retriever.retrieve([], k=3, query="astronauts and aliens on a starship in deep space"))
    assert set(got) <= {"s1", "s2", "s3", "s4"}
    with_history = ids(retriever.retrieve(["d1"], k=4, query="a fairy-tale princess and a dragon"))
    assert {"a1", "a2"} & set(with_history)


@pytest.mark.parametrize("name", ["fused", LEARNED])
def test_genre_filter_keeps_only_that_genre(tiny_index: Index, tiny_learned_fusion: LearnedFusion, name: str) -> None:
    catalog = tiny_index.catalog
    got = retriever_named(tiny_index, name, tiny_learned_fusion).retrieve(["s1", "s2"], k=10,
                                                                           filters=Filters(genres=["drama"]))
    assert got, "the filter allows four items"
    assert all("Drama" in catalog.item(c.item_id)["genres"] for c in got)  # type: ignore[operator]
    assert len(got) == 4  # all drama items, topped up by popularity


def test_unknown_genre_is_rejected(tiny_index: Index) -> None:
    with pytest.raises(ValueError, match="unknown genre 'Western'"):
        tiny_index.retriever("fused").retrieve(["s1"], k=3, filters=Filters(genres=["Western"]))


def test_unknown_history_id_raises(tiny_index: Index) -> None:
    with pytest.raises(UnknownItemsError) as info:
        tiny_index.retriever("fused").retrieve(["s1", "nope-1", "nope-2"], k=3)
    assert info.value.ids == ["nope-1", "nope-2"]
    assert "nope-1" in str(info.value) and tiny_index.catalog.name in str(info.value)


def test_candidates_carry_provenance(tiny_index: Index) -> None:
    got = tiny_index.retriever("fused").retrieve(["s1", "s2"], k=3)
    top = got[0]
    assert top.item_id == "s3"
    assert top.sources, "the top candidate must say which sources listed it"
    by_source = {hit.source: hit for hit in top.sources}
    assert set(by_source) <= set(DEFAULT_WEIGHTS)
    assert by_source["sequential"].rank == 1 and by_source["sequential"].score > 0
    for cand in got:
        for hit in cand.sources:
            assert hit.rank >= 1 and math.isfinite(hit.score)
    assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)


def test_k_must_be_positive(tiny_index: Index) -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        tiny_index.retriever("fused").retrieve(["s1"], k=0)


def test_registry_error_lists_choices(tiny_index: Index) -> None:
    with pytest.raises(ValueError) as info:
        tiny_index.retriever("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in RETRIEVERS:
        assert name in message


# --- embedding cache ----------------------------------------------------------------------------------------


def test_reindex_embeds_only_the_changed_item(tiny_catalog: Catalog, embedder: Embedder,
                                              scratch_catalog_name: str) -> None:
    def copy(items_title: str | None = None) -> Catalog:
        items = tiny_catalog.items.copy()
        if items_title is not None:
            items.loc[0, "title"] = items_title
        return Catalog(name=scratch_catalog_name, items=items, interactions=tiny_catalog.interactions.copy())

    calls = embedder.model_calls
    save_and_index(copy(), embedder=embedder, progress=False)
    assert embedder.model_calls == calls, "the tiny catalogue's texts are cached already"

    reindex(scratch_catalog_name, embedder=embedder, progress=False)
    assert embedder.model_calls == calls, "re-indexing unchanged items embeds nothing"

    old = load_index(load_catalog(scratch_catalog_name), embedder=embedder).item_vectors
    retitled = copy(f"Star Voyager: Director's Cut {uuid.uuid4().hex}")
    save_and_index(retitled, embedder=embedder, progress=False)
    assert embedder.model_calls == calls + 1, "only the retitled item reaches the model"

    new_index = load_index(load_catalog(scratch_catalog_name), embedder=embedder)
    assert new_index.store.count() == tiny_catalog.n_items
    assert not np.allclose(new_index.item_vectors[0], old[0])
    np.testing.assert_array_equal(new_index.item_vectors[1:], old[1:])


# --- fast evaluation path -----------------------------------------------------------------------------------

WEIGHT_SETS = [
    dict(DEFAULT_WEIGHTS),
    {"sequential": 1.0},
    {"ease": 1.0},
    {"content": 1.0},
    {"mostpop": 1.0},
    {"sequential": 1.0, "ease": 0.25, "content": 0.4, "mostpop": 0.1},
    {"sequential": 1.0, "ease": 0.0, "content": 0.2, "mostpop": 0.0},
    {"sequential": 1.0, "ease": 1.0, "content": 0.0, "mostpop": 0.4},
]


@pytest.mark.parametrize("part", ["validation", "test"])
def test_fast_ranks_agree_with_retrieve(tiny_index: Index, part: str) -> None:
    """Contract: PartLists.ranks puts the target exactly where BlendRetriever.retrieve(history, k=50) does."""
    split = leave_last_out(tiny_index.catalog.histories())
    cases = split.cases(part)
    assert len(cases) == 8
    lists = collect_lists(tiny_index, split, part, progress=False)
    cf = tiny_index.fit_cf(split.fit_histories(part))
    seen_absent = False
    cold_moved = False
    for weights in WEIGHT_SETS:
        by_cold = {}
        for cold in (0.0, 3.0):
            fast = by_cold[cold] = lists.ranks(weights, cold)
            retriever = tiny_index.retriever("fused", cf=cf, weights=weights, cold=cold)
            for case, rank in zip(cases, fast, strict=True):
                got = ids(retriever.retrieve(case.history, k=50))
                expected = got.index(case.target) + 1 if case.target in got else None
                assert rank == expected, (weights, cold, case)
                seen_absent |= expected is None
        cold_moved |= by_cold[0.0] != by_cold[3.0]
    if part == "test":
        assert seen_absent, "u8's target is in its history, so it is never retrieved"
    assert cold_moved, "the cold-item path moves some target (the tiny catalogue has items no one has seen)"


# --- metrics ------------------------------------------------------------------------------------------------


def test_rank_of() -> None:
    assert rank_of(["a", "b", "c"], "a") == 1
    assert rank_of(["a", "b", "c"], "c") == 3
    assert rank_of(["a", "b", "c"], "z") is None


def test_metric_values_by_hand() -> None:
    assert metric_values(1) == {m: 1.0 for m in METRICS}
    r3 = metric_values(3)
    assert r3["recall@10"] == 1.0 and r3["recall@50"] == 1.0
    assert r3["ndcg@10"] == pytest.approx(0.5)  # 1 / log2(4)
    assert r3["mrr@20"] == pytest.approx(1 / 3)
    r15 = metric_values(15)
    assert r15["recall@10"] == 0.0 and r15["recall@20"] == 1.0
    assert r15["ndcg@10"] == 0.0 and r15["ndcg@20"] == pytest.approx(0.25)  # 1 / log2(16)
    assert r15["mrr@20"] == pytest.approx(1 / 15)
    r30 = metric_values(30)
    assert r30["recall@20"] == 0.0 and r30["recall@50"] == 1.0 and r30["mrr@20"] == 0.0
    assert metric_values(None) == {m: 0.0 for m in METRICS}


def test_summarise_and_bootstrap() -> None:
    table = summarise([1, None, 3, 15], n_boot=200)
    assert table["recall@10"]["mean"] == pytest.approx(0.5)
    assert table["recall@20"]["mean"] == pytest.approx(0.75)
    assert table["ndcg@10"]["mean"] == pytest.approx((1 + 0.5) / 4)
    assert table["mrr@20"]["mean"] == pytest.approx((1 + 1 / 3 + 1 / 15) / 4)
    for stats in table.values():
        assert stats["lo"] <= stats["mean"] <= stats["hi"]
    assert bootstrap_ci(np.full(5, 0.25)) == (pytest.approx(0.25), pytest.approx(0.25))
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([])))
    mean, lo, hi = paired_bootstrap_diff(np.array([1.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0]))
    assert mean == pytest.approx(1 / 3) and 0.0 <= lo <= mean <= hi <= 1.0


# --- splits -------------------------------------------------------------------------------------------------


def test_leave_last_out_on_toy_history() -> None:
    split = leave_last_out({"u": ["a", "b", "c", "d"], "short": ["x", "y"]})
    assert split.train == {"u": ["a", "b"], "short": ["x", "y"]}
    assert split.validation == [Case("u", ["a", "b"], "c")]
    assert split.test == [Case("u", ["a", "b", "c"], "d")]
    assert "c" in split.test[0].history  # the test history includes the validation item
    assert split.fit_histories("validation") == {"u": ["a", "b"], "short": ["x", "y"]}
    assert split.fit_histories("test") == {"u": ["a", "b", "c"], "short": ["x", "y"]}
    assert split.cases("test") == split.test
    with pytest.raises(ValueError, match="unknown split part"):
        split.cases("train")
    with pytest.raises(ValueError, match="unknown split part"):
        split.fit_histories("nope")


def test_split_spec_provenance_and_tie_rules() -> None:
    spec = SplitSpec()
    assert (spec.ties, spec.seed, spec.protocol) == ("random", 0, "leave-last-out by time")
    assert spec.describe() == ("per user by time, ties in time broken by seeded random order (seed 0); "
                               "last = test, second-last = validation")
    assert SplitSpec(ties="id").describe().startswith("per user by time, ties in time broken by item id")
    assert spec.provenance() == {"ties": "random", "seed": 0, "protocol": "leave-last-out by time",
                                 "description": spec.describe()}
    assert SplitSpec(seed=4).other_rule() == SplitSpec(ties="id", seed=4)
    assert SplitSpec(ties="id").other_rule() == SplitSpec()
    with pytest.raises(ValueError, match="choose one of: id, random"):
        SplitSpec(ties="time")


def test_split_catalog_holds_out_by_the_tie_rule() -> None:
    """A last batch of equal timestamps: "id" always holds out its highest-position item, "random" a seeded one."""
    batch = [f"i{n}" for n in range(8)]
    rows = [(u, "old", 1) for u in ("u", "v")] + [(u, i, 2) for u in ("u", "v") for i in batch]
    catalog = Catalog(name="tied", items=pd.DataFrame({"item_id": ["old", *batch]}),
                      interactions=pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))
    by_id = split_catalog(catalog, SplitSpec(ties="id"))
    assert [c.target for c in by_id.test] == ["i7", "i7"] and [c.target for c in by_id.validation] == ["i6", "i6"]
    seeded = split_catalog(catalog)
    assert seeded == split_catalog(catalog, SplitSpec(seed=0))
    assert [c.history[0] for c in seeded.test] == ["old", "old"]
    targets = {split_catalog(catalog, SplitSpec(seed=s)).test[0].target for s in range(6)}
    assert len(targets) > 1, "the held-out item depends on the seed"


# --- tuning and the tie-rule sensitivity --------------------------------------------------------------------


def test_tune_chooses_weights_and_ease_lambda_and_decay_on_validation(tiny_index: Index) -> None:
    split = split_catalog(tiny_index.catalog)
    base = collect_lists(tiny_index, split, "validation", progress=False)
    tuning = tune(tiny_index, split, base, lambdas=(10.0, 300.0), decays=(1.0, 0.5), progress=False, sasrec=False,
                  refine=False)
    assert tuning.sasrec is None and tuning.coarse is None and tuning.cf.sasrec_epochs == 0
    assert set(tuning.grid) == {(10.0, 1.0), (10.0, 0.5), (300.0, 1.0), (300.0, 0.5)}
    chosen = tuning.grid[(tuning.cf.ease_lambda, tuning.cf.ease_decay)]
    assert tuning.weights == chosen.weights and tuning.score == chosen.score
    assert all(p.key <= chosen.key for p in tuning.grid.values())
    assert summarise(tuning.lists.ranks(tuning.weights), n_boot=1)["ndcg@10"]["mean"] == tuning.score
    # only EASE is recomputed per lambda, and it matches a full recomputation under that CF config
    other = CFConfig(ease_lambda=10.0)
    swapped = with_cf_config(base, tiny_index, split, "validation", other, progress=False)
    full = collect_lists(tiny_index, split, "validation", progress=False, cf_config=other)
    for name in full.norm:
        np.testing.assert_array_equal(swapped.norm[name], full.norm[name])
    assert all(swapped.norm[name] is base.norm[name] for name in base.norm if name != "ease")
    # recomputing EASE never trains SASRec, whatever the config says
    assert "sasrec" not in with_cf_config(base, tiny_index, split, "validation", TINY_SASREC, progress=False).norm


def test_tune_adds_sasrec_with_its_epochs_chosen_on_validation(tiny_index: Index) -> None:
    split = split_catalog(tiny_index.catalog)
    base = collect_lists(tiny_index, split, "validation", progress=False)
    index = dataclasses.replace(tiny_index, manifest=tiny_index.manifest.model_copy(
        update={"cf": tiny_index.manifest.cf.model_copy(update={"sasrec": TINY_SASREC.sasrec})}))
    tuning = tune(index, split, base, lambdas=(300.0,), decays=(1.0,), progress=False, refine=False)
    choice = tuning.sasrec
    assert choice is not None and choice.without == tuning.grid[(300.0, 1.0)]
    assert choice.epochs == int(np.argmax(choice.curve)) + 1  # early stopping kept the best epoch
    assert "sasrec" in choice.with_it.weights and choice.with_it.key >= choice.without.key
    if choice.kept:
        assert tuning.cf.sasrec_epochs == choice.epochs and tuning.weights == choice.with_it.weights
        assert "sasrec" in tuning.lists.norm and tuning.score == choice.with_it.score > choice.without.score
    else:
        assert tuning.cf.sasrec_epochs == 0 and tuning.weights == choice.without.weights
        assert "sasrec" not in tuning.lists.norm
    assert summarise(tuning.lists.ranks(tuning.weights), n_boot=1)["ndcg@10"]["mean"] == tuning.score


def test_refine_chooses_on_the_finer_grid_and_keeps_the_coarse_choice(tiny_index: Index) -> None:
    split = split_catalog(tiny_index.catalog)
    base = collect_lists(tiny_index, split, "validation", progress=False)
    coarse = tune(tiny_index, split, base, lambdas=(300.0,), decays=(1.0,), progress=False, sasrec=False,
                  refine=False)
    tuning = refine_weights(coarse, progress=False)
    assert tuning.coarse is not None and tuning.coarse.weights == coarse.weights
    assert tuning.coarse.score == coarse.score and tuning.score >= coarse.score
    fine = tune_weights(tuning.lists, grid=REFINE_GRID)
    assert tuning.weights == (fine.weights if fine.key > tuning.coarse.key else coarse.weights)
    assert summarise(tuning.lists.ranks(tuning.weights), n_boot=1)["ndcg@10"]["mean"] == tuning.score
    # tune() refines by default: the same weights as the two steps above
    assert tune(tiny_index, split, base, lambdas=(300.0,), decays=(1.0,), progress=False,
                sasrec=False).weights == tuning.weights


def test_the_finer_grid_reaches_past_the_coarse_grids_edge() -> None:
    """Two users, three items: the first user's target wins only where EASE weighs more than 1/.6 the sequential
    source (the coarse grid stops at 1); the second's target is first whatever the weights."""
    nan = float("nan")
    lists = PartLists(
        norm={"sequential": np.array([[0.0, 1.0, nan], [1.0, 0.0, nan]]),
              "ease": np.array([[1.0, 0.4, nan], [1.0, 0.0, nan]])},
        allowed=np.ones((2, 3), dtype=bool), targets=np.array([0, 0]), popularity=np.array([1, 2, 3]))
    assert max(TUNE_GRID["ease"]) < 1 / 0.6 < max(REFINE_GRID["ease"])
    coarse = tune_weights(lists)
    assert lists.ranks(coarse.weights) == [2, 1]
    point = refined(lists, coarse)
    assert point.weights["ease"] > 1 / 0.6 and lists.ranks(point.weights) == [1, 1] and point.score == 1.0
    assert refined(lists, GridPoint(point.weights, point.score, point.recall50)).weights == point.weights


def test_sasrec_is_saved_and_loaded_with_the_cf_models(tiny_index: Index, tmp_path: Path) -> None:
    cf = tiny_index.fit_cf(tiny_index.catalog.histories(), TINY_SASREC)
    assert cf.sasrec is not None and cf.config.sasrec_epochs == 2
    cf.save(tmp_path)
    loaded = CFModels.load(tmp_path, cf.config)
    assert loaded.sasrec is not None
    allowed = np.ones(tiny_index.catalog.n_items, dtype=bool)
    query = SourceQuery(history=[0, 1, 2], allowed=allowed)
    assert SasrecSource(loaded).top(query, 5) == SasrecSource(cf).top(query, 5)
    assert CFModels.load(tmp_path, cf.config.model_copy(update={"sasrec_epochs": 0})).sasrec is None
    assert tiny_index.fit_cf(tiny_index.catalog.histories()).sasrec is None  # no epochs: not trained
    with pytest.raises(ValueError, match="SASRec was not trained"):
        SasrecSource(tiny_index.cf)


def test_tie_sensitivity_reports_the_fused_retriever_under_both_rules(tiny_index: Index) -> None:
    spec = SplitSpec()
    split = split_catalog(tiny_index.catalog, spec)
    weights = dict(DEFAULT_WEIGHTS)
    lists = {part: collect_lists(tiny_index, split, part, progress=False) for part in ("validation", "test")}
    results = evaluate(lists, weights, n_boot=20)
    sens = tie_sensitivity(tiny_index, tiny_index.catalog, spec, results, weights, tiny_index.manifest.cf, n_boot=20,
                           progress=False)
    for part in ("validation", "test"):
        assert list(sens[part]) == ["fused, ties random (seed 0)", "fused, ties id"]
        assert sens[part]["fused, ties random (seed 0)"] == results[part]["fused"]
        # the tiny catalogue has no equal timestamps, so both rules give the same split and numbers
        assert sens[part]["fused, ties id"] == results[part]["fused"]


def test_save_cf_stores_the_tuned_lambda_for_serving_and_rebuilds(tiny_catalog: Catalog, embedder: Embedder,
                                                                   scratch_catalog_name: str) -> None:
    copy = Catalog(name=scratch_catalog_name, items=tiny_catalog.items.copy(),
                   interactions=tiny_catalog.interactions.copy())
    save_and_index(copy, embedder=embedder, progress=False)
    stored = load_catalog(scratch_catalog_name)
    assert stored.root is not None
    before = load_index(stored, embedder=embedder)
    config = before.manifest.cf.model_copy(update={"ease_lambda": 10.0})
    save_cf(stored.root / "index", stored, config)
    after = load_index(stored, embedder=embedder)
    assert after.manifest.cf.ease_lambda == 10.0 and after.manifest.fusion == before.manifest.fusion
    assert after.cf.ease is not None and before.cf.ease is not None
    np.testing.assert_array_equal(after.cf.ease, after.fit_cf(stored.histories()).ease)  # what serving loads
    assert not np.allclose(after.cf.ease, before.cf.ease)
    assert not [p.name for p in (stored.root / "index").iterdir() if p.name.startswith(".")]
    reindex(scratch_catalog_name, embedder=embedder, progress=False)
    assert load_index(load_catalog(scratch_catalog_name), embedder=embedder).manifest.cf.ease_lambda == 10.0


def test_eval_retrieval_command_tunes_and_reports_both_tie_rules(tiny_catalog: Catalog, embedder: Embedder,
                                                                 scratch_catalog_name: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    save_and_index(Catalog(name=scratch_catalog_name, items=tiny_catalog.items.copy(),
                           interactions=tiny_catalog.interactions.copy()), embedder=embedder, progress=False)
    monkeypatch.chdir(tmp_path)  # reports/ is written to the working directory
    result = CliRunner().invoke(app, ["eval", "retrieval", "--catalog", scratch_catalog_name, "--tune", "--seed", "2",
                                      "--bootstrap", "20", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    for part in ("validation", "test"):
        assert {"fused", "fused, ties random (seed 2)", "fused, ties id"} <= set(payload[part])
    report = json.loads((tmp_path / "reports" / f"retrieval-{scratch_catalog_name}.json").read_text())
    assert report["split"]["ties"] == "random" and report["split"]["seed"] == 2
    assert report["cf"]["ease_lambda"] in EASE_LAMBDAS and report["cf"]["ease_decay"] in EASE_DECAYS
    assert set(report["tuning"]) == {f"lambda {x:g}, decay {d:g}" for x in EASE_LAMBDAS for d in EASE_DECAYS}
    markdown_text = (tmp_path / "reports" / f"retrieval-{scratch_catalog_name}.md").read_text()
    assert "ties in time broken by seeded random order (seed 2)" in markdown_text
    assert "## Tie-rule sensitivity" in markdown_text and "--ties random --seed 2 --tune" in markdown_text
    manifest = load_index(load_catalog(scratch_catalog_name), embedder=embedder).manifest
    assert manifest.fusion.tuned and manifest.cf.ease_lambda == report["cf"]["ease_lambda"]
    assert manifest.cf.ease_decay == report["cf"]["ease_decay"]  # served as tuned
    assert manifest.cf.sasrec_epochs == report["cf"]["sasrec_epochs"] and "the SASRec source" in markdown_text
    assert report["sasrec_tuning"]["epochs"] >= 1
    index_folder = load_catalog(scratch_catalog_name).root / "index"  # type: ignore[operator]
    assert (index_folder / "sasrec.pt").exists() == (manifest.cf.sasrec_epochs > 0)
    # the learned fusion was trained and measured on validation; kept (and reported on test) only where it won
    assert "## Learned fusion" in markdown_text and LEARNED in payload["validation"] and LEARNED in payload["test"]
    kept = manifest.fusion.learned is not None
    assert kept == (report["learned_fusion"] is not None)
    gain = report["learned_minus_weights"]["test"]["ndcg@10"]
    assert gain["lo"] <= gain["mean"] <= gain["hi"] and "Learned fusion minus the weights" in markdown_text
    assert ("served fusion: the learned ranker" in markdown_text) == kept


@pytest.mark.parametrize("command", [["retrieval"], ["rerank"], ["chat"], ["speed"], ["all"]])
def test_every_eval_command_rejects_an_unknown_tie_rule(command: list[str]) -> None:
    result = CliRunner().invoke(app, ["eval", *command, "--ties", "newest"])
    assert result.exit_code == 2
    assert "--ties 'newest': choose one of id, random" in " ".join(result.output.split())


def test_a_shipped_sasrec_is_loaded_only_for_its_histories_and_settings(tiny_index: Index, tmp_path: Path) -> None:
    catalog = tiny_index.catalog
    histories = position_histories(catalog, catalog.histories())
    digest = histories_digest(histories, catalog.n_items)
    cf = fit_cf(histories, catalog.n_items, TINY_SASREC)
    ship_sasrec(cf.sasrec, tmp_path, digest, 2, TINY_SASREC.sasrec, made_by="test")
    shipped = shipped_sasrec(tmp_path, digest, 2, TINY_SASREC.sasrec, catalog.n_items)
    assert shipped is not None
    query = SourceQuery(history=[0, 1, 2], allowed=np.ones(catalog.n_items, dtype=bool))
    reused = fit_cf(histories, catalog.n_items, TINY_SASREC, sasrec=shipped)
    assert reused.sasrec is shipped and SasrecSource(reused).top(query, 5) == SasrecSource(cf).top(query, 5)
    other = {**histories, "new user": [0, 1]}
    assert histories_digest(other, catalog.n_items) != digest
    assert shipped_sasrec(tmp_path, histories_digest(other, catalog.n_items), 2, TINY_SASREC.sasrec,
                          catalog.n_items) is None
    assert shipped_sasrec(tmp_path, digest, 3, TINY_SASREC.sasrec, catalog.n_items) is None
    assert shipped_sasrec(tmp_path, digest, 2, TINY_SASREC.sasrec.model_copy(update={"hidden": 32}),
                          catalog.n_items) is None
    assert shipped_sasrec(tmp_path / "none", digest, 2, TINY_SASREC.sasrec, catalog.n_items) is None
    assert shipped_sasrec(tmp_path, digest, 2, TINY_SASREC.sasrec, catalog.n_items, encoder="another") is None
    encoder = tiny_index.manifest.encoder  # a random-init model does not depend on the encoder
    assert sasrec_init(encoder, TINY_SASREC.sasrec) == (encoder.checkpoint or encoder.name)
    assert sasrec_init(encoder, TINY_SASREC.sasrec.model_copy(update={"init_scale": 0.0})) == "none"


def same_weights(a: object, b: object) -> bool:
    sa, sb = a.state_dict(), b.state_dict()  # type: ignore[attr-defined]
    return sa.keys() == sb.keys() and all(bool((sa[k] == sb[k]).all()) for k in sa)


def test_the_index_starts_every_sasrec_fit_from_its_item_vectors(tiny_index: Index) -> None:
    """``Index.fit_cf`` (each evaluation part's CF fit) trains SASRec from the index's item vectors, not from GPT-2's
    random init (the index build and ``save_cf``: the shipped-model test below)."""
    catalog = tiny_index.catalog
    histories = position_histories(catalog, catalog.histories())
    config = TINY_SASREC.sasrec.model_copy(update={"epochs": TINY_SASREC.sasrec_epochs, "max_minutes": math.inf})
    started, _ = fit_sasrec(histories, catalog.n_items, config, progress=False, item_vectors=tiny_index.item_vectors)
    random, _ = fit_sasrec(histories, catalog.n_items, config, progress=False)
    fitted = tiny_index.fit_cf(catalog.histories(), TINY_SASREC).sasrec
    assert same_weights(fitted, started) and not same_weights(fitted, random)


def test_an_index_build_takes_the_shipped_sasrec_instead_of_training(tiny_catalog: Catalog, embedder: Embedder,
                                                                     scratch_catalog_name: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import retrieval.cf
    import retrieval.index

    save_and_index(Catalog(name=scratch_catalog_name, items=tiny_catalog.items.copy(),
                           interactions=tiny_catalog.interactions.copy()), embedder=embedder, progress=False)
    stored = load_catalog(scratch_catalog_name)
    assert stored.root is not None
    save_cf(stored.root / "index", stored, TINY_SASREC)  # trains SASRec, records its epochs in the manifest
    trained = load_index(stored, embedder=embedder)
    assert trained.cf.sasrec is not None and trained.manifest.cf.sasrec_epochs == 2
    histories = position_histories(stored, stored.histories())
    started, _ = fit_sasrec(histories, stored.n_items, TINY_SASREC.sasrec.model_copy(
        update={"epochs": 2, "max_minutes": math.inf}), progress=False, item_vectors=trained.item_vectors)
    assert same_weights(trained.cf.sasrec, started)  # save_cf started it from the index's item vectors
    (tmp_path / scratch_catalog_name).mkdir()
    ship_sasrec(trained.cf.sasrec, tmp_path / scratch_catalog_name, histories_digest(histories, stored.n_items), 2,
                TINY_SASREC.sasrec, made_by="test", encoder=sasrec_init(trained.manifest.encoder, TINY_SASREC.sasrec))
    monkeypatch.setattr(retrieval.index, "SHIPPED", tmp_path)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("SASRec was trained although a matching model was shipped")

    monkeypatch.setattr(retrieval.cf, "fit_sasrec", no_training)
    reindex(scratch_catalog_name, embedder=embedder, progress=False)
    rebuilt = load_index(load_catalog(scratch_catalog_name), embedder=embedder)
    query = SourceQuery(history=[0, 1, 2], allowed=np.ones(stored.n_items, dtype=bool))
    assert SasrecSource(rebuilt.cf).top(query, 5) == SasrecSource(trained.cf).top(query, 5)


def test_the_cold_item_path_brings_up_items_no_one_has_interacted_with(tiny_index: Index) -> None:
    """Items of popularity 0 reach a history-only fused list through the content source (weight 0 in the fusion)
    with the cold-item weight, listed by it, and never without it but as a popularity top-up."""
    split = leave_last_out(tiny_index.catalog.histories())
    cf = tiny_index.fit_cf(split.fit_histories("validation"))  # the held-out items have no interactions here
    cold = {tiny_index.catalog.item_ids[p] for p in np.flatnonzero(cf.popularity == 0)}
    assert cold, "some items are seen only as held-out items"
    weights = {"sequential": 1.0, "ease": 1.0, "content": 0.0}
    off = tiny_index.retriever("fused", cf=cf, weights=weights, cold=0.0)
    on = tiny_index.retriever("fused", cf=cf, weights=weights, cold=3.0)
    assert off.cold == 0 and on.cold == 3.0 and "content" not in on.sources
    assert tiny_index.retriever("fused", weights=weights, cold=3.0).cold == 0  # none cold: the path is off
    brought = 0
    n = tiny_index.catalog.n_items
    for history in split.train.values():
        before = {c.item_id: c for c in off.retrieve(history, k=n)}
        after = {c.item_id: c for c in on.retrieve(history, k=n)}
        for item, c in after.items():
            if item not in cold:  # the path leaves every item with interactions as it was
                assert c.score == before[item].score
            elif c.score > before[item].score:
                assert "content" in [h.source for h in c.sources]
                assert "content" not in [h.source for h in before[item].sources]
                brought += 1
    assert brought > 0
    free_text = on.retrieve([], k=3, query="space adventure")  # a text request: content at its own weight
    assert free_text and all(c.sources for c in free_text)


def test_the_cold_item_weight_is_stored_with_the_fusion_and_rejects_a_negative(tiny_index: Index) -> None:
    cf = tiny_index.fit_cf(leave_last_out(tiny_index.catalog.histories()).fit_histories("validation"))
    assert FusionConfig().cold == COLD_WEIGHT > 0
    assert tiny_index.retriever("fused", cf=cf).cold == tiny_index.manifest.fusion.cold == COLD_WEIGHT
    assert FusionConfig.model_validate({"weights": {"ease": 1.0}}).cold == COLD_WEIGHT  # a manifest from before
    with pytest.raises(ValidationError, match="cold"):
        FusionConfig(cold=-1)
    with pytest.raises(ValueError, match="cold-item weight"):
        BlendRetriever(tiny_index.catalog, tiny_index.sources(), {"ease": 1.0}, tiny_index.cf.popularity, cold=-0.5)
    assert tiny_index.retriever("ease").cold == 0.0  # a single source has no cold-item path


def test_cold_world_removes_the_cold_items_from_every_history_and_keeps_the_targets(tiny_index: Index) -> None:
    split = leave_last_out(tiny_index.catalog.histories())
    cold = {split.test[0].target, split.validation[1].target, split.validation[1].history[0]}
    for part in ("validation", "test"):
        world = cold_world(split, cold, part)
        fit = world.fit_histories("validation")
        assert not cold & {i for h in fit.values() for i in h}, part  # a cold validation item too, for test
        assert not cold & {i for c in world.validation for i in c.history}
        assert [c.target for c in world.validation] == [c.target for c in split.cases(part)]
        assert sum(map(len, fit.values())) > 0 and not world.test
    kept = cold_world(split, set(), "test").fit_histories("validation")
    assert kept == split.fit_histories("test")  # nothing cold: the part's own fit


def test_the_cold_item_weight_is_the_best_recall_among_ties_in_ndcg() -> None:
    grid = [GridRow(0.0, .1300, .500, 0.0, .14), GridRow(1.0, .1300 - NDCG_TIE / 2, .510, .1, .14),
            GridRow(2.0, .1290, .520, .2, .13)]
    assert choose(grid) == 1.0  # 2 has the best recall but costs NDCG@10
    assert choose([grid[0], GridRow(1.0, .1300 - 2 * NDCG_TIE, .510, .1, .14)]) == 0.0
    assert choose([GridRow(0.5, .13, .5, 0, .1), GridRow(0.0, .13, .5, 0, .1)]) == 0.0
