"""`recagent eval ...`: offline evaluation commands."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from cli.main import catalog_name, console, eval_app, fail, guarded, out, print_json, setup, split_spec, ties_option
from eval.machine import machine_info, machine_line
from retrieval.catalog import DEFAULT_CATALOG

REPORTS = Path("reports")


@eval_app.command("retrieval")
def eval_retrieval(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    tune: bool = typer.Option(False, "--tune", help="choose fusion weights and EASE's lambda on validation and "
                              "store them with the index"),
    ties: str = ties_option(),
    seed: int = typer.Option(0, "--seed", help="seeds the random tie order and the bootstrap"),
    as_json: bool = typer.Option(False, "--json"),
    n_boot: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the 95% intervals"),
) -> None:
    """Retrieval baselines and the fused retriever: Recall/NDCG/MRR with bootstrap intervals."""
    setup()
    spec = split_spec(ties, seed)
    from eval import retrieval_eval as rv
    from retrieval.catalog_store import ensure_catalog
    from retrieval.index import load_index
    from retrieval.splits import split_catalog

    cat = guarded(lambda: ensure_catalog(catalog))
    index = guarded(lambda: load_index(cat))
    split = split_catalog(cat, spec)
    fusion, cf_config = index.manifest.fusion, index.manifest.cf
    tuning = None
    if tune:
        tuning = rv.tune_and_store(index, split, spec)
        lists = {"validation": tuning.lists}
        cf_config, fusion = tuning.cf, index.manifest.fusion
        console.print(f"[green]tuned[/] weights {tuning.weights}, EASE lambda {cf_config.ease_lambda:g}, "
                      f"recency decay {cf_config.ease_decay:g}, SASRec epochs {cf_config.sasrec_epochs} "
                      f"(validation NDCG@10 {tuning.score:.4f}); {rv.served_line(fusion.learned)}; stored with "
                      "the index")
    else:
        lists = {"validation": rv.collect_lists(index, split, "validation")}
    lists["test"] = rv.collect_lists(index, split, "test", cf_config=cf_config)
    t0 = time.perf_counter()
    # the learned fusion's rows: the one stored, or the one just trained and not kept (it lost on validation)
    learned = fusion.learned or (tuning.learned.fusion if tuning and tuning.learned else None)
    results = rv.evaluate(lists, fusion.weights, n_boot=n_boot, seed=seed, learned=learned, catalog=cat,
                          cold=fusion.cold)
    gain = (rv.learned_gain(lists, fusion.weights, learned, cat, n_boot=n_boot, seed=seed, cold=fusion.cold)
            if learned else None)
    sensitivity = rv.tie_sensitivity(index, cat, spec, results, fusion.weights, cf_config, n_boot=n_boot,
                                      cold=fusion.cold)
    REPORTS.mkdir(exist_ok=True)
    command = (f"recagent eval retrieval --catalog {catalog} --ties {spec.ties} --seed {spec.seed}"
               f"{' --tune' if tune else ''}")
    notes = [f"catalogue: {catalog} ({cat.n_items} items, {len(split.test)} evaluated users)",
             f"protocol: {spec.describe()}; full ranking over all items minus the history; "
             "CF fitted only on what each part may see",
             f"fused weights: {json.dumps(fusion.weights, sort_keys=True)} (tuned: {fusion.tuned}), cold-item "
             f"weight {fusion.cold:g} (chosen by the cold-start study of `eval embedder`, kept by --tune); "
             f"EASE lambda {cf_config.ease_lambda:g}, recency decay {cf_config.ease_decay:g}, SASRec epochs "
             f"{cf_config.sasrec_epochs}{' (tuned on validation)' if tuning else ''}",
             rv.served_line(fusion.learned),
             f"command: {command}", f"machine: {machine_line()}"]
    (REPORTS / f"retrieval-{catalog}.md").write_text(
        rv.markdown(results, f"Retrieval evaluation: {catalog}", notes, sensitivity, tuning, gain))
    report = {"catalog": catalog, "split": spec.provenance(), "fusion": fusion.model_dump(exclude={"learned"}),
              "learned_fusion": fusion.learned.model_dump(exclude={"model"}) if fusion.learned else None,
              "cf": cf_config.model_dump(), "results": results, "sensitivity": sensitivity, "notes": notes}
    if gain:
        report["learned_minus_weights"] = gain
    if tuning:
        report["tuning"] = {f"lambda {lam:g}, decay {decay:g}": dataclasses.asdict(p)
                            for (lam, decay), p in tuning.grid.items()}
        if tuning.sasrec:
            report["sasrec_tuning"] = dataclasses.asdict(tuning.sasrec)
        if tuning.coarse:
            report["weight_refinement"] = {"coarse": dataclasses.asdict(tuning.coarse), "weights": tuning.weights,
                                           "ndcg@10": tuning.score}
    (REPORTS / f"retrieval-{catalog}.json").write_text(json.dumps(report, indent=2))
    if as_json:
        print_json(rv.flat({part: {**results[part], **sensitivity[part]} for part in results}))
        return
    from rich.table import Table

    for part, methods in results.items():
        table = Table(title=f"{catalog} {part} ({spec.describe()})")
        table.add_column("method")
        metrics = list(next(iter(methods.values())))
        for m in metrics:
            table.add_column(m, justify="right")
        for method, vals in {**methods, **sensitivity[part]}.items():
            table.add_row(method, *[f"{vals[m]['mean']:.4f}" for m in metrics])
        out.print(table)
    console.print(f"report: {REPORTS / f'retrieval-{catalog}.md'} ({time.perf_counter() - t0:.1f}s)")


@eval_app.command("embedder")
def eval_embedder(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    cold_share: float = typer.Option(0.1, "--cold-share", min=0.01, max=0.5, help="share of items made cold"),
    cold_minutes: float = typer.Option(12.0, "--cold-minutes", min=0.1, help="training budget of the cold encoder"),
    ties: str = ties_option(),
    seed: int = typer.Option(0, "--seed", help="seeds the random tie order, the cold items and the bootstrap"),
    n_boot: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the 95% intervals"),
    sasrec: bool = typer.Option(True, "--sasrec/--no-sasrec", help="also fit the SASRec-style baseline (~7 min)"),
    cold_only: bool = typer.Option(False, "--cold-only", help="only the cold-start rows (and the query cost): no warm "
                                   "tables, no SASRec; writes reports/embedder-CATALOG-cold.{md,json}"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The tuned encoder (`recagent train embedder`) against the frozen one, CF and the fusion on the same split;
    cold-start hit rates; the cost of a user's query vector. Writes reports/embedder-CATALOG.{md,json,png}
    (with --cold-only: reports/embedder-CATALOG-cold.{md,json})."""
    setup()
    spec = split_spec(ties, seed)
    from eval import embedder_eval as ee
    from retrieval.catalog_store import ensure_catalog
    from retrieval.index import load_index
    from retrieval.splits import split_catalog

    cat = guarded(lambda: ensure_catalog(catalog))
    live = guarded(lambda: load_index(cat))
    if live.manifest.encoder.kind != "tuned":
        fail(f"the index of '{catalog}' uses the frozen encoder; run `recagent train embedder --catalog {catalog}` "
             "first (it re-indexes with the tuned one)")
    t0 = time.perf_counter()
    report = ee.run(cat, live, split_catalog(cat, spec), spec, cold_share, cold_minutes, n_boot, sasrec,
                    cold_only=cold_only)
    command = (f"recagent eval embedder --catalog {catalog} --ties {spec.ties} --seed {spec.seed} "
               f"--cold-share {cold_share:g} --cold-minutes {cold_minutes:g}{'' if sasrec else ' --no-sasrec'}"
               f"{' --cold-only' if cold_only else ''}")
    report.update(command=command, machine=machine_info(), seconds=round(time.perf_counter() - t0, 1))
    REPORTS.mkdir(exist_ok=True)
    stem = f"embedder-{catalog}-cold" if cold_only else f"embedder-{catalog}"  # a cold-only run keeps the full report
    plot = None if cold_only else REPORTS / f"{stem}.png"
    if plot is not None:
        ee.plot_validation(report["training"]["train"]["log"], plot)
    training = report["training"]
    notes = [f"catalogue: {catalog} ({cat.n_items} items); protocol: {spec.describe()}; full ranking over all items "
             "minus the history; CF fitted only on what each part may see",
             f"tuned encoder: {report['encoder']['name']}, trained by `{training['command']}` (commit "
             f"{training['commit']}): {training['train']['steps']} steps, {training['train']['pairs_seen']} pairs in "
             f"{training['train']['seconds'] / 60:.1f} min ({training['train']['pairs_per_s']} pairs/s), top "
             f"{training['config']['train_layers']} of 6 layers trained; training pairs from the training part only",
             f"best checkpoint chosen on {training['validation']['users']} validation users: "
             f"{training['validation']['kept']}",
             f"command: {command} ({report['seconds'] / 60:.1f} min)", f"machine: {machine_line()}"]
    ee.write_report(report, notes, REPORTS / stem, plot.name if plot else None)
    if as_json:
        if cold_only:
            print_json({"cold hit@50": {m: round(v["mean"], 5) for m, v in report["cold"]["hit@50"].items()}})
        else:
            print_json({part: {m: {k: round(v["mean"], 5) for k, v in ms.items()} for m, ms in methods.items()}
                        for part, methods in report["warm"]["results"].items()})
        return
    console.print(f"report: {REPORTS / f'{stem}.md'}")


@eval_app.command("rerank")
def eval_rerank(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    mode: str = typer.Option("score", "--mode", help="score | generate"),
    perms: int | None = typer.Option(None, "--perms", min=1, help="candidate orders averaged (score mode)"),
    users: int = typer.Option(200, "--users", min=1, help="users sampled per split part"),
    bias_users: int = typer.Option(12, "--bias-users", min=0, help="users for the position-bias curve (0: skip)"),
    tune: bool = typer.Option(False, "--tune", help="choose calibration and alpha on validation and store them"),
    seed: int = typer.Option(0, "--seed", help="seeds the user sample and the random tie order"),
    ties: str = ties_option(),
    ranker: str | None = typer.Option(None, "--ranker", help="auto (the catalogue's trained ranker if any) | "
                                      "zero-shot | a ranker folder (default: RECAGENT_RANKER, else auto)"),
    window: int | None = typer.Option(None, "--window", min=2, max=100, help="candidates reranked per user "
                                      "(default: the trained ranker's window, else 20)"),
    compare_zero_shot: bool = typer.Option(False, "--compare-zero-shot", help="also run the zero-shot model "
                                           "(label scoring, 20 candidates) on the same users, in the same run"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """LLM reranking of each user's retrieved window: final, LLM-only, retrieval and random orders, bias, latency."""
    setup()
    if mode not in ("score", "generate"):
        from cli.main import fail

        fail(f"--mode '{mode}': choose score or generate")
    spec = split_spec(ties, seed)
    from agent.llm.registry import make_backend
    from agent.rerank import ModeConfig, RerankConfig
    from eval import rerank_eval as rx
    from eval.plots import plot_position_bias
    from retrieval.catalog import atomic_write_json
    from retrieval.catalog_store import ensure_catalog
    from retrieval.index import load_index
    from retrieval.splits import split_catalog

    cat = guarded(lambda: ensure_catalog(catalog))
    index = guarded(lambda: load_index(cat))
    with console.status("loading the LLM"):
        backend = guarded(make_backend)
    config = guarded(lambda: RerankConfig.load(index, ranker))
    if perms is not None:
        config.perms = perms
    if window is not None:
        if config.scorer == "labels" and window > 26:
            fail(f"--window {window}: the zero-shot label scorer takes at most 26 candidates")
        config.max_candidates = window
    split = split_catalog(cat, spec)
    evaluator = rx.RerankEvaluator(index, backend, config, n_candidates=config.window(mode))
    report: dict[str, object] = {"catalog": catalog, "mode": mode, "split": spec.provenance(), "parts": {}}
    bias = None
    REPORTS.mkdir(exist_ok=True)
    stem = f"rerank-{catalog}-{mode}" + (f"-w{window}" if window else "")
    if mode == "score" and bias_users and config.scorer == "labels":  # the trained ranker sees shuffled slots
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
    if tune and mode == "score" and config.scorer == "markers":  # a trained ranker: alpha only, kept with it
        from agent.ranker.artifact import store_alpha

        alpha, grid = rx.tune_alpha(results["validation"], seed)
        report["alpha_grid"] = {str(a): v for a, v in grid.items()}
        config.modes[mode] = ModeConfig(alpha=alpha, tuned=True)
        stored = store_alpha(config.adapter, alpha, f"recagent eval rerank --tune ({users} validation users)")
        console.print(f"[green]tuned[/] trained ranker: alpha={alpha}" + (f"; stored in {stored}" if stored else
                                                                          " (shipped ranker: not stored)"))
    elif tune:
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
        # the zero-shot choices: this mode's alpha, and calibration when the zero-shot scorer was tuned (a trained
        # ranker in use for score mode keeps its own alpha, and generate mode does not calibrate)
        zero_shot = RerankConfig.stored_tuning(index)
        zero_shot.modes[mode] = config.modes[mode]
        if mode == "score":
            zero_shot.calibrate = config.calibrate
        atomic_write_json(path, zero_shot.model_dump(mode="json"))
        console.print(f"[green]tuned[/] {mode}: alpha={alpha}, calibrate={zero_shot.calibrate}; stored in {path}")
    report["alpha"] = alpha
    if compare_zero_shot:
        report["zero_shot"] = _zero_shot_baseline(index, backend, split, evaluator, users, seed, mode)
    for part, res in results.items():
        report["parts"][part] = {  # type: ignore[index]
            "metrics": rx.table(res, alpha, seed), "rates": rx.rates(res), "latency": rx.latency_summary(res)}
    if compare_zero_shot:
        for part, zs in report["zero_shot"].items():  # type: ignore[attr-defined]
            if isinstance(zs, dict) and "latency" in zs:
                mine = report["parts"][part]["latency"]["p50_s"]  # type: ignore[index]
                zs["p50_ratio_this_over_zero_shot"] = round(mine / max(zs["latency"]["p50_s"], 1e-9), 3)
    report["notes"] = {
        "command": f"recagent eval rerank --catalog {catalog} --mode {mode} --users {users} --bias-users "
                   f"{bias_users}{' --tune' if tune else ''}{f' --perms {perms}' if perms else ''} --seed {seed} "
                   f"--ties {spec.ties}{f' --ranker {ranker}' if ranker else ''}"
                   f"{f' --window {window}' if window else ''}{' --compare-zero-shot' if compare_zero_shot else ''}",
        "split": spec.describe(),
        "model": backend.model_name, "backend": backend.name, "candidates": evaluator.n_candidates,
        "ranker": config.ranker if mode == "score" else "zero-shot",
        "ranker_folder": (config.adapter or "none") if mode == "score" else "none",
        "prompt": (f"rerank_trained.{config.trained_prompt}" if config.scorer == "markers"
                   else f"rerank_score.{config.score_prompt}") if mode == "score"
                  else config.generate_prompt_id(),
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


def _zero_shot_baseline(index: Any, backend: Any, split: Any, evaluator: Any, users: int, seed: int,
                        mode: str) -> dict[str, Any]:
    """The zero-shot model (label scoring over the top 20, its stored alpha and calibration) on the same users,
    in the same run: NDCG@10 of its final and LLM-only orders and its latency per user, for the comparison."""
    from agent.rerank import RerankConfig
    from eval import rerank_eval as rx

    config = RerankConfig.load(index, "zero-shot")
    baseline = rx.RerankEvaluator(index, backend, config, n_candidates=20)
    out: dict[str, Any] = {"alpha": config.alpha(mode), "calibrate": config.calibrate,
                           "prompt": f"rerank_score.{config.score_prompt}", "candidates": 20}
    for part in ("validation", "test"):
        cases = rx.sample_cases(split.cases(part), users, seed)
        res = baseline.run_part(split, part, cases, mode="score")
        table = rx.table(res, config.alpha(mode), seed)
        out[part] = {"final_ndcg@10": table["all"]["final"]["ndcg@10"], "llm_ndcg@10": table["all"]["llm"]["ndcg@10"],
                     "retrieval_ndcg@10": table["all"]["retrieval"]["ndcg@10"], "latency": rx.latency_summary(res),
                     }
    return out


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
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    users: int = typer.Option(200, "--users", min=1),
    k: int = typer.Option(50, "-k", "--k", min=1),
    genre: str | None = typer.Option(None, "--genre", help="filter used while timing (default: Drama if known)"),
    ties: str = ties_option(),
    seed: int = typer.Option(0, "--seed", help="seeds the timed users and the random tie order of their histories"),
    as_json: bool = typer.Option(False, "--json"),
    skip_build: bool = typer.Option(False, "--skip-build", help="time retrieve only; the build figure is kept "
                                    "from the previous report when it has one"),
) -> None:
    """Index build time from nothing and retrieve latency (p50/p95) with a genre filter and without one, from the
    index loaded from disk."""
    setup()
    spec = split_spec(ties, seed)
    from eval.speed import cpu_line, time_build, time_retrieve
    from retrieval.catalog import describe_order
    from retrieval.catalog_store import ensure_catalog

    cat = guarded(lambda: ensure_catalog(catalog))
    if genre is None and "Drama" in cat.all_genres:
        genre = "Drama"
    report_json = REPORTS / f"speed-{catalog}.json"
    build: dict[str, Any] = {}
    if skip_build:
        previous = json.loads(report_json.read_text()) if report_json.exists() else {}
        if previous.get("build_seconds") is not None:
            build = {"build_seconds": previous["build_seconds"], "items": previous.get("items", float(cat.n_items)),
                     "build_date": previous.get("build_date", previous.get("date"))}
    else:
        with console.status("building an index from nothing"):
            build = {**time_build(cat), "build_date": time.strftime("%Y-%m-%d")}
    ret = guarded(lambda: time_retrieve(cat, users=users, k=k, seed=spec.seed, genre=genre, ties=spec.ties))
    result = {"catalog": catalog, **build, **ret, "ties": spec.ties, "seed": spec.seed,
              "histories": describe_order(spec.ties, spec.seed),
              "machine": machine_line(), "cpu": cpu_line(), "date": time.strftime("%Y-%m-%d"),
              "command": f"recagent eval speed --catalog {catalog} --users {users} -k {k} --ties {spec.ties} "
                         f"--seed {spec.seed}" + (" --skip-build" if skip_build else "")}
    REPORTS.mkdir(exist_ok=True)
    report_json.write_text(json.dumps(result, indent=2))
    if build:
        built = f"{build['build_seconds']:.1f} s" + (f" (measured {build['build_date']})" if skip_build else "")
    else:
        built = "not measured (--skip-build)"
    weights = ", ".join(f"{n} {w:g}" for n, w in ret["weights"].items())
    if ret.get("learned"):  # the learned fusion ranks; it reads every source, the content one included
        weights = f"learned fusion over {', '.join(ret['learned'])}; weights {weights} for text queries"
    md = [f"# Retrieval speed: {catalog}", "", "| measure | value |", "|---|---|",
          f"| index build from nothing (empty embedding cache) | {built} |",
          f"| retrieve p50 / p95 (k={k}, filter genre={genre}) | {ret['p50_ms']:.1f} / {ret['p95_ms']:.1f} ms |",
          f"| retrieve p50 / p95 (k={k}, no filter) | {ret['unfiltered_p50_ms']:.1f} / "
          f"{ret['unfiltered_p95_ms']:.1f} ms |",
          f"| users timed (mean history length) | {ret['users']} ({ret['mean_history']:.0f}) |", "",
          f"- retriever: fused ({weights}), from the index loaded from disk "
          f"(`load_index`, {ret['index_load_seconds']:.2f} s); each user timed with and without the filter in turn",
          f"- command: `{result['command']}`", f"- histories timed: {result['histories']}",
          f"- machine: {result['machine']}; {result['cpu']}"]
    (REPORTS / f"speed-{catalog}.md").write_text("\n".join(md) + "\n")
    if as_json:
        print_json(result)
    else:
        out.print("\n".join(md), markup=False, highlight=False)


@eval_app.command("explain")
def eval_explain(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    users: int = typer.Option(50, "--users", min=1, help="test users explained in process"),
    k: int = typer.Option(10, "-k", "--k", min=1, max=50, help="items explained per user"),
    api_requests: int = typer.Option(50, "--api-requests", min=0, help="explain requests through the API"),
    hol_requests: int = typer.Option(40, "--hol-requests", min=0, help="score requests timed alone and under "
                                     "explain traffic"),
    generate_users: int = typer.Option(20, "--generate-users", min=0, help="users for generate mode"),
    baseline_users: int = typer.Option(3, "--baseline-users", min=0, help="users for the previous designs (one "
                                       "JSON document of reasons for the whole list; generate mode's JSON list "
                                       "of ids), timed in the same run for a ratio"),
    ties: str = ties_option(),
    seed: int = typer.Option(0, "--seed", help="seeds the sampled test users and the tie order"),
    prompt: str | None = typer.Option(None, "--prompt", help="version of prompts/explain_item to compare (default: "
                                      "the served one); its report goes to explain-CATALOG-VERSION-seedSEED.md "
                                      "(-openai before -VERSION for RECAGENT_LLM=openai)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Explanations: seconds per user for the top-k, first-reason latency, LLM share and code checks; 0 answers
    without reasons through the API; score latency under explain traffic (head-of-line); generate mode."""
    setup()
    spec = split_spec(ties, seed)
    import prompts
    from agent.service import build_service
    from eval import explain_bench as eb

    if prompt is not None:
        guarded(lambda: prompts.load("explain_item", prompt))
    service = guarded(lambda: build_service(catalog))
    if prompt is not None:
        service.explainer.config = service.explainer.config.model_copy(update={"prompt": prompt})
    if service.reranker is None or service.backend is None:
        fail("the explain benchmark needs the LLM (RECAGENT_LLM is 'none')")
    assert service.backend is not None and service.reranker is not None
    cases = eb.sample_users(service, max(users, generate_users), spec)
    result: dict[str, Any] = {"catalog": catalog, "split": spec.provenance(), "machine": machine_line(),
                              "date": time.strftime("%Y-%m-%d"), "model": service.backend.model_name,
                              "llm": os.environ.get("RECAGENT_LLM", "transformers"),
                              "ranker": service.reranker.config.ranker,
                              "explain_prompt": f"explain_item.{service.explainer.config.prompt}",
                              "command": f"recagent eval explain --catalog {catalog} --users {users} -k {k} "
                                         f"--api-requests {api_requests} --hol-requests {hol_requests} "
                                         f"--generate-users {generate_users} --baseline-users {baseline_users} "
                                         f"--ties {spec.ties} --seed {spec.seed}"
                                         + (f" --prompt {prompt}" if prompt is not None else "")}
    result["explain"] = eb.explain_in_process(service, cases[:users], k)
    if baseline_users:
        result["baseline"] = eb.json_baseline(service, cases[:baseline_users], k)
    if api_requests or hol_requests:
        result.update(eb.through_api(service, [u for u, _ in cases], k, api_requests, max(hol_requests, 1),
                                     lambda what: console.log(what)))
    if generate_users:
        result["generate"] = eb.generate_mode(service, cases[:generate_users], k)
        if baseline_users and result["generate"]["style"] != "json":
            result["generate_baseline"] = eb.generate_mode(service, cases[:baseline_users], k, style="json")
    REPORTS.mkdir(exist_ok=True)
    stem = f"explain-{catalog}" + ("" if result["llm"] == "transformers" else f"-{result['llm']}") + (
        "" if prompt is None else f"-{prompt}-seed{spec.seed}")  # other backends and prompts write beside it
    if "hol" in result:
        eb.plot(result, REPORTS / f"{stem}.png")
    (REPORTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = eb.markdown(result, f"{stem}.png" if "hol" in result else None)
    (REPORTS / f"{stem}.md").write_text(md)
    if as_json:
        print_json(result)
    else:
        out.print(md, markup=False, highlight=False)


@eval_app.command("scale")
def eval_scale(
    items: str = typer.Option("10000,100000", "--items", help="catalogue sizes, comma-separated (e.g. "
                              "10000,100000,1000000)"),
    users: str | None = typer.Option(None, "--users", help="users per size, comma-separated (default: items/5, at "
                                     "least 1000)"),
    seed: int = typer.Option(0, "--seed"),
    queries: int = typer.Option(200, "--queries", min=10, help="users timed per size"),
    eval_users: int = typer.Option(500, "--eval-users", min=10, help="test users evaluated per size"),
    keep: bool = typer.Option(False, "--keep", help="keep the synthetic catalogues (default: removed)"),
    timeout_min: float = typer.Option(180.0, "--timeout-min", help="give up on a size after this long"),
    precision: str = typer.Option("fp32", "--precision", help="encoder weights: fp32 or int8 (see `recagent eval "
                                  "encoder-precision`)"),
    reuse: bool = typer.Option(False, "--reuse", help="measure a size's kept index (an earlier --keep run of the "
                               "same catalogue) instead of building it again; the build's seconds are then its "
                               "manifest's and the peak memory the measuring process's"),
) -> None:
    """Index build time, peak memory, size on disk and retrieve p50/p95 (with and without a genre filter) on
    synthetic catalogues of growing size, plus the fused retriever against its sources on each one's own split.
    Updates reports/scale.{md,json}: the sizes measured now replace the same sizes there, other sizes stay with
    the run that measured them."""
    setup()
    from eval.scale import markdown, merge, run_child
    from retrieval.embeddings import encoder_precision
    from retrieval.provenance import git_commit

    try:
        os.environ["RECAGENT_ENCODER_PRECISION"] = encoder_precision(precision)  # the child builds with it
    except ValueError as exc:
        fail(f"--precision: {exc}")

    try:
        sizes = [int(x) for x in items.split(",") if x.strip()]
        counts = [int(x) for x in users.split(",")] if users else [max(1000, n // 5) for n in sizes]
    except ValueError:
        fail(f"--items {items!r} / --users {users!r}: comma-separated whole numbers")
        return
    if len(counts) != len(sizes) or min(sizes) < 10 or min(counts) < 10:
        fail("--users needs one count per --items size, and every size and count at least 10")
    results = []
    for n, u in zip(sizes, counts, strict=True):
        console.print(f"[bold]{n:,} items, {u:,} users[/]")
        t0 = time.perf_counter()
        result = run_child(n, u, seed, queries, eval_users, keep, timeout_s=timeout_min * 60, reuse=reuse)
        console.print(f"  done in {time.perf_counter() - t0:.0f}s: " + json.dumps(
            {k: result.get(k) for k in ("build_s", "peak_rss_mb", "retrieve", "collaborative", "error")}))
        results.append(result)
    command = f"recagent eval scale --items {items}" + (f" --users {users}" if users else "") + \
        f" --seed {seed} --queries {queries} --eval-users {eval_users} --precision {precision}" + \
        (" --keep" if keep else "") + (" --reuse" if reuse else "")
    run = {"machine": machine_line(), "date": time.strftime("%Y-%m-%d"), "command": command, "commit": git_commit()}
    previous = json.loads((REPORTS / "scale.json").read_text()) if (REPORTS / "scale.json").exists() else None
    report = merge(previous, results, run)
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "scale.json").write_text(json.dumps(report, indent=2))
    (REPORTS / "scale.md").write_text(markdown(report))
    console.print(f"report: {REPORTS / 'scale.md'}")


@eval_app.command("encoder-precision")
def eval_encoder_precision(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    users: int = typer.Option(500, "--users", min=10, help="test users evaluated"),
    ties: str = ties_option(),
    seed: int = typer.Option(0, "--seed", help="seeds the sampled users and the tie order"),
    encoder: str = typer.Option("index", "--encoder", help="index (the encoder the index was built with) or "
                                "frozen (MiniLM as it ships)"),
) -> None:
    """The int8 encoder (RECAGENT_ENCODER_PRECISION=int8) against fp32: item texts embedded per second, and the
    content and fused retrievers' NDCG@10 / Recall@50 with each, in one run. Writes
    reports/encoder-precision-<catalog>.{md,json}."""
    setup()
    spec = split_spec(ties, seed)
    from eval import encoder_precision as ep

    if encoder not in ("index", "frozen"):
        fail(f"--encoder {encoder!r}: choose index or frozen")
    result = guarded(lambda: ep.measure(catalog, spec, users=users, encoder=encoder))
    result.update({"machine": machine_line(), "date": time.strftime("%Y-%m-%d"),
                   "command": f"recagent eval encoder-precision --catalog {catalog} --users {users} "
                              f"--ties {spec.ties} --seed {spec.seed} --encoder {encoder}"})
    REPORTS.mkdir(exist_ok=True)
    stem = f"encoder-precision-{catalog}" + ("-frozen" if encoder == "frozen" else "")
    (REPORTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = ep.markdown(result)
    (REPORTS / f"{stem}.md").write_text(md)
    out.print(md, markup=False, highlight=False)
