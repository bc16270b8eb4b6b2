"""Exact filtered neighbours for catalogues too large to score in memory whole: per-filter blocks of unit vectors.

Past ``DENSE_MAX_ITEMS`` the content source asks Chroma for neighbours. With a filter, Chroma's ``where`` clause
made a genre-filtered query the slow path at a million items, and over-fetching unfiltered neighbours does not help
when the user's neighbourhood holds few items of the genre (items of one topic sit together in vector space). A
block here is the unit vectors of the items that pass one filter, gathered once into one contiguous matrix; a query
is then one matrix-vector product over those rows (a genre holding 8% of a million items: 80,000 x 384), exact, and
its cost grows with the filter's share of the catalogue, not with the catalogue. Blocks are kept for the most
recently used filters (an LRU bounded in entries and in rows), built on first use, and shared by every retriever
of one loaded index.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

BLOCK_ENTRIES = 8  # filters whose blocks are kept
BLOCK_MAX_ROWS = 250_000  # a filter passing more items than this is not blocked (384 MB at 384 dimensions)
BLOCK_TOTAL_ROWS = 1_000_000  # rows kept over all blocks, about 1.5 GB at 384 dimensions


class FilterBlocks:
    """``scores(key, passes, vector)``: the catalogue positions of the items passing the filter ``key`` (whose mask
    over positions is ``passes``), ascending, and their cosine to ``vector``; None when the filter passes too many
    items to block (the caller then asks the vector store)."""

    def __init__(self, item_vectors: np.ndarray, entries: int = BLOCK_ENTRIES, max_rows: int = BLOCK_MAX_ROWS,
                 total_rows: int = BLOCK_TOTAL_ROWS) -> None:
        self.item_vectors = item_vectors
        self.entries = entries
        self.max_rows = max_rows
        self.total_rows = total_rows
        self._blocks: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0  # blocks gathered so far (for tests and logs)

    def _block(self, key: str, passes: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            found = self._blocks.get(key)
            if found is not None:
                self._blocks.move_to_end(key)
                return found
        positions = np.flatnonzero(passes)
        if positions.size > self.max_rows:
            return None
        rows = self.item_vectors[positions].astype(np.float32)
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        with self._lock:
            self._blocks[key] = (positions, rows)
            self.built += 1
            while len(self._blocks) > self.entries or (
                    len(self._blocks) > 1 and sum(p.size for p, _ in self._blocks.values()) > self.total_rows):
                self._blocks.popitem(last=False)
        return positions, rows

    def scores(self, key: str, passes: np.ndarray, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        block = self._block(key, passes)
        if block is None:
            return None
        positions, rows = block
        return positions, rows @ vector.astype(np.float32)
