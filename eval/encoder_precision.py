"""`recagent eval encoder-precision`: the int8 encoder against the fp32 one, speed and retrieval quality, one run.

Both precisions of the encoder the catalogue's index was built with embed every item text (timed, texts per
second, batched as an index build batches them, no cache); the report gives how far apart their vectors are
(cosine), then the content retriever and the fused retriever with each precision's item vectors (and query vectors,
for a tuned encoder) on the same test users of the catalogue's split, CF fitted on what the test part may see,
with the paired difference int8 - fp32 and its bootstrap interval. Nothing is written to the index or the cache.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import numpy as np

from eval.metrics import paired_bootstrap_diff, per_user_table, rank_of, summarise
from retrieval.embeddings import PRECISIONS, Embedder, precision_name
from retrieval.splits import SplitSpec

METHODS = ("content", "fused")


def base_name(name: str, precision: str) -> str:
    suffix = f"-{precision}"
    return name[: -len(suffix)] if precision != "fp32" and name.endswith(suffix) else name


def measure(catalog_name: str, spec: SplitSpec, users: int = 500, k: int = 50, n_boot: int = 1000,
            progress: bool = True, encoder: str = "index") -> dict[str, Any]:
    """``encoder``: ``index`` (the one the index was built with) or ``frozen`` (MiniLM as it ships, its item
    vectors in place of the index's, the fusion weights left as the index has them)."""
    from retrieval.catalog import load_catalog
    from retrieval.encoder import EncoderRef, make_embedder
    from retrieval.index import item_texts, load_index
    from retrieval.splits import split_catalog

    if encoder not in ("index", "frozen"):
        raise ValueError(f"encoder {encoder!r} is not one of: index, frozen")
    catalog = load_catalog(catalog_name)
    index = load_index(catalog)
    if encoder == "frozen":
        index = dataclasses.replace(index, manifest=index.manifest.model_copy(update={"encoder": EncoderRef()}))
    ref = index.manifest.encoder
    name = base_name(ref.name, ref.precision)
    texts = item_texts(catalog)
    split = split_catalog(catalog, spec)
    cases = split.test
    cases = random.Random(spec.seed).sample(cases, min(users, len(cases)))
    cf = index.fit_cf(split.fit_histories("test"))

    out: dict[str, Any] = {"catalog": catalog_name, "items": catalog.n_items, "encoder": name,
                           "encoder_choice": encoder,
                           "split": spec.describe(), "part": "test", "users": len(cases), "precisions": {}}
    vectors: dict[str, np.ndarray] = {}
    ranks: dict[str, dict[str, list[int | None]]] = {}
    for precision in PRECISIONS:
        embedder: Embedder = make_embedder(ref.model_copy(update={"precision": precision,
                                                                  "name": precision_name(name, precision)}),
                                           cache=False)
        embedder.warm_up()
        embedder.encode_uncached(texts[:64])  # first calls pay for allocations
        clock = time.perf_counter()
        vectors[precision] = embedder.encode_uncached(texts, progress=progress)
        seconds = time.perf_counter() - clock
        variant = dataclasses.replace(index, item_vectors=vectors[precision], embedder=embedder)
        ranks[precision] = {}
        quality = {}
        for method in METHODS:
            retriever = variant.retriever(method, cf=cf)
            got = []
            for case in cases:
                got.append(rank_of([c.item_id for c in retriever.retrieve(case.history, k=k)], case.target))
            ranks[precision][method] = got
            s = summarise(got, n_boot=n_boot, seed=spec.seed)
            quality[method] = {m: s[m] for m in ("ndcg@10", "recall@50")}
        out["precisions"][precision] = {"texts_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 2),
                                        "batch_size": embedder.batch_size, "runtime": embedder.runtime,
                                        "quality": quality}
    unit = {p: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for p, v in vectors.items()}
    cosine = (unit["fp32"] * unit["int8"]).sum(axis=1)
    out["cosine"] = {"mean": round(float(cosine.mean()), 4), "p1": round(float(np.quantile(cosine, 0.01)), 4),
                     "min": round(float(cosine.min()), 4)}
    out["speedup"] = round(out["precisions"]["int8"]["texts_per_s"] / out["precisions"]["fp32"]["texts_per_s"], 2)
    out["diff"] = {}
    for method in METHODS:
        a, b = per_user_table(ranks["int8"][method]), per_user_table(ranks["fp32"][method])
        out["diff"][method] = {}
        for metric in ("ndcg@10", "recall@50"):
            mean, lo, hi = paired_bootstrap_diff(a[metric], b[metric], n_boot=n_boot, seed=spec.seed)
            out["diff"][method][metric] = {"mean": mean, "lo": lo, "hi": hi}
    return out


def markdown(r: dict[str, Any]) -> str:
    fp, q = r["precisions"]["fp32"], r["precisions"]["int8"]
    lines = [f"# Encoder precision: int8 against fp32 on {r['catalog']} ({r['date']})", "",
             f"Machine: {r['machine']}. Command: `{r['command']}`. Encoder: {r['encoder']} ("
             + ("the one the index was built with" if r.get("encoder_choice", "index") == "index" else
                "frozen, as it ships; its item vectors in place of the index's, the index's fusion weights")
             + "), through ONNX Runtime; int8 = dynamic quantisation of its weights, signed, per output "
             f"channel. Split: {r['split']}; {r['part']} part, {r['users']} users sampled with the seed; CF fitted on "
             "what the test part may see; 95% bootstrap intervals, the difference paired by user.", "",
             "| | fp32 | int8 |", "|---|---|---|",
             f"| item texts embedded per second ({r['items']:,} texts, batch {fp['batch_size']}) | "
             f"{fp['texts_per_s']:,.0f} | {q['texts_per_s']:,.0f} ({r['speedup']:.2f}x) |"]
    for method in METHODS:
        for metric in ("ndcg@10", "recall@50"):
            a, b = fp["quality"][method][metric], q["quality"][method][metric]
            lines.append(f"| {method} {metric} | {a['mean']:.4f} [{a['lo']:.4f}, {a['hi']:.4f}] | "
                         f"{b['mean']:.4f} [{b['lo']:.4f}, {b['hi']:.4f}] |")
    lines += ["", "| int8 - fp32 (paired) | NDCG@10 | Recall@50 |", "|---|---|---|"]
    for method in METHODS:
        d = r["diff"][method]
        lines.append(f"| {method} | " + " | ".join(
            f"{d[m]['mean']:+.4f} [{d[m]['lo']:+.4f}, {d[m]['hi']:+.4f}]" for m in ("ndcg@10", "recall@50")) + " |")
    c = r["cosine"]
    lines += ["", f"Cosine between an item's int8 and fp32 vectors: mean {c['mean']:.4f}, 1st percentile "
              f"{c['p1']:.4f}, min {c['min']:.4f}.", ""]
    return "\n".join(lines)
