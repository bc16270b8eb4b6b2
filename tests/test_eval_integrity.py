"""The held-out label never reaches inference.

Each evaluation path is run twice on the tiny catalogue: once with the real held-out items and once with every
held-out item replaced by another catalogue item. Whatever reaches the retriever and the LLM (every prompt) and
whatever comes out (candidate lists, scores, rankings, explanations) must be identical; only the metrics, which
are computed afterwards from the target, may differ.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.llm.base import ScoreRequest
from eval import suite
from eval.judge import Judge
from eval.retrieval_eval import collect_lists
from retrieval.index import Index
from retrieval.splits import Case, Split, leave_last_out
from tests.fakes import ScriptedBackend

pytestmark = pytest.mark.slow


class PromptLog(ScriptedBackend):
    """The scripted backend, recording every prompt it is sent."""

    def __init__(self) -> None:
        super().__init__(prefer=lambda r: len(json.dumps(r.messages)) % len(r.labels))
        self.prompts: list[str] = []

    def score_labels(self, request: ScoreRequest) -> list[float]:
        self.prompts.append(json.dumps([request.messages, request.answer_prefix, list(request.labels)]))
        return super().score_labels(request)

    def generate_json(self, messages: Any, schema: dict[str, Any], max_tokens: int = 512,
                      temperature: float = 0.0) -> str:
        self.prompts.append(json.dumps([messages, schema]))
        return super().generate_json(messages, schema, max_tokens, temperature)


def swapped(cases: list[Case], index: Index) -> list[Case]:
    """Every target replaced by a different catalogue item."""
    ids = index.catalog.item_ids
    return [dataclasses.replace(c, target=next(i for i in ids if i != c.target and i not in c.history))
            for c in cases]


def context(index: Index, cases: list[Case], backend: PromptLog) -> suite.Context:
    full = leave_last_out(index.catalog.histories())
    config = suite.SuiteConfig(catalog=index.catalog.name, users=len(cases), n_boot=20, perms_users=len(cases),
                               generate_users=len(cases), explain_users=len(cases), bias_users=0)
    return suite.Context(config=config, index=index, split=Split(full.train, full.validation, cases), cases=cases,
                         backend_factory=lambda: backend, judge_factory=lambda: Judge(backend, index.catalog),
                         progress=False)


def test_retrieval_lists_do_not_depend_on_the_target(tiny_index: Index) -> None:
    full = leave_last_out(tiny_index.catalog.histories())
    fake = swapped(full.test, tiny_index)
    assert all(a.target != b.target for a, b in zip(full.test, fake, strict=True))
    real = collect_lists(tiny_index, full, "test", progress=False)
    other = collect_lists(tiny_index, Split(full.train, full.validation, fake), "test", progress=False)
    assert set(real.norm) == set(other.norm)
    for name in real.norm:
        np.testing.assert_array_equal(real.norm[name], other.norm[name])
    np.testing.assert_array_equal(real.allowed, other.allowed)
    assert not np.array_equal(real.targets, other.targets)  # only the labels differ


def test_rerank_generate_and_explain_paths_see_and_return_the_same_with_another_label(tiny_index: Index) -> None:
    cases = leave_last_out(tiny_index.catalog.histories()).test
    outputs = []
    for variant in (cases, swapped(cases, tiny_index)):
        backend = PromptLog()
        ctx = context(tiny_index, variant, backend)
        score, gen, expl = suite.stage_score(ctx), suite.stage_generate(ctx), suite.stage_explain(ctx)
        users = [{k: v for k, v in u.items() if k not in ("target_pos", "latency_s")} for u in score["users"]]
        outputs.append({"prompts": backend.prompts, "users": users, "alpha": score["alpha"],
                        "explanations": gen["explanations"] + expl["explanations"], "lists": gen["lists"]})
    real, fake = outputs
    assert real["prompts"] and real["prompts"] == fake["prompts"]
    assert real["users"] == fake["users"]
    assert real["explanations"] == fake["explanations"] and real["lists"] == fake["lists"]


def test_reports_name_the_cpu_model(tmp_path: Path) -> None:
    """Trained weights differ between CPU models (SASRec's do), so every report's machine line names it."""
    from eval.machine import cpu_model, machine_line

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t: sse\n")
    assert cpu_model(str(info)) == "Example CPU 9000"
    info.write_text("processor\t: 0\n")  # no model line (some ARM kernels): the platform's name instead
    assert cpu_model(str(info)) and cpu_model(str(info)) != "Example CPU 9000"
    assert cpu_model(str(tmp_path / "missing")) and f"({cpu_model()})" in machine_line()
