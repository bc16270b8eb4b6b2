"""Chat sessions behind one interface, :class:`SessionStore`, shared by every replica of the server.

A turn is an atomic read-modify-write: it takes the session's lease (:meth:`SessionStore.lease`, held across
processes and machines: a row in SQLite, a Redis lock), reads the session, changes it and saves it with a version
check (:meth:`SessionStore.save` raises :class:`SessionConflictError` when someone else saved in between, which
only happens when a lease ran out). Idle sessions expire after ``ttl_s``.

Implementations are chosen by URL (:func:`open_session_store`): ``sqlite:///path`` (the default, one machine;
:class:`SQLiteSessionStore`) and ``redis://host:port/db`` (replicas; :mod:`agent.chat.redis_store`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from agent.chat.models import SessionState
from retrieval.home import recagent_home

logger = logging.getLogger(__name__)
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SESSION_SCHEMES = ("sqlite", "redis", "rediss")
LEASE_S = 180.0  # a turn's hold on its session; longer than any turn's deadline, so it runs out only on a crash
WAIT_S = 60.0  # how long a turn waits for the session's lease before it is refused


class SessionNotFoundError(LookupError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"chat session '{session_id}' does not exist or has expired")
        self.session_id = session_id

    def __str__(self) -> str:
        return str(self.args[0])


class SessionBusyError(RuntimeError):
    """The session's lease was not free within the wait: other turns of it are still running."""

    def __init__(self, session_id: str, waited_s: float) -> None:
        super().__init__(f"chat session '{session_id}' is busy with other turns (waited {waited_s:g}s); "
                         "try again")
        self.session_id = session_id


class SessionConflictError(RuntimeError):
    """The session was saved by someone else since it was read (its version moved on)."""

    def __init__(self, session_id: str, expected: int) -> None:
        super().__init__(f"chat session '{session_id}' changed since it was read (expected version {expected})")
        self.session_id = session_id


def valid_session_id(session_id: str) -> bool:
    return bool(SESSION_ID.fullmatch(session_id))


class SessionStore(ABC):
    """Sessions keyed by id. ``state.version`` counts saves: :meth:`save` stores ``state`` only when the stored
    version still equals it (0: not stored yet), then increments it."""

    ttl_s: float

    def new(self, catalog: str, user_id: str | None = None, session_id: str | None = None) -> SessionState:
        """A fresh (unsaved, version 0) session."""
        now = time.time()
        sid = session_id or secrets.token_urlsafe(12)
        if not valid_session_id(sid):
            raise ValueError(f"session id {sid!r}: use 1-64 letters, digits, '_' or '-'")
        return SessionState(session_id=sid, catalog=catalog, user_id=user_id, created=now, updated=now)

    @abstractmethod
    def get(self, session_id: str) -> SessionState | None:
        """The stored session; None when unknown, expired or unreadable."""

    @abstractmethod
    def save(self, state: SessionState) -> None:
        """Store ``state`` if nobody saved since it was read (else :class:`SessionConflictError`); bumps its
        version and ``updated``."""

    @abstractmethod
    def delete(self, session_id: str) -> bool: ...

    @abstractmethod
    def purge_expired(self) -> int:
        """Remove expired sessions; how many went."""

    @abstractmethod
    def lease(self, session_id: str, lease_s: float = LEASE_S, wait_s: float = WAIT_S
              ) -> contextlib.AbstractContextManager[None]:
        """Hold the session for one turn, across processes: at most one holder at a time (a lease that is not
        released within ``lease_s`` lapses). Waits up to ``wait_s``, then :class:`SessionBusyError`."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""

    @staticmethod
    def parse(session_id: str, payload: str | bytes) -> SessionState | None:
        try:
            return SessionState.model_validate_json(payload)
        except ValidationError as exc:
            logger.warning("session unreadable session=%s error=%s", session_id, exc)
            return None


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    catalog TEXT NOT NULL,
    updated REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    expires REAL NOT NULL
)""",
)
PURGE_EVERY_S = 600.0


class SQLiteSessionStore(SessionStore):
    """One SQLite file (WAL): every process on the machine that opens it shares the sessions and their leases.
    Expired sessions are purged when the store opens and then at most every ten minutes, on a save."""

    def __init__(self, path: Path | None = None, ttl_s: float = 86400) -> None:
        self.path = path or recagent_home() / "sessions.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            for statement in _SCHEMA:
                conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
            if "version" not in columns:  # a file written before sessions had versions
                conn.execute("ALTER TABLE sessions ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
        self._purged = 0.0
        self.purge_expired()

    def __repr__(self) -> str:
        return f"SQLiteSessionStore({str(self.path)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            with conn:  # one transaction: committed on success, rolled back on error
                yield conn
        finally:
            conn.close()

    def get(self, session_id: str) -> SessionState | None:
        if not valid_session_id(session_id):
            return None
        with self._connect() as conn:
            row = conn.execute("SELECT updated, version, data FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            return None
        if time.time() - float(row[0]) > self.ttl_s:
            self.delete(session_id)
            logger.info("session expired session=%s", session_id)
            return None
        state = self.parse(session_id, row[2])
        if state is not None:
            state.version = int(row[1])  # the row's version is the truth
        return state

    def save(self, state: SessionState) -> None:
        expected = state.version
        stored = state.model_copy(update={"updated": time.time(), "version": expected + 1})
        payload = stored.model_dump_json()
        with self._connect() as conn:
            if expected == 0:
                cur = conn.execute(
                    "INSERT INTO sessions (id, catalog, updated, version, data) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO NOTHING",
                    (state.session_id, state.catalog, stored.updated, stored.version, payload),
                )
            else:
                cur = conn.execute(
                    "UPDATE sessions SET catalog = ?, updated = ?, version = ?, data = ? WHERE id = ? AND version = ?",
                    (state.catalog, stored.updated, stored.version, payload, state.session_id, expected),
                )
            if cur.rowcount != 1:
                raise SessionConflictError(state.session_id, expected)
        state.updated, state.version = stored.updated, stored.version
        if time.time() - self._purged > PURGE_EVERY_S:
            self.purge_expired()

    def delete(self, session_id: str) -> bool:
        with self._connect() as conn:
            cur = conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cur.rowcount > 0

    def purge_expired(self) -> int:
        now = time.time()
        self._purged = now
        with self._connect() as conn:
            cur = conn.execute("DELETE FROM sessions WHERE updated < ?", (now - self.ttl_s,))
            conn.execute("DELETE FROM leases WHERE expires < ?", (now,))
        if cur.rowcount:
            logger.info("sessions purged count=%d", cur.rowcount)
        return cur.rowcount

    @contextlib.contextmanager
    def lease(self, session_id: str, lease_s: float = LEASE_S, wait_s: float = WAIT_S) -> Iterator[None]:
        token = secrets.token_hex(8)
        start = time.monotonic()
        pause = 0.002
        while True:
            now = time.time()
            with self._connect() as conn:
                cur = conn.execute(
                    "INSERT INTO leases (id, token, expires) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "token = excluded.token, expires = excluded.expires WHERE leases.expires < ?",
                    (session_id, token, now + lease_s, now),
                )
            if cur.rowcount == 1:
                break
            if time.monotonic() - start > wait_s:
                raise SessionBusyError(session_id, wait_s)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            with self._connect() as conn:
                conn.execute("DELETE FROM leases WHERE id = ? AND token = ?", (session_id, token))


def open_session_store(url: str | None = None, ttl_s: float = 86400) -> SessionStore:
    """The store a URL names: ``redis://host:port/db`` (or ``rediss://``), ``sqlite:///absolute/path`` or a plain
    file path; None: SQLite under ``RECAGENT_HOME``."""
    if url is None or not url.strip():
        return SQLiteSessionStore(ttl_s=ttl_s)
    url = url.strip()
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("redis", "rediss"):
        from agent.chat.redis_store import RedisSessionStore

        return RedisSessionStore(url, ttl_s=ttl_s)
    if scheme == "sqlite":
        path = parsed.path
        if not path or path == "/":
            raise ValueError(f"sessions URL {url!r}: name a file, as sqlite:///absolute/path/sessions.sqlite")
        return SQLiteSessionStore(Path(path), ttl_s=ttl_s)
    if scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # a plain path (or a Windows drive)
        return SQLiteSessionStore(Path(url), ttl_s=ttl_s)
    raise ValueError(f"sessions URL {url!r}: unknown scheme {scheme!r}; choose one of "
                     f"{', '.join(s + '://' for s in SESSION_SCHEMES)} (or a file path)")
