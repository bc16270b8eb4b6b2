"""Schemathesis against the app's own OpenAPI schema: every route, generated inputs, never a 5xx.

Runs over the real pipeline on the tiny catalogue with a fast fake LLM (so the LLM paths, explanations and the
chat agent are exercised) and a small example budget per operation to stay bounded in time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from agent.service import RecommenderService
from agent.settings import Settings
from retrieval.index import Index
from serve import create_app

sys.path.insert(0, str(Path(__file__).parent))
from test_api_fakes import FakeBackend  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_app(tiny_index: Index) -> Any:
    service = RecommenderService(tiny_index, backend=FakeBackend())
    return create_app(Settings(llm="fake", deadline_s=5, chat_deadline_s=10), service=service)


# The schemathesis pytest plugin does not run under pytest 9, so each operation's hypothesis strategy is
# driven directly: one test per route of the schema.
OPERATIONS = [
    "GET /healthz", "GET /readyz", "GET /metrics", "POST /v1/recommendations", "POST /v1/rerank",
    "GET /v1/items/{item_id}", "GET /v1/items", "POST /v1/chat", "POST /v1/chat/completions", "GET /v1/models",
    "POST /v1/admin/reload",
]


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def test_operations_cover_the_schema(fuzz_schema: Any) -> None:
    labels = {result.ok().label for result in fuzz_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_errors(fuzz_schema: Any, label: str) -> None:
    operation = fuzz_schema.find_operation_by_label(label)
    assert operation is not None, label
    seen: list[int] = []

    @given(case=operation.as_strategy())
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case: Any) -> None:
        response = case.call()
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    run()
    assert seen and max(seen) < 500


def test_every_route_is_in_the_schema(fuzz_app: Any) -> None:
    from fastapi.testclient import TestClient

    paths = TestClient(fuzz_app).get("/openapi.json").json()["paths"]
    expected = {"/healthz", "/readyz", "/metrics", "/v1/recommendations", "/v1/rerank", "/v1/chat",
                "/v1/chat/completions", "/v1/items", "/v1/items/{item_id}", "/v1/models"}
    assert expected <= set(paths)
