"""The index through a real `chroma run` server (RECAGENT_CHROMA_URL) gives what the embedded store gives."""

from __future__ import annotations

from collections.abc import Iterator

import chromadb
import pytest

from retrieval.catalog import Catalog, load_catalog
from retrieval.catalog_store import save_and_index
from retrieval.embeddings import Embedder
from retrieval.filters import Filters
from retrieval.index import Index, load_index
from tests.servers import chroma_server

pytestmark = [pytest.mark.chroma_server, pytest.mark.slow]


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with chroma_server(tmp_path_factory.mktemp("chroma-server")) as url:
        yield url


QUERIES: list[tuple[list[str], Filters | None]] = [
    (["s1", "s2"], None),
    (["a1"], None),
    (["d1", "d2", "s4"], Filters(exclude_genres=["Crime"])),
    (["s1"], Filters(genres=["Animation"], year_min=2004)),
]


def results(index: Index, name: str, history: list[str], filters: Filters | None) -> list[tuple[str, float]]:
    return [(c.item_id, c.score) for c in index.retriever(name).retrieve(history, k=8, filters=filters)]


def test_server_store_matches_embedded(chroma_url: str, tiny_catalog: Catalog, tiny_index: Index,
                                       embedder: Embedder, scratch_catalog_name: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECAGENT_CHROMA_URL", chroma_url)
    copy = Catalog(name=scratch_catalog_name, items=tiny_catalog.items.copy(),
                   interactions=tiny_catalog.interactions.copy())
    manifest = save_and_index(copy, embedder=embedder, progress=False)
    served = load_index(load_catalog(scratch_catalog_name), embedder=embedder)
    assert served.manifest.collection == manifest.collection
    assert served.store.count() == tiny_catalog.n_items
    # really two stores: the collection lives on the server, not in the embedded store
    port = int(chroma_url.rsplit(":", 1)[1])
    assert chromadb.HttpClient(host="127.0.0.1", port=port).get_collection(manifest.collection).count() == 12
    with pytest.raises(Exception):  # noqa: B017 - chromadb raises its own NotFoundError type
        tiny_index.store.client.get_collection(manifest.collection)

    for vector in (tiny_index.item_vectors[0], tiny_index.item_vectors[7]):
        via_server = served.store.query(vector, 5)
        embedded = tiny_index.store.query(vector, 5)
        assert [i for i, _ in via_server] == [i for i, _ in embedded]
        assert [s for _, s in via_server] == pytest.approx([s for _, s in embedded], abs=1e-5)

    for history, filters in QUERIES:
        for name in ("content", "fused"):
            got = results(served, name, history, filters)
            want = results(tiny_index, name, history, filters)
            assert [i for i, _ in got] == [i for i, _ in want], (name, history, filters)
            assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
