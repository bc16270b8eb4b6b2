"""`recagent eval all`: stages, cache, report files, intervals and determinism (scripted backend); and once with
the real small LLM through the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from eval import report as rp
from eval import suite
from eval.judge import Judge
from retrieval.index import Index
from tests.fakes import ScriptedBackend

pytestmark = pytest.mark.slow
PLOTS = ("metrics.png", "diffs.png", "latency.png", "checks.png")


def small_config(index: Index, **kw: Any) -> suite.SuiteConfig:
    base = {"catalog": index.catalog.name, "users": 6, "n_boot": 50, "perms_users": 3, "generate_users": 2,
            "explain_users": 3, "bias_users": 0, "judge_items": 4, "pairwise_items": 2, "chat_users": 0}
    return suite.SuiteConfig(**{**base, **kw})


def run(index: Index, run_dir: Path, fresh: bool = False, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    config = small_config(index, **kw)
    results = suite.run_suite(index, config, run_dir, lambda: ScriptedBackend(),
                              lambda b: Judge(b, index.catalog), progress=False, fresh=fresh)
    metrics = rp.analyse(results, config, index.catalog)
    metrics["provenance"] = {"catalog": index.catalog.name, "seed": config.seed, "command": "test"}
    rp.write_report(run_dir, metrics, results)
    return results, metrics


def assert_intervals(metrics: dict[str, Any]) -> None:
    rows = metrics["rows"]
    for name in ("retrieval order (top-20)", "random order (top-20)", "baseline: fused", "LLM score: LLM only"):
        assert name in rows
    for name, row in rows.items():
        for m in ("ndcg@10", "recall@10"):
            assert row[m]["lo"] <= row[m]["mean"] <= row[m]["hi"], (name, m, row[m])
        if name != "retrieval order (top-20)":
            assert "diff_vs_retrieval" in row
    assert metrics["best_baseline"] in rows


def test_suite_writes_report_caches_stages_and_repeats_itself(tiny_index: Index, tmp_path: Path) -> None:
    results, metrics = run(tiny_index, tmp_path / "a")
    for name in ("report.md", "metrics.json", *PLOTS):
        assert (tmp_path / "a" / name).exists(), name
    assert_intervals(json.loads((tmp_path / "a" / "metrics.json").read_text()))
    assert set(results["_cached"]) == set()
    assert metrics["chat"].get("skipped")
    assert metrics["judge"]["validity"]["trustworthy"] is False  # not measured on this catalogue: said plainly
    report = (tmp_path / "a" / "report.md").read_text()
    assert report.index("| system |") < report.index("## Metrics") and "NOT trustworthy" in report

    again, _ = run(tiny_index, tmp_path / "a")
    assert set(again["_cached"]) == set(suite.STAGES)
    partly, _ = run(tiny_index, tmp_path / "a", judge_items=3)  # only the stage that depends on it reruns
    assert set(partly["_cached"]) == set(suite.STAGES) - {"judge"}

    _, other = run(tiny_index, tmp_path / "b", fresh=True)
    assert rp.stable(other) == rp.stable(metrics)
    _, changed = run(tiny_index, tmp_path / "a", seed=1)  # another seed: the cache is not reused
    assert changed["rows"] and rp.stable(changed) != rp.stable(metrics)


@pytest.mark.llm
def test_eval_all_command_with_the_real_small_llm(tiny_catalog: Any, tmp_path: Path) -> None:
    from cli.main import app

    def once(run_id: str) -> dict[str, Any]:
        args = ["eval", "all", "--catalog", tiny_catalog.name, "--users", "3", "--seed", "3", "--reports",
                str(tmp_path), "--run-id", run_id, "--bootstrap", "50", "--generate-users", "1", "--explain-users",
                "1", "--perms-users", "1", "--bias-users", "0", "--judge-items", "2", "--pairwise-items", "1",
                "--chat-users", "0"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return dict(json.loads((tmp_path / run_id / "metrics.json").read_text()))

    first = once("r1")
    for name in ("report.md", *PLOTS):
        assert (tmp_path / "r1" / name).exists(), name
    assert_intervals(first)
    prov = first["provenance"]
    assert prov["model"]["sha256"] and prov["git"]["commit"] and prov["data"]["catalog_hash"]
    assert prov["machine"]["cpus"] and "--users 3" in prov["command"]
    assert first["judge"]["meta"]["prompts"]["judge_rubric.v1"]
    assert rp.stable(once("r2")) == rp.stable(first)  # the same seed gives the same numbers
