"""`recagent eval scale`: how the index grows with the catalogue, on synthetic catalogues (retrieval.synth).

Each size runs in a child process of its own (``python -m eval.scale``), so that its peak memory is its own. A size
generates its catalogue, builds the index as `recagent ingest` does (embedding every item, filling Chroma, fitting
CF: EASE up to its limit, ALS past it), reloads it from disk as a server would, times ``retrieve`` (k=50) with and
without a genre filter, and measures quality on the catalogue's own leave-last-out split (test part, seeded random
ties, CF fitted on what the test part may see): the fused retriever against popularity, content and the
collaborative and sequential sources alone. The catalogue is removed afterwards unless asked to keep it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measure(items: int, users: int, seed: int = 0, queries: int = 200, eval_users: int = 500, k: int = 50,
            keep: bool = False, progress: bool = True, reuse: bool = False) -> dict[str, Any]:
    """One size, in this process: build, reload, time, evaluate (see the module docstring). ``reuse``: when a kept
    index of the same synthetic catalogue (same content hash) is on disk, measure it instead of building again;
    the build's seconds are then the manifest's, and the peak memory is this (measuring) process's only."""
    from eval.metrics import rank_of, summarise
    from retrieval.catalog import catalog_root, load_catalog
    from retrieval.catalog_store import save_and_index
    from retrieval.filters import Filters
    from retrieval.home import recagent_home
    from retrieval.index import load_index, read_manifest
    from retrieval.splits import SplitSpec, split_catalog
    from retrieval.synth import SynthConfig, synth_catalog
    from retrieval.vector_store import delete_collection, make_client

    name = f"scale-{items}x{users}-s{seed}"
    out: dict[str, Any] = {"items": items, "users": users, "seed": seed}
    t0 = time.perf_counter()
    catalog = synth_catalog(name, SynthConfig(items=items, users=users, seed=seed))
    out["generate_s"] = round(time.perf_counter() - t0, 2)
    out["interactions"] = int(len(catalog.interactions))
    chroma_dir = recagent_home() / "chroma"
    chroma_before = folder_bytes(chroma_dir)
    kept = read_manifest(catalog_root(name) / "index") if reuse else None
    if kept is not None and kept.content_hash == catalog.content_hash():
        manifest = kept
        out["build_s"] = manifest.build_seconds
        out["build_reused"] = {"built_at": manifest.built_at}
    else:
        t0 = time.perf_counter()
        manifest = save_and_index(catalog, progress=progress)
        out["build_s"] = round(time.perf_counter() - t0, 2)
    out["build_items_per_s"] = round(items / out["build_s"], 1)
    out["build_phases"] = manifest.build_phases
    out["encoder"] = {"name": manifest.encoder.name, "precision": manifest.encoder.precision}
    out["collaborative"] = manifest.cf.fitted
    out["weights"] = manifest.fusion.weights
    root = catalog_root(name)
    out["disk_mb"] = {"catalogue_and_index": round(folder_bytes(root) / 1e6, 1),
                      "chroma_delta": round((folder_bytes(chroma_dir) - chroma_before) / 1e6, 1)}
    if "build_reused" in out:  # built earlier: the whole Chroma folder (this collection and any others in it)
        out["disk_mb"]["chroma_delta"] = None
        out["disk_mb"]["chroma_folder"] = round(folder_bytes(chroma_dir) / 1e6, 1)
    try:
        t0 = time.perf_counter()
        stored = load_catalog(name)
        index = load_index(stored)
        retriever = index.retriever("fused")
        out["load_s"] = round(time.perf_counter() - t0, 2)

        histories = stored.histories("random", seed)
        rng = random.Random(seed)
        chosen = rng.sample(sorted(histories), min(queries, len(histories)))
        genre_counts: dict[str, int] = {}
        for genres in stored.genres_by_pos:
            for g in genres:
                genre_counts[g] = genre_counts.get(g, 0) + 1
        genre = "Drama" if "Drama" in genre_counts else max(genre_counts, key=genre_counts.__getitem__)
        out["filter"] = {"genre": genre, "share_of_items": round(genre_counts[genre] / stored.n_items, 3)}
        latency: dict[str, dict[str, float]] = {}
        for label, filters in (("unfiltered", None), ("genre_filter", Filters(genres=[genre]))):
            retriever.retrieve(histories[chosen[0]], k=k, filters=filters)  # warm-up
            lat = []
            for user in chosen:
                t = time.perf_counter()
                retriever.retrieve(histories[user], k=k, filters=filters)
                lat.append((time.perf_counter() - t) * 1000)
            latency[label] = {"p50_ms": round(statistics.median(lat), 2),
                              "p95_ms": round(float(np.quantile(lat, 0.95)), 2)}
        out["retrieve"] = latency

        spec = SplitSpec()
        split = split_catalog(stored, spec)
        cases = split.test
        rng = random.Random(seed)
        cases = rng.sample(cases, min(eval_users, len(cases)))
        cf = index.fit_cf(split.fit_histories("test"))
        methods = ["fused", "mostpop", "content", "sequential", cf.collaborative or "ease"]
        quality = {}
        for method in methods:
            r = index.retriever(method, cf=cf)
            ranks = []
            for case in cases:
                ranks.append(rank_of([c.item_id for c in r.retrieve(case.history, k=k)], case.target))
            s = summarise(ranks, n_boot=500, seed=seed)
            quality[method] = {m: s[m] for m in ("ndcg@10", "recall@50")}
        out["quality"] = {"split": spec.describe(), "part": "test", "users": len(cases), "methods": quality}
    finally:
        if not keep:
            final = read_manifest(root / "index")
            client = make_client()
            for collection in ([final.collection, *(r.name for r in final.retired)] if final else []):
                delete_collection(client, collection)
            shutil.rmtree(root, ignore_errors=True)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews the timings
    return out


def run_child(items: int, users: int, seed: int, queries: int, eval_users: int, keep: bool,
              timeout_s: float | None = None, reuse: bool = False) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (its own peak memory); progress goes to stderr."""
    argv = [sys.executable, "-m", "eval.scale", "--items", str(items), "--users", str(users), "--seed", str(seed),
            "--queries", str(queries), "--eval-users", str(eval_users)] + (["--keep"] if keep else []) + \
        (["--reuse"] if reuse else [])
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        return {"items": items, "users": users, "error": f"exit {proc.returncode}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def merge(previous: dict[str, Any] | None, results: list[dict[str, Any]], run: dict[str, str]) -> dict[str, Any]:
    """The report after a run: each size measured now (stamped with ``run``: command, date, commit, machine)
    replaces the same size of ``previous``; the other sizes stay, each with the run that measured it."""
    kept: dict[int, dict[str, Any]] = {}
    for old in (previous or {}).get("sizes", []):
        old_run = {k: old.get(k) or previous.get(k, "?") for k in ("command", "date", "machine")}  # type: ignore[union-attr]
        kept[int(old["items"])] = {"commit": "?", **old, **old_run}
    for result in results:
        kept[int(result["items"])] = {**result, **run}
    return {"sizes": [kept[n] for n in sorted(kept)], "notes": (previous or {}).get("notes", [])}


def markdown(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    runs: list[tuple[str, str, str, str]] = []
    for r in sizes:
        key = (r.get("date", "?"), r.get("commit", "?"), r.get("command", "?"), r.get("machine", "?"))
        if key not in runs:
            runs.append(key)
    lines = ["# Scale: synthetic catalogues", "",
             "One run per size, each in its own process (peak memory is that process's); the run of each row is "
             "listed under the table. Build: embedding every item text, filling Chroma, fitting CF (the seconds "
             "of each in brackets where the run recorded them). Quality: test part of each catalogue's own "
             "leave-last-out split, seeded random ties, CF fitted on what the test part may see, a seeded sample "
             "of users, 95% bootstrap intervals. Load average at the end of each size: "
             + ", ".join(f"{r['items']:,}: {r.get('loadavg_at_end', ['?'])[0]}" for r in sizes) + ".", "",
             "| items | users | interactions | encoder | collaborative | build (embed / Chroma / CF) | peak memory | "
             "on disk (index + Chroma) | retrieve p50 / p95 | with a genre filter p50 / p95 | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        run = runs.index((r.get("date", "?"), r.get("commit", "?"), r.get("command", "?"), r.get("machine", "?")))
        if "error" in r:
            lines.append(f"| {r['items']:,} | {r['users']:,} | failed: {r['error']} | | | | | | | | {run + 1} |")
            continue
        disk = r["disk_mb"]
        lat = r["retrieve"]
        phases = r.get("build_phases") or {}
        split = (f" ({phases['embed_s']:.0f} / {phases['vector_store_s']:.0f} / {phases['cf_s']:.0f} s)"
                 if phases else "")
        encoder = r.get("encoder", {}).get("precision", "fp32")
        reused = " (kept index, built " + r["build_reused"]["built_at"] + " by an earlier process)" \
            if r.get("build_reused") else ""
        memory = f"{r['peak_rss_mb'] / 1024:.2f} GiB" + (" (measuring only)" if reused else "")
        lines.append(
            f"| {r['items']:,} | {r['users']:,} | {r['interactions']:,} | MiniLM {encoder} | {r['collaborative']} | "
            f"{r['build_s']:.0f} s{split}{reused} | "
            f"{memory} | {disk['catalogue_and_index'] + (disk['chroma_delta'] or disk.get('chroma_folder', 0)):.0f} MB"
            f"{' (Chroma: the whole folder)' if disk['chroma_delta'] is None else ''} | "
            f"{lat['unfiltered']['p50_ms']:.1f} / {lat['unfiltered']['p95_ms']:.1f} ms | "
            f"{lat['genre_filter']['p50_ms']:.1f} / {lat['genre_filter']['p95_ms']:.1f} ms "
            f"({r['filter']['genre']}, {r['filter']['share_of_items']:.0%} of items) | {run + 1} |")
    lines += ["", "Runs:", ""]
    for i, (date, commit, command, machine) in enumerate(runs):
        lines.append(f"{i + 1}. {date}, commit {commit}, machine: {machine}: `{command}`")
    lines += ["", "## Quality on each catalogue's own split", ""]
    for r in sizes:
        if "error" in r:
            continue
        q = r["quality"]
        lines += [f"### {r['items']:,} items ({q['users']} test users)", "", "| method | NDCG@10 | Recall@50 |",
                  "|---|---|---|"]
        for method, m in q["methods"].items():
            lines.append(f"| {method} | {m['ndcg@10']['mean']:.3f} [{m['ndcg@10']['lo']:.3f}, "
                         f"{m['ndcg@10']['hi']:.3f}] | {m['recall@50']['mean']:.3f} [{m['recall@50']['lo']:.3f}, "
                         f"{m['recall@50']['hi']:.3f}] |")
        lines.append("")
    lines += report.get("notes", [])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one size of `recagent eval scale` (prints one JSON line)")
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--eval-users", type=int, default=500)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args(argv)
    from retrieval.home import configure_offline_environment

    configure_offline_environment()
    result = measure(args.items, args.users, args.seed, args.queries, args.eval_users, keep=args.keep,
                     reuse=args.reuse)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
