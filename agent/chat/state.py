"""Persisted chat sessions: one SQLite table under ``RECAGENT_HOME``; each save is one transaction."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from agent.chat.models import SessionState
from retrieval.home import recagent_home

logger = logging.getLogger(__name__)
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    catalog TEXT NOT NULL,
    updated REAL NOT NULL,
    data TEXT NOT NULL
)
"""


class SessionNotFoundError(LookupError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"chat session '{session_id}' does not exist or has expired")
        self.session_id = session_id

    def __str__(self) -> str:
        return str(self.args[0])


def valid_session_id(session_id: str) -> bool:
    return bool(SESSION_ID.fullmatch(session_id))


class SessionStore:
    """Sessions keyed by id; ones idle for longer than ``ttl_s`` read as missing and are purged."""

    def __init__(self, path: Path | None = None, ttl_s: float = 86400) -> None:
        self.path = path or recagent_home() / "sessions.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            with conn:  # one transaction: committed on success, rolled back on error
                yield conn
        finally:
            conn.close()

    def _expired(self, updated: float, now: float | None = None) -> bool:
        return (now or time.time()) - updated > self.ttl_s

    def new(self, catalog: str, user_id: str | None = None, session_id: str | None = None) -> SessionState:
        """A fresh (unsaved) session."""
        now = time.time()
        sid = session_id or secrets.token_urlsafe(12)
        if not valid_session_id(sid):
            raise ValueError(f"session id {sid!r}: use 1-64 letters, digits, '_' or '-'")
        return SessionState(session_id=sid, catalog=catalog, user_id=user_id, created=now, updated=now)

    def get(self, session_id: str) -> SessionState | None:
        if not valid_session_id(session_id):
            return None
        with self._connect() as conn:
            row = conn.execute("SELECT updated, data FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            return None
        if self._expired(float(row[0])):
            self.delete(session_id)
            logger.info("session expired session=%s", session_id)
            return None
        try:
            return SessionState.model_validate_json(row[1])
        except ValidationError as exc:
            logger.warning("session unreadable session=%s error=%s", session_id, exc)
            return None

    def save(self, state: SessionState) -> None:
        state.updated = time.time()
        payload = state.model_dump_json()
        with self._lock, self._connect() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO sessions (id, catalog, updated, data) VALUES (?, ?, ?, ?)",
                (state.session_id, state.catalog, state.updated, payload),
            )

    def delete(self, session_id: str) -> bool:
        with self._lock, self._connect() as conn:
            cur = conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cur.rowcount > 0

    def purge_expired(self) -> int:
        cutoff = time.time() - self.ttl_s
        with self._lock, self._connect() as conn:
            cur = conn.execute("DELETE FROM sessions WHERE updated < ?", (cutoff,))
        if cur.rowcount:
            logger.info("sessions purged count=%d", cur.rowcount)
        return cur.rowcount
