"""Retrieval speed benchmark: index build from nothing (empty embedding cache, new collection) and
``retrieve`` latency for k=50 with a genre filter."""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from retrieval.catalog import Catalog
from retrieval.embeddings import Embedder
from retrieval.filters import Filters
from retrieval.index import build_index, load_index, read_manifest
from retrieval.vector_store import delete_collection, make_client


def time_build(catalog: Catalog) -> dict[str, float]:
    """Build a throw-away index with no embedding cache, as on a fresh machine (models already on disk)."""
    folder = Path(tempfile.mkdtemp(prefix="recagent-speed-"))
    try:
        t0 = time.perf_counter()
        manifest = build_index(catalog, folder / "index", embedder=Embedder(cache=False), progress=False)
        seconds = time.perf_counter() - t0
        delete_collection(make_client(), manifest.collection)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"build_seconds": seconds, "items": float(catalog.n_items)}


def time_retrieve(catalog: Catalog, users: int = 200, k: int = 50, seed: int = 0,
                  genre: str | None = None, ties: str = "random") -> dict[str, Any]:
    """Latency of ``retrieve`` over seeded users' full histories (ordered by time, ``ties`` seeded by ``seed``)."""
    index = load_index(catalog)
    retriever = index.retriever("fused")
    histories = catalog.histories(ties, seed)
    rng = random.Random(seed)
    chosen = rng.sample(sorted(histories), min(users, len(histories)))
    genre = genre or (catalog.all_genres[0] if catalog.all_genres else None)
    filters = Filters(genres=[genre]) if genre else None
    retriever.retrieve(histories[chosen[0]], k=k, filters=filters)  # warm-up
    lat = []
    for user in tqdm(chosen, desc="retrieve", unit="user"):
        t0 = time.perf_counter()
        retriever.retrieve(histories[user], k=k, filters=filters)
        lat.append((time.perf_counter() - t0) * 1000)
    mean_history = float(np.mean([len(histories[u]) for u in chosen]))
    return {"users": len(chosen), "k": k, "filter": genre, "p50_ms": statistics.median(lat),
            "p95_ms": float(np.quantile(lat, 0.95)), "mean_history": mean_history}


def manifest_build_seconds(catalog: Catalog) -> float | None:
    assert catalog.root is not None
    m = read_manifest(catalog.root / "index")
    return None if m is None else m.build_seconds
