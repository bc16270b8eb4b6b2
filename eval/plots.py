"""Plot plumbing shared by the evaluation reports: a headless pyplot, one way to save a figure, and the
position-bias curve that both `recagent eval rerank` and `recagent eval all` draw."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed); imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path | str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def plot_position_bias(curves: Mapping[str, Any], path: Path | str) -> None:
    """Top-1 rate of the held-out item by its slot in the prompt, one line per setting (the output of
    ``RerankEvaluator.position_bias``)."""
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    for name, c in curves.items():
        ax.plot(c["positions"], c["top1_rate"], marker="o", label=f"{name} (n={c['users']})")
    ax.set_xlabel("slot of the held-out item in the prompt")
    ax.set_ylabel("LLM top-1 rate")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Position bias: a flat curve means the slot does not matter")
    ax.legend()
    save(fig, path)


def plot_training(log: list[dict[str, Any]], path: Path | str) -> None:
    """A ranker's training curve: validation NDCG@10 (retrieval order, ranker alone, best blend) and the training
    loss, by optimiser step (the rows of ``provenance.train.log``)."""
    steps = [r["step"] for r in log]
    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(7, 5), sharex=True)
    for key, label in (("retrieval", "retrieval order"), ("ranker", "ranker alone"), ("best_fused", "best blend")):
        top.plot(steps, [r[key] for r in log], marker="o", label=label)
    top.set_ylabel("validation NDCG@10")
    top.legend()
    top.set_title("Trained ranker: validation sample, window of the training examples")
    bottom.plot(steps, [float("nan") if r["loss"] is None else r["loss"] for r in log], marker="o", color="grey")
    bottom.set_xlabel("optimiser step")
    bottom.set_ylabel("training loss")
    save(fig, path)
