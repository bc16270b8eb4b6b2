"""Retrieval speed benchmark: index build from nothing (empty embedding cache, new collection) and
``retrieve`` latency for k=50 with a genre filter and without one, from the index loaded from disk."""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from eval.machine import cpu_model
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
    """Latency of the fused ``retrieve`` from the index loaded from disk (``load_index``), over seeded users' full
    histories (ordered by time, ``ties`` seeded by ``seed``), each user timed with the genre filter and without it
    in turn, so that both figures see the same machine load. ``p50_ms``/``p95_ms`` are the filtered ones."""
    t0 = time.perf_counter()
    index = load_index(catalog)
    load_seconds = time.perf_counter() - t0
    retriever = index.retriever("fused")
    histories = catalog.histories(ties, seed)
    rng = random.Random(seed)
    chosen = rng.sample(sorted(histories), min(users, len(histories)))
    genre = genre or (catalog.all_genres[0] if catalog.all_genres else None)
    filters = Filters(genres=[genre]) if genre else None
    for f in (filters, None):  # warm-up
        retriever.retrieve(histories[chosen[0]], k=k, filters=f)
    filtered: list[float] = []
    unfiltered: list[float] = []
    for user in tqdm(chosen, desc="retrieve", unit="user"):
        for f, lat in ((filters, filtered), (None, unfiltered)):
            t0 = time.perf_counter()
            retriever.retrieve(histories[user], k=k, filters=f)
            lat.append((time.perf_counter() - t0) * 1000)
    mean_history = float(np.mean([len(histories[u]) for u in chosen]))
    return {"users": len(chosen), "k": k, "filter": genre, "p50_ms": statistics.median(filtered),
            "p95_ms": float(np.quantile(filtered, 0.95)), "unfiltered_p50_ms": statistics.median(unfiltered),
            "unfiltered_p95_ms": float(np.quantile(unfiltered, 0.95)), "mean_history": mean_history,
            "index_load_seconds": load_seconds, "retriever": "fused",
            "weights": {n: w for n, w in retriever.weights.items() if w > 0},
            "learned": index.manifest.fusion.learned.sources if index.manifest.fusion.learned else None}


def cpu_line() -> str:
    """The CPU model and the load average when asked (the retrieve figures depend on both)."""
    model = cpu_model()
    try:
        load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        load = ""
    return f"{model}{load}"


def manifest_build_seconds(catalog: Catalog) -> float | None:
    assert catalog.root is not None
    m = read_manifest(catalog.root / "index")
    return None if m is None else m.build_seconds
