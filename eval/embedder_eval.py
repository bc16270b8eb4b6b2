"""``recagent eval embedder``: the tuned encoder against the frozen one, CF and the fusion, on one split.

* **Warm comparison** (the catalogue's own leave-last-out split, full ranking): the content source with the
  frozen MiniLM (user = mean of their items' vectors) and with the tuned encoder (user = encoder over their
  history text), the CF sources, and the fused retriever with each encoder, its weights tuned on validation.
  The frozen index is built beside the live one for the run and removed afterwards.
* **Cold start**: a seeded share of items is removed from every history before anything is fitted (CF and a
  second tuned encoder trained for this run); for the test users whose held-out item is one of them, how often
  each retriever puts it in its top 50. Each encoder's content source is measured twice, by cosine only and with
  the popularity prior (the tuned one's weight as served, the frozen one's chosen on validation); the cold items
  have no interactions, so the prior guesses theirs from their nearest items that have some
  (:func:`~retrieval.sources.popularity_prior`); a ceiling row gives it their true counts instead.
  Then the fused retriever's cold-item path: its weight chosen on validation in that world, measured on test
  (:mod:`eval.cold_path`). ``cold_only`` runs this part (and the query cost) without the warm tables.
* **Query cost**: embedding a 50-item history into the tuned encoder's user vector.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from eval import cold_path
from eval import retrieval_eval as rv
from eval.metrics import METRICS, bootstrap_ci, interval_cell, summarise
from retrieval.catalog import Catalog
from retrieval.cf import CFConfig
from retrieval.encoder import EncoderRef, load_provenance, make_embedder, tuned_ref
from retrieval.encoder_train import PRIOR_WEIGHTS, EncoderTrainConfig, EncoderTrainer
from retrieval.index import COLD_WEIGHT, Index, build_index, load_index
from retrieval.sources import PRIOR_NEIGHBOURS
from retrieval.splits import Split, SplitSpec
from retrieval.vector_store import delete_collection, make_client

SASREC = "SASRec-style (GPT-2 over item ids, behaviour only)"
COLD_RETRIEVERS = ("content", "mostpop", "sequential", "ease", "fused")


@contextmanager
def side_index(catalog: Catalog, encoder: EncoderRef, cf: CFConfig) -> Iterator[Index]:
    """A throw-away index of ``catalog`` built with ``encoder`` (its own folder and Chroma collection)."""
    folder = Path(tempfile.mkdtemp(prefix=f"recagent-{catalog.name}-side-"))
    manifest = None
    try:
        embedder = make_embedder(encoder, cache=encoder.kind == "frozen")  # throw-away vectors stay uncached
        manifest = build_index(catalog, folder / "index", embedder=embedder, encoder=encoder, progress=False)
        index = load_index(catalog, folder=folder / "index")
        index.manifest.cf = cf  # the live index's CF settings, so that tuning starts from the same EASE lambda
        yield index
    finally:
        if manifest is not None:
            delete_collection(make_client(), manifest.collection)
        shutil.rmtree(folder, ignore_errors=True)


SERVED = "fused, tuned encoder + SASRec (the served sources)"
FUSIONS = {"frozen": "frozen encoder", "tuned": "tuned encoder", "served": "tuned encoder + SASRec"}


@dataclass
class WarmResult:
    tuning: dict[str, dict[str, float]]  # fusion (a FUSIONS key) -> fusion weights chosen on validation
    results: rv.Results  # part -> method -> metrics
    frozen_prior: dict[str, Any] = field(default_factory=dict)  # the frozen encoder's prior, chosen on validation
    lists: dict[str, rv.PartLists] = field(default_factory=dict)  # part -> the tuned encoder's source lists


def warm_comparison(live: Index, frozen: Index, split: Split, n_boot: int, seed: int,
                    progress: bool = True) -> WarmResult:
    """Every method on validation and test; both fusions tuned (weights grid, the live EASE lambda) on
    validation only. SASRec stays out of the fusions (it has its own row: this report compares encoders)."""
    cf = rv.without_sasrec(live.manifest.cf)
    results: rv.Results = {"validation": {}, "test": {}}
    tuning: dict[str, dict[str, float]] = {}
    prior = frozen_prior(frozen, split, cf, progress)  # the frozen encoder gets its own best prior, for fairness
    for part, metrics in prior.pop("results").items():
        results[part]["content, frozen encoder + popularity prior"] = metrics
    for name, index in (("frozen", frozen), ("tuned", live)):
        lists = {part: rv.collect_lists(index, split, part, progress, cf_config=cf) for part in rv.PARTS}
        tuned = rv.tune(index, split, lists["validation"], lambdas=(cf.ease_lambda,),
                        decays=(cf.ease_decay,), progress=progress, sasrec=False)
        tuning[name] = tuned.weights
        scores = rv.evaluate(lists, tuned.weights, n_boot=n_boot, seed=seed)
        for part, methods in scores.items():
            results[part][f"content, {name} encoder"] = methods["content"]
            results[part][f"fused, {name} encoder"] = methods["fused"]
            if name == "tuned":
                for base in ("mostpop", "sequential", "ease", "slit"):
                    if base in methods:
                        results[part][base] = methods[base]
    order = ["content, frozen encoder", "content, frozen encoder + popularity prior", "content, tuned encoder",
             "mostpop", "sequential", "ease", "slit",
             "fused, frozen encoder", "fused, tuned encoder"]
    results = {part: {m: methods[m] for m in order if m in methods} for part, methods in results.items()}
    return WarmResult(tuning=tuning, results=results, frozen_prior=prior, lists=lists)


def add_served_fusion(warm: WarmResult, live: Index, split: Split, fitted: Mapping[str, Any], n_boot: int,
                      seed: int, progress: bool = True) -> None:
    """The fusion of every source the live index serves: the tuned encoder's lists plus SASRec's, from the models
    :func:`eval.sasrec.evaluate_sasrec` fitted on what each part may see; its weights tuned on validation (the
    coarse grid, then the finer one, as ``eval retrieval --tune`` chooses the served weights)."""
    lists = {part: rv.with_sasrec_lists(live, split, part, warm.lists[part], live.manifest.cf,
                                        fitted["models"][part], fitted["best_epochs"], progress)
             for part in rv.PARTS}
    weights = rv.refined(lists["validation"], rv.tune_weights(lists["validation"]), progress=progress).weights
    warm.tuning["served"] = weights
    for part, methods in rv.evaluate(lists, weights, n_boot=n_boot, seed=seed, cold=live.manifest.fusion.cold).items():
        warm.results[part][SERVED] = methods["fused"]


def with_prior_weight(index: Index, weight: float) -> Index:
    """``index`` with its content source's popularity-prior weight set to ``weight`` (0: cosine only); the same
    vectors, encoder and CF."""
    encoder = index.manifest.encoder.model_copy(update={"prior_weight": weight})
    return dataclasses.replace(index, manifest=index.manifest.model_copy(update={"encoder": encoder}))


def choose_prior_weight(index: Index, split: Split, cf: CFConfig, progress: bool) -> tuple[float, dict[float, float]]:
    """The prior weight (of ``PRIOR_WEIGHTS``) whose content source is best on validation (NDCG@10; ties: the
    smaller weight), and the validation NDCG@10 per weight."""
    weights = {"content": 1.0}
    by_weight: dict[float, float] = {}
    for weight in PRIOR_WEIGHTS:
        lists = rv.collect_lists(with_prior_weight(index, weight), split, "validation", progress, cf_config=cf,
                                 weights=weights)
        by_weight[weight] = summarise(lists.ranks(weights), n_boot=1)["ndcg@10"]["mean"]
    return max(PRIOR_WEIGHTS, key=lambda w: (by_weight[w], -w)), by_weight


def frozen_prior(frozen: Index, split: Split, cf: CFConfig, progress: bool) -> dict[str, Any]:
    """The frozen encoder's content source with the popularity prior whose weight is best on validation."""
    weights = {"content": 1.0}
    best, by_weight = choose_prior_weight(frozen, split, cf, progress)
    parts = {part: rv.collect_lists(with_prior_weight(frozen, best), split, part, progress, cf_config=cf,
                                    weights=weights)
             for part in rv.PARTS}
    return {"weight": best, "validation_ndcg@10": {f"{w:g}": round(v, 5) for w, v in by_weight.items()},
            "results": {part: summarise(pl.ranks(weights)) for part, pl in parts.items()}}


def cold_items(catalog: Catalog, share: float, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    n = max(1, round(share * catalog.n_items))
    return {str(i) for i in rng.choice(np.asarray(catalog.item_ids, dtype=object), size=n, replace=False)}


def content_variants(encoder: str, index: Index, prior_weight: float | None) -> list[tuple[str, Index]]:
    """The content source of ``encoder`` by cosine only and with the popularity prior, labelled as the warm table
    labels them: a tuned encoder's index is served with its prior (its weight chosen on validation, maybe 0), so
    ``content, X encoder`` is that and ``..., cosine only`` the one without; a frozen encoder's is served without
    one: ``content, X encoder`` and, given ``prior_weight``, ``content, X encoder + popularity prior``."""
    label = f"content, {encoder} encoder"
    if index.manifest.encoder.kind == "tuned":
        return [(f"{label}, cosine only", with_prior_weight(index, 0.0)), (label, index)]
    rows = [(label, index)]
    if prior_weight is not None:
        rows.append((f"{label} + popularity prior", with_prior_weight(index, prior_weight)))
    return rows


def cold_hits(indexes: Mapping[str, Index], split: Split, cold: set[str], weights: Mapping[str, float],
              cf_config: CFConfig, progress: bool = True,
              prior_weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Top-50 hit rate of the held-out cold item per retriever (histories without cold items everywhere). Each
    encoder's content source is measured by cosine only and with the popularity prior (a tuned encoder's served
    weight, a frozen one's ``prior_weights[encoder]``); CF and the fusion (``weights``) with the ``tuned`` index
    only. Beside each encoder with a prior, a ceiling that serving cannot reach: the same prior with the cold items'
    true interaction counts (before the test items). ``prior_weights`` in the result: the weight of each
    encoder's row with the prior."""
    before_test = split.fit_histories("test")
    fit = {u: [i for i in h if i not in cold] for u, h in before_test.items()}
    index_of = next(iter(indexes.values())).catalog.item_index
    cases = [c for c in split.test if c.target in cold]
    out: dict[str, Any] = {"cases": len(cases), "cold_items": len(cold)}
    rows: dict[str, np.ndarray] = {}
    used: dict[str, float] = {}
    cf = next(iter(indexes.values())).fit_cf(fit, cf_config)  # CF does not depend on the encoder: fitted once
    counts = np.zeros_like(cf.popularity)  # every item's interactions before the test items, cold ones included
    for history in before_test.values():
        np.add.at(counts, [index_of[i] for i in history], 1)
    known = dataclasses.replace(cf, popularity=counts)
    for encoder, index in indexes.items():
        available = index.sources(cf)
        variants = content_variants(encoder, index, (prior_weights or {}).get(encoder))
        used[encoder] = max(v.manifest.encoder.prior_weight for _, v in variants)
        retrievers = [(label, v.retriever("content", cf=cf)) for label, v in variants]
        if used[encoder] > 0:  # the ceiling: the prior with the cold items' true counts, which serving never has
            retrievers.append((f"content, {encoder} encoder + true popularity (ceiling)",
                               with_prior_weight(index, used[encoder]).retriever("content", cf=known)))
        for name in () if encoder == "frozen" else [n for n in COLD_RETRIEVERS if n != "content"]:
            if name != "fused" and name not in available:
                continue
            label = f"{name}, {encoder} encoder" if name == "fused" else name
            retrievers.append((label, index.retriever(name, cf=cf, weights=weights if name == "fused" else None,
                                                      cold=0.0)))  # the cold-item path: eval.cold_path
        for label, retriever in retrievers:
            hits = []
            for case in tqdm(cases, desc=f"cold start: {label}", unit="user", disable=not progress):
                history = [i for i in case.history if i not in cold]
                got = [c.item_id for c in retriever.retrieve(history, 50)]
                hits.append(1.0 if case.target in got else 0.0)
            rows[label] = np.asarray(hits)
    out["hit@50"] = {label: {"mean": float(v.mean()) if v.size else float("nan"),
                             **dict(zip(("lo", "hi"), bootstrap_ci(v), strict=True))} for label, v in rows.items()}
    out["prior_weights"] = used  # the weight of each encoder's "with the prior" row
    out["fusion_weights"] = dict(weights)
    return out


def _percentiles(times: list[float]) -> dict[str, float]:
    p95 = statistics.quantiles(times, n=20)[18] if len(times) >= 2 else max(times)
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(p95, 2)}


def query_cost(index: Index, split: Split, users: int = 100, length: int = 50) -> dict[str, Any]:
    """Milliseconds to turn a ``length``-item history into the tuned encoder's user vector (p50/p95) through the
    index's embedder (its runtime: ONNX Runtime by default) and, in the same run, user by user in turn, through
    torch; the largest difference between the two runtimes' vectors; and items per second for embedding every item
    text with each. A catalogue with fewer than two such histories is timed on its longest ones (``history_items``
    says how long)."""
    from retrieval.embeddings import Embedder
    from retrieval.encoder import user_vector_fn
    from retrieval.index import item_texts

    assert index.user_vector is not None, "query cost is measured for a tuned encoder"
    idx = index.catalog.item_index
    long = [h for h in split.train.values() if len(h) >= length]
    chosen = long if len(long) >= 2 else sorted((h for h in split.train.values() if h), key=len, reverse=True)
    histories = [[idx[i] for i in h[-length:]] for h in chosen[:users]]
    served = index.embedder
    texts = item_texts(index.catalog)
    embedders = {served.runtime: served}
    encoders = {served.runtime: index.user_vector}
    if served.runtime != "torch":  # the same weights through torch, timed user by user in turn
        embedders["torch"] = Embedder(served.model_dir, cache=False, name=served.name, runtime="torch")
        torch_vector = user_vector_fn(index.manifest.encoder, embedders["torch"], texts)
        assert torch_vector is not None
        encoders["torch"] = torch_vector
    for encode in encoders.values():  # warm-up (and the ONNX export, when there is none yet)
        for h in histories[:3]:
            encode(h)
    times: dict[str, list[float]] = {name: [] for name in encoders}
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    for h in histories:
        for name, encode in encoders.items():
            t0 = time.perf_counter()
            vectors[name].append(encode(h))
            times[name].append((time.perf_counter() - t0) * 1000)
    throughput = {}
    for name, embedder in embedders.items():
        t0 = time.perf_counter()
        embedder.encode_uncached(texts)
        throughput[name] = round(len(texts) / (time.perf_counter() - t0), 1)
    out: dict[str, Any] = {"users": len(histories), "history_items": min(len(h) for h in histories),
                           "runtime": served.runtime, **_percentiles(times[served.runtime]),
                           "by_runtime": {name: _percentiles(t) for name, t in times.items()},
                           "items_per_s": throughput, "item_texts": len(texts)}
    if len(encoders) > 1:
        out["max_abs_diff"] = float(np.abs(np.stack(vectors[served.runtime]) - np.stack(vectors["torch"])).max())
    return out


def cold_encoder(catalog: Catalog, spec: SplitSpec, cold: set[str], minutes: float, folder: Path,
                 recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Train the encoder with the cold items removed from every history (the live encoder's recipe, a shorter
    time budget); returns its provenance's training summary."""
    keys = set(EncoderTrainConfig.model_fields)
    config = EncoderTrainConfig(**{k: v for k, v in recipe.items() if k in keys}).model_copy(
        update={"max_minutes": minutes})
    provenance = EncoderTrainer(catalog, config, spec, out=folder, exclude=cold).run()
    return {"minutes": minutes, "train": {k: v for k, v in provenance.train.items() if k != "log"},
            "validation": provenance.validation}


def run(catalog: Catalog, live: Index, split: Split, spec: SplitSpec, cold_share: float, cold_minutes: float,
        n_boot: int, sasrec: bool = True, progress: bool = True, cold_only: bool = False) -> dict[str, Any]:
    """The report. ``cold_only`` skips the warm tables and SASRec: the frozen prior's weight is then chosen on
    validation alone (as the warm part chooses it) and the cold fusion uses the live index's tuned weights."""
    ref = live.manifest.encoder
    assert ref.kind == "tuned" and ref.path is not None
    provenance = load_provenance(Path(ref.path))
    report: dict[str, Any] = {"catalog": catalog.name, "split": spec.provenance(), "encoder": ref.model_dump(),
                              "training": {"command": provenance.command, "commit": provenance.commit,
                                           "train": provenance.train, "validation": provenance.validation,
                                           "config": provenance.config}}
    cf = rv.without_sasrec(live.manifest.cf)  # the side indexes and CF fits here need no SASRec (its own row)
    with side_index(catalog, EncoderRef(), cf) as frozen:
        if cold_only:
            frozen_weight, _ = choose_prior_weight(frozen, split, cf, progress)
            fusion = dict(live.manifest.fusion.weights)
        else:
            warm = warm_comparison(live, frozen, split, n_boot, spec.seed, progress)
            report["warm"] = {"fusion_weights": warm.tuning, "results": warm.results,
                              "frozen_prior": warm.frozen_prior}
            frozen_weight, fusion = warm.frozen_prior["weight"], warm.tuning["tuned"]
            if sasrec:
                from eval.sasrec import evaluate_sasrec

                fitted = evaluate_sasrec(catalog, split, config=live.manifest.cf.sasrec, progress=progress,
                                         item_vectors=live.item_vectors)
                for part in rv.PARTS:
                    warm.results[part][SASREC] = summarise(fitted[part], n_boot=n_boot, seed=spec.seed)
                add_served_fusion(warm, live, split, fitted, n_boot, spec.seed, progress)
                report["warm"]["sasrec"] = {"best_epochs": fitted["best_epochs"], "log": fitted["log"]}
            warm.lists.clear()
        cold = cold_items(catalog, cold_share, spec.seed)
        with tempfile.TemporaryDirectory(prefix="recagent-cold-encoder-") as tmp:
            folder = Path(tmp) / "encoder"
            report["cold_training"] = cold_encoder(catalog, spec, cold, cold_minutes, folder, provenance.config)
            with side_index(catalog, tuned_ref(folder), cf) as cold_index:
                report["cold"] = cold_hits({"frozen": frozen, "tuned": cold_index}, split, cold, fusion,
                                           cf, progress, prior_weights={"frozen": frozen_weight})
                path = cold_path.study(cold_index, split, cold, fusion, cf, n_boot, spec.seed, progress)
                report["cold_path"] = path.as_dict()
                report["cold"]["hit@50"][f"fused, tuned encoder + cold-item path (weight {path.chosen:g})"] = (
                    path.test["on"]["cold_hit@50"])
        report["cold"]["share"] = cold_share
    report["query_cost"] = query_cost(live, split)
    return report


def write_report(report: dict[str, Any], notes: list[str], stem: Path, validation_plot: str | None) -> None:
    """``STEM.md`` and ``STEM.json`` beside ``STEM-cold-path.png`` (the cold-item path's grid, where the report has
    it); ``validation_plot``: the name of the encoder's validation curve already drawn beside them, if any."""
    if "cold_path" in report:
        cold_path.plot(report["cold_path"], f"{stem}-cold-path.png")
        report["cold_path_plot"] = f"{stem.name}-cold-path.png"
    Path(f"{stem}.md").write_text(markdown(report, notes, validation_plot))
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))


def markdown(report: Mapping[str, Any], notes: list[str], plot: str | None) -> str:
    lines = [f"# Fine-tuned encoder: {report['catalog']}", ""] + [f"- {n}" for n in notes] + [""]
    if plot:
        lines += [f"![validation curve]({plot})", ""]
    if "warm" in report:
        lines += warm_markdown(report)
    cold = report["cold"]
    lines += ["## Cold items", "",
              f"{cold['cold_items']} items ({cold['share']:.0%}, seeded) removed from every history before CF and a "
              f"second tuned encoder were fitted; {cold['cases']} test users hold one of them out. Share of those "
              "users whose held-out cold item is in the retriever's top 50:", "",
              "| retriever | hit@50 [95% interval] |", "|---|---|"]
    lines += [f"| {label} | {interval_cell(m)} |" for label, m in cold["hit@50"].items()]
    if "prior_weights" in cold:
        pw = cold["prior_weights"]
        lines += ["", "Each encoder's content source is measured by cosine only and with the popularity prior as "
                  f"served (weight x log(1 + training interactions)): weight {pw.get('tuned', 0):g} for the cold "
                  f"tuned encoder (chosen on validation during its training), {pw.get('frozen', 0):g} for the "
                  "frozen one (chosen on validation here). The cold items have no training interactions, so the "
                  f"prior guesses theirs: the mean log(1 + interactions) of the {PRIOR_NEIGHBOURS} nearest items "
                  "(by that encoder's vectors) that have some. The \"true popularity (ceiling)\" rows give the "
                  "prior the cold items' real interaction counts before the test items instead, which no served "
                  "list could know: how far a perfect popularity guess would go. The fusion weights: "
                  + ", ".join(f"{k} {v:g}" for k, v in sorted(cold.get("fusion_weights", {}).items())) + "."]
    ct = report["cold_training"]
    if "cold_path" in report:
        lines += ["", "The fused rows: without the cold-item path (weight 0), and with the weight chosen below."]
    lines += ["", f"The cold encoder trained {ct['minutes']:g} min ({ct['train']['steps']} steps, "
              f"{ct['train']['pairs_seen']} pairs); its validation NDCG@10 {ct['validation']['best']['ndcg@10']}.", ""]
    if "cold_path" in report:
        lines += cold_path.markdown(report["cold_path"], served=COLD_WEIGHT, plot_name=report.get("cold_path_plot"))
    lines += query_cost_markdown(report["query_cost"])
    lines.append("Cells: mean over users [bootstrap 95% interval].")
    return "\n".join(lines) + "\n"


def query_cost_markdown(qc: Mapping[str, Any]) -> list[str]:
    """The query-cost section: the served runtime's figure, then each runtime of the same run side by side."""
    lines = ["## Query cost", "", f"Tuned encoder over a {qc['history_items']}-item history ({qc['users']} users), "
             f"as served ({qc.get('runtime', 'torch')}): p50 {qc['p50_ms']} ms, p95 {qc['p95_ms']} ms.", ""]
    if "by_runtime" in qc:
        lines += ["| runtime | query p50 ms | query p95 ms | item texts embedded per s |", "|---|---|---|---|"]
        lines += [f"| {name} | {t['p50_ms']} | {t['p95_ms']} | {qc['items_per_s'].get(name, 'n/a')} |"
                  for name, t in qc["by_runtime"].items()]
        lines.append("")
        note = f"Same run, users timed with each runtime in turn; throughput over all {qc['item_texts']} item texts."
        if "max_abs_diff" in qc:
            note += f" Largest difference between the runtimes' user vectors: {qc['max_abs_diff']:.1e}."
        lines += [note, ""]
    return lines


def warm_markdown(report: Mapping[str, Any]) -> list[str]:
    """The warm tables and their notes."""
    lines: list[str] = []
    for part in ("test", "validation"):
        lines += [f"## Warm items, {part} split (full ranking)", "", "| method | " + " | ".join(METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for method, metrics in report["warm"]["results"][part].items():
            lines.append(f"| {method} | " + " | ".join(interval_cell(metrics[m]) for m in METRICS) + " |")
        lines.append("")
    lines += [f"The content rows rank Chroma's nearest neighbours by cosine plus a popularity prior, weight times "
              f"log(1 + training interactions), the median for items without any (in-batch negatives leave "
              f"popularity out of the trained cosine): weight {report['encoder']['prior_weight']:g} for the tuned "
              f"encoder (chosen on validation during training), {report['warm']['frozen_prior']['weight']:g} for the "
              "frozen one's prior row (chosen on validation here); the plain frozen row has none.", ""]
    weights = report["warm"]["fusion_weights"]
    lines += ["Fusion weights chosen on validation: " + "; ".join(
        f"{FUSIONS.get(name, name)} {', '.join(f'{k} {v:g}' for k, v in sorted(w.items()))}"
        for name, w in weights.items()), ""]
    if SERVED in report["warm"]["results"]["test"]:
        lines += [f"\"{SERVED}\" fuses every source a live index serves; its SASRec is the one of the row above (the "
                  "epochs chosen on validation, refitted for test). The other fusions leave SASRec out: they "
                  "compare encoders.", ""]
    return lines


def plot_validation(log: list[dict[str, Any]], path: Path) -> None:
    from eval.plots import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["ndcg@10"] for r in log], marker="o", label="NDCG@10")
    ax.plot(steps, [r["recall@50"] for r in log], marker="o", label="Recall@50")
    ax.set_xlabel("optimiser step (step 0 = frozen weights, history text)")
    ax.set_ylabel("validation sample")
    ax.set_title("Encoder fine-tuning: vector retriever on validation users")
    ax.legend()
    save(fig, path)
