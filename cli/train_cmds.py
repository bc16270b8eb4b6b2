"""`recagent train ...`: models trained on a catalogue's behaviour data."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.main import catalog_name, console, fail, guarded, out, setup, split_spec, ties_option, train_app
from retrieval.catalog import DEFAULT_CATALOG


@train_app.command("ranker")
def train_ranker(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    minutes: float = typer.Option(45.0, "--minutes", min=0.1, help="training time budget (then the final choices)"),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="stop after this many optimiser steps"),
    window: int = typer.Option(20, "--window", min=2, max=100, help="candidates per training example"),
    windows: str = typer.Option("20,30,50", "--windows", help="serving windows compared on validation"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(3e-4, "--lr", min=1e-7),
    per_user: int = typer.Option(16, "--per-user", min=1, help="training steps per user (latest of the train part)"),
    objective: str = typer.Option("residual", "--objective", help="residual (learn corrections to the retrieval "
                                  "order) or listwise (rank from the ranker's scores alone)"),
    prompt: str = typer.Option("v2", "--prompt", help="version of prompts/rerank_trained.*.jinja"),
    order: str = typer.Option("retrieval", "--order", help="candidate presentation: retrieval or shuffled"),
    insert_missing: bool = typer.Option(False, "--insert-missing/--no-insert-missing", help="put the next item "
                                        "in when the retriever missed it (default: drop such steps)"),
    val_users: int = typer.Option(150, "--val-users", min=1, help="validation users measured during training"),
    eval_every: int = typer.Option(60, "--eval-every", min=1, help="optimiser steps between validation passes"),
    top_layers: int = typer.Option(10, "--top-layers", min=1, help="LoRA on the top N transformer layers"),
    seed: int = typer.Option(0, "--seed"),
    ties: str = ties_option(),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint of an interrupted run"),
    output: Path | None = typer.Option(None, "--output", help="ranker folder (default RECAGENT_HOME/rankers/NAME)"),
    export: Path | None = typer.Option(None, "--export", help="write the encoded examples, recipe and base model "
                                       "to this folder for `python -m agent.ranker.accelerated` on another "
                                       "machine, instead of training here"),
    from_run: Path | None = typer.Option(None, "--from-run", help="finish a run of agent.ranker.accelerated (its "
                                         "output folder): choose alpha and the window here, install the ranker; the "
                                         "run's recorded recipe is used, the training options here are ignored"),
) -> None:
    """LoRA-train the in-process LLM to rank the retriever's candidates for the next item (training part of the
    histories only); keeps the best adapter by validation NDCG@10, chooses alpha and the window on validation.
    With --export / --from-run the training itself runs on another machine (an accelerator's)."""
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
    config = guarded(lambda: TrainConfig.model_validate(dict(
        window=window, windows=serving_windows, batch_size=batch_size, lr=lr, per_user=per_user,
        val_users=val_users, eval_every=eval_every, top_layers=top_layers, seed=seed, max_minutes=minutes,
        max_steps=max_steps, objective=objective, prompt=prompt, order=order, insert_missing=insert_missing)))
    cat = guarded(lambda: ensure_catalog(catalog))
    index = guarded(lambda: load_index(cat))
    llm = LLMConfig.from_env()
    if llm.backend != "transformers":
        fail(f"training needs the in-process model (RECAGENT_LLM=transformers), not '{llm.backend}'")
    with console.status("loading the LLM"):
        backend = TransformersBackend(llm.model_copy(update={"thread_policy": "fixed"}))
    trainer = RankerTrainer(index, backend, config, spec, out=output)
    if export is not None and from_run is not None:
        fail("--export and --from-run are two ends of one run: give one of them")
    if export is not None:
        folder = guarded(lambda: trainer.export(export))
        console.print(f"[green]exported[/] to {folder}; train with `python -m agent.ranker.accelerated {folder} "
                      "OUT`, then `recagent train ranker --from-run OUT`")
        return
    provenance = guarded(lambda: trainer.finish_from(from_run)) if from_run is not None else trainer.run(resume)
    from eval.ranker_report import write_training_report

    report = write_training_report(provenance, Path("reports"))
    console.print(f"[green]ranker saved[/] in {trainer.out}; report: {report}")
    out.print(json.dumps({"train": {k: v for k, v in provenance.train.items() if k != "log"},
                          "validation": provenance.validation}, indent=2))


@train_app.command("embedder")
def train_embedder(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    minutes: float = typer.Option(28.0, "--minutes", min=0.1, help="training time budget (the best checkpoint is "
                                  "kept)"),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="stop after this many optimiser steps"),
    epochs: float = typer.Option(1.0, "--epochs", min=0.01, help="passes over the training pairs (the learning "
                                 "rate decays to 0 over them; the time budget may stop training earlier)"),
    batch_size: int = typer.Option(64, "--batch-size", min=2, help="pairs per batch (in-batch negatives)"),
    lr: float = typer.Option(2e-4, "--lr", min=1e-7),
    train_layers: int = typer.Option(2, "--train-layers", min=1, help="top transformer layers trained"),
    per_user: int = typer.Option(50, "--per-user", min=1, help="latest training steps per user made into pairs"),
    max_tokens: int = typer.Option(64, "--max-tokens", min=16, max=512, help="token budget of a history text"),
    val_users: int = typer.Option(1000, "--val-users", min=1, help="validation users measured during training "
                                  "(all of them when there are fewer)"),
    eval_every: int = typer.Option(100, "--eval-every", min=1, help="optimiser steps between validation passes"),
    seed: int = typer.Option(0, "--seed"),
    ties: str = ties_option(),
    reindex: bool = typer.Option(True, "--reindex/--no-reindex", help="rebuild the catalogue's index with the "
                                 "tuned encoder and re-tune the fusion weights on validation"),
    output: Path | None = typer.Option(None, "--output", help="encoder folder (default RECAGENT_HOME/encoders/NAME)"),
) -> None:
    """Fine-tune the sentence encoder on the training part of the histories (user history text -> next item,
    in-batch negatives); keeps the best checkpoint by validation NDCG@10 of the vector retriever, then rebuilds
    the index with it (item vectors in Chroma, user vectors from history text) and re-tunes the fusion weights."""
    setup()
    from eval import retrieval_eval as rv
    from retrieval.catalog_store import ensure_catalog
    from retrieval.encoder import encoders_dir, record_fusion, tuned_ref
    from retrieval.encoder_train import EncoderTrainConfig, EncoderTrainer
    from retrieval.index import build_index, load_index
    from retrieval.splits import split_catalog

    spec = split_spec(ties, seed)
    config = guarded(lambda: EncoderTrainConfig(
        batch_size=batch_size, lr=lr, train_layers=train_layers, per_user=per_user, max_tokens=max_tokens,
        val_users=val_users, eval_every=eval_every, seed=seed, max_minutes=minutes, max_steps=max_steps,
        epochs=epochs))
    cat = guarded(lambda: ensure_catalog(catalog))
    folder = output or encoders_dir(cat.name)
    trainer = EncoderTrainer(cat, config, spec, out=folder)
    provenance = guarded(trainer.run)
    console.print(f"[green]encoder saved[/] in {folder}: validation NDCG@10 {provenance.validation['best']['ndcg@10']}"
                  f" (frozen {provenance.validation['ndcg@10_frozen']}), kept {provenance.validation['kept']}")
    summary: dict[str, object] = {"train": {k: v for k, v in provenance.train.items() if k != "log"},
                                  "validation": provenance.validation, "checkpoint": provenance.checkpoint}
    if reindex:
        assert cat.root is not None
        with console.status("re-indexing with the tuned encoder"):
            build_index(cat, cat.root / "index", encoder=tuned_ref(folder), progress=False)
        index = load_index(cat)
        tuning = rv.tune_and_store(index, split_catalog(cat, spec), spec, progress=False)
        learned = index.manifest.fusion.learned
        record_fusion(folder, tuning.weights, tuning.cf.ease_lambda, index.manifest.fusion.tuned_on or "validation",
                      learned=learned.model_dump(mode="json") if learned else None, ease_decay=tuning.cf.ease_decay,
                      sasrec_epochs=tuning.cf.sasrec_epochs)
        console.print(f"[green]index rebuilt[/] with encoder {index.manifest.encoder.name}; fusion re-tuned on "
                      f"validation: {tuning.weights}, EASE lambda {tuning.cf.ease_lambda:g}, recency decay "
                      f"{tuning.cf.ease_decay:g}, SASRec epochs {tuning.cf.sasrec_epochs} (NDCG@10 "
                      f"{tuning.score:.4f})")
        summary["fusion"] = {"weights": tuning.weights, "ease_lambda": tuning.cf.ease_lambda,
                             "ease_decay": tuning.cf.ease_decay, "sasrec_epochs": tuning.cf.sasrec_epochs,
                             "validation_ndcg@10": round(tuning.score, 5)}
    out.print(json.dumps(summary, indent=2))
