"""Explanations through the API: a reason on every item, who wrote it, streamed events, deadlines the caller can
set, degradation that keeps the LLM ranking, and work that stops when the client goes away."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.llm.base import LLMError, TextRequest
from agent.service import RecommenderService
from agent.settings import Settings
from retrieval.index import Index
from serve import create_app

sys.path.insert(0, str(Path(__file__).parent))
from test_api_chat import sse_events  # noqa: E402
from test_api_fakes import FakeBackend, make_client, running_server  # noqa: E402

from tests.fakes import genre_sentence  # noqa: E402


class ReasonBackend(FakeBackend):
    """Scores like FakeBackend; writes reasons slowly (``reason_s`` each), or fails at it (``reason_fail``), and
    records how many reasons it started after the caller cancelled."""

    def __init__(self, reason_s: float = 0.0, reason_fail: bool = False) -> None:
        super().__init__()
        self.reason_s = reason_s
        self.reason_fail = reason_fail
        self.started = 0
        self.cancelled_seen = threading.Event()

    def complete(self, request: TextRequest) -> str:
        if self.reason_fail:
            raise LLMError("reasons are down")
        self.started += 1
        time.sleep(self.reason_s)
        return genre_sentence(request)

    def complete_batch(self, requests: Sequence[TextRequest],
                       cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[int, str]]:
        for i, request in enumerate(requests):
            if cancelled is not None and cancelled():
                self.cancelled_seen.set()
                return
            yield i, self.complete(request)


def test_every_item_has_a_reason_and_says_who_wrote_it(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=ReasonBackend()) as c:
        body = c.post("/v1/recommendations", json={"user_id": "u5", "k": 3, "explain": True}).json()
    assert not body["degraded"], body
    assert all(i["reason"] and i["reason_source"] in ("llm", "template") for i in body["items"])
    assert body["reasons_llm"] == sum(i["reason_source"] == "llm" for i in body["items"]) >= 1
    llm = next(i for i in body["items"] if i["reason_source"] == "llm")
    assert re.search(r"is a [\w'-]+ film you may like", llm["reason"]) and llm["evidence"]


def test_a_failing_llm_keeps_its_ranking_and_templates_fill_every_reason(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=ReasonBackend(reason_fail=True)) as c:
        body = c.post("/v1/recommendations", json={"user_id": "u5", "k": 3, "explain": True}).json()
    assert body["degraded"] and "explanations" in body["reason"], body
    assert body["reranked"] > 0 and all(i["llm_score"] is not None for i in body["items"])  # LLM ranking kept
    assert all(i["reason"] and i["reason_source"] == "template" for i in body["items"])
    assert body["reasons_llm"] == 0


def test_deadline_while_explaining_keeps_the_ranking_and_fills_reasons(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=ReasonBackend(reason_s=3.0)) as c:
        t0 = time.monotonic()
        body = c.post("/v1/rerank", json={"history": ["s1"], "candidates": ["s2", "s3", "a1"], "k": 3,
                                          "explain": True, "timeout_s": 1.0}).json()
        took = time.monotonic() - t0
    assert took < 2.5, took
    assert body["degraded"] and "deadline" in body["reason"] and "while explaining" in body["reason"], body
    assert body["reranked"] == 3 and all(i["llm_score"] is not None for i in body["items"])
    assert all(i["reason"] for i in body["items"])
    assert {i["reason_source"] for i in body["items"]} == {"template"}


def test_callers_may_ask_for_longer_deadlines_up_to_the_server_maximum(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=ReasonBackend(reason_s=0.4), deadline_s=0.3, max_deadline_s=30) as c:
        short = c.post("/v1/rerank", json={"history": ["s1"], "candidates": ["s2", "s3"], "explain": True}).json()
        long = c.post("/v1/rerank", json={"history": ["s1"], "candidates": ["s2", "s3"], "explain": True,
                                          "timeout_s": 20}).json()
        too_long = c.post("/v1/rerank", json={"history": ["s1"], "candidates": ["s2"], "timeout_s": 31})
    assert short["degraded"] and "deadline" in short["reason"]
    assert not long["degraded"] and long["reasons_llm"] >= 1, long
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "timeout_s"
    assert "RECAGENT_MAX_DEADLINE_S" in too_long.json()["error"]["message"]


def test_stream_sends_the_ranking_first_then_each_reason_then_done(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=ReasonBackend(reason_s=0.05)) as c:
        r = c.post("/v1/recommendations", json={"user_id": "u5", "k": 3, "explain": True},
                   headers={"Accept": "text/event-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [(name, json.loads(data)) for name, data in sse_events(r.text) if data]
    names = [n for n, _ in events]
    assert names[0] == "ranked" and names[-1] == "done" and names.count("reason") == 3, names
    ranked, done = events[0][1], events[-1][1]
    assert all(i["reason"] is None for i in ranked["items"])
    assert [i["item_id"] for i in ranked["items"]] == [i["item_id"] for i in done["items"]]
    reasons = {d["item_id"]: d for n, d in events if n == "reason"}
    assert set(reasons) == {i["item_id"] for i in done["items"]}
    for item in done["items"]:
        assert reasons[item["item_id"]]["reason"] == item["reason"]
        assert reasons[item["item_id"]]["rank"] == item["rank"]
    assert done["timings"]["first_reason_ms"] is not None and done["user_id"] == "u5"


def test_stream_errors_before_the_first_event_are_http_errors(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=ReasonBackend()) as c:
        r = c.post("/v1/recommendations", json={"user_id": "nobody", "explain": True},
                   headers={"Accept": "text/event-stream"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_a_client_that_disconnects_stops_the_reasons(tiny_index: Index) -> None:
    backend = ReasonBackend(reason_s=0.6)
    app = create_app(Settings(llm="fake", deadline_s=30), service=RecommenderService(tiny_index, backend=backend))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/v1/rerank", headers={"Accept": "text/event-stream"},
                           json={"history": ["s1"], "candidates": ["s2", "s3", "a1", "a2", "a3"], "k": 5,
                                 "explain": True}) as r:
            for line in r.iter_lines():
                if line.startswith("event: ranked"):
                    break  # the client goes away after the ranked list
        time.sleep(1.0)
        started = backend.started
        time.sleep(2.5)  # uncancelled, the five reasons (0.6 s each) would all have started by now
        assert backend.started == started < 5, (started, backend.started)


@pytest.mark.parametrize("route", ["/v1/recommendations", "/v1/rerank"])
def test_explain_without_an_llm_still_gives_template_reasons(client_without_llm: Any, route: str) -> None:
    payload: dict[str, Any] = {"user_id": "u5"} if route == "/v1/recommendations" else {
        "history": ["s1"], "candidates": ["s2", "a1"]}
    body = client_without_llm.post(route, json={**payload, "k": 2, "explain": True}).json()
    assert all(i["reason"] and i["reason_source"] == "template" for i in body["items"]), body


@pytest.fixture(scope="module")
def client_without_llm(tiny_index: Index) -> Any:
    with make_client(tiny_index) as c:
        yield c


def test_readyz_reports_an_open_circuit_and_requests_degrade_at_once(tiny_index: Index) -> None:
    from agent.llm.breaker import CircuitBreaker, GuardedBackend

    class DownServer(FakeBackend):
        def _call(self) -> None:
            self.calls += 1
            raise LLMError("cannot reach the LLM server (test)")

    inner = DownServer()
    backend = GuardedBackend(inner, CircuitBreaker(failures_to_open=2, cooldown_s=60))
    app = create_app(Settings(llm="openai"), service=RecommenderService(tiny_index, backend=backend))
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        assert c.get("/readyz").json()["llm_state"] == "closed"
        first = c.post("/v1/recommendations", json={"user_id": "u2", "k": 3}).json()
        assert first["degraded"] and "LLM failed" in first["reason"]
        ready = c.get("/readyz").json()
        assert ready["llm_state"] == "open" and ready["llm"] is False, ready
        assert "cannot reach" in ready["llm_health"]["last_error"]
        calls = inner.calls
        t0 = time.monotonic()
        again = c.post("/v1/recommendations", json={"user_id": "u2", "k": 3, "explain": True}).json()
        assert time.monotonic() - t0 < 2.0
        assert again["degraded"] and inner.calls == calls  # refused by the breaker, the server is not called
        assert all(i["reason"] and i["reason_source"] == "template" for i in again["items"])
