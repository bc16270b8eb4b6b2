"""Scale-out pieces: the synthetic catalogue generator, vectorised CF fitting, ALS past EASE's limit (chosen by
size, recorded in the manifest, weighted in the fusion), and one small size of `recagent eval scale` end to end."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from retrieval.catalog import Catalog, load_catalog
from retrieval.catalog_store import save_and_index
from retrieval.cf import CFConfig, fit_cf
from retrieval.embeddings import Embedder
from retrieval.index import load_index, position_histories
from retrieval.sources import AlsSource
from retrieval.synth import SynthConfig, synth_catalog


def test_synthetic_catalogue_has_popularity_and_sequential_structure() -> None:
    config = SynthConfig(items=3000, users=800, seed=3)
    catalog = synth_catalog("synth-test", config)
    again = synth_catalog("synth-test", config)
    assert catalog.items.equals(again.items) and catalog.interactions.equals(again.interactions)  # seeded
    assert catalog.n_items == 3000 and catalog.interactions["user_id"].nunique() == 800
    assert set(catalog.interactions["item_id"]) <= set(catalog.item_ids)
    assert not catalog.interactions.duplicated(["user_id", "item_id"]).any()
    lengths = catalog.interactions.groupby("user_id").size()
    assert lengths.min() >= 2 and (lengths >= 3).mean() > 0.97 and 12 <= lengths.mean() <= 25

    counts = np.sort(catalog.interactions["item_id"].value_counts().to_numpy())[::-1]
    assert counts[:30].sum() / counts.sum() > 0.1  # the top 1% of items take far more than 1% of events

    # a history moves along its topic's chain: the next item is often one of the next three ids
    steps: Counter[str] = Counter()
    for history in catalog.histories().values():
        numbers = [int(i[1:]) for i in history]
        steps.update("chain" if 1 <= b - a <= 3 else "other" for a, b in zip(numbers, numbers[1:], strict=False))
    assert steps["chain"] / sum(steps.values()) > 0.3
    # items carry their topic in text: genres and a description
    assert all(catalog.items["genres"].map(len) >= 1) and catalog.items["description"].str.len().min() > 20


def loop_transitions(histories: dict[str, list[int]], n_items: int, window: int) -> np.ndarray:
    """The transition counts as the first, per-interaction implementation computed them (reference)."""
    dense = np.zeros((n_items, n_items))
    for seq in histories.values():
        for gap in range(1, window + 1):
            for a, b in zip(seq[:-gap], seq[gap:], strict=False):
                if a != b:
                    dense[a, b] += 1.0 / gap
    sums = dense.sum(axis=1, keepdims=True)
    return np.divide(dense, sums, out=np.zeros_like(dense), where=sums > 0)


def test_vectorised_fit_matches_the_loop_and_als_takes_over_past_ease() -> None:
    catalog = synth_catalog("synth-cf", SynthConfig(items=400, users=300, seed=1))
    histories = position_histories(catalog, catalog.histories())
    ease = fit_cf(histories, catalog.n_items, CFConfig())
    assert ease.config.fitted == "ease" and ease.ease is not None and ease.als_items is None
    np.testing.assert_allclose(ease.transitions.toarray(), loop_transitions(histories, catalog.n_items, 3), atol=1e-6)
    expected_pop = np.zeros(catalog.n_items)
    for seq in histories.values():
        expected_pop[list(set(seq))] += 1
    np.testing.assert_array_equal(ease.popularity, expected_pop)

    als = fit_cf(histories, catalog.n_items, CFConfig(max_ease_items=100, als_iterations=8))
    assert als.config.fitted == "als" and als.ease is None and als.als_items is not None
    assert als.als_items.shape == (400, 64)
    # ALS ranks the items a user's topic-mates watched well above chance: hit rate of held-out next items
    source = AlsSource(als)
    from retrieval.sources import SourceQuery

    hits = 0
    users = list(histories.values())[:100]
    for seq in users:
        allowed = np.ones(catalog.n_items, dtype=bool)
        allowed[seq[:-1]] = False
        top = [p for p, _ in source.top(SourceQuery(history=seq[:-1], allowed=allowed), 50)]
        hits += seq[-1] in top
    assert hits / len(users) > 3 * 50 / 400  # at least 3x a random list of 50


@pytest.mark.slow
def test_index_past_ease_limit_records_als_and_weights_it(embedder: Embedder, scratch_catalog_name: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    synth = synth_catalog(scratch_catalog_name, SynthConfig(items=150, users=120, seed=2))
    monkeypatch.setattr("retrieval.index.CFConfig", lambda: CFConfig(max_ease_items=100))
    catalog = Catalog(name=scratch_catalog_name, items=synth.items, interactions=synth.interactions)
    manifest = save_and_index(catalog, embedder=embedder, progress=False)
    assert manifest.cf.fitted == "als"
    assert "als" in manifest.fusion.weights and "ease" not in manifest.fusion.weights
    index = load_index(load_catalog(scratch_catalog_name), embedder=embedder)
    retriever = index.retriever("fused")
    assert "als" in retriever.sources and "ease" not in retriever.sources
    history = catalog.histories()["u0"]
    got = retriever.retrieve(history, k=10)
    assert len(got) == 10 and not {c.item_id for c in got} & set(history)
    assert any(h.source == "als" for c in got for h in c.sources)
    assert [c.item_id for c in index.retriever("als").retrieve(history, k=5)]


@pytest.mark.slow
def test_eval_scale_measures_one_small_size(embedder: Embedder) -> None:
    from eval.scale import markdown, measure, merge

    result = measure(items=300, users=300, seed=0, queries=10, eval_users=80, progress=False)
    assert result["collaborative"] == "ease" and result["interactions"] > 3000
    assert result["build_s"] > 0 and result["peak_rss_mb"] > 100 and result["disk_mb"]["catalogue_and_index"] > 0
    for label in ("unfiltered", "genre_filter"):
        assert 0 < result["retrieve"][label]["p50_ms"] <= result["retrieve"][label]["p95_ms"]
    methods = result["quality"]["methods"]
    assert set(methods) == {"fused", "mostpop", "content", "sequential", "ease"}
    fused = methods["fused"]["ndcg@10"]["mean"]
    assert fused > methods["mostpop"]["ndcg@10"]["mean"] and fused > methods["content"]["ndcg@10"]["mean"]
    from retrieval.catalog import list_catalogs

    assert not [c for c in list_catalogs() if c.startswith("scale-300x300")]  # removed afterwards
    assert set(result["build_phases"]) == {"embed_s", "vector_store_s", "cf_s"}
    text = markdown(merge(None, [result], {"machine": "test", "date": "today", "command": "recagent eval scale",
                                           "commit": "abc"}))
    assert "| 300 | 300 |" in text and "fused" in text and "today, commit abc" in text


def test_a_scale_run_replaces_its_own_sizes_and_keeps_the_others() -> None:
    from eval.scale import merge

    previous = {"sizes": [{"items": 10, "build_s": 1}, {"items": 100, "build_s": 2}], "command": "old",
                "date": "d0", "machine": "m"}
    report = merge(previous, [{"items": 100, "build_s": 3}, {"items": 1000, "build_s": 4}],
                   {"command": "new", "date": "d1", "machine": "m", "commit": "c1"})
    assert [(r["items"], r["build_s"], r["command"]) for r in report["sizes"]] == [
        (10, 1, "old"), (100, 3, "new"), (1000, 4, "new")]
    assert report["sizes"][0]["date"] == "d0" and report["sizes"][0]["commit"] == "?"
