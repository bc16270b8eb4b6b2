"""The report of `recagent train ranker`: what was trained, how fast, and what validation measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval.machine import machine_line
from eval.plots import plot_training


def write_training_report(provenance: Any, reports: Path) -> Path:
    """``reports/ranker-<catalog>.md`` (+ ``.json`` and the training-curve PNG) from a ranker's provenance."""
    reports.mkdir(exist_ok=True)
    stem = f"ranker-{provenance.catalog}"
    train, val = provenance.train, provenance.validation
    plot_training(train["log"], reports / f"{stem}-training.png")
    recipe = train["recipe"]
    lines = [f"# Trained ranker: {provenance.catalog}", "",
             f"- command: `{provenance.command}` (commit {provenance.commit}, seed {provenance.seed})",
             *([f"- trained elsewhere: exported by `{train['export_command']}`, trained by "
                f"`{train['run_command']}` on {train['trained_on']}; alpha and the window chosen here"]
               if "run_command" in train else []),
             *([f"- note on that run: {train['run_note']}"] if train.get("run_note") else []),
             f"- split: {provenance.split.get('description', provenance.split)}",
             f"- base model: {provenance.base_model}; prompt {provenance.prompt}; LoRA r={recipe['lora_r']} on "
             f"{', '.join(recipe['target_modules'])} of the top {recipe['top_layers']} layers; lr {recipe['lr']}, "
             f"batch {recipe['batch_size']}, window {recipe['window']}",
             f"- examples: {train['examples_built']} built from the training part only ({recipe['per_user']} latest "
             f"steps per user, {recipe['folds']} user folds: each fold's candidates come from CF fitted on the "
             f"other folds); next item retrieved in the window for {train['target_retrieved_rate']:.1%}; "
             + (f"put in for the other {train['inserted']}" if recipe.get("insert_missing", True) else
                f"the others dropped, {train.get('examples_used', '?')} examples trained on"),
             f"- candidates presented in {provenance.order} order; objective {recipe.get('objective', 'listwise')}"
             + (f": the retrieval term alone (beta {train['retrieval_only_beta']}) has a loss of "
                f"{train['retrieval_only_loss']:.4f} on these examples, the line the ranker's training loss has to get "
                f"under" if recipe.get("objective") == "residual" and "retrieval_only_loss" in train else ""),
             f"- trained {train['seconds'] / 60:.1f} min: {train['examples_seen']} examples seen in "
             f"{train['steps']} steps, {train['examples_per_second']:.2f} examples/s; kept the adapter of step "
             f"{train['kept_step']} (step 0 = the untrained model)",
             f"- validation: {val['users']} sampled validation users; chosen on them: alpha "
             f"{provenance.choices.alpha}, window {provenance.choices.window}",
             f"- machine: {machine_line()}" + (f" (training ran on {train['trained_on']})" if "trained_on" in train
                                               else ""), "",
             f"![training curve]({stem}-training.png)", "",
             "## Validation NDCG@10 during training (window of the training examples)", "",
             "| step | examples | loss | retrieval | ranker alone | best blend | its alpha |",
             "|---|---|---|---|---|---|---|"]
    for r in train["log"]:
        loss = "-" if r["loss"] is None or r["loss"] != r["loss"] else f"{r['loss']:.3f}"  # step 0: no loss yet
        lines.append(f"| {r['step']} | {r['examples']} | {loss} | {r['retrieval']:.4f} | {r['ranker']:.4f} | "
                     f"{r['best_fused']:.4f} | {r['best_alpha']} |")
    lines += ["", "## Serving windows compared on validation (kept adapter)", "",
              "| window | retrieval | ranker alone | best blend | its alpha | s per user (training-time scorer) |",
              "|---|---|---|---|---|---|"]
    for w, r in val["windows"].items():
        lines.append(f"| {w} | {r['retrieval']:.4f} | {r['ranker']:.4f} | {r['best_fused']:.4f} | {r['best_alpha']} | "
                     f"{r['seconds_per_user']:.3f} |")
    (reports / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (reports / f"{stem}.json").write_text(json.dumps(json.loads(provenance.model_dump_json()), indent=2))
    return reports / f"{stem}.md"
