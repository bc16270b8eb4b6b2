"""`recagent eval ...`: offline evaluation commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from cli.main import console, eval_app, guarded, out, print_json, setup
from eval.machine import machine_line
from retrieval.catalog import DEFAULT_CATALOG

REPORTS = Path("reports")


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
             f"machine: {machine_line()}"]
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


@eval_app.command("rerank")
def eval_rerank(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog"),
    mode: str = typer.Option("score", "--mode", help="score | generate"),
    perms: int | None = typer.Option(None, "--perms", min=1, help="candidate orders averaged (score mode)"),
    users: int = typer.Option(200, "--users", min=1, help="users sampled per split part"),
    bias_users: int = typer.Option(12, "--bias-users", min=0, help="users for the position-bias curve (0: skip)"),
    tune: bool = typer.Option(False, "--tune", help="choose calibration and alpha on validation and store them"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """LLM reranking of the retrieved top-20: final, LLM-only, retrieval and random orders, bias, latency."""
    setup()
    if mode not in ("score", "generate"):
        from cli.main import fail

        fail(f"--mode '{mode}': choose score or generate")
    from agent.llm.registry import make_backend
    from agent.rerank import ModeConfig, RerankConfig
    from eval import rerank_eval as rx
    from eval.plots import plot_position_bias
    from eval.splits import leave_last_out
    from retrieval.catalog import atomic_write_json
    from retrieval.catalog_store import ensure_catalog
    from retrieval.index import load_index

    cat = guarded(lambda: ensure_catalog(catalog))
    index = guarded(lambda: load_index(cat))
    with console.status("loading the LLM"):
        backend = guarded(make_backend)
    config = RerankConfig.load(index)
    if perms is not None:
        config.perms = perms
    split = leave_last_out(cat.histories())
    evaluator = rx.RerankEvaluator(index, backend, config)
    report: dict[str, object] = {"catalog": catalog, "mode": mode, "parts": {}}
    bias = None
    REPORTS.mkdir(exist_ok=True)
    stem = f"rerank-{catalog}-{mode}"
    if mode == "score" and bias_users:
        bias_cases = rx.sample_cases(split.validation, bias_users, seed + 1)
        settings = {"raw": {"calibrate": False, "perms": 1}, "calibrated": {"calibrate": True, "perms": 1},
                    "calibrated, 2 perms": {"calibrate": True, "perms": 2}}
        bias = evaluator.position_bias(split, bias_cases, settings, positions=[0, 4, 9, 14, 19])
        report["position_bias"] = bias
        plot_position_bias(bias, REPORTS / f"{stem}-bias.png")
        report["position_bias_plot"] = f"{stem}-bias.png"
    results = {}
    for part in ("validation", "test"):
        cases = rx.sample_cases(split.cases(part), users, seed)
        results[part] = evaluator.run_part(split, part, cases, mode=mode)
    alpha = config.alpha(mode)
    if tune:
        choices = {}
        if mode == "score" and config.perms == 1:  # calibration on/off from the same pass, chosen on validation
            for cal in (True, False):
                variant = rx.with_calibration(results["validation"], evaluator.reranker.biases, cal)
                choices[cal] = (*rx.tune_alpha(variant, seed), variant)
        else:
            choices[config.calibrate] = (*rx.tune_alpha(results["validation"], seed), results["validation"])
        chosen = max(choices, key=lambda c: (max(choices[c][1].values()), c))
        config.calibrate = chosen
        alpha, grid, _ = choices[chosen]
        if mode == "score" and config.perms == 1:
            biases = evaluator.reranker.biases
            results = {part: rx.with_calibration(res, biases, chosen) for part, res in results.items()}
        report["calibration_choice"] = {str(c): round(max(v[1].values()), 6) for c, v in choices.items()}
        report["alpha_grid"] = {str(a): v for a, v in grid.items()}
        config.modes[mode] = ModeConfig(alpha=alpha, tuned=True)
        path = RerankConfig.path(index)
        assert path is not None
        atomic_write_json(path, config.tuned().model_dump(mode="json"))
        console.print(f"[green]tuned[/] {mode}: alpha={alpha}, calibrate={config.calibrate}; stored in {path}")
    report["alpha"] = alpha
    for part, res in results.items():
        report["parts"][part] = {  # type: ignore[index]
            "metrics": rx.table(res, alpha, seed), "rates": rx.rates(res), "latency": rx.latency_summary(res)}
    report["notes"] = {
        "command": f"recagent eval rerank --catalog {catalog} --mode {mode} --users {users} --bias-users "
                   f"{bias_users}{' --tune' if tune else ''}{f' --perms {perms}' if perms else ''} --seed {seed}",
        "model": backend.model_name, "backend": backend.name, "candidates": evaluator.n_candidates,
        "prompt": f"rerank_score.{config.score_prompt}" if mode == "score"
                  else f"rerank_generate.{config.generate_prompt}",
        "perms": config.perms, "calibrate": config.calibrate, "history_token_budget": config.history_token_budget,
        "llm_threads": _threads_note(backend), "machine": machine_line(), "date": time.strftime("%Y-%m-%d"),
    }
    (REPORTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (REPORTS / f"{stem}.md").write_text(rx.markdown(report))
    if as_json:
        print_json(report)
        return
    out.print(rx.markdown(report), markup=False, highlight=False)
    console.print(f"report: {REPORTS / f'{stem}.md'}")


def _threads_note(backend: object) -> str:
    """The in-process model's thread policy, for reports (other backends: not applicable)."""
    config = getattr(backend, "config", None)
    if config is None or getattr(backend, "name", "") != "transformers":
        return "n/a"
    governor = getattr(backend, "governor", None)
    measured = f"; measured ms/token {governor.snapshot()}" if governor is not None else ""
    return f"{config.thread_policy}, 1 or {config.threads}{measured}"


@eval_app.command("speed")
def eval_speed(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog"),
    users: int = typer.Option(200, "--users", min=1),
    k: int = typer.Option(50, "-k", "--k", min=1),
    genre: str | None = typer.Option(None, "--genre", help="filter used while timing (default: Drama if known)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Index build time from nothing and retrieve latency (p50/p95) with a filter."""
    setup()
    from eval.speed import time_build, time_retrieve
    from retrieval.catalog_store import ensure_catalog

    cat = guarded(lambda: ensure_catalog(catalog))
    if genre is None and "Drama" in cat.all_genres:
        genre = "Drama"
    with console.status("building an index from nothing"):
        build = time_build(cat)
    ret = guarded(lambda: time_retrieve(cat, users=users, k=k, genre=genre))
    result = {"catalog": catalog, **build, **ret, "machine": machine_line(), "date": time.strftime("%Y-%m-%d"),
              "command": f"recagent eval speed --catalog {catalog} --users {users} -k {k}"}
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"speed-{catalog}.json").write_text(json.dumps(result, indent=2))
    md = [f"# Retrieval speed: {catalog}", "", "| measure | value |", "|---|---|",
          f"| index build from nothing (empty embedding cache) | {build['build_seconds']:.1f} s |",
          f"| retrieve p50 (k={k}, filter genre={genre}) | {ret['p50_ms']:.1f} ms |",
          f"| retrieve p95 | {ret['p95_ms']:.1f} ms |",
          f"| users timed (mean history length) | {ret['users']} ({ret['mean_history']:.0f}) |", "",
          f"- command: `{result['command']}`", f"- machine: {result['machine']}"]
    (REPORTS / f"speed-{catalog}.md").write_text("\n".join(md) + "\n")
    if as_json:
        print_json(result)
    else:
        out.print("\n".join(md), markup=False, highlight=False)
