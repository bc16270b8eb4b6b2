"""Chat sessions in Redis (``RECAGENT_SESSIONS_URL=redis://host:port/db``), shared by every server replica.

A session is one JSON string at ``recagent:session:<id>`` whose Redis TTL is the idle timeout (refreshed on
every save, so Redis itself expires idle sessions). A save is a ``WATCH``/``MULTI`` transaction that checks the
stored version; a turn's lease is redis-py's :class:`redis.lock.Lock` (``SET NX PX`` with a token, released by a
script that checks the token).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.exceptions import LockError, WatchError

from agent.chat.models import SessionState
from agent.chat.state import LEASE_S, WAIT_S, SessionBusyError, SessionConflictError, SessionStore, valid_session_id

logger = logging.getLogger(__name__)
PREFIX = "recagent:session:"


class RedisSessionStore(SessionStore):
    def __init__(self, url: str, ttl_s: float = 86400, client: Any | None = None) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.client: redis.Redis = client or redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                                                  health_check_interval=30)
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise ConnectionError(f"sessions store {url!r} does not answer: {exc}") from exc

    def __repr__(self) -> str:
        return f"RedisSessionStore({self.url!r})"

    @staticmethod
    def key(session_id: str) -> str:
        return PREFIX + session_id

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def get(self, session_id: str) -> SessionState | None:
        if not valid_session_id(session_id):
            return None
        payload = self.client.get(self.key(session_id))
        return None if payload is None else self.parse(session_id, payload)

    def save(self, state: SessionState) -> None:
        expected = state.version
        stored = state.model_copy(update={"updated": time.time(), "version": expected + 1})
        key = self.key(state.session_id)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                payload = pipe.get(key)
                current = 0
                if payload is not None:
                    found = self.parse(state.session_id, payload)
                    current = found.version if found is not None else -1
                if current != expected:
                    raise SessionConflictError(state.session_id, expected)
                pipe.multi()
                pipe.set(key, stored.model_dump_json(), px=self._ttl_ms())
                pipe.execute()
            except WatchError as exc:  # written between our read and our write
                raise SessionConflictError(state.session_id, expected) from exc
        state.updated, state.version = stored.updated, stored.version

    def delete(self, session_id: str) -> bool:
        return bool(self.client.delete(self.key(session_id)))

    def purge_expired(self) -> int:
        return 0  # Redis expires idle sessions itself (each key's TTL)

    @contextlib.contextmanager
    def lease(self, session_id: str, lease_s: float = LEASE_S, wait_s: float = WAIT_S) -> Iterator[None]:
        lock = self.client.lock(f"{PREFIX}{session_id}:lease", timeout=lease_s, sleep=0.005,
                                blocking_timeout=wait_s, thread_local=False)
        if not lock.acquire():
            raise SessionBusyError(session_id, wait_s)
        try:
            yield
        finally:
            try:
                lock.release()
            except LockError:  # the lease lapsed (a turn longer than lease_s); the version check still guards
                logger.warning("session lease lapsed before release session=%s", session_id)

    def close(self) -> None:
        self.client.close()
