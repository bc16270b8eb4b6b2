"""The OpenAI-compatible backend: its logic against a fake transport, then (marker ``vllm``) a real vLLM
server."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from agent.llm.base import LLMError, ScoreRequest
from agent.llm.config import LLMConfig
from agent.llm.openai_backend import MISSING_LOGPROB, OpenAIBackend, log_softmax
from agent.llm.registry import make_backend
from agent.llm.vllm_server import (
    MARKER_NAME,
    VLLMServer,
    VLLMSetupError,
    free_port,
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
    backend = make_backend(LLMConfig(backend="openai", url="http://127.0.0.1:1/v1"))
    assert isinstance(backend, OpenAIBackend)
    assert backend.name == "openai"
    assert backend.root_url == "http://127.0.0.1:1"
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
