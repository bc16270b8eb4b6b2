"""`recagent train ...`: models trained on a catalogue's behaviour data."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.main import console, fail, guarded, out, setup, split_spec, ties_option, train_app
from retrieval.catalog import DEFAULT_CATALOG


@train_app.command("ranker")
def train_ranker(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog"),
    minutes: float = typer.Option(45.0, "--minutes", min=0.1, help="training time budget (then the final choices)"),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="stop after this many optimiser steps"),
    window: int = typer.Option(20, "--window", min=2, max=100, help="candidates per training example"),
    windows: str = typer.Option("20,30,50", "--windows", help="serving windows compared on validation"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(3e-4, "--lr", min=1e-7),
    per_user: int = typer.Option(8, "--per-user", min=1, help="training steps per user (latest of the train part)"),
    val_users: int = typer.Option(150, "--val-users", min=1, help="validation users measured during training"),
    eval_every: int = typer.Option(60, "--eval-every", min=1, help="optimiser steps between validation passes"),
    top_layers: int = typer.Option(10, "--top-layers", min=1, help="LoRA on the top N transformer layers"),
    seed: int = typer.Option(0, "--seed"),
    ties: str = ties_option(),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint of an interrupted run"),
    output: Path | None = typer.Option(None, "--output", help="ranker folder (default RECAGENT_HOME/rankers/NAME)"),
) -> None:
    """LoRA-train the in-process LLM to rank the retriever's candidates for the next item (training part of the
    histories only); keeps the best adapter by validation NDCG@10, chooses alpha and the window on validation."""
    setup()
    from agent.llm.config import LLMConfig
    from agent.llm.transformers_backend import TransformersBackend
    from agent.ranker.train import RankerTrainer, TrainConfig
    from retrieval.catalog_store import ensure_catalog
    from retrieval.index import load_index

    spec = split_spec(ties, seed)
    try:
        serving_windows = sorted({int(w) for w in windows.split(",") if w.strip()})
    except ValueError:
        fail(f"--windows '{windows}': give comma-separated integers, e.g. 20,30,50")
    if not serving_windows or min(serving_windows) < 2 or max(serving_windows) > 100:
        fail(f"--windows '{windows}': each window must be between 2 and 100")
    config = guarded(lambda: TrainConfig(window=window, windows=serving_windows, batch_size=batch_size, lr=lr,
                                         per_user=per_user, val_users=val_users, eval_every=eval_every,
                                         top_layers=top_layers, seed=seed, max_minutes=minutes,
                                         max_steps=max_steps))
    cat = guarded(lambda: ensure_catalog(catalog))
    index = guarded(lambda: load_index(cat))
    llm = LLMConfig.from_env()
    if llm.backend != "transformers":
        fail(f"training needs the in-process model (RECAGENT_LLM=transformers), not '{llm.backend}'")
    with console.status("loading the LLM"):
        backend = TransformersBackend(llm.model_copy(update={"thread_policy": "fixed"}))
    trainer = RankerTrainer(index, backend, config, spec, out=output)
    provenance = trainer.run(resume=resume)
    from eval.ranker_report import write_training_report

    report = write_training_report(provenance, Path("reports"))
    console.print(f"[green]ranker saved[/] in {trainer.out}; report: {report}")
    out.print(json.dumps({"train": {k: v for k, v in provenance.train.items() if k != "log"},
                          "validation": provenance.validation}, indent=2))
