"""Request paths without Python loops over the catalogue (issue #13): the precomputed genre masks, the in-memory
content neighbours, the popularity top-up and title matching give exactly what the loops and Chroma's ``where``
clauses gave."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from rapidfuzz import process

from agent.chat.titles import TitleResolver, _best, _score, normalise_title
from retrieval.catalog import Catalog
from retrieval.filter_blocks import FilterBlocks
from retrieval.filters import Filters
from retrieval.index import Index
from retrieval.sources import ContentSource, top_of_dense

COMBOS = [
    Filters(genres=["Sci-Fi"]),
    Filters(genres=["Animation", "Drama"]),
    Filters(genres=["drama", "Drama"]),  # case and repeats
    Filters(exclude_genres=["Crime"]),
    Filters(exclude_genres=["Crime", "Children's"]),
    Filters(genres=["Fantasy"], exclude_genres=["Children's"]),
    Filters(genres=["Adventure", "Fantasy"], exclude_genres=["Sci-Fi"]),
    Filters(year_min=1990),
    Filters(year_max=1999),
    Filters(year_min=1986, year_max=2004),
    Filters(genres=["Drama"], year_max=1988),
    Filters(genres=["Drama"], year_min=1980),  # d4 has no year: out whenever a bound is set
    Filters(exclude_genres=["Sci-Fi"], year_min=2000, year_max=2008),
    Filters(genres=["Sci-Fi"], year_min=2050),  # nothing passes
]
HISTORIES = [[], ["s1", "s2"], ["a1"], ["d1", "d2", "s4"], ["d4", "d1", "d2", "d4"], ["s1", "a2", "d3"]]
TEXTS = [None, "a fairy-tale princess and a dragon"]


def oracle(catalog: Catalog, filters: Filters) -> set[str]:
    """Items passing ``filters``, decided one item at a time from ``Catalog.item`` (no masks involved)."""
    f = filters.canonical(catalog.all_genres)
    out = set()
    for item_id in catalog.item_ids:
        item = catalog.item(item_id)
        genres: Any = item["genres"]
        year: Any = item["year"]
        if f.genres and not set(f.genres) & set(genres):
            continue
        if set(f.exclude_genres) & set(genres):
            continue
        if f.year_min is not None and (year is None or year < f.year_min):
            continue
        if f.year_max is not None and (year is None or year > f.year_max):
            continue
        out.add(item_id)
    return out


def label(f: Filters) -> str:
    return str(f.model_dump(exclude_defaults=True))


# --- masks --------------------------------------------------------------------------------------------------


def test_genre_matrix_rows_are_the_items_genres(tiny_catalog: Catalog) -> None:
    matrix = tiny_catalog.genre_matrix
    assert matrix.shape == (len(tiny_catalog.all_genres), tiny_catalog.n_items) and matrix.dtype == bool
    for genre, row in zip(tiny_catalog.all_genres, matrix, strict=True):
        want = [genre in genres for genres in tiny_catalog.genres_by_pos]
        assert row.tolist() == want, genre
        assert tiny_catalog.genre_masks[genre] is not None and tiny_catalog.genre_masks[genre].tolist() == want


@pytest.mark.parametrize("filters", COMBOS, ids=label)
def test_mask_is_the_per_item_rule(tiny_catalog: Catalog, filters: Filters) -> None:
    """Fails if the mask were wrong: the per-item rule is computed without any mask."""
    f = filters.canonical(tiny_catalog.all_genres)
    want = oracle(tiny_catalog, filters)
    for genres in (tiny_catalog.genre_masks, tiny_catalog.genres_by_pos):
        mask = f.mask(genres, tiny_catalog.years_by_pos)
        assert mask.dtype == bool and mask.shape == (tiny_catalog.n_items,)
        assert {tiny_catalog.item_ids[p] for p in np.flatnonzero(mask)} == want


def test_unknown_genre_in_masks_matches_nothing(tiny_catalog: Catalog) -> None:
    years = tiny_catalog.years_by_pos
    assert not Filters(genres=["Western"]).mask(tiny_catalog.genre_masks, years).any()
    assert Filters(exclude_genres=["Western"]).mask(tiny_catalog.genre_masks, years).all()


def test_the_catalogue_mask_is_not_changed_by_a_query(tiny_index: Index) -> None:
    catalog = tiny_index.catalog
    before = {g: m.copy() for g, m in catalog.genre_masks.items()}
    tiny_index.retriever("fused").retrieve(["s1"], k=5, filters=Filters(genres=["Sci-Fi"]))
    tiny_index.retriever("fused").retrieve(["s1"], k=5, filters=Filters(exclude_genres=["Sci-Fi"]))
    assert all((catalog.genre_masks[g] == m).all() for g, m in before.items())


# --- filtered retrieval -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fused", "content", "sequential", "mostpop"])
@pytest.mark.parametrize("filters", COMBOS, ids=label)
def test_filtered_retrieve_returns_exactly_the_passing_items(tiny_index: Index, name: str,
                                                              filters: Filters) -> None:
    """With k = catalogue size every passing item not in the history comes back (sources, then the top-up)."""
    catalog = tiny_index.catalog
    retriever = tiny_index.retriever(name)
    want_all = oracle(catalog, filters)
    for history in HISTORIES:
        got = [c.item_id for c in retriever.retrieve(history, k=catalog.n_items, filters=filters)]
        assert len(got) == len(set(got))
        assert set(got) == want_all - set(history), (history, label(filters))


def test_top_up_follows_popularity_then_position(tiny_index: Index) -> None:
    catalog = tiny_index.catalog
    retriever = tiny_index.retriever("sequential")
    got = retriever.retrieve(["s1", "s2"], k=catalog.n_items, filters=Filters(exclude_genres=["Sci-Fi"]))
    topped = [catalog.item_index[c.item_id] for c in got if not c.sources]
    assert topped, "sequential lists nothing outside Sci-Fi after s1, s2"
    pop = retriever.popularity
    assert topped == sorted(topped, key=lambda p: (-pop[p], p))
    assert all(c.score == 0.0 for c in got if not c.sources)


def content_sources(index: Index, prior: np.ndarray | None) -> dict[str, ContentSource]:
    def make(dense_max_items: int, min_share: float, blocks: bool = False) -> ContentSource:
        src = ContentSource(index.store, index.item_vectors, index.catalog.item_index, index.embed_text,
                            prior=prior, dense_max_items=dense_max_items,
                            blocks=None if blocks else FilterBlocks(index.item_vectors, max_rows=0))  # 0: never
        src.overfetch_min_share = min_share
        return src

    return {"in memory": make(10**9, 0.05), "filter blocks": make(0, 0.05, blocks=True),
            "chroma, masked": make(0, 0.0), "chroma, where": make(0, 2.0)}


@pytest.mark.parametrize("with_prior", [False, True])
def test_masked_content_neighbours_equal_chroma_where(tiny_index: Index, with_prior: bool) -> None:
    """Property over filter combos, histories and free text: the neighbours scored in memory (or fetched from
    Chroma unfiltered and masked) are those of a Chroma query with the filters' ``where`` clause, in order."""
    catalog = tiny_index.catalog
    prior = np.linspace(0.0, 0.3, catalog.n_items)[::-1].copy() if with_prior else None
    sources = content_sources(tiny_index, prior)
    assert sources["in memory"].unit is not None and sources["chroma, where"].unit is None
    retriever = tiny_index.retriever("content")
    checked = 0
    for filters, history, text in itertools.product([None, *COMBOS], HISTORIES, TEXTS):
        q = retriever.query(history, filters, text)
        for n in (2, 5, catalog.n_items):
            lists = {name: src.top(q, n) for name, src in sources.items()}
            want = lists["chroma, where"]
            for name, got in lists.items():
                assert [p for p, _ in got] == [p for p, _ in want], (name, label(filters or Filters()), history, text)
                assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
            assert all(q.allowed[p] for p, _ in want)
            checked += bool(want)
    assert checked > 100


def test_retrieve_is_the_same_through_the_where_clause(tiny_index: Index) -> None:
    catalog = tiny_index.catalog
    for weights in ({"content": 1.0}, {"sequential": 1.0, "content": 0.4, "ease": 0.25}):
        fast = tiny_index.retriever("fused", weights=weights)
        slow = tiny_index.retriever("fused", weights=weights)
        where_source = content_sources(tiny_index, None)["chroma, where"]
        slow.sources["content"] = slow.content = where_source  # type: ignore[assignment]
        for filters, history, text in itertools.product([None, *COMBOS], HISTORIES, TEXTS):
            a = fast.retrieve(history, k=catalog.n_items, filters=filters, query=text)
            b = slow.retrieve(history, k=catalog.n_items, filters=filters, query=text)
            assert [c.item_id for c in a] == [c.item_id for c in b]
            assert [c.score for c in a] == pytest.approx([c.score for c in b], abs=1e-5)


class CountingStore:
    def __init__(self, store: Any) -> None:
        self.store, self.calls = store, 0

    def query(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.store.query(*args, **kwargs)


def test_filtered_content_query_does_not_ask_chroma(tiny_index: Index) -> None:
    """The in-memory path: a filtered request costs a matrix product and a mask, no Chroma ``where`` query."""
    store = CountingStore(tiny_index.store)
    src = ContentSource(store, tiny_index.item_vectors, tiny_index.catalog.item_index,  # type: ignore[arg-type]
                        tiny_index.embed_text)
    q = tiny_index.retriever("content").query(["s1"], Filters(genres=["Drama"], year_max=1988), "courtroom")
    got = src.top(q, 3)
    assert sorted(tiny_index.catalog.item_ids[p] for p, _ in got) == ["d1", "d2"]  # Drama up to 1988
    assert store.calls == 0
    big = ContentSource(store, tiny_index.item_vectors, tiny_index.catalog.item_index,  # type: ignore[arg-type]
                        tiny_index.embed_text, dense_max_items=0)
    for _ in range(2):
        via_block = big.top(q, 3)  # past dense_max_items: the block of items passing the filter, scored exactly
        assert [p for p, _ in via_block] == [p for p, _ in got]
        assert [s for _, s in via_block] == pytest.approx([s for _, s in got], abs=1e-5)
    assert store.calls == 0 and big.blocks is not None and big.blocks.built == 1  # gathered once, then kept
    unblocked = ContentSource(store, tiny_index.item_vectors, tiny_index.catalog.item_index,  # type: ignore[arg-type]
                              tiny_index.embed_text, dense_max_items=0,
                              blocks=FilterBlocks(tiny_index.item_vectors, max_rows=0))
    via_chroma = unblocked.top(q, 3)
    assert [p for p, _ in via_chroma] == [p for p, _ in got]
    assert store.calls == 1  # a filter too large to block: one unfiltered query, masked


def test_filter_blocks_are_an_lru_bounded_in_entries_and_rows() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(100, 8)).astype(np.float32)
    blocks = FilterBlocks(vectors, entries=2, max_rows=60, total_rows=80)
    masks = {name: rng.random(100) < share for name, share in (("a", 0.3), ("b", 0.3), ("c", 0.3), ("big", 0.9))}
    vec = vectors[0] / np.linalg.norm(vectors[0])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    def top(name: str, mask: np.ndarray) -> list[tuple[int, float]] | None:
        block = blocks.scores(name, mask, vec)
        if block is None:
            return None
        positions, scores = block
        return [(int(positions[i]), s) for i, s in top_of_dense(scores, np.ones(len(scores), dtype=bool), 5)]

    for name in ("a", "b", "a", "c"):
        got = top(name, masks[name])
        assert got is not None
        want = sorted(np.flatnonzero(masks[name]), key=lambda p: -float(unit[p] @ vec))[:5]
        assert [p for p, _ in got] == want
    assert list(blocks._blocks) == ["a", "c"] and blocks.built == 3  # "b" least recently used, dropped
    assert top("big", masks["big"]) is None  # too many rows: the caller asks Chroma
    assert top("none", np.zeros(100, dtype=bool)) == []


# --- titles -------------------------------------------------------------------------------------------------


def test_title_scores_equal_the_python_scorer(tiny_catalog: Catalog) -> None:
    resolver = TitleResolver(tiny_catalog)
    mentions = ["star voyager", "voyager star", "the glass slipper", "glass slipper", "orbit mars", "nebula",
                "kingdom wishes", "the dragon and princess", "witness court", "zzz", "the", "defence rests"]
    mentions += [normalise_title(t)[0] for t in tiny_catalog.titles_by_pos]
    for mention in mentions:
        for choices in (resolver.keys, resolver.bare):
            for limit, cutoff in ((8, 72.0), (3, 40.0), (20, 0.0)):
                want = [(pos, float(score)) for _, score, pos in
                        process.extract(mention, choices, scorer=_score, limit=limit, score_cutoff=cutoff)]
                assert _best(mention, choices, limit=limit, cutoff=cutoff) == want, (mention, limit, cutoff)


def test_title_best_keeps_ties_in_catalogue_order() -> None:
    choices = ["heat", "beat", "heat", "neat", "heap"]
    assert _best("heat", choices, limit=3, cutoff=50.0) == [(0, 100.0), (2, 100.0), (1, 75.0)]
    assert _best("heat", choices, limit=10, cutoff=101.0) == []
