"""The OpenAI-compatible backend: its logic against a fake transport, then (marker ``vllm``) a real vLLM
server."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from agent.llm.base import LLMError, MarkerRequest, ScoreRequest, TextRequest, deadline_var
from agent.llm.breaker import GuardedBackend
from agent.llm.config import LLMConfig
from agent.llm.openai_backend import (
    MISSING_LOGPROB,
    LLMDeadlineError,
    LLMOutputError,
    LLMStatusError,
    OpenAIBackend,
    log_softmax,
)
from agent.llm.registry import make_backend
from agent.llm.vllm_server import (
    MARKER_NAME,
    VLLMServer,
    VLLMSetupError,
    free_port,
    lora_args,
    server_command,
    server_env,
    venv_ready,
)

BASE = "http://llm.test:9/v1"
LETTER_IDS = {chr(65 + i): 49 + i for i in range(20)}  # as SmolLM2's tokenizer has them

Handler = Callable[[httpx.Request], httpx.Response]


def fake_backend(handler: Handler, **config: Any) -> tuple[OpenAIBackend, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    cfg = LLMConfig(backend="openai", url=BASE, **config)
    return OpenAIBackend(cfg, transport=httpx.MockTransport(record)), seen


def body_of(request: httpx.Request) -> dict[str, Any]:
    return json.loads(request.content.decode())


def vllm_like(top: dict[str, float] | None = None, content: str = "A", usage: bool = True) -> Handler:
    """A fake vLLM: /v1/models, /tokenize (letters only) and chat completions with the given top log-probs."""

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "served-model"}]})
        if path == "/tokenize":
            text = body_of(request)["prompt"]
            words = text.split()
            tokens = [LETTER_IDS[text]] if text in LETTER_IDS else [1000 + i for i in range(len(words))]
            return httpx.Response(200, json={"count": len(tokens), "tokens": tokens})
        if path == "/v1/chat/completions":
            logprobs = None
            if top is not None:
                entries = [{"token": f"token_id:{LETTER_IDS[k]}", "logprob": v} for k, v in top.items()]
                logprobs = {"content": [{"token": entries[0]["token"], "logprob": entries[0]["logprob"],
                                         "top_logprobs": entries}]}
            payload: dict[str, Any] = {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": logprobs, "finish_reason": "stop"}]}
            if usage:
                payload["usage"] = {"prompt_tokens": 40, "completion_tokens": 1,
                                    "prompt_tokens_details": {"cached_tokens": 32}}
            return httpx.Response(200, json=payload)
        return httpx.Response(404, json={"detail": "Not Found"})

    return handler


def letters_request(n: int = 3, prefix: str = "Answer: ") -> ScoreRequest:
    return ScoreRequest(messages=[{"role": "user", "content": "Pick a letter."}], answer_prefix=prefix,
                        labels=[chr(65 + i) for i in range(n)])


# --- unit tests: no server --------------------------------------------------------------------------------


def test_registry_builds_openai_backend_without_touching_the_network() -> None:
    backend = make_backend(LLMConfig(backend="openai", url="http://127.0.0.1:1/v1", breaker_failures=5,
                                     breaker_cooldown_s=2.5))
    assert isinstance(backend, GuardedBackend) and isinstance(backend.inner, OpenAIBackend)
    assert backend.name == "openai"
    # what other code reads goes through the wrapper
    assert backend.root_url == "http://127.0.0.1:1" and backend.base_url == "http://127.0.0.1:1/v1"
    assert backend.config.url == "http://127.0.0.1:1/v1" and backend.usage is backend.inner.usage
    assert callable(backend.label_token_id) and callable(backend.tokenize_chat)
    assert (backend.breaker.failures_to_open, backend.breaker.cooldown_s) == (5, 2.5)
    assert backend.health()["state"] == "closed"
    backend.close()


def test_model_name_is_discovered_once_and_cached() -> None:
    backend, seen = fake_backend(vllm_like())
    assert backend.model_name == "served-model"
    assert backend.model_name == "served-model"
    assert [r.url.path for r in seen] == ["/v1/models"]


def test_configured_model_name_skips_discovery() -> None:
    backend, seen = fake_backend(vllm_like(), served_model="mine")
    assert backend.model_name == "mine"
    assert seen == []


def test_empty_model_list_is_an_llm_error() -> None:
    backend, _ = fake_backend(lambda r: httpx.Response(200, json={"data": []}))
    with pytest.raises(LLMError, match="no model"):
        _ = backend.model_name


def test_score_labels_renormalises_and_sends_the_vllm_extensions() -> None:
    backend, seen = fake_backend(vllm_like(top={"B": -0.5, "A": -1.5, "C": -3.0}))
    scores = backend.score_labels(letters_request(3))
    assert len(scores) == 3
    assert math.isclose(sum(math.exp(s) for s in scores), 1.0, rel_tol=1e-9)
    assert scores[1] > scores[0] > scores[2]  # same order as the labels, not as the server listed them
    assert math.isclose(scores[0] - scores[2], 1.5)
    chat = body_of(seen[-1])
    assert chat["model"] == "served-model"
    assert chat["allowed_token_ids"] == [49, 50, 51]
    assert chat["top_logprobs"] == 3 and chat["max_tokens"] == 1 and chat["logprobs"] is True
    assert chat["messages"][-1] == {"role": "assistant", "content": "Answer: "}
    assert chat["continue_final_message"] is True and chat["add_generation_prompt"] is False
    assert backend.usage.by_kind == {"score": 1}
    assert (backend.usage.prompt_tokens, backend.usage.cached_prompt_tokens) == (40, 32)


def test_labels_are_tokenized_once() -> None:
    backend, seen = fake_backend(vllm_like(top={"A": -0.1, "B": -2.0}))
    backend.score_labels(letters_request(2))
    backend.score_labels(letters_request(2))
    assert [r.url.path for r in seen].count("/tokenize") == 2


def test_without_answer_prefix_the_assistant_turn_is_opened_by_the_template() -> None:
    backend, seen = fake_backend(vllm_like(top={"A": -0.1, "B": -2.0}))
    backend.score_labels(letters_request(2, prefix=""))
    chat = body_of(seen[-1])
    assert chat["messages"][-1]["role"] == "user"
    assert "continue_final_message" not in chat


def test_a_label_missing_from_top_logprobs_gets_a_very_low_score() -> None:
    backend, _ = fake_backend(vllm_like(top={"A": -0.2, "B": -1.7}))
    scores = backend.score_labels(letters_request(3))
    assert all(math.isfinite(s) for s in scores)
    assert scores[2] < MISSING_LOGPROB / 2
    assert math.isclose(sum(math.exp(s) for s in scores), 1.0, rel_tol=1e-9)


def test_score_labels_batch_keeps_order() -> None:
    backend, _ = fake_backend(vllm_like(top={"A": -0.2, "B": -1.7}))
    results = backend.score_labels_batch([letters_request(2) for _ in range(4)])
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert backend.usage.calls == 4


def test_log_softmax() -> None:
    out = log_softmax([math.log(0.2), math.log(0.2)])
    assert all(math.isclose(v, math.log(0.5)) for v in out)


@pytest.mark.parametrize("handler, match", [
    (vllm_like(top=None), "no usable log-probs"),
    (lambda r: vllm_like()(r) if r.url.path != "/v1/chat/completions"
     else httpx.Response(200, json={"choices": []}), "no choices"),
    (lambda r: vllm_like()(r) if r.url.path != "/v1/chat/completions"
     else httpx.Response(200, text="<html>oops</html>"), "not JSON"),
    (lambda r: vllm_like()(r) if r.url.path != "/v1/chat/completions"
     else httpx.Response(500, json={"error": {"message": "engine dead"}}), "HTTP 500.*engine dead"),
])
def test_bad_responses_become_llm_errors(handler: Handler, match: str) -> None:
    backend, _ = fake_backend(handler)
    with pytest.raises(LLMError, match=match):
        backend.score_labels(letters_request(2))


def test_multi_token_label_is_an_llm_error() -> None:
    backend, _ = fake_backend(vllm_like(top={"A": -0.1}))
    request = ScoreRequest(messages=[{"role": "user", "content": "x"}], answer_prefix="",
                           labels=["A", "two words"])
    with pytest.raises(LLMError, match="single-token"):
        backend.score_labels(request)


@pytest.mark.parametrize("exc, match", [
    (httpx.ConnectError("[Errno 111] Connection refused"), "cannot reach"),
    (httpx.ReadTimeout("timed out"), "timed out"),
    (httpx.RemoteProtocolError("server disconnected"), "cannot reach"),
])
def test_transport_failures_become_llm_errors(exc: Exception, match: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    backend, _ = fake_backend(handler, served_model="m")
    with pytest.raises(LLMError, match=match):
        backend.score_labels(letters_request(2))
    with pytest.raises(LLMError, match=match):
        list(backend.stream_text([{"role": "user", "content": "hi"}]))


def test_generate_json_sends_the_schema_and_checks_the_output() -> None:
    schema = {"type": "object", "properties": {"id": {"enum": ["1", "2"]}}, "required": ["id"]}
    backend, seen = fake_backend(vllm_like(content='{"id": "2"}'))
    text = backend.generate_json([{"role": "user", "content": "pick"}], schema, max_tokens=20)
    assert json.loads(text) == {"id": "2"}
    chat = body_of(seen[-1])
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    assert chat["max_tokens"] == 20
    assert backend.usage.by_kind == {"json": 1}

    broken, _ = fake_backend(vllm_like(content='{"id": '))
    with pytest.raises(LLMError, match="not valid JSON"):
        broken.generate_json([{"role": "user", "content": "pick"}], schema)


def sse(*events: dict[str, Any] | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def test_stream_text_yields_pieces_and_records_usage() -> None:
    body = sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
               {"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
               {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}, "[DONE]")
    backend, seen = fake_backend(lambda r: httpx.Response(200, text=body,
                                                           headers={"content-type": "text/event-stream"}),
                                 served_model="m")
    assert list(backend.stream_text([{"role": "user", "content": "hi"}], max_tokens=5)) == ["Hel", "lo"]
    assert body_of(seen[-1])["stream"] is True
    assert (backend.usage.prompt_tokens, backend.usage.completion_tokens) == (7, 2)
    assert backend.generate_text([{"role": "user", "content": "hi"}]) == "Hello"


def test_stream_errors_become_llm_errors() -> None:
    mid = sse({"choices": [{"delta": {"content": "a"}}]}, {"error": {"message": "boom"}})
    backend, _ = fake_backend(lambda r: httpx.Response(200, text=mid), served_model="m")
    with pytest.raises(LLMError, match="boom"):
        list(backend.stream_text([{"role": "user", "content": "hi"}]))
    refused, _ = fake_backend(lambda r: httpx.Response(400, json={"error": {"message": "too long"}}),
                              served_model="m")
    with pytest.raises(LLMError, match="HTTP 400.*too long"):
        list(refused.stream_text([{"role": "user", "content": "hi"}]))


def test_count_tokens_uses_tokenize_then_falls_back_when_missing() -> None:
    backend, _ = fake_backend(vllm_like())
    assert backend.count_tokens("three little words") == 3
    plain, seen = fake_backend(lambda r: httpx.Response(404, json={"detail": "Not Found"}), served_model="m")
    assert plain.count_tokens("x" * 40) == 10
    assert plain.count_tokens("y" * 8) == 2
    assert len(seen) == 1  # the missing endpoint is remembered


def chat_reply(content: str | None, finish: str = "stop") -> httpx.Response:
    return httpx.Response(200, json={
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 6, "prompt_tokens_details": {"cached_tokens": 48}}})


def reason_request(prefix: str = "Because", stop: tuple[str, ...] = ("\n",), max_tokens: int = 16) -> TextRequest:
    return TextRequest(messages=[{"role": "user", "content": "Why Aladdin?"}], answer_prefix=prefix,
                       max_tokens=max_tokens, stop=stop)


def test_complete_continues_the_answer_prefix_and_cuts_at_stop() -> None:
    backend, seen = fake_backend(lambda r: chat_reply(" it is a musical.\nMore"), served_model="m")
    text = backend.complete(reason_request(stop=("\n", "END")))
    assert text == " it is a musical."  # a server that ignored `stop` is cut here too
    chat = body_of(seen[-1])
    assert chat["messages"] == [{"role": "user", "content": "Why Aladdin?"},
                                {"role": "assistant", "content": "Because"}]
    assert chat["continue_final_message"] is True and chat["add_generation_prompt"] is False
    assert (chat["max_tokens"], chat["temperature"], chat["stop"], chat["model"]) == (16, 0.0, ["\n", "END"], "m")
    assert backend.usage.by_kind == {"reason": 1}
    assert (backend.usage.prompt_tokens, backend.usage.cached_prompt_tokens) == (50, 48)


def test_complete_without_prefix_opens_the_assistant_turn_and_accepts_an_empty_answer() -> None:
    backend, seen = fake_backend(lambda r: chat_reply(None), served_model="m")
    assert backend.complete(reason_request(prefix="", stop=())) == ""
    chat = body_of(seen[-1])
    assert chat["messages"][-1]["role"] == "user" and "continue_final_message" not in chat and "stop" not in chat
    broken, _ = fake_backend(lambda r: httpx.Response(200, json={"choices": [{"message": {}}]}), served_model="m")
    with pytest.raises(LLMOutputError, match="no message content"):
        broken.complete(reason_request())


def slow_by_prefix(delays: dict[str, float]) -> Handler:
    """Chat completions that answer ``<prefix>!`` after the prefix's delay (so completion order is known)."""

    def handler(request: httpx.Request) -> httpx.Response:
        prefix = body_of(request)["messages"][-1]["content"]
        time.sleep(delays.get(prefix, 0.0))
        if prefix == "fail":
            return httpx.Response(503, json={"error": {"message": "engine overloaded"}})
        return chat_reply(f"{prefix}!")

    return handler


def test_complete_batch_yields_each_answer_as_it_completes() -> None:
    backend, seen = fake_backend(slow_by_prefix({"a": 0.6, "b": 0.0, "c": 0.3}), served_model="m")
    started = time.monotonic()
    arrivals: list[tuple[int, str, float]] = []
    for i, text in backend.complete_batch([reason_request(p) for p in "abc"]):
        arrivals.append((i, text, time.monotonic() - started))
    assert [(i, t) for i, t, _ in arrivals] == [(1, "b!"), (2, "c!"), (0, "a!")]
    assert arrivals[0][2] < 0.25  # the quick one did not wait for the slow ones
    assert arrivals[-1][2] < 1.0  # sent concurrently: about the slowest, not the sum
    assert len(seen) == 3 and backend.usage.by_kind == {"reason": 3}
    assert list(backend.complete_batch([])) == []
    assert list(backend.complete_batch([reason_request("z")])) == [(0, "z!")]


def test_complete_batch_stops_when_cancelled() -> None:
    backend, seen = fake_backend(slow_by_prefix({"a": 0.0, "b": 1.5, "c": 1.5}), served_model="m")
    stop = threading.Event()
    started = time.monotonic()
    got = []
    for i, text in backend.complete_batch([reason_request(p) for p in "abc"], cancelled=stop.is_set):
        got.append((i, text))
        stop.set()
    assert got == [(0, "a!")]
    assert time.monotonic() - started < 0.8  # did not wait for the slow ones
    assert list(backend.complete_batch([reason_request("a")], cancelled=lambda: True)) == []


def test_complete_batch_raises_the_first_failure() -> None:
    backend, _ = fake_backend(slow_by_prefix({"a": 0.5}), served_model="m")
    with pytest.raises(LLMStatusError, match="HTTP 503.*engine overloaded"):
        list(backend.complete_batch([reason_request(p) for p in ("a", "fail")]))


def timeouts_seen(seen: list[httpx.Request]) -> list[float]:
    return [r.extensions["timeout"]["read"] for r in seen]


def test_timeouts_follow_the_requests_deadline() -> None:
    backend, seen = fake_backend(vllm_like(top={"A": -0.1, "B": -2.0}), timeout_s=30)
    backend.score_labels(letters_request(2))
    assert timeouts_seen(seen) == [30, 30, 30, 30]  # /v1/models, two /tokenize, the completion
    seen.clear()
    token = deadline_var.set(time.monotonic() + 2.0)
    try:
        backend.score_labels(letters_request(2))
        backend.complete(reason_request())
        list(backend.stream_text([{"role": "user", "content": "hi"}]))
        backend.score_labels_batch([letters_request(2), letters_request(2)])  # worker threads get the deadline
        assert len(list(backend.complete_batch([reason_request("a"), reason_request("b")]))) == 2
    finally:
        deadline_var.reset(token)
    assert len(seen) == 1 + 1 + 1 + 2 + 2 and all(1.5 < t <= 2.0 for t in timeouts_seen(seen))
    seen.clear()
    token = deadline_var.set(time.monotonic() + 60)  # a deadline further than the timeout does not lengthen it
    try:
        backend.complete(reason_request())
    finally:
        deadline_var.reset(token)
    assert timeouts_seen(seen) == [30]


def test_a_passed_deadline_fails_at_once_without_sending() -> None:
    backend, seen = fake_backend(vllm_like(), served_model="m")
    token = deadline_var.set(time.monotonic() - 0.1)
    try:
        with pytest.raises(LLMDeadlineError, match="deadline passed"):
            backend.complete(reason_request())
        with pytest.raises(LLMDeadlineError, match="deadline passed"):
            list(backend.stream_text([{"role": "user", "content": "hi"}]))
    finally:
        deadline_var.reset(token)
    assert seen == []


@contextlib.contextmanager
def silent_server(delay: float) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that accepts every request and answers only after ``delay`` seconds."""

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(delay)
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_a_silent_server_fails_the_call_at_its_deadline_not_at_the_configured_timeout() -> None:
    with silent_server(delay=4.0) as url:
        backend = OpenAIBackend(LLMConfig(backend="openai", url=url, timeout_s=30, served_model="m"))
        token = deadline_var.set(time.monotonic() + 1.0)
        started = time.monotonic()
        try:
            with pytest.raises(LLMError, match=r"timed out after [01]\.\d+s \(the request's deadline; "
                                               r"RECAGENT_LLM_TIMEOUT is 30s\)"):
                backend.complete(reason_request())
        finally:
            deadline_var.reset(token)
        assert time.monotonic() - started < 1.5
        short = OpenAIBackend(LLMConfig(backend="openai", url=url, timeout_s=0.5, served_model="m"))
        started = time.monotonic()
        with pytest.raises(LLMError, match=r"timed out after 0\.5s \(RECAGENT_LLM_TIMEOUT\)"):
            short.complete(reason_request())
        assert time.monotonic() - started < 1.0
        backend.close()
        short.close()


def test_which_errors_count_against_the_server() -> None:
    assert LLMStatusError("x", 503).server_fault is True
    assert LLMStatusError("x", 429).server_fault is True
    assert LLMStatusError("x", 400).server_fault is False
    assert LLMOutputError("x").server_fault is False
    assert LLMDeadlineError("x").server_fault is None


MARKER = " §"
MARKER_ID = 20850  # as SmolLM2's tokenizer has it
#: The fake server's rendering of any chat prompt: three candidate lines, each closed by the marker.
CHAT_IDS = [1, 9, 10, 11, MARKER_ID, 198, 12, 13, MARKER_ID, 198, 14, MARKER_ID, 198, 2, 15]


def marker_server(prompt_logprobs: Callable[[list[int]], Any] | None = None,
                  chat_ids: list[int] = CHAT_IDS) -> Handler:
    """A fake vLLM for marker scoring: /tokenize (the marker, or chat messages -> ``chat_ids``) and completions
    whose prompt log-probs give the token at position p the log-probability -p/10 (None at position 0)."""

    def default(ids: list[int]) -> list[Any]:
        return [None] + [{str(t): {"logprob": -p / 10, "rank": 1, "decoded_token": "x"}}
                         for p, t in enumerate(ids) if p > 0]

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "served-model"},
                                                                        {"id": "recagent-ranker"}]})
        if path == "/tokenize":
            body = body_of(request)
            tokens = [MARKER_ID] if body.get("prompt") == MARKER else chat_ids if "messages" in body else [7, 8]
            return httpx.Response(200, json={"count": len(tokens), "max_model_len": 2048, "tokens": tokens})
        if path == "/v1/completions":
            ids = body_of(request)["prompt"]
            entries = (prompt_logprobs or default)(ids)
            return httpx.Response(200, json={
                "choices": [{"index": 0, "text": "x", "prompt_logprobs": entries, "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1}})
        return httpx.Response(404, json={"detail": "Not Found"})

    return handler


def marker_request(expected: int = 3, adapter: str | None = "/rankers/movielens-100k") -> MarkerRequest:
    return MarkerRequest(messages=[{"role": "system", "content": "Rank."}, {"role": "user", "content": "lines"}],
                         marker=MARKER, expected=expected, adapter=adapter)


def test_score_markers_reads_the_prompt_logprobs_at_the_marker_positions() -> None:
    backend, seen = fake_backend(marker_server())
    scores = backend.score_markers(marker_request())
    assert scores == [-0.4, -0.8, -1.1]  # positions 4, 8 and 11 of CHAT_IDS
    paths = [r.url.path for r in seen]
    assert paths == ["/v1/models", "/tokenize", "/tokenize", "/v1/completions"]
    assert body_of(seen[1]) == {"model": "served-model", "prompt": MARKER, "add_special_tokens": False}
    chat = body_of(seen[2])
    assert chat == {"model": "served-model", "messages": marker_request().messages, "add_generation_prompt": True}
    completion = body_of(seen[3])
    assert completion == {"model": "recagent-ranker", "prompt": CHAT_IDS, "max_tokens": 1, "temperature": 0.0,
                          "prompt_logprobs": 0}
    assert backend.usage.by_kind == {"score": 1} and backend.usage.prompt_tokens == len(CHAT_IDS)


def test_score_markers_without_adapter_asks_the_base_model_and_the_ranker_name_is_configurable() -> None:
    backend, seen = fake_backend(marker_server(), served_model="base")
    backend.score_markers(marker_request(adapter=None))
    assert body_of(seen[-1])["model"] == "base"
    named, seen = fake_backend(marker_server(), served_model="base", ranker_model="my-ranker")
    named.score_markers(marker_request())
    assert body_of(seen[-1])["model"] == "my-ranker"
    assert LLMConfig.model_validate({}).ranker_model == "recagent-ranker"


def test_ranker_model_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECAGENT_LLM_RANKER_MODEL", "ranker-v2")
    assert LLMConfig.from_env().ranker_model == "ranker-v2"


def test_score_markers_batch_keeps_order() -> None:
    backend, _ = fake_backend(marker_server(), served_model="m")
    requests = [marker_request(adapter=a) for a in ("/r", None, "/r", None)]
    results = backend.score_markers_batch(requests)
    assert results == [[-0.4, -0.8, -1.1]] * 4
    assert backend.usage.calls == 4
    assert backend.score_markers_batch([]) == []


def test_wrong_marker_count_is_an_llm_error_before_any_forward_pass() -> None:
    backend, seen = fake_backend(marker_server(), served_model="m")
    with pytest.raises(LLMError, match="3 marker tokens ' §', expected 5"):
        backend.score_markers(marker_request(expected=5))
    assert "/v1/completions" not in [r.url.path for r in seen]


@pytest.mark.parametrize("entries, match", [
    (lambda ids: None, "no usable prompt log-probs"),
    (lambda ids: [None] * (len(ids) - 1), "no usable prompt log-probs.*got 14 entries"),
    (lambda ids: [None] + [{"5": {"logprob": -1.0}}] * (len(ids) - 1), "position 4 do not hold the marker"),
    (lambda ids: [None] * len(ids), "position 4 do not hold the marker"),
])
def test_missing_prompt_logprobs_are_llm_errors(entries: Callable[[list[int]], Any], match: str) -> None:
    backend, _ = fake_backend(marker_server(entries), served_model="m")
    with pytest.raises(LLMError, match=match):
        backend.score_markers(marker_request())


def test_score_markers_refusals_become_llm_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            return httpx.Response(404, json={"error": {"message": "The model `recagent-ranker` does not exist."}})
        return marker_server()(request)

    backend, _ = fake_backend(handler, served_model="m")
    with pytest.raises(LLMError, match="HTTP 404.*recagent-ranker"):
        backend.score_markers(marker_request())
    multi, _ = fake_backend(marker_server(), served_model="m")
    with pytest.raises(LLMError, match="single-token"):
        multi.score_markers(MarkerRequest(messages=[{"role": "user", "content": "x"}], marker="two tokens",
                                          expected=1))


def test_server_command_and_environment(tmp_path: Path) -> None:
    cmd = server_command(tmp_path / "venv", tmp_path / "model", port=8123)
    assert cmd[:3] == [str(tmp_path / "venv" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    for flag in ("--enforce-eager", "--enable-prefix-caching", "--enable-prompt-tokens-details"):
        assert flag in cmd
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    env = server_env(tmp_path, base={"PYTHONPATH": "/x", "PATH": "/bin"})
    assert "PYTHONPATH" not in env and env["PATH"] == "/bin"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache") and env["HF_HUB_OFFLINE"] == "1"


def adapter_folder(folder: Path, r: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16, "peft_type": "LORA"}))
    return folder


def test_lora_args_serve_adapters_beside_the_base_model(tmp_path: Path) -> None:
    assert lora_args({}) == []
    small, big = adapter_folder(tmp_path / "small"), adapter_folder(tmp_path / "big", r=24)
    assert lora_args({"recagent-ranker": small}) == [
        "--enable-lora", "--max-loras", "1", "--max-lora-rank", "16", "--lora-modules", f"recagent-ranker={small}"]
    args = lora_args({"a": small, "b": big})
    assert args[args.index("--max-lora-rank") + 1] == "32" and args[-2:] == [f"a={small}", f"b={big}"]
    cmd = server_command(tmp_path / "venv", tmp_path / "model", extra_args=lora_args({"r": small}))
    assert cmd[-7:] == lora_args({"r": small})
    with pytest.raises(VLLMSetupError, match="no readable LoRA adapter"):
        lora_args({"x": tmp_path / "not-an-adapter"})


class FakeServer:
    """Stands in for :class:`VLLMServer` in the CLI: records its arguments, then a Ctrl-C."""

    made: list[FakeServer] = []

    def __init__(self, port: int, model_dir: Path, served_name: str = "", max_model_len: int = 0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.extra_args = list(extra_args)
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log_path = Path("vllm.log")
        self.stopped = False
        FakeServer.made.append(self)

    def start(self) -> None: ...

    def wait_ready(self, timeout: float) -> None: ...

    def running(self) -> bool:
        raise KeyboardInterrupt

    def stop(self) -> None:
        self.stopped = True


def test_llm_serve_serves_the_catalogues_trained_ranker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import agent.llm.vllm_server as vllm_server
    from agent.ranker.artifact import PROVENANCE
    from cli.main import app

    home = tmp_path / "home"
    monkeypatch.setenv("RECAGENT_HOME", str(home))
    monkeypatch.delenv("RECAGENT_RANKER", raising=False)
    monkeypatch.delenv("RECAGENT_LLM_RANKER_MODEL", raising=False)
    monkeypatch.setattr(vllm_server, "ensure_vllm_venv", lambda home=None: tmp_path / "venv")
    monkeypatch.setattr(vllm_server, "VLLMServer", FakeServer)
    manifest = home / "catalogs" / "cat" / "catalog" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"name": "cat", "content_hash": "abc"}))
    ranker = adapter_folder(home / "rankers" / "cat")
    (ranker / PROVENANCE).write_text(json.dumps({
        "catalog": "cat", "content_hash": "abc", "prompt": "rerank_trained.v1", "marker": MARKER,
        "base_model": "SmolLM2-135M-Instruct", "command": "recagent train ranker", "commit": "x", "seed": 0,
        "split": {}, "choices": {"alpha": 0.5, "window": 20}, "created": "2026-01-01T00:00:00Z"}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def serve(*args: str) -> tuple[str, list[str]]:
        FakeServer.made.clear()
        result = CliRunner(env={"COLUMNS": "4000"}).invoke(
            app, ["llm", "serve", "--port", str(free_port()), "--model", str(model), "--catalog", "cat", *args])
        assert result.exit_code == 0, result.output
        assert len(FakeServer.made) == 1 and FakeServer.made[0].stopped
        return result.output, FakeServer.made[0].extra_args

    output, extra = serve()
    assert extra == lora_args({"recagent-ranker": ranker})
    assert "RECAGENT_LLM_RANKER_MODEL=recagent-ranker" in output and "RECAGENT_LLM=openai" in output
    output, extra = serve("--no-ranker")
    assert extra == [] and "RECAGENT_LLM_RANKER_MODEL" not in output
    monkeypatch.setenv("RECAGENT_LLM_RANKER_MODEL", "mine")
    output, extra = serve()
    assert f"mine={ranker}" in extra and "RECAGENT_LLM_RANKER_MODEL=mine" in output
    monkeypatch.setenv("RECAGENT_RANKER", "zero-shot")  # the reranker would not use it: neither is it served
    output, extra = serve()
    assert extra == [] and "no trained ranker" in output


def test_venv_marker_and_server_refusals(tmp_path: Path) -> None:
    venv = tmp_path / "vllm-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    assert not venv_ready(venv)
    (venv / MARKER_NAME).write_text("something older\n")
    assert not venv_ready(venv)
    with pytest.raises(VLLMSetupError, match="config.json"):
        VLLMServer(free_port(), tmp_path / "no-model", home=tmp_path, venv=venv).start()
    with pytest.raises(VLLMSetupError, match="no vLLM venv"):
        VLLMServer(free_port(), tmp_path, home=tmp_path, venv=tmp_path / "missing").start()


# --- integration: a real vLLM server (marker vllm) ---------------------------------------------------------


@pytest.fixture
def live(vllm_server: VLLMServer) -> Iterator[OpenAIBackend]:
    backend = OpenAIBackend(LLMConfig(backend="openai", url=vllm_server.url, timeout_s=120))
    yield backend
    backend.close()


MOVIES = [{"role": "system", "content": "You recommend movies."},
          {"role": "user", "content": "I loved Toy Story and Babe. Which is best for me next?\n"
                                      "A. Heat\nB. Aladdin\nC. Casino\nD. The Lion King\nE. Seven\n"
                                      "Answer with one letter."}]


@pytest.mark.vllm
def test_live_score_labels(live: OpenAIBackend, vllm_server: VLLMServer) -> None:
    assert live.model_name == vllm_server.served_name
    request = ScoreRequest(messages=MOVIES, answer_prefix="Answer: ", labels=list("ABCDE"))  # type: ignore[arg-type]
    scores = live.score_labels(request)
    assert len(scores) == 5 and all(math.isfinite(s) for s in scores)
    assert math.isclose(sum(math.exp(s) for s in scores), 1.0, abs_tol=1e-6)
    assert max(scores) > MISSING_LOGPROB / 2
    batch = live.score_labels_batch([request, ScoreRequest(messages=MOVIES, answer_prefix="",  # type: ignore[arg-type]
                                                           labels=list("AB"))])
    assert [len(b) for b in batch] == [5, 2]
    assert live.usage.by_kind["score"] == 3 and live.usage.prompt_tokens > 0


class Pick(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Literal["1", "50", "181"]] = Field(min_length=1, max_length=2)


@pytest.mark.vllm
def test_live_generate_json_follows_the_schema(live: OpenAIBackend) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["ids"],
              "properties": {"ids": {"type": "array", "minItems": 1, "maxItems": 2,
                                     "items": {"type": "string", "enum": ["1", "50", "181"]}}}}
    messages = [{"role": "user", "content": "Items: 1 Toy Story, 50 Star Wars, 181 Return of the Jedi. "
                                            "Reply with JSON listing the ids to recommend."}]
    text = live.generate_json(messages, schema, max_tokens=64)  # type: ignore[arg-type]
    Pick.model_validate_json(text)


@pytest.mark.vllm
def test_live_stream_text_and_count_tokens(live: OpenAIBackend) -> None:
    pieces = list(live.stream_text([{"role": "user", "content": "Say hello."}], max_tokens=8))
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert live.usage.by_kind.get("text") == 1 and live.usage.completion_tokens > 0
    assert live.count_tokens("Hello world, how are you?") > 0
    assert live.label_token_id("A") != live.label_token_id("B")


@pytest.mark.vllm
def test_live_complete_continues_the_answer_prefix(live: OpenAIBackend) -> None:
    request = TextRequest(messages=MOVIES, answer_prefix="Answer: B. Aladdin, because", max_tokens=24,  # type: ignore[arg-type]
                          stop=("\n", "."))
    text = live.complete(request)
    assert text.strip() and "\n" not in text and "." not in text and not text.startswith("Answer")
    assert live.complete(request) == text  # greedy
    assert live.usage.by_kind == {"reason": 2} and live.usage.completion_tokens > 0
    short = TextRequest(messages=MOVIES, answer_prefix="Answer:", max_tokens=1, stop=())  # type: ignore[arg-type]
    done = dict(live.complete_batch([request, short, request]))
    assert sorted(done) == [0, 1, 2] and done[0].strip() and done[2].strip()
    assert 0 < len(done[1]) <= 12  # one token
    assert live.usage.by_kind == {"reason": 5}


@pytest.mark.vllm
def test_live_error_paths(vllm_server: VLLMServer) -> None:
    closed = OpenAIBackend(LLMConfig(backend="openai", url=f"http://127.0.0.1:{free_port()}/v1", timeout_s=5))
    with pytest.raises(LLMError, match="cannot reach"):
        closed.score_labels(letters_request(2))
    impatient = OpenAIBackend(LLMConfig(backend="openai", url=vllm_server.url, timeout_s=0.01,
                                        served_model=vllm_server.served_name))
    with pytest.raises(LLMError, match="timed out"):
        impatient.generate_text([{"role": "user", "content": "Tell me a long story."}], max_tokens=64)
    wrong = OpenAIBackend(LLMConfig(backend="openai", url=vllm_server.url, served_model="no-such-model"))
    with pytest.raises(LLMError, match="HTTP 404"):
        wrong.generate_json([{"role": "user", "content": "hi"}], {"type": "object"}, max_tokens=4)
    live = OpenAIBackend(LLMConfig(backend="openai", url=vllm_server.url))
    with pytest.raises(LLMError, match="single-token"):
        live.label_token_id("Return of the Jedi")


def test_complete_bans_one_token_words_through_logit_bias_tokenizing_each_word_once() -> None:
    backend, seen = fake_backend(vllm_like(content=" a drama."), served_model="m")
    request = TextRequest(messages=[{"role": "user", "content": "Why Casablanca?"}], answer_prefix="It is",
                          banned=("war", "love story"))
    assert backend.complete(request) == backend.complete(request) == " a drama."
    chats = [body_of(r) for r in seen if r.url.path == "/v1/chat/completions"]
    # "war" is one token (id 1000 under the fake tokenizer); "love story" is two, left to the caller's checks
    assert [c["logit_bias"] for c in chats] == [{"1000": -100}] * 2
    assert sum(r.url.path == "/tokenize" for r in seen) == 8  # 4 variants of each word, once
    backend.complete(reason_request())  # nothing banned: no bias sent
    assert "logit_bias" not in body_of(seen[-1])
    backend.complete(replace(reason_request(), no_digits=True))  # the digits "0" to "9", one token each here
    assert body_of(seen[-1])["logit_bias"] == {"1000": -100}
    assert sum(r.url.path == "/tokenize" for r in seen) == 18


def test_without_tokenize_banned_words_are_left_to_the_checks() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return chat_reply(" a war film.") if request.url.path == "/v1/chat/completions" else httpx.Response(404)

    backend, seen = fake_backend(handler, served_model="m")
    request = TextRequest(messages=[{"role": "user", "content": "Why Heat?"}], answer_prefix="It is",
                          banned=("war",))
    assert backend.complete(request) == " a war film."
    assert "logit_bias" not in body_of(seen[-1])
    backend.complete(request)
    assert sum(r.url.path == "/tokenize" for r in seen) == 1  # the missing endpoint is remembered
