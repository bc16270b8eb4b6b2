"""Two `recagent serve` replicas for real: separate processes on their own ports, sharing a redis-server (chat
sessions) and a `chroma run` server (the vectors), all started here. A conversation whose turns alternate
between the replicas keeps its state, and 16 concurrent turns of one session, spread over both, lose nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from agent.chat.redis_store import RedisSessionStore
from retrieval.catalog import Catalog
from retrieval.catalog_store import save_and_index
from retrieval.embeddings import Embedder
from tests.servers import chroma_server, recagent_server

pytestmark = [pytest.mark.slow, pytest.mark.chroma_server]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, redis_url: str, tiny_catalog: Catalog,
             embedder: Embedder, recagent_test_home: Path) -> Iterator[tuple[str, str, str]]:
    """(replica A's URL, replica B's URL, the Redis URL) serving a copy of the tiny catalogue from the Chroma
    server."""
    from tests.conftest import drop_catalog, new_catalog_name

    folder = tmp_path_factory.mktemp("replicas")
    name = new_catalog_name("replicas")
    with contextlib.ExitStack() as stack:
        chroma_url = stack.enter_context(chroma_server(folder / "chroma"))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RECAGENT_CHROMA_URL", chroma_url)
            copy = Catalog(name=name, items=tiny_catalog.items.copy(), interactions=tiny_catalog.interactions.copy())
            save_and_index(copy, embedder=embedder, progress=False)
            stack.callback(drop_catalog, name)  # runs while the Chroma server is still up (LIFO)
        env = {"RECAGENT_HOME": str(recagent_test_home), "RECAGENT_CHROMA_URL": chroma_url,
               "RECAGENT_SESSIONS_URL": redis_url, "RECAGENT_CATALOG": name, "RECAGENT_LLM": "none",
               "RECAGENT_WORKERS": "8", "RECAGENT_LOG_LEVEL": "WARNING"}
        a = stack.enter_context(recagent_server(folder, env))
        b = stack.enter_context(recagent_server(folder, env))
        yield a, b, redis_url


def chat(url: str, message: str, session_id: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"message": message}
    if session_id is not None:
        body["session_id"] = session_id
    response = httpx.post(f"{url}/v1/chat", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


def item_ids(turn: dict[str, object]) -> list[str]:
    return [str(i["item_id"]) for i in turn["items"]]  # type: ignore[attr-defined, index]


def test_a_conversation_alternating_between_replicas_keeps_its_state(replicas: tuple[str, str, str]) -> None:
    a, b, redis_url = replicas
    first = chat(a, "I loved Star Voyager and Nebula Drift")
    sid = str(first["session_id"])
    second = chat(b, "more like those please", sid)  # replica B knows what A heard
    assert second["session_id"] == sid
    shown = set(item_ids(first)) | set(item_ids(second))
    assert not set(item_ids(second)) & (set(item_ids(first)) | {"s1", "s2"})  # no repeats, nothing liked
    assert "s3" in shown  # the sci-fi follow-up everyone watched after s1, s2
    third = chat(a, "something else", sid)
    assert not set(item_ids(third)) & (shown | {"s1", "s2"})

    state = RedisSessionStore(redis_url).get(sid)
    assert state is not None and state.version == 3
    assert [t.user for t in state.turns] == ["I loved Star Voyager and Nebula Drift", "more like those please",
                                             "something else"]
    assert {"s1", "s2"} <= set(state.liked)
    missing = httpx.post(f"{b}/v1/chat", json={"message": "hi", "session_id": "no-such-session"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "session_id"


def test_sixteen_concurrent_turns_over_both_replicas_lose_nothing(replicas: tuple[str, str, str]) -> None:
    a, b, redis_url = replicas
    sid = str(chat(b, "hello")["session_id"])
    messages = [f"something else please ({n})" for n in range(16)]

    def send(n: int) -> str:
        return str(chat((a, b)[n % 2], messages[n], sid)["session_id"])

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(send, range(16))) == {sid}
    state = RedisSessionStore(redis_url).get(sid)
    assert state is not None
    said = [t.user for t in state.turns]
    assert said[0] == "hello" and sorted(said[1:]) == sorted(messages)
    assert state.version == 17
