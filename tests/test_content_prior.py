"""The content source's popularity prior (issue #12): an item the training data has never seen gets a guess, not
0: the mean prior of its nearest seen items by item vector (the median without vectors); every other item keeps
weight x log(1 + interactions)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from retrieval.index import Index
from retrieval.sources import PRIOR_NEIGHBOURS, ContentSource, neighbour_log_counts, popularity_prior


def test_a_zero_interaction_item_gets_the_median_prior_and_warm_items_keep_theirs() -> None:
    counts = np.array([0, 1, 3, 0, 10, 583], dtype=np.float32)
    prior = popularity_prior(counts, 0.07)
    warm = counts > 0
    np.testing.assert_allclose(prior[warm], 0.07 * np.log1p(counts[warm].astype(np.float64)))  # unchanged
    median = 0.07 * np.median(np.log1p([1.0, 3.0, 10.0, 583.0]))
    np.testing.assert_allclose(prior[~warm], [median, median])
    assert prior[~warm].min() > 0 and np.log1p(1.0) * 0.07 < median < prior.max()


def test_a_never_seen_item_gets_the_mean_prior_of_its_nearest_seen_items() -> None:
    counts = np.array([0, 3, 10, 583, 0], dtype=np.float32)
    angles = np.array([0.0, 0.1, -0.1, 3.0, 2.95])  # item 0 sits between items 1 and 2; item 4 beside item 3
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [2.0], [0.5], [1.0], [3.0]])
    prior = popularity_prior(counts, 0.07, vectors, neighbours=2)
    np.testing.assert_allclose(prior[0], 0.07 * np.mean(np.log1p([3.0, 10.0])))  # not the popular one far away
    np.testing.assert_allclose(prior[4], 0.07 * np.mean(np.log1p([583.0, 3.0])))  # its nearest two: 3, then 1
    np.testing.assert_allclose(prior[1:4], 0.07 * np.log1p(counts[1:4].astype(np.float64)))  # warm ones unchanged
    assert prior[0] != popularity_prior(counts, 0.07)[0]  # the median would have said otherwise


def test_past_the_budget_the_neighbours_come_from_a_seeded_sample_of_seen_items() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(400, 8))
    counts = rng.integers(0, 50, size=400).astype(np.float64)
    log_counts, seen = np.log1p(counts), counts > 0
    full = neighbour_log_counts(vectors, log_counts, seen, 5)
    sampled = neighbour_log_counts(vectors, log_counts, seen, 5, budget=(~seen).sum() * 20)
    again = neighbour_log_counts(vectors, log_counts, seen, 5, budget=(~seen).sum() * 20)
    np.testing.assert_array_equal(sampled, again)  # seeded
    assert not np.allclose(sampled[~seen], full[~seen])  # searched fewer items
    assert (sampled[~seen] >= log_counts[seen].min()).all() and (sampled[~seen] <= log_counts[seen].max()).all()


def test_vectors_must_match_the_counts() -> None:
    with pytest.raises(ValueError, match="3 item vectors for 4 items"):
        popularity_prior(np.array([0, 1, 2, 3]), 0.07, np.ones((3, 4)))


def test_the_prior_without_interactions_or_weight_is_zero() -> None:
    np.testing.assert_array_equal(popularity_prior(np.zeros(4), 0.07), np.zeros(4))
    np.testing.assert_array_equal(popularity_prior(np.array([0, 2, 5]), 0.0), np.zeros(3))
    all_seen = np.array([1, 2, 5])
    np.testing.assert_allclose(popularity_prior(all_seen, 0.05), 0.05 * np.log1p(all_seen))


def test_the_served_content_source_guesses_never_seen_items_from_their_neighbours(tiny_index: Index) -> None:
    manifest = tiny_index.manifest.model_copy(deep=True)
    manifest.encoder.prior_weight = 0.07
    index = dataclasses.replace(tiny_index, manifest=manifest)
    popularity = np.arange(index.catalog.n_items, dtype=np.float32) % 5  # every fifth item never seen
    cf = dataclasses.replace(index.cf, popularity=popularity)
    prior = index.content_prior(cf)
    assert prior is not None
    seen = popularity > 0
    np.testing.assert_allclose(prior[seen], 0.07 * np.log1p(popularity[seen].astype(np.float64)))
    guess = neighbour_log_counts(index.item_vectors, np.log1p(popularity.astype(np.float64)), seen, PRIOR_NEIGHBOURS)
    np.testing.assert_allclose(prior[~seen], 0.07 * guess[~seen])  # by this index's item vectors
    assert not np.allclose(prior[~seen], np.median(prior[seen]))
    content = index.sources(cf)["content"]
    assert isinstance(content, ContentSource) and content.prior is not None
    np.testing.assert_allclose(content.prior, prior)  # what the content source re-ranks with
