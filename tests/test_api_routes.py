"""HTTP routes over the real pipeline on the tiny catalogue (retrieval, reranker, chat agent), with the LLM
absent or replaced by a fake backend through the service's backend seam."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from retrieval.index import Index
from serve import create_app

sys.path.insert(0, str(Path(__file__).parent))
from test_api_fakes import FakeBackend, make_client  # noqa: E402


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "field"}, body
    return body["error"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def client(tiny_index: Index) -> Any:
    with make_client(tiny_index) as c:
        yield c


@pytest.fixture(scope="module")
def llm_client(tiny_index: Index) -> Any:
    with make_client(tiny_index, backend=FakeBackend()) as c:
        yield c


# --- health, page, docs -------------------------------------------------------------------------------------
def test_health_ready_docs_and_page(client: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["index"]
    serving = ready.json()["serving"]
    assert serving["workers"] >= 1 and "max_batch" in serving and not any("key" in k for k in serving)
    assert "/v1/recommendations" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/web/app.js" in page.text
    assert client.get("/web/app.js").status_code == 200
    assert client.get("/web/app.css").status_code == 200


def test_request_ids(client: Any) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert generated and " " not in generated


# --- recommendations ----------------------------------------------------------------------------------------
def test_recommend_for_known_user(client: Any) -> None:
    r = client.post("/v1/recommendations", json={"user_id": "u2", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [i["item_id"] for i in body["items"]]
    assert ids[0] == "s4" and not set(ids) & {"s1", "s2", "s3"}
    assert [i["rank"] for i in body["items"]] == [1, 2, 3]
    assert body["user_id"] == "u2" and body["degraded"] is False and body["catalog"]
    assert body["items"][0]["sources"]


def test_recommend_for_history_with_filters(client: Any) -> None:
    r = client.post("/v1/recommendations", json={"history": ["a1", "a2"], "k": 2,
                                                  "filters": {"genres": ["animation"]}})
    assert r.status_code == 200, r.text
    assert all("Animation" in i["genres"] for i in r.json()["items"])


def test_recommend_with_fake_llm_and_explanations(llm_client: Any) -> None:
    r = llm_client.post("/v1/recommendations", json={"user_id": "u5", "k": 3, "explain": True})
    body = r.json()
    assert r.status_code == 200 and body["model"] == "fake-llm" and not body["degraded"], body
    assert all(i["llm_score"] is not None for i in body["items"])
    assert all(i["reason"] for i in body["items"])


@pytest.mark.parametrize(("payload", "field"), [
    ({"user_id": "u1", "history": ["s1"]}, None),
    ({}, None),
    ({"user_id": "u1", "k": 0}, "k"),
    ({"user_id": "u1", "mode": "psychic"}, "mode"),
    ({"user_id": "u1", "filters": {"year_min": 2000, "year_max": 1990}}, "filters"),
    ({"user_id": "u1", "filters": {"genres": ["Polka"]}}, "filters"),
    ({"user_id": "u1", "surprise": 1}, "surprise"),
    ({"history": "s1"}, "history"),
])
def test_recommend_schema_errors(client: Any, payload: dict[str, Any], field: str | None) -> None:
    err = error_of(client.post("/v1/recommendations", json=payload), 422)
    assert err["type"] == "invalid_request"
    if field is not None:
        assert err["field"] is not None and err["field"].startswith(field), err


def test_malformed_json_is_422(client: Any) -> None:
    r = client.post("/v1/recommendations", content=b"{not json", headers={"content-type": "application/json"})
    error_of(r, 422)


def test_unknown_user_and_items_are_404(client: Any) -> None:
    assert error_of(client.post("/v1/recommendations", json={"user_id": "nobody"}), 404)["field"] == "user_id"
    err = error_of(client.post("/v1/recommendations", json={"history": ["s1", "zz9"]}), 404)
    assert err["field"] == "history" and "zz9" in err["message"]
    assert error_of(client.get("/v1/items/zz9"), 404)["field"] == "item_id"
    assert error_of(client.get("/v1/nothing-here"), 404)["type"] == "not_found"
    assert error_of(client.get("/v1/recommendations"), 405)["type"] == "method_not_allowed"


def test_oversized_history_and_body_are_413(tiny_index: Index) -> None:
    with make_client(tiny_index, max_history=3, max_body_bytes=2048, max_candidates=2) as c:
        err = error_of(c.post("/v1/recommendations", json={"history": ["s1"] * 4}), 413)
        assert err["field"] == "history"
        err = error_of(c.post("/v1/rerank", json={"candidates": ["s1", "s2", "s3"]}), 413)
        assert err["field"] == "candidates"
        big = json.dumps({"user_id": "u1", "query": "x" * 5000}).encode()
        assert error_of(c.post("/v1/recommendations", content=big,
                               headers={"content-type": "application/json"}), 413)["field"] == "body"

        def chunks() -> Any:
            for _ in range(10):
                yield b" " * 1000
            yield b'{"user_id": "u1"}'

        r = c.post("/v1/recommendations", content=chunks(), headers={"content-type": "application/json"})
        assert error_of(r, 413)["type"] == "payload_too_large"


# --- rerank -------------------------------------------------------------------------------------------------
def test_rerank_catalogue_ids_and_free_items(llm_client: Any) -> None:
    free = {"id": "ext-1", "title": "Moon Base Alpha", "text": "Astronauts on a lunar station."}
    r = llm_client.post("/v1/rerank", json={"history": ["s1", "s2"], "candidates": ["s3", free, "a1", "s1"],
                                            "k": 3, "explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 3 and "s1" not in ids and "ext-1" in ids
    for item in body["items"]:
        assert {"item_id", "title", "rank", "score", "llm_score", "retrieval_score", "sources", "reason",
                "evidence"} <= set(item)
    assert {"items", "model", "mode", "degraded", "reason", "timings"} <= set(body)


def test_rerank_unknown_candidate_is_404(client: Any) -> None:
    err = error_of(client.post("/v1/rerank", json={"candidates": ["s1", "nope"]}), 404)
    assert err["field"] == "candidates"
    assert error_of(client.post("/v1/rerank", json={"candidates": []}), 422)["field"] == "candidates"


def test_rerank_without_llm_keeps_the_given_order(client: Any) -> None:
    r = client.post("/v1/rerank", json={"candidates": ["d1", "a1", "s4"], "k": 3, "mode": "retrieval"})
    assert [i["item_id"] for i in r.json()["items"]] == ["d1", "a1", "s4"]


# --- items --------------------------------------------------------------------------------------------------
def test_item_and_search(client: Any) -> None:
    item = client.get("/v1/items/s1").json()
    assert item["title"] == "Star Voyager" and "Sci-Fi" in item["genres"]
    hits = client.get("/v1/items", params={"query": "courtroom trial jury", "k": 3}).json()["items"]
    assert hits and hits[0]["item_id"].startswith("d")
    assert error_of(client.get("/v1/items", params={"query": ""}), 422)["field"] == "query"
    assert error_of(client.get("/v1/items", params={"query": "x", "genre": "Polka"}), 422)["field"] == "filters"


# --- degraded answers ---------------------------------------------------------------------------------------
def test_llm_failure_degrades_every_llm_route(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=FakeBackend(fail=True)) as c:
        r = c.post("/v1/recommendations", json={"user_id": "u2", "k": 3})
        body = r.json()
        assert r.status_code == 200 and body["degraded"] and "LLM failed" in body["reason"]
        assert [i["item_id"] for i in body["items"]][0] == "s4"
        r = c.post("/v1/rerank", json={"history": ["s1"], "candidates": ["s2", "a1"], "explain": True})
        assert r.status_code == 200 and r.json()["degraded"]
        assert c.get("/v1/items/s1").status_code == 200
        assert c.get("/v1/items", params={"query": "space"}).status_code == 200
        metrics = c.get("/metrics").text
        assert 'recagent_degraded_answers_total{cause="llm_error",route="recommendations"}' in metrics


def test_deadline_returns_retrieval_order_flagged(tiny_index: Index) -> None:
    with make_client(tiny_index, backend=FakeBackend(sleep_s=1.5), deadline_s=0.3) as c:
        t0 = time.monotonic()
        r = c.post("/v1/recommendations", json={"user_id": "u2", "k": 3})
        took = time.monotonic() - t0
        body = r.json()
        assert r.status_code == 200 and body["degraded"] and "deadline" in body["reason"], body
        assert took < 1.4
        assert [i["item_id"] for i in body["items"]][0] == "s4"
        r = c.post("/v1/rerank", json={"candidates": ["s2", "a1"], "timeout_s": 0.2})
        assert r.json()["degraded"] and "deadline" in r.json()["reason"]


def test_full_queue_is_429_with_retry_after(tiny_index: Index) -> None:
    from agent.service import RecommenderService
    from agent.settings import Settings

    app = create_app(Settings(llm="fake", workers=1, queue_size=1, deadline_s=5.0),
                     service=RecommenderService(tiny_index, backend=FakeBackend(sleep_s=0.4)))

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return list(await asyncio.gather(*[
                c.post("/v1/recommendations", json={"user_id": f"u{i % 8 + 1}", "k": 2}) for i in range(6)]))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "overloaded"


# --- auth and CORS ------------------------------------------------------------------------------------------
def test_api_key(tiny_index: Index) -> None:
    with make_client(tiny_index, api_key="s3cret-key") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200
        err = error_of(c.get("/v1/items/s1"), 401)
        assert err["type"] == "unauthorized"
        assert c.get("/v1/items/s1").headers["www-authenticate"] == "Bearer"
        error_of(c.get("/v1/items/s1", headers={"Authorization": "Bearer wrong"}), 401)
        error_of(c.get("/metrics"), 401)
        ok = c.get("/v1/items/s1", headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200


def test_cors(tiny_index: Index) -> None:
    with make_client(tiny_index, cors_origins="http://ui.example") as c:
        r = c.options("/v1/recommendations", headers={"Origin": "http://ui.example",
                                                      "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "http://ui.example"
        r = c.get("/healthz", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_metrics_exposes_requests_latency_and_tokens(llm_client: Any) -> None:
    llm_client.post("/v1/recommendations", json={"user_id": "u1", "k": 2})
    text = llm_client.get("/metrics").text
    assert 'recagent_http_requests_total{method="POST",route="/v1/recommendations",status="200"}' in text
    assert "recagent_http_request_duration_seconds_bucket" in text
    assert 'recagent_llm_tokens_total{kind="prompt"}' in text
    assert "recagent_queue_depth" in text


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.settings import Settings

    monkeypatch.setenv("RECAGENT_PORT", "9123")
    monkeypatch.setenv("RECAGENT_API_KEY", "zq-secret-99")
    monkeypatch.setenv("RECAGENT_CORS_ORIGINS", "http://a, http://b")
    monkeypatch.setenv("RECAGENT_LLM", "none")
    s = Settings()
    assert s.port == 9123 and s.cors_origins == ["http://a", "http://b"] and not s.use_llm
    assert s.api_key is not None and "zq-secret-99" not in repr(s)


def test_stopped_llm_server_degrades_every_route(tiny_index: Index) -> None:
    """The OpenAI-compatible backend pointed at a port where no server listens (a stopped vLLM)."""
    from test_api_fakes import free_port

    from agent.llm.config import LLMConfig
    from agent.llm.openai_backend import OpenAIBackend

    backend = OpenAIBackend(LLMConfig(backend="openai", url=f"http://127.0.0.1:{free_port()}/v1", timeout_s=0.5,
                                      served_model="m"))
    with make_client(tiny_index, backend=backend) as c:
        for path, payload in [("/v1/recommendations", {"user_id": "u2", "k": 3, "explain": True}),
                              ("/v1/rerank", {"history": ["s1"], "candidates": ["s2", "a1"]})]:
            r = c.post(path, json=payload)
            assert r.status_code == 200 and r.json()["degraded"] and r.json()["items"], r.text
        chat = c.post("/v1/chat", json={"message": "recommend a space movie"})
        assert chat.status_code == 200 and chat.json()["reply"]
        assert c.get("/v1/items/s1").status_code == 200
        assert c.get("/readyz").status_code == 200
