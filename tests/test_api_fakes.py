"""Helpers shared by the API tests: a controllable fake LLM backend (the production seam
``RecommenderService(index, backend=...)``), app builders and a uvicorn server in a thread. Also checks the fake
itself."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.llm.base import ChatMessage, LLMBackend, LLMError, ScoreRequest, TextRequest
from agent.service import RecommenderService
from agent.settings import Settings
from retrieval.index import Index
from serve import free_port, running_server  # noqa: F401 (re-exported for the tests)
from tests.fakes import genre_sentence


def instance(schema: dict[str, Any]) -> Any:
    """A small value valid under the JSON schemas the reranker and chat agent ask for."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: instance(v) for k, v in props.items() if k in schema.get("required", list(props))}
    if kind == "array":
        item = schema.get("items", {"type": "string"})
        n = schema.get("minItems", 0)
        if "enum" in item:
            return item["enum"][: max(n, 0)] if n else []
        if item.get("type") == "object" and "item_id" in item.get("properties", {}):
            ids = item["properties"]["item_id"].get("enum", [])
            out = []
            for i in ids[: max(n, 1)]:
                entry = instance(item)
                entry["item_id"] = i
                out.append(entry)
            return out
        return [instance(item) for _ in range(n)]
    if kind == "string":
        return "A fine pick that matches what you like."[: schema.get("maxLength", 60)].ljust(
            schema.get("minLength", 0), "."
        )
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    return None


class FakeBackend(LLMBackend):
    """Deterministic fake LLM. ``fail``: every call raises LLMError; ``sleep_s``: every call sleeps first."""

    name = "fake"

    def __init__(self, fail: bool = False, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.fail = fail
        self.sleep_s = sleep_s
        self.calls = 0

    @property
    def model_name(self) -> str:
        return "fake-llm"

    def _call(self) -> None:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.fail:
            raise LLMError("fake backend is down")

    def score_labels(self, request: ScoreRequest) -> list[float]:
        self._call()
        raw = [-0.3 * i for i in range(len(request.labels))][::-1]
        top = max(raw)
        total = top + math.log(sum(math.exp(v - top) for v in raw))
        self.usage.add("score", 100, 0)
        return [v - total for v in raw]

    def generate_json(self, messages: list[ChatMessage], schema: dict[str, Any], max_tokens: int = 512,
                      temperature: float = 0.0) -> str:
        self._call()
        self.usage.add("generate", 100, 20)
        return json.dumps(instance(schema))

    def stream_text(self, messages: list[ChatMessage], max_tokens: int = 256,
                    temperature: float = 0.0) -> Iterator[str]:
        self._call()
        self.usage.add("generate", 50, 6)
        yield from ["Here ", "are ", "some ", "picks."]

    def complete(self, request: TextRequest) -> str:
        self._call()
        self.usage.add("reason", 100, 4)
        return genre_sentence(request)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def make_client(tiny_index: Index, backend: LLMBackend | None = None, chat: bool = True, **settings: Any) -> Any:
    """A TestClient over the real pipeline on the tiny catalogue."""
    from fastapi.testclient import TestClient

    from serve import create_app

    settings.setdefault("llm", "none" if backend is None else "fake")
    service = RecommenderService(tiny_index, backend=backend)
    app = create_app(Settings(**settings), service=service)
    if not chat:
        app.state.holder["runtime"].chat_agent = None
    return TestClient(app, raise_server_exceptions=False)


# --- checks of the helpers ----------------------------------------------------------------------------------
def test_fake_backend_fails_on_demand() -> None:
    fake = FakeBackend(fail=True)
    with pytest.raises(LLMError):
        fake.score_labels(ScoreRequest(messages=[], answer_prefix="", labels=["A", "B"]))


def test_instance_satisfies_a_ranking_schema() -> None:
    schema = {"type": "object", "required": ["ranking"], "properties": {"ranking": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "object", "required": ["item_id", "reason", "evidence"],
            "properties": {"item_id": {"type": "string", "enum": ["x", "y", "z"]},
                           "reason": {"type": "string", "minLength": 10, "maxLength": 40},
                           "evidence": {"type": "array", "items": {"type": "string", "enum": ["h"]}}}}}}}
    value = instance(schema)
    assert [e["item_id"] for e in value["ranking"]] == ["x", "y"]
    assert all(10 <= len(e["reason"]) <= 40 for e in value["ranking"])
