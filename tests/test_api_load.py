"""The load script against a real uvicorn server on loopback (tiny catalogue, fast fake LLM): bounded, mixes
routes, reports latencies and errors, and the server stays healthy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent.service import RecommenderService
from agent.settings import Settings
from eval.load_test import LoadConfig, run_load, write_reports
from retrieval.index import Index
from serve import create_app

sys.path.insert(0, str(Path(__file__).parent))
from test_api_fakes import FakeBackend, running_server  # noqa: E402


def test_load_script_mixes_routes_without_errors(tiny_index: Index, tmp_path: Path) -> None:
    app = create_app(Settings(llm="fake", workers=2), service=RecommenderService(tiny_index, backend=FakeBackend()))
    users = ",".join(f"u{i}" for i in range(1, 9))
    items = ",".join(f"{g}{i}" for g in "sad" for i in range(1, 5))
    with running_server(app) as url:
        config = LoadConfig.parse(url=url, clients=3, seconds=2.0, mix="recommend=3,rerank=1,item=1,search=1",
                                  users=users, items=items)
        result = run_load(config)
    overall = result["overall"]
    assert overall["requests"] > 3 and overall["errors"] == 0, result["error_examples"]
    assert overall["p50_s"] is not None and overall["p95_s"] >= overall["p50_s"]
    assert {"recommend", "rerank", "item", "search"} <= set(result["routes"])
    assert result["healthy_after"]
    md, js = write_reports(result, "test", folder=tmp_path)
    assert "p95" in md.read_text() and js.exists()


def test_load_script_refuses_remote_targets() -> None:
    with pytest.raises(ValueError, match="this machine"):
        LoadConfig.parse(url="http://example.com:8000", clients=1, seconds=1, mix="recommend=1")
    with pytest.raises(ValueError, match="unknown route"):
        LoadConfig.parse(url="http://127.0.0.1:8000", clients=1, seconds=1, mix="delete=1")
