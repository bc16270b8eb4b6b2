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
