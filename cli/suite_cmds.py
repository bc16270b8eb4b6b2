"""`recagent eval all` (the whole offline suite) and `recagent eval judge` (LLM-as-judge of given explanations)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from cli.main import catalog_name, console, eval_app, fail, guarded, out, print_json, setup, split_spec, ties_option
from eval.machine import machine_info
from retrieval.catalog import DEFAULT_CATALOG


@eval_app.command("all")
def eval_all(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    users: int = typer.Option(200, "--users", min=1, help="test users sampled (seeded) for every stage"),
    seed: int = typer.Option(0, "--seed", help="seeds the user sample and the random tie order"),
    ties: str = ties_option(),
    run_id: str | None = typer.Option(None, "--run-id", help="default: <catalog>-u<users>-s<seed>-<commit>"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore the stage cache of this run id"),
    reports: Path = typer.Option(Path("reports"), "--reports", help="folder for reports/<run-id>/"),
    n_boot: int = typer.Option(1000, "--bootstrap", min=10, help="bootstrap resamples"),
    generate_users: int = typer.Option(10, "--generate-users", min=0, help="users for generate mode"),
    explain_users: int = typer.Option(15, "--explain-users", min=0, help="users for score mode + explanations"),
    perms_users: int = typer.Option(40, "--perms-users", min=0, help="users for the 2-permutation ablation"),
    bias_users: int = typer.Option(16, "--bias-users", min=0, help="validation users for the position-bias curve"),
    judge_items: int = typer.Option(16, "--judge-items", min=0, help="explanations scored by the judge"),
    pairwise_items: int = typer.Option(8, "--pairwise-items", min=0, help="pairs judged in both orders"),
    chat_users: int = typer.Option(30, "--chat-users", min=0, help="simulated chat users (0: skip)"),
    no_validity: bool = typer.Option(False, "--no-validity",
                                     help="skip the judge's agreement with the author-written reference labels "
                                          "on constructed cases (eval/data/judge_labels.jsonl)"),
    as_json: bool = typer.Option(False, "--json", help="print metrics.json"),
) -> None:
    """Every offline evaluation on one seeded user sample: report.md, metrics.json and plots in reports/<run-id>/."""
    setup()
    spec = split_spec(ties, seed)
    from agent.llm.config import LLMConfig
    from agent.llm.registry import make_backend
    from eval import report as rp
    from eval import suite
    from eval.judge import JudgeConfig
    from retrieval.catalog_store import ensure_catalog
    from retrieval.index import load_index

    config = suite.SuiteConfig(catalog=catalog, users=users, seed=seed, ties=spec.ties, n_boot=n_boot,
                               generate_users=generate_users, explain_users=explain_users, perms_users=perms_users,
                               bias_users=bias_users, judge_items=judge_items, pairwise_items=pairwise_items,
                               chat_users=chat_users, validity=not no_validity)
    git = suite.git_info()
    rid = run_id or suite.default_run_id(config, git["commit"])
    run_dir = reports / rid
    run_dir.mkdir(parents=True, exist_ok=True)
    cat = guarded(lambda: ensure_catalog(catalog))
    index = guarded(lambda: load_index(cat))
    llm_config = guarded(LLMConfig.from_env)
    judge_config = guarded(JudgeConfig.from_env)
    made: list[object] = []

    def backend_factory() -> object:
        with console.status("loading the LLM"):
            made.append(guarded(lambda: make_backend(llm_config)))
        return made[-1]

    t0 = time.perf_counter()
    results = suite.run_suite(index, config, run_dir, backend_factory,  # type: ignore[arg-type]
                              suite.default_judge_factory(cat, judge_config), fresh=fresh,
                              on_stage=lambda s: console.print(f"[bold]stage[/] {s}"))
    metrics = rp.analyse(results, config, cat)
    backend = made[0] if made else None
    command = (f"recagent eval all --catalog {catalog} --users {users} --seed {seed}"
               + "".join(f" --{k.replace('_', '-')} {v}" for k, v in config.model_dump().items()
                         if k in ("ties", "generate_users", "explain_users", "perms_users", "bias_users",
                                  "judge_items", "pairwise_items", "chat_users")
                         and v != suite.SuiteConfig.model_fields[k].default))
    metrics["provenance"] = {
        "catalog": catalog, "seed": seed, "split": spec.provenance(), "run_id": rid, "command": command,
        "config": config.model_dump(),
        "git": git, "model": suite.model_fingerprint(backend, llm_config),  # type: ignore[arg-type]
        "judge": {"backend": judge_config.llm.backend, "model_path": judge_config.llm.model_path,
                  "served_model": judge_config.llm.served_model, "same_as_recommender":
                  judge_config.same_backend_as(llm_config), "temperature": judge_config.temperature},
        "data": {"catalog_hash": cat.content_hash(), "index_hash": index.manifest.content_hash,
                 "embed_model": index.manifest.embed_model, "fusion": index.manifest.fusion.model_dump()},
        "rerank": results["score"].get("rerank") or suite.rerank_provenance(index),  # as the stage ran
        "machine": machine_info(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": round(time.perf_counter() - t0, 1), "cached_stages": results["_cached"],
        "stage_seconds_total": round(sum(results["_seconds"].values()), 1),
    }
    path = rp.write_report(run_dir, metrics, results)
    if as_json:
        print_json(metrics)
        return
    console.print(f"[green]report[/] {path} ({metrics['provenance']['wall_seconds']}s"
                  f"{', cached: ' + ', '.join(results['_cached']) if results['_cached'] else ''})")


@eval_app.command("judge")
def eval_judge(
    input_path: Path = typer.Option(..., "--input", help="JSONL: {history, item_id, reason, evidence?} per line"),
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per input line"),
) -> None:
    """Judge explanations from a file: rubric scores (LLM) and code checks; malformed lines are skipped."""
    setup()
    if not input_path.exists():
        fail(f"--input {input_path}: no such file")
    from agent import explanation_checks as xc
    from agent.llm.registry import make_backend
    from eval.judge import Judge, JudgeConfig, read_explanations
    from retrieval.catalog_store import ensure_catalog

    lines = input_path.read_text(encoding="utf-8", errors="replace").splitlines()
    good, bad = read_explanations(lines)
    for n, err in bad:
        console.print(f"[yellow]line {n}[/]: skipped, {err}", highlight=False)
    if not good:
        fail(f"{input_path}: no valid explanation lines")
    cat = guarded(lambda: ensure_catalog(catalog))
    config = guarded(JudgeConfig.from_env)
    with console.status("loading the judge LLM"):
        judge = Judge(guarded(lambda: make_backend(config.llm)), cat, config)
    rows: dict[int, dict[str, object]] = {n: {"line": n, "error": err} for n, err in bad}
    for n, exp in good:
        facts = xc.facts_for(cat, [*exp.history, exp.item_id, *exp.evidence])
        violations = xc.check_explanation(exp.history, exp.item_id, exp.reason, exp.evidence, facts,
                                          genre_vocabulary=cat.all_genres)
        row: dict[str, object] = {"line": n, "item_id": exp.item_id}
        try:
            s = judge.rubric(exp)
            row["scores"] = s.scores()
            row["justification"] = s.justification
        except Exception as exc:  # the judge failing on one line never stops the others
            row["scores"] = None
            row["judge_error"] = f"{type(exc).__name__}: {exc}"[:300]
        row["violations"] = [v.model_dump() for v in violations]
        rows[n] = row
    ordered = [rows[n] for n in sorted(rows)]
    if as_json:
        for r in ordered:
            print_json(r)
        sys.stdout.flush()
        return
    from rich.table import Table

    table = Table(title=f"Judge: {judge.backend.model_name} (prompt judge_rubric.{config.prompt_version})")
    for col in ("line", "item", "relevance", "faithfulness", "specificity", "persuasiveness", "violations"):
        table.add_column(col)
    for r in ordered:
        if "error" in r:
            table.add_row(str(r["line"]), "-", "", "", "", "", f"malformed: {r['error']}")
            continue
        scores = r["scores"] if isinstance(r["scores"], dict) else {}
        viol = "; ".join(f"{v['check']}" for v in r["violations"]) or "none"  # type: ignore[attr-defined]
        table.add_row(str(r["line"]), str(r["item_id"]), *[str(scores.get(c, "err")) for c in
                                                           ("relevance", "faithfulness", "specificity",
                                                            "persuasiveness")], viol)
    out.print(table)
    console.print(json.dumps(judge.metadata()), highlight=False)
