"""The object the HTTP routes call: the recommender service and the chat agent behind a bounded work queue.

* LLM work runs on a fixed pool of threads (``workers``) fed by a bounded queue (``queue_size``); a full
  queue raises :class:`QueueFullError` (HTTP 429 with Retry-After).
* Every LLM request carries a deadline: a job that starts late skips the LLM (the reranker checks the
  deadline), and a caller still waiting at the deadline gets the retrieval order, flagged ``degraded``.
* :class:`BatchingBackend` merges ``score`` requests that reach the in-process model together into one padded
  forward pass (micro-batching); it computes only the last position's logits.
* Prometheus metrics live in a registry of their own (one per app).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.api_models import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatItem,
    ChatRequest,
    ChatResponse,
    Choice,
    CompletionUsage,
    Item,
    Readiness,
    RecommendationRequest,
    RecommendationResponse,
    RerankRequest,
    RerankResponse,
    SearchHit,
    SearchResponse,
)
from agent.llm.base import ChatMessage, LLMBackend, LLMError, MarkerRequest, ScoreRequest
from agent.schemas import RecommendationAnswer
from agent.service import FreeItem, RecommenderService
from agent.settings import Settings
from retrieval.filters import Filters

if TYPE_CHECKING:
    from agent.chat.agent import ChatAgent

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The request id of the request being served (set by the app's middleware, copied into worker threads).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: The monotonic deadline of the LLM job running in this thread (read by the batcher to drop stale work).
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
#: At most this many earlier user messages (the latest) are replayed to rebuild a /v1/chat/completions
#: conversation sent without ``session_id``.
MAX_REPLAYED_TURNS = 20


# --- errors the edge turns into HTTP answers ----------------------------------------------------------------
class ServiceError(Exception):
    status = 400
    type = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequestError(ServiceError):
    status = 422
    type = "invalid_request"


class PayloadTooLargeError(ServiceError):
    status = 413
    type = "payload_too_large"


class QueueFullError(ServiceError):
    status = 429
    type = "overloaded"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the work queue is full; retry in {retry_after}s")
        self.retry_after = retry_after


class NotReadyError(ServiceError):
    status = 503
    type = "unavailable"


# --- metrics ------------------------------------------------------------------------------------------------
class _UsageCollector(Collector):
    """LLM token counters read from the backend's running usage at scrape time."""

    def __init__(self, backend: Callable[[], LLMBackend | None]) -> None:
        self.backend = backend

    def collect(self) -> Iterator[CounterMetricFamily]:
        tokens = CounterMetricFamily("recagent_llm_tokens", "LLM tokens processed", labels=["kind"])
        calls = CounterMetricFamily("recagent_llm_calls", "LLM calls", labels=["kind"])
        backend = self.backend()
        if backend is not None:
            usage = backend.usage
            tokens.add_metric(["prompt"], usage.prompt_tokens)
            tokens.add_metric(["completion"], usage.completion_tokens)
            tokens.add_metric(["cached_prompt"], usage.cached_prompt_tokens)
            for kind, n in sorted(usage.by_kind.items()):
                calls.add_metric([kind], n)
        yield tokens
        yield calls


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "recagent_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "recagent_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60),
            registry=r,
        )
        self.degraded = Counter(
            "recagent_degraded_answers", "answers flagged degraded", ["route", "cause"], registry=r
        )
        self.rejected = Counter(
            "recagent_queue_rejected", "requests refused because the work queue was full", registry=r
        )
        self.queue_depth = Gauge("recagent_queue_depth", "LLM jobs waiting or running", registry=r)
        self.job_seconds = Histogram(
            "recagent_llm_job_seconds",
            "time of one LLM job (queue excluded)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60),
            registry=r,
        )
        self.batch_size = Histogram(
            "recagent_llm_score_batch_size",
            "score prompts per forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )

    def watch_usage(self, backend: Callable[[], LLMBackend | None]) -> None:
        self.registry.register(_UsageCollector(backend))


# --- micro-batching -----------------------------------------------------------------------------------------
@dataclass
class _Pending:
    requests: list[ScoreRequest]
    deadline: float | None = None
    future: Future[list[list[float]]] = field(default_factory=Future)


class BatchingBackend(LLMBackend):
    """Wraps the in-process transformers backend: ``score`` requests arriving within ``window_ms`` of
    each other (from different worker threads) share one left-padded forward pass. A lone request takes the
    backend's own path (its static-prefix KV cache). Everything else is delegated."""

    name = "batching"

    def __init__(
        self,
        inner: LLMBackend,
        window_ms: float = 4.0,
        max_batch: int = 8,
        on_batch: Callable[[int], None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        super().__init__()
        if not self.supports(inner):
            raise TypeError(f"backend {inner.name!r} cannot be micro-batched")
        self.inner: Any = inner
        self.usage = inner.usage
        self.window_s = window_ms / 1000
        self.max_batch = max_batch
        self.on_batch = on_batch
        #: how many LLM jobs are running now (the work queue's count): the batcher stops waiting for company
        #: once that many requests have arrived, and does not wait at all for a lone request
        self.in_flight = in_flight
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="score-batcher", daemon=True)
        self._thread.start()

    @staticmethod
    def supports(backend: LLMBackend) -> bool:
        return all(
            hasattr(backend, a)
            for a in ("model", "tokenizer", "render", "label_id", "torch", "_lock", "threads_for")
        )

    @property
    def model_name(self) -> str:
        return str(self.inner.model_name)

    def score_labels(self, request: ScoreRequest) -> list[float]:
        return self.score_labels_batch([request])[0]

    def score_labels_batch(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        if not requests:
            return []
        pending = _Pending(list(requests), deadline=deadline_var.get())
        self._queue.put(pending)
        return pending.future.result()

    def score_markers(self, request: MarkerRequest) -> list[float]:
        """A trained ranker's pass (one prompt scores the whole window): not micro-batched, the backend's own
        path with its prefix cache."""
        return list(self.inner.score_markers(request))

    def generate_json(
        self,
        messages: list[ChatMessage],
        schema: dict[str, Any],
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> str:
        return str(self.inner.generate_json(messages, schema, max_tokens=max_tokens, temperature=temperature))

    def stream_text(
        self, messages: list[ChatMessage], max_tokens: int = 256, temperature: float = 0.0
    ) -> Iterator[str]:
        yield from self.inner.stream_text(messages, max_tokens=max_tokens, temperature=temperature)

    def count_tokens(self, text: str) -> int:
        return int(self.inner.count_tokens(text))

    def close(self) -> None:
        self._queue.put(None)
        self.inner.close()

    # -- the batcher thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            size = len(first.requests)
            # wait for company: each arrival extends the window, up to 5 windows after the first request; no
            # wait once every running job has sent its request
            start = time.monotonic()
            until = start + self.window_s
            while size < self.max_batch and len(group) < self._expected():
                remaining = until - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                group.append(nxt)
                size += len(nxt.requests)
                until = min(time.monotonic() + self.window_s, start + 5 * self.window_s)
            self._run(group)

    def _expected(self) -> int:
        """Callers worth waiting for: the running LLM jobs when known, else as many as a batch holds."""
        return self.max_batch if self.in_flight is None else max(1, self.in_flight())

    def _run(self, group: list[_Pending]) -> None:
        now = time.monotonic()
        for p in group:  # callers past their deadline already got the retrieval order: skip their work
            if p.deadline is not None and p.deadline <= now:
                p.future.set_exception(LLMError("deadline exceeded before the forward pass"))
        group = [p for p in group if not p.future.done()]
        if not group:
            return
        flat = [r for p in group for r in p.requests]
        try:
            results = self.forward(flat)
        except Exception as exc:  # each waiting caller sees the failure (the reranker degrades)
            for p in group:
                p.future.set_exception(
                    exc if isinstance(exc, LLMError) else LLMError(f"batched score failed: {exc}")
                )
            return
        if self.on_batch is not None:
            self.on_batch(len(flat))
        start = 0
        for p in group:
            p.future.set_result(results[start : start + len(p.requests)])
            start += len(p.requests)

    def forward(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Label log-probabilities of each request from one left-padded forward pass (last position only)."""
        inner = self.inner
        if len(requests) == 1:
            return [inner.score_labels(requests[0])]
        torch = inner.torch
        seqs = [inner.render(r.messages, r.answer_prefix) for r in requests]
        labels = [[inner.label_id(label) for label in r.labels] for r in requests]
        width = max(len(s) for s in seqs)
        pad = inner.tokenizer.pad_token_id
        pad = inner.tokenizer.eos_token_id if pad is None else pad
        ids = torch.tensor([[pad or 0] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with inner._lock, inner.threads_for(int(mask.sum())), torch.inference_mode():
            out = inner.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1
            )
        logits = out.logits[:, -1].float()
        for s in seqs:
            inner.usage.add("score", len(s), 0)
        results = []
        for row, label_ids in enumerate(labels):
            chosen = logits[row, label_ids]
            results.append([float(x) for x in torch.log_softmax(chosen, dim=-1)])
        return results


# --- the work queue -----------------------------------------------------------------------------------------
class WorkQueue:
    """A fixed thread pool with a bound on jobs waiting or running; full -> :class:`QueueFullError`."""

    def __init__(self, workers: int, size: int, metrics: Metrics, name: str = "llm") -> None:
        self.workers = workers
        self.size = size
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._pending = 0
        self._lock = threading.Lock()
        self._mean_job_s = 1.0
        metrics.queue_depth.set_function(lambda: self._pending)

    @property
    def depth(self) -> int:
        return self._pending

    @property
    def running(self) -> int:
        """Jobs on a worker now (the rest of ``depth`` waits for one)."""
        return min(self._pending, self.workers)

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_job_s * self._pending / self.workers))

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        with self._lock:
            if self._pending >= self.size + self.workers:
                self.metrics.rejected.inc()
                raise QueueFullError(self.retry_after())
            self._pending += 1
        ctx = contextvars.copy_context()

        def job() -> T:
            t0 = time.perf_counter()
            try:
                return ctx.run(fn)
            finally:
                took = time.perf_counter() - t0
                self.metrics.job_seconds.observe(took)
                with self._lock:
                    self._pending -= 1
                    self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * took

        try:
            return asyncio.get_running_loop().run_in_executor(self.executor, job)
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# --- the runtime --------------------------------------------------------------------------------------------
def chat_available() -> bool:
    try:
        import agent.chat.agent  # noqa: F401
    except ImportError:
        return False
    return True


class Runtime:
    """Thin async facade over :class:`RecommenderService` and the chat agent, used by the HTTP routes."""

    def __init__(
        self,
        service: RecommenderService,
        settings: Settings | None = None,
        chat: ChatAgent | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.service = service
        self.metrics = metrics or Metrics()
        self.plain = RecommenderService(service.index, backend=None, n_candidates=service.n_candidates)
        self.queue = WorkQueue(self.settings.workers, self.settings.queue_size, self.metrics)
        if isinstance(service.backend, BatchingBackend) and service.backend.in_flight is None:
            service.backend.in_flight = lambda: self.queue.running
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="io")
        self.chat_agent = chat
        self.metrics.watch_usage(lambda: self.service.backend)
        self._warm_up()

    def _warm_up(self) -> None:
        """Load the query embedder now (its lazy load is not thread-safe, and the io threads would race) and the
        trained ranker, if one is in use."""
        embedder = getattr(self.service.index, "embedder", None)
        if embedder is not None:
            try:
                _ = embedder.model
            except Exception as exc:  # search degrades later with a clear error; serving still starts
                logger.warning("embedder warm-up failed error=%s", exc)
        if self.service.reranker is not None:
            self.service.reranker.warm_up()

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, settings: Settings, metrics: Metrics | None = None) -> Runtime:
        """Load the catalogue, its index and (unless ``llm`` is 'none') the LLM; wire the chat agent."""
        from agent.service import build_service

        metrics = metrics or Metrics()
        backend: LLMBackend | None = None
        if settings.use_llm:
            from agent.llm.config import LLMConfig
            from agent.llm.registry import make_backend

            backend = make_backend(LLMConfig.from_env().model_copy(update={"backend": settings.llm}))
            if settings.micro_batch and settings.workers > 1 and BatchingBackend.supports(backend):
                backend = BatchingBackend(
                    backend, settings.batch_window_ms, settings.max_batch, on_batch=metrics.batch_size.observe
                )
        service = build_service(settings.catalog, use_llm=settings.use_llm, backend=backend)
        runtime = cls(service, settings, metrics=metrics)
        runtime.chat_agent = runtime.make_chat()
        return runtime

    def make_chat(self) -> ChatAgent | None:
        if not chat_available():
            logger.warning("chat agent unavailable: agent.chat.agent cannot be imported")
            return None
        from pathlib import Path

        from agent.chat.agent import ChatAgent
        from agent.chat.state import SessionStore

        path = Path(self.settings.chat_sessions_path) if self.settings.chat_sessions_path else None
        return ChatAgent(self.service, SessionStore(path=path, ttl_s=self.settings.chat_session_ttl_s))

    def close(self) -> None:
        self.queue.shutdown()
        self.io.shutdown(wait=False, cancel_futures=True)

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def catalog_name(self) -> str:
        return self.service.catalog.name

    @property
    def llm_enabled(self) -> bool:
        return self.service.reranker is not None

    async def _io(self, fn: Callable[[], T]) -> T:
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.io, ctx.run, fn)

    def _deadline_s(self, requested: float | None) -> float:
        limit = self.settings.deadline_s
        return limit if requested is None else min(limit, requested)

    async def _with_deadline(
        self,
        route: str,
        llm_job: Callable[[float], RecommendationAnswer],
        fallback: Callable[[], RecommendationAnswer],
        timeout_s: float,
    ) -> RecommendationAnswer:
        """Run ``llm_job(deadline)`` on the work queue; past the deadline answer ``fallback()`` flagged."""
        deadline = time.monotonic() + timeout_s
        def job() -> RecommendationAnswer:
            deadline_var.set(deadline)
            return llm_job(deadline)

        future = self.queue.submit(job)
        try:
            answer = await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        except TimeoutError:
            answer = await self._io(fallback)
            answer.degraded = True
            answer.reason = f"deadline exceeded ({timeout_s:g}s): retrieval order"
            answer.model = self.service.backend.model_name if self.service.backend else None
            logger.warning(
                "deadline exceeded route=%s request_id=%s timeout_s=%g",
                route,
                request_id_var.get(),
                timeout_s,
            )
        if answer.degraded:
            cause = "deadline" if answer.reason and "deadline" in answer.reason else "llm_error"
            self.metrics.degraded.labels(route=route, cause=cause).inc()
        return answer

    def _check_filters(self, filters: Filters | None) -> Filters | None:
        if filters is None:
            return None
        try:
            return filters.canonical(self.service.catalog.all_genres)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), field="filters") from None

    # -- recommendations -------------------------------------------------------------------------------------
    async def recommend(self, req: RecommendationRequest) -> RecommendationResponse:
        if req.history is not None and len(req.history) > self.settings.max_history:
            raise PayloadTooLargeError(
                f"history has {len(req.history)} items; at most {self.settings.max_history}", field="history"
            )
        filters = self._check_filters(req.filters)
        if req.history is not None:
            history = list(req.history)
        else:
            assert req.user_id is not None
            history = await self._io(lambda: self.service.user_history(str(req.user_id)))
        query = req.query if req.query and req.query.strip() else None
        use_llm = req.mode != "retrieval" and self.llm_enabled

        def plain() -> RecommendationAnswer:
            return self.plain.recommend(
                history, k=req.k, filters=filters, query=query, use_llm=False, exclude=req.exclude
            )

        if not use_llm:
            answer = await self._io(plain)
            if req.mode != "retrieval":  # the LLM was asked for but is not configured
                answer.mode = req.mode
        else:

            def job(deadline: float) -> RecommendationAnswer:
                return self.service.recommend(
                    history,
                    k=req.k,
                    filters=filters,
                    query=query,
                    use_llm=True,
                    explain=req.explain,
                    mode=req.mode,
                    exclude=req.exclude,
                    deadline=deadline,
                )

            answer = await self._with_deadline("recommendations", job, plain, self._deadline_s(req.timeout_s))
        return RecommendationResponse(**answer.model_dump(), user_id=req.user_id, catalog=self.catalog_name)

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        if len(req.history) > self.settings.max_history:
            raise PayloadTooLargeError(
                f"history has {len(req.history)} items; at most {self.settings.max_history}", field="history"
            )
        if len(req.candidates) > self.settings.max_candidates:
            raise PayloadTooLargeError(
                f"{len(req.candidates)} candidates; at most {self.settings.max_candidates}",
                field="candidates",
            )
        unknown = [h for h in req.history if not self.service.catalog.has_item(h)]
        if unknown:
            from retrieval.candidates import UnknownItemsError

            raise UnknownItemsError(unknown, self.catalog_name, field="history")
        candidates: list[str | FreeItem] = [
            c if isinstance(c, str) else FreeItem(id=c.id, title=c.title, text=c.text) for c in req.candidates
        ]
        use_llm = req.mode != "retrieval" and self.llm_enabled

        def plain() -> RecommendationAnswer:
            return self.plain.rerank(req.history, candidates, k=req.k)

        if not use_llm:
            answer = await self._io(plain)
            if req.mode != "retrieval":
                answer.mode = req.mode
        else:

            def job(deadline: float) -> RecommendationAnswer:
                return self.service.rerank(
                    req.history, candidates, k=req.k, explain=req.explain, mode=req.mode, deadline=deadline
                )

            answer = await self._with_deadline("rerank", job, plain, self._deadline_s(req.timeout_s))
        return RerankResponse(**answer.model_dump(), catalog=self.catalog_name)

    # -- items -----------------------------------------------------------------------------------------------
    async def item(self, item_id: str) -> Item:
        return Item.model_validate(await self._io(lambda: self.service.item(item_id)))

    async def search(self, query: str, k: int, genres: list[str]) -> SearchResponse:
        filters = self._check_filters(Filters(genres=genres)) if genres else None
        hits = await self._io(lambda: self.service.search(query, k=k, filters=filters))
        return SearchResponse(query=query, items=[SearchHit.model_validate(h) for h in hits])

    # -- chat ------------------------------------------------------------------------------------------------
    def _agent(self) -> ChatAgent:
        if self.chat_agent is None:
            raise NotReadyError("the chat agent is not available on this server")
        return self.chat_agent

    @staticmethod
    def _chat_response(turn: Any) -> ChatResponse:
        return ChatResponse.model_validate(turn.model_dump() if hasattr(turn, "model_dump") else turn)

    def _degraded_chat(self, session_id: str | None, reason: str) -> ChatResponse:
        self.metrics.degraded.labels(
            route="chat", cause="deadline" if "deadline" in reason else "llm_error"
        ).inc()
        return ChatResponse(
            session_id=session_id or "",
            reply="Sorry, I could not finish that answer in time. Please try again.",
            degraded=True,
            reason=reason,
            decided_by="server",
        )

    @staticmethod
    def _session(agent: ChatAgent, req: ChatRequest, replay: Sequence[str]) -> str | None:
        """The session ``req`` continues: its own, or a new one that has answered ``replay`` (replies dropped)."""
        session = req.session_id
        for message in replay:
            session = agent.respond(session, message, user_id=req.user_id).session_id
        return session

    async def chat(self, req: ChatRequest, replay: Sequence[str] = ()) -> ChatResponse:
        """One chat turn; ``replay`` (user messages, oldest first) is sent to a new session first."""
        agent = self._agent()
        future = self.queue.submit(
            lambda: agent.respond(self._session(agent, req, replay), req.message, user_id=req.user_id)
        )
        try:
            turn = await asyncio.wait_for(asyncio.shield(future), timeout=self.settings.chat_deadline_s)
        except TimeoutError:
            return self._degraded_chat(
                req.session_id, f"deadline exceeded ({self.settings.chat_deadline_s:g}s)"
            )
        except LLMError as exc:
            return self._degraded_chat(req.session_id, f"LLM failed: {exc}"[:300])
        response = self._chat_response(turn)
        if response.degraded:
            self.metrics.degraded.labels(route="chat", cause="agent").inc()
        return response

    async def chat_stream(
        self, req: ChatRequest, replay: Sequence[str] = ()
    ) -> AsyncIterator[str | ChatResponse]:
        """Reply pieces, then the final :class:`ChatResponse` (``replay`` as in :meth:`chat`). Errors before the
        first piece propagate (so the edge can answer 404/429); the caller should ``await anext()`` once before
        starting a response."""
        agent = self._agent()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def work() -> None:
            try:
                session = self._session(agent, req, replay)
                for piece in agent.respond_stream(session, req.message, user_id=req.user_id):
                    loop.call_soon_threadsafe(pieces.put_nowait, ("piece", piece))
            except BaseException as exc:
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", exc))
            else:
                loop.call_soon_threadsafe(pieces.put_nowait, ("end", None))

        self.queue.submit(work)
        until = time.monotonic() + self.settings.chat_deadline_s
        while True:
            try:
                kind, value = await asyncio.wait_for(pieces.get(), timeout=max(0.0, until - time.monotonic()))
            except TimeoutError:
                yield self._degraded_chat(
                    req.session_id, f"deadline exceeded ({self.settings.chat_deadline_s:g}s)"
                )
                return
            if kind == "end":
                return
            if kind == "error":
                if isinstance(value, LLMError):
                    yield self._degraded_chat(req.session_id, f"LLM failed: {value}"[:300])
                    return
                raise value
            if isinstance(value, str):
                yield value
            else:
                response = self._chat_response(value)
                if response.degraded:
                    self.metrics.degraded.labels(route="chat", cause="agent").inc()
                yield response

    # -- OpenAI-compatible facade ----------------------------------------------------------------------------
    def completion_turn(self, req: ChatCompletionRequest) -> tuple[ChatRequest, list[str]]:
        """The chat turn a completion request asks for (its last user message), and the user messages to replay
        before it.

        Conversation state is never looked up by message content. With ``session_id`` the turn continues that
        session, as ``/v1/chat`` does, and nothing is replayed. Without it the state is rebuilt from the request
        alone: a new session (a fresh random id, returned as ``session_id``) is sent the earlier user messages
        in order, at most the last :data:`MAX_REPLAYED_TURNS`, their replies discarded, and then the turn.
        Assistant messages are ignored: the client's copy of the replies is not state.
        """
        convo: list[tuple[str, str]] = [(m.role, m.text()) for m in req.messages]
        last_user = max((i for i, (role, _) in enumerate(convo) if role == "user"), default=None)
        if last_user is None:
            raise InvalidRequestError("messages: no user message", field="messages")
        message = convo[last_user][1].strip()
        if not message:
            raise InvalidRequestError("the last user message is empty", field=f"messages.{last_user}.content")
        if len(message) > 4000:
            raise PayloadTooLargeError(
                "the last user message is longer than 4000 characters", field=f"messages.{last_user}.content"
            )
        replay: list[str] = []
        if req.session_id is None:
            earlier = [text.strip() for role, text in convo[:last_user] if role == "user"]
            replay = [text for text in earlier if text][-MAX_REPLAYED_TURNS:]
        return ChatRequest(session_id=req.session_id, user_id=req.user, message=message), replay

    def completion_response(self, resp: ChatResponse, model: str, message: str) -> ChatCompletionResponse:
        backend = self.service.backend

        def count(text: str) -> int:
            return backend.count_tokens(text) if backend is not None else len(text.split())

        prompt, completion = count(message), count(resp.reply)
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=model,
            choices=[Choice(message=AssistantMessage(content=resp.reply))],
            usage=CompletionUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
            recommendations=[ChatItem.model_validate(i.model_dump()) for i in resp.items],
            session_id=resp.session_id,
            degraded=resp.degraded,
        )

    async def completion(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        turn, replay = self.completion_turn(req)
        resp = await self.chat(turn, replay)
        return self.completion_response(resp, req.model or "recagent", turn.message)

    # -- health ----------------------------------------------------------------------------------------------
    def readiness(self) -> Readiness:
        backend = self.service.backend
        llm_ok = backend is not None and self.service.reranker is not None
        return Readiness(
            ready=(llm_ok or not self.settings.use_llm),
            catalog=self.catalog_name,
            index=True,
            llm=llm_ok,
            llm_required=self.settings.use_llm,
            model=backend.model_name if backend is not None else None,
            chat=self.chat_agent is not None,
            queue_depth=self.queue.depth,
            serving=self.serving_settings(),
        )

    def serving_settings(self) -> dict[str, str | int | float | bool]:
        s = self.settings
        out: dict[str, str | int | float | bool] = {
            "llm": s.llm, "workers": s.workers, "queue_size": s.queue_size, "deadline_s": s.deadline_s,
            "micro_batch": isinstance(self.service.backend, BatchingBackend), "batch_window_ms": s.batch_window_ms,
            "max_batch": s.max_batch}
        config = getattr(getattr(self.service.backend, "inner", self.service.backend), "config", None)
        if config is not None and hasattr(config, "thread_policy"):
            out.update(llm_threads=config.threads, llm_thread_policy=config.thread_policy)
        return out
