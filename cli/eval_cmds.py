"""`recagent eval ...`: offline evaluation commands."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import typer

from cli.main import console, eval_app, guarded, out, print_json, setup
from retrieval.catalog import DEFAULT_CATALOG

REPORTS = Path("reports")


def machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


@eval_app.command("retrieval")
def eval_retrieval(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog"),
    tune: bool = typer.Option(False, "--tune", help="grid-search fusion weights on validation and store them"),
    as_json: bool = typer.Option(False, "--json"),
    n_boot: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the 95% intervals"),
) -> None:
    """Retrieval baselines and the fused retriever: Recall/NDCG/MRR with bootstrap intervals."""
    setup()
    from eval.retrieval_eval import collect_lists, evaluate, flat, markdown, tune_weights
    from eval.splits import leave_last_out
    from retrieval.catalog_store import ensure_catalog
    from retrieval.index import load_index, save_fusion

    cat = guarded(lambda: ensure_catalog(catalog))
    index = guarded(lambda: load_index(cat))
    split = leave_last_out(cat.histories())
    lists = {part: collect_lists(index, split, part) for part in ("validation", "test")}
    fusion = index.manifest.fusion
    if tune:
        weights, best = tune_weights(lists["validation"])
        fusion = fusion.model_copy(update={"weights": weights, "tuned": True, "tuned_on": "validation ndcg@10"})
        assert cat.root is not None
        save_fusion(cat.root / "index", fusion)
        console.print(f"[green]tuned[/] weights {weights} (validation NDCG@10 {best:.4f}); stored with the index")
    t0 = time.perf_counter()
    results = evaluate(index, split, fusion, n_boot=n_boot, lists=lists)
    REPORTS.mkdir(exist_ok=True)
    notes = [f"catalogue: {catalog} ({cat.n_items} items, {len(split.test)} evaluated users)",
             "protocol: per user by time (ties by item id), last = test, second-last = validation; "
             "full ranking over all items minus the history; CF fitted only on what each part may see",
             f"fused weights: {json.dumps(fusion.weights, sort_keys=True)} (tuned: {fusion.tuned})",
             f"command: recagent eval retrieval --catalog {catalog}{' --tune' if tune else ''}",
             f"machine: {machine()}"]
    (REPORTS / f"retrieval-{catalog}.md").write_text(markdown(results, f"Retrieval evaluation: {catalog}", notes))
    (REPORTS / f"retrieval-{catalog}.json").write_text(json.dumps(
        {"catalog": catalog, "fusion": fusion.model_dump(), "results": results, "notes": notes}, indent=2))
    if as_json:
        print_json(flat(results))
        return
    from rich.table import Table

    for part, methods in results.items():
        table = Table(title=f"{catalog} {part}")
        table.add_column("method")
        metrics = list(next(iter(methods.values())))
        for m in metrics:
            table.add_column(m, justify="right")
        for method, vals in methods.items():
            table.add_row(method, *[f"{vals[m]['mean']:.4f}" for m in metrics])
        out.print(table)
    console.print(f"report: {REPORTS / f'retrieval-{catalog}.md'} ({time.perf_counter() - t0:.1f}s)")
