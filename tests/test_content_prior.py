"""The content source's popularity prior (issue #12): an item the training data has never seen gets the median
prior of the items that have interactions, not 0; every other item keeps weight x log(1 + interactions)."""

from __future__ import annotations

import dataclasses

import numpy as np

from retrieval.index import Index
from retrieval.sources import ContentSource, popularity_prior


def test_a_zero_interaction_item_gets_the_median_prior_and_warm_items_keep_theirs() -> None:
    counts = np.array([0, 1, 3, 0, 10, 583], dtype=np.float32)
    prior = popularity_prior(counts, 0.07)
    warm = counts > 0
    np.testing.assert_allclose(prior[warm], 0.07 * np.log1p(counts[warm].astype(np.float64)))  # unchanged
    median = 0.07 * np.median(np.log1p([1.0, 3.0, 10.0, 583.0]))
    np.testing.assert_allclose(prior[~warm], [median, median])
    assert prior[~warm].min() > 0 and np.log1p(1.0) * 0.07 < median < prior.max()


def test_the_prior_without_interactions_or_weight_is_zero() -> None:
    np.testing.assert_array_equal(popularity_prior(np.zeros(4), 0.07), np.zeros(4))
    np.testing.assert_array_equal(popularity_prior(np.array([0, 2, 5]), 0.0), np.zeros(3))
    all_seen = np.array([1, 2, 5])
    np.testing.assert_allclose(popularity_prior(all_seen, 0.05), 0.05 * np.log1p(all_seen))


def test_the_served_content_source_uses_the_median_for_never_seen_items(tiny_index: Index) -> None:
    manifest = tiny_index.manifest.model_copy(deep=True)
    manifest.encoder.prior_weight = 0.07
    index = dataclasses.replace(tiny_index, manifest=manifest)
    popularity = np.arange(index.catalog.n_items, dtype=np.float32) % 5  # every fifth item never seen
    cf = dataclasses.replace(index.cf, popularity=popularity)
    prior = index.content_prior(cf)
    assert prior is not None
    np.testing.assert_allclose(prior, popularity_prior(popularity, 0.07))
    seen = popularity > 0
    np.testing.assert_allclose(prior[seen], 0.07 * np.log1p(popularity[seen].astype(np.float64)))
    np.testing.assert_allclose(prior[~seen], np.median(prior[seen]))
    content = index.sources(cf)["content"]
    assert isinstance(content, ContentSource) and content.prior is not None
    np.testing.assert_allclose(content.prior, prior)  # what the content source re-ranks with
