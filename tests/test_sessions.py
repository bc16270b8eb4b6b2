"""Every session store (SQLite, and Redis on a real redis-server) passes one contract: versioned saves that
refuse a stale write, TTL expiry, a lease that serialises turns across threads and processes, and a chat agent
whose concurrent turns on one session lose nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.chat.agent import ChatAgent
from agent.chat.config import ChatConfig
from agent.chat.state import (
    SessionBusyError,
    SessionConflictError,
    SessionStore,
    SQLiteSessionStore,
    open_session_store,
)
from agent.service import RecommenderService
from retrieval.index import Index


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., SessionStore]]:
    """A factory: ``make_store(ttl_s)`` opens a store of the parametrised kind (each call a new client of the
    same data, as another replica would open it)."""
    opened: list[SessionStore] = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        import redis

        redis.Redis.from_url(url).flushdb()
    else:
        url = f"sqlite://{tmp_path / 'sessions.sqlite'}"

    def make(ttl_s: float = 3600) -> SessionStore:
        store = open_session_store(url, ttl_s=ttl_s)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_url_picks_the_store_and_names_the_choices(tmp_path: Path) -> None:
    assert isinstance(open_session_store(str(tmp_path / "a.sqlite")), SQLiteSessionStore)
    assert isinstance(open_session_store(f"sqlite://{tmp_path / 'b.sqlite'}"), SQLiteSessionStore)
    with pytest.raises(ValueError, match=r"unknown scheme 'mongodb'.*sqlite://.*redis://"):
        open_session_store("mongodb://localhost/x")
    with pytest.raises(ValueError, match="name a file"):
        open_session_store("sqlite://")
    with pytest.raises(ConnectionError, match="does not answer"):
        open_session_store("redis://127.0.0.1:1/0")


def test_save_get_versions_and_stale_writes_are_refused(make_store) -> None:  # type: ignore[no-untyped-def]
    store, other = make_store(), make_store()
    state = store.new("cat", user_id="u1")
    state.liked = ["a"]
    store.save(state)
    assert state.version == 1
    seen = other.get(state.session_id)
    assert seen is not None and seen.liked == ["a"] and seen.user_id == "u1" and seen.version == 1

    seen.liked.append("b")
    other.save(seen)  # the other replica's turn lands first
    state.liked.append("c")
    with pytest.raises(SessionConflictError, match="changed since it was read"):
        store.save(state)  # a stale read never overwrites
    final = store.get(state.session_id)
    assert final is not None and final.liked == ["a", "b"] and final.version == 2

    twin = store.new("cat", session_id=state.session_id)  # a "new" session under a taken id
    with pytest.raises(SessionConflictError):
        store.save(twin)
    assert store.get("../../etc/passwd") is None
    assert store.delete(state.session_id) and store.get(state.session_id) is None


def test_idle_sessions_expire(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store(ttl_s=0.3)
    state = store.new("cat")
    store.save(state)
    assert store.get(state.session_id) is not None
    time.sleep(0.5)
    assert store.get(state.session_id) is None
    store.purge_expired()
    assert store.get(state.session_id) is None


def test_the_lease_serialises_read_modify_write(make_store) -> None:  # type: ignore[no-untyped-def]
    """16 writers (each with its own client, as replicas have), 5 increments each, through lease+get+save: all
    80 land. Without the lease the version check would refuse most of them (the test would fail)."""
    first = make_store()
    state = first.new("cat")
    first.save(state)
    sid = state.session_id

    def writer(n: int) -> None:
        store = make_store()
        for i in range(5):
            with store.lease(sid, wait_s=30):
                current = store.get(sid)
                assert current is not None
                current.liked.append(f"{n}-{i}")
                store.save(current)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(writer, range(16)))
    final = first.get(sid)
    assert final is not None and len(final.liked) == 80 and len(set(final.liked)) == 80
    assert final.version == 81


def test_a_held_lease_makes_others_wait_then_busy_and_lapses(make_store) -> None:  # type: ignore[no-untyped-def]
    store, other = make_store(), make_store()
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with store.lease("s1", lease_s=30):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        t0 = time.monotonic()
        with pytest.raises(SessionBusyError, match="busy"), other.lease("s1", wait_s=0.3):
            pass
        assert time.monotonic() - t0 >= 0.25  # it waited (to the sleep's granularity)
    finally:
        release.set()
        thread.join(10)
    with other.lease("s1", wait_s=5):  # free again once released
        pass
    # a crashed holder: its lease lapses and others go on
    with store.lease("s2", lease_s=0.2), other.lease("s2", wait_s=5):
        pass


def test_concurrent_chat_turns_on_one_session_lose_nothing(make_store, tiny_index: Index) -> None:  # type: ignore[no-untyped-def]
    """16 turns of one conversation sent at once, through agents with their own store clients (as replicas):
    every turn is recorded, and every title the user named ends up liked."""
    service = RecommenderService(tiny_index)
    config = ChatConfig(use_llm=False, k=2)
    first = ChatAgent(service, make_store(), config)
    sid = first.respond(None, "hello").session_id
    catalog = tiny_index.catalog
    titles = {i: str(catalog.item(i)["title"]) for i in ("s1", "s2", "s3", "a1", "a2", "d1", "d2", "d3")}
    messages = [f"I loved {titles[i]}" for i in titles] + [f"more please ({n})" for n in range(8)]
    agents = [ChatAgent(service, make_store(), config) for _ in range(4)]

    def turn(n: int) -> str:
        return agents[n % 4].respond(sid, messages[n]).session_id

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(turn, range(16))) == {sid}
    state = first.store.get(sid)
    assert state is not None
    said = [t.user for t in state.turns]
    assert sorted(said[1:]) == sorted(messages) and len(said) == 17
    assert set(titles) <= set(state.liked)
    assert state.version == 17
