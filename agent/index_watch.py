"""Index hot swap: a running server moves to a new index of its catalogue without a failed request.

``recagent index`` / ``ingest`` build the new index beside the live one and retire (not delete) the old Chroma
collection. :class:`IndexWatcher` polls the catalogue's index manifest (``RECAGENT_INDEX_WATCH_S``), or is asked
by ``POST /v1/admin/reload``; on a new collection it loads the new index off the request path, then swaps the
services in one step. Requests already running finish on the index they started with, whose collection stays
until its grace period (``RECAGENT_INDEX_GRACE_S``) has passed; then the watcher deletes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from retrieval.catalog import catalog_root, load_catalog
from retrieval.index import RETIRE_GRACE_S, Index, load_index, purge_retired, read_manifest
from retrieval.vector_store import make_client

logger = logging.getLogger(__name__)


class ReloadResult(BaseModel):
    reloaded: bool = Field(description="whether this call moved the server to a new index")
    catalog: str
    collection: str = Field(description="the Chroma collection served now")
    previous: str | None = Field(default=None, description="the collection served before (when reloaded)")
    built_at: str
    seconds: float = Field(default=0.0, description="time to load the new index")
    deleted: list[str] = Field(default_factory=list, description="retired collections past their grace period")


class IndexWatcher:
    """Keeps a server on its catalogue's latest index. ``current()`` gives the index served now; ``swap(index)``
    makes the server serve another (the runtime's)."""

    def __init__(self, catalog: str, current: Callable[[], Index], swap: Callable[[Index], None],
                 interval_s: float = 5.0, grace_s: float = RETIRE_GRACE_S) -> None:
        self.catalog = catalog
        self.current = current
        self.swap = swap
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> ReloadResult:
        """Load and serve the catalogue's index if it is not the one served; purge retired collections."""
        with self._lock:
            served = self.current()
            manifest = read_manifest(catalog_root(self.catalog) / "index")
            if manifest is None or manifest.collection == served.manifest.collection:
                manifest = manifest or served.manifest
                return ReloadResult(reloaded=False, catalog=self.catalog, collection=served.manifest.collection,
                                    built_at=served.manifest.built_at, deleted=self._purge(manifest))
            t0 = time.perf_counter()
            index = load_index(load_catalog(self.catalog), embedder=getattr(served, "embedder", None))
            self.swap(index)
            seconds = time.perf_counter() - t0
            logger.info("index reloaded catalog=%s collection=%s previous=%s seconds=%.2f", self.catalog,
                        index.manifest.collection, served.manifest.collection, seconds)
            return ReloadResult(reloaded=True, catalog=self.catalog, collection=index.manifest.collection,
                                previous=served.manifest.collection, built_at=index.manifest.built_at,
                                seconds=round(seconds, 3), deleted=self._purge(index.manifest))

    def _purge(self, manifest: Any) -> list[str]:
        if not manifest.retired:  # the usual case on each watch tick: no Chroma client, no work
            return []
        try:
            return purge_retired(manifest, make_client(), self.grace_s)
        except Exception as exc:  # housekeeping: never fails a reload
            logger.warning("purging retired collections failed catalog=%s error=%s", self.catalog, exc)
            return []

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="index-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # a half-written or broken index: keep serving the old one, retry later
                logger.warning("index watch failed catalog=%s error=%s", self.catalog, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
