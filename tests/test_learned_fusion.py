"""The learned fusion (retrieval.learned_fusion): its training examples, its contract with the evaluation's fast
ranks, and how it is kept with an index."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from eval.retrieval_eval import collect_lists, cut_splits
from retrieval.cf import CFConfig
from retrieval.encoder import EncoderRef
from retrieval.index import FusionConfig, Index, collaborative_weights
from retrieval.learned_fusion import ABSENT_RANK, ItemSide, LearnedFusion, LearnedRetriever, feature_names, source_ranks
from retrieval.splits import leave_last_out


def with_learned(index: Index, learned: LearnedFusion | None) -> Index:
    fusion = index.manifest.fusion.model_copy(update={"learned": learned})
    return dataclasses.replace(index, manifest=index.manifest.model_copy(update={"fusion": fusion}))


def test_source_ranks_share_the_best_rank_on_ties_and_mark_the_absent() -> None:
    got = source_ranks(np.array([0.5, np.nan, 1.0, 0.5, 0.0]))
    np.testing.assert_array_equal(got, [2, ABSENT_RANK, 1, 2, 4])


def test_cut_examples_never_see_a_validation_or_test_item(tiny_index: Index) -> None:
    """Every example and every model that makes its candidates come from the training part, each example's own
    next item and everything after it left out."""
    split = leave_last_out(tiny_index.catalog.histories())
    held = {(c.user_id, len(c.history)) for c in split.validation + split.test}  # (user, position) held out
    cuts = cut_splits(split, 3)
    assert len(cuts) == 3 and cuts[0].validation
    for c, cut in enumerate(cuts, start=1):
        assert len(cut.validation) == sum(len(h) > c for h in split.train.values())
        for case in cut.validation:
            train = split.train[case.user_id]
            assert case.history == train[: len(train) - c] and case.target == train[len(train) - c]
            assert (case.user_id, len(case.history)) not in held
        for user, fitted in cut.fit_histories("validation").items():
            full = split.train[user]
            assert fitted == full[: max(len(full) - c, 0)]  # a prefix of the training part, its last c left out
            assert not {(user, n) for n in range(len(fitted))} & held


@pytest.mark.parametrize("part", ["validation", "test"])
def test_learned_ranks_agree_with_retrieve(tiny_index: Index, tiny_learned_fusion: LearnedFusion, part: str) -> None:
    """Contract: PartLists.learned_ranks puts the target where LearnedRetriever.retrieve(history, k=50) does."""
    split = leave_last_out(tiny_index.catalog.histories())
    lists = collect_lists(tiny_index, split, part, progress=False)
    cf = tiny_index.fit_cf(split.fit_histories(part))
    retriever = with_learned(tiny_index, tiny_learned_fusion).retriever("fused", cf=cf)
    assert isinstance(retriever, LearnedRetriever)
    fast = lists.learned_ranks(tiny_learned_fusion, ItemSide.of(tiny_index.catalog, lists.popularity))
    for case, rank in zip(split.cases(part), fast, strict=True):
        got = [c.item_id for c in retriever.retrieve(case.history, k=50)]
        assert rank == (got.index(case.target) + 1 if case.target in got else None), case


def test_learned_fusion_records_what_it_was_measured_at(tiny_learned_fusion: LearnedFusion) -> None:
    learned = tiny_learned_fusion
    assert {"learned_ndcg@10", "linear_ndcg@10", "learned_recall@50", "linear_recall@50"} <= set(learned.validation)
    assert learned.validation["users"] == 8 and learned.examples > 0
    assert learned.booster.feature_name() == feature_names(learned.sources)
    copy = LearnedFusion.model_validate_json(learned.model_dump_json())  # as the manifest stores it
    x = np.random.default_rng(0).random((5, len(learned.feature_names))).astype(np.float32)
    np.testing.assert_allclose(copy.score(x), learned.score(x))


def test_scores_come_from_the_ranker_and_text_queries_from_the_weights(tiny_index: Index,
                                                                       tiny_learned_fusion: LearnedFusion) -> None:
    index = with_learned(tiny_index, tiny_learned_fusion)
    learned = index.retriever("fused")
    got = learned.retrieve(["s1", "s2"], k=4)
    assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)
    blend = index.retriever("fused", weights=tiny_learned_fusion.linear_weights)
    assert not isinstance(blend, LearnedRetriever)  # explicit weights: the blend (what the evaluation grids)
    text = "astronauts and aliens on a starship in deep space"
    assert learned.retrieve(["d1"], k=4, query=text) == blend.retrieve(["d1"], k=4, query=text)
    assert isinstance(learned, LearnedRetriever)
    assert list(learned.learned_sources) == tiny_learned_fusion.sources and set(learned.sources) == set(blend.sources)


def test_a_switch_to_als_drops_a_ranker_that_reads_ease(tiny_learned_fusion: LearnedFusion) -> None:
    assert "ease" in tiny_learned_fusion.sources
    fusion = FusionConfig(weights={"sequential": 1.0, "ease": 0.5}, learned=tiny_learned_fusion)
    assert collaborative_weights(fusion, CFConfig(fitted="ease")) is fusion  # EASE still fitted: kept
    als = collaborative_weights(fusion, CFConfig(collaborative="als", fitted="als"))
    assert als.learned is None and als.weights == {"sequential": 1.0, "als": 0.5}


def test_a_new_index_takes_the_ranker_recorded_with_its_encoder(tmp_path, tiny_learned_fusion: LearnedFusion,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval import encoder as enc
    from retrieval.index import fusion_for

    recorded = {"weights": {"sequential": 1.0}, "ease_lambda": 100.0, "ease_decay": 0.98, "tuned_on": "validation",
                "learned": tiny_learned_fusion.model_dump(mode="json")}

    class Prov:
        fusion = recorded

    (tmp_path / enc.PROVENANCE).write_text("{}")
    monkeypatch.setattr(enc, "load_provenance", lambda folder: Prov())
    ref = EncoderRef(kind="tuned", name="t", path=str(tmp_path), fusion={"sequential": 1.0}, ease_lambda=100.0,
                     ease_decay=0.98, sasrec_epochs=7)
    fusion, cf = fusion_for(ref, None)
    assert fusion.learned is not None and fusion.learned.model == tiny_learned_fusion.model
    assert cf.ease_lambda == 100.0 and cf.ease_decay == 0.98 and cf.sasrec_epochs == 7


def test_fit_refuses_examples_without_a_positive() -> None:
    from retrieval.learned_fusion import LearnedFusionParams, fit

    x = np.zeros((3, len(feature_names(["sequential"]))), dtype=np.float32)
    with pytest.raises(ValueError, match="next item among the candidates"):
        fit([(x, np.zeros(3, dtype=np.int8))], ["sequential"], {"sequential": 1.0}, LearnedFusionParams())
