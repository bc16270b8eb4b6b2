"""Index hot swap on a real server (uvicorn, the real index and Chroma): a catalogue re-ingested while clients keep
asking moves the server to the new index (by its manifest watch, and by POST /v1/admin/reload) without one failed
request; the old collection stays until its grace period has passed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pandas as pd
import pytest

from agent.chat.agent import ChatAgent
from agent.chat.config import ChatConfig
from agent.chat.state import SQLiteSessionStore
from agent.service import RecommenderService
from agent.settings import Settings
from retrieval.catalog import Catalog, load_catalog
from retrieval.catalog_store import save_and_index
from retrieval.embeddings import Embedder
from retrieval.index import load_index, read_manifest
from retrieval.vector_store import make_client

pytestmark = pytest.mark.slow

NEW_ITEM = {"item_id": "s5", "title": "Comet Harbour", "description": "Miners on a comet fight a rogue AI.",
            "genres": ["Sci-Fi"], "year": 2003, "metadata": "{}"}


def with_new_item(catalog: Catalog, name: str) -> Catalog:
    items = pd.concat([catalog.items, pd.DataFrame([NEW_ITEM])], ignore_index=True)
    extra = pd.DataFrame([{"user_id": "u9", "item_id": i, "timestamp": 1_800_000_000 + n, "rating": None}
                          for n, i in enumerate(["s1", "s5"])])
    interactions = pd.concat([catalog.interactions, extra.astype(catalog.interactions.dtypes.to_dict())],
                             ignore_index=True)
    return Catalog(name=name, items=items[catalog.items.columns], interactions=interactions)


class Hammer:
    """Clients that keep asking while the index changes under them; every answer is recorded."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url = url
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.done = 0
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(clients)]

    def run(self, n: int) -> None:
        requests: list[tuple[str, str, dict[str, Any] | None]] = [
            ("POST", "/v1/recommendations", {"history": ["s1", "s2"], "k": 5}),
            ("POST", "/v1/recommendations", {"user_id": "u4", "k": 3, "filters": {"genres": ["Animation"]}}),
            ("GET", "/v1/items?query=space%20crew&k=3", None),
            ("GET", "/v1/items/d1", None),
        ]
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = n
            while not self.stop.is_set():
                method, path, body = requests[i % len(requests)]
                i += 1
                r = client.request(method, path, json=body)
                if r.status_code != 200:
                    self.failures.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
                self.done += 1

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.fixture
def served(tiny_catalog: Catalog, embedder: Embedder, scratch_catalog_name: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A server on a copy of the tiny catalogue, watching its manifest every 0.2 s; (URL, runtime)."""
    from serve import create_app, running_server

    copy = Catalog(name=scratch_catalog_name, items=tiny_catalog.items.copy(),
                   interactions=tiny_catalog.interactions.copy())
    save_and_index(copy, embedder=embedder, progress=False)
    index = load_index(load_catalog(scratch_catalog_name), embedder=embedder)
    service = RecommenderService(index)
    store = SQLiteSessionStore(tmp_path_factory.mktemp("swap") / "sessions.sqlite")
    settings = Settings(llm="none", catalog=scratch_catalog_name, index_watch_s=0.2)
    app = create_app(settings, service=service, chat=ChatAgent(service, store, ChatConfig(use_llm=False, k=3)))
    runtime = app.state.holder["runtime"]
    with running_server(app) as url:
        yield url, runtime
    runtime.close()


def test_a_new_index_is_picked_up_without_a_failed_request(served: tuple[str, Any], tiny_catalog: Catalog,
                                                            embedder: Embedder) -> None:
    url, runtime = served
    name = runtime.catalog_name
    old = read_manifest(load_catalog(name).root / "index")  # type: ignore[operator]
    assert old is not None
    assert httpx.get(f"{url}/v1/items/s5").status_code == 404

    runtime.watcher.start()
    with Hammer(url) as hammer:
        time.sleep(0.5)
        save_and_index(with_new_item(tiny_catalog, name), embedder=embedder, progress=False)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/v1/items/s5").status_code != 200:  # the watcher moved the server on
            assert time.monotonic() < deadline, "the server never picked up the new index"
            time.sleep(0.1)
        time.sleep(0.5)
    assert hammer.done > 20
    assert hammer.failures == []

    new = read_manifest(load_catalog(name).root / "index")  # type: ignore[operator]
    assert new is not None and new.collection != old.collection
    assert runtime.service.index.manifest.collection == new.collection
    assert [r.name for r in new.retired] == [old.collection]
    assert make_client().get_collection(old.collection).count() == 12  # kept for servers still on it
    after = httpx.post(f"{url}/v1/recommendations", json={"history": ["s1"], "k": 12}).json()
    assert "s5" in [i["item_id"] for i in after["items"]]
    chat = httpx.post(f"{url}/v1/chat", json={"message": "I loved Comet Harbour"}, timeout=30)
    assert chat.status_code == 200 and "s5" not in [i["item_id"] for i in chat.json()["items"]]

    # nothing new: the reload endpoint says so; once the grace period is over it deletes the old collection
    same = httpx.post(f"{url}/v1/admin/reload").json()
    assert same["reloaded"] is False and same["collection"] == new.collection and same["deleted"] == []
    runtime.watcher.grace_s = 0.0
    purged = httpx.post(f"{url}/v1/admin/reload").json()
    assert purged["deleted"] == [old.collection]
    with pytest.raises(Exception):  # noqa: B017 - chromadb raises its own NotFoundError type
        make_client().get_collection(old.collection)


def test_reload_endpoint_moves_the_server_at_once(served: tuple[str, Any], tiny_catalog: Catalog,
                                                  embedder: Embedder) -> None:
    url, runtime = served  # the watch thread is not started here: only the endpoint moves the server
    save_and_index(with_new_item(tiny_catalog, runtime.catalog_name), embedder=embedder, progress=False)
    assert httpx.get(f"{url}/v1/items/s5").status_code == 404
    moved = httpx.post(f"{url}/v1/admin/reload").json()
    assert moved["reloaded"] is True and moved["previous"] != moved["collection"]
    assert httpx.get(f"{url}/v1/items/s5").json()["title"] == "Comet Harbour"
