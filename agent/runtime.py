"""The object the HTTP routes call: the recommender service and the chat agent behind bounded work queues.

* LLM work runs on fixed pools of threads fed by bounded queues (:mod:`agent.work_queue`); a full queue raises
  :class:`~agent.errors.QueueFullError` (HTTP 429 with Retry-After).
* Every LLM request carries a deadline: a job that starts late skips the LLM (the reranker checks the
  deadline), and a caller still waiting at the deadline gets the retrieval order, flagged ``degraded``.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from agent.answers import Event, Lanes, answer_events, rank_with_deadline, run_io
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
from agent.errors import InvalidRequestError, NotReadyError, PayloadTooLargeError, QueueFullError
from agent.explain import Reason
from agent.index_watch import IndexWatcher
from agent.llm.base import LLMBackend, LLMError
from agent.llm.batching import BatchingBackend
from agent.metrics import Metrics
from agent.schemas import RecommendationAnswer
from agent.service import FreeItem, Ranked, RecommenderService
from agent.settings import Settings
from agent.work_queue import WorkQueue
from retrieval.filters import Filters

if TYPE_CHECKING:
    from agent.chat.agent import ChatAgent
    from agent.chat.models import TurnItems
    from agent.index_watch import ReloadResult
    from retrieval.index import Index

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The request id of the request being served (set by the app's middleware, copied into worker threads).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: At most this many earlier user messages (the latest) are replayed to rebuild a /v1/chat/completions
#: conversation sent without ``session_id``.
MAX_REPLAYED_TURNS = 20


# --- the runtime --------------------------------------------------------------------------------------------
def chat_available() -> bool:
    try:
        import agent.chat.agent  # noqa: F401
    except ImportError:
        return False
    return True


async def _final(events: AsyncIterator[Event]) -> RecommendationAnswer:
    """The answer of the ``done`` event."""
    async for event in events:
        if event.kind == "done" and event.answer is not None:
            return event.answer
    raise RuntimeError("an answer stream ended without its done event")


def serving_backend(backend: LLMBackend, settings: Settings, metrics: Metrics) -> LLMBackend:
    """``backend`` as the server runs it: micro-batched (:class:`BatchingBackend`) when the settings ask for it
    and the backend allows it."""
    if settings.micro_batch and settings.workers > 1 and BatchingBackend.supports(backend):
        return BatchingBackend(backend, settings.batch_window_ms, settings.max_batch,
                               on_batch=metrics.batch_size.observe)
    return backend


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
        self.queue = WorkQueue(self.settings.workers, self.settings.queue_size, self.metrics, name="score")
        self.explain_queue = WorkQueue(self.settings.explain_workers, self.settings.queue_size, self.metrics,
                                       name="explain")
        if isinstance(service.backend, BatchingBackend) and service.backend.in_flight is None:
            service.backend.in_flight = lambda: self.queue.running_foreground
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="io")
        self.lanes = Lanes(score=self.queue, explain=self.explain_queue, io=self.io, service=service,
                           plain=self.plain, metrics=self.metrics)
        self.chat_agent = chat
        self.metrics.watch_usage(lambda: self.service.backend)
        self.watcher = IndexWatcher(service.catalog.name, lambda: self.service.index, self.swap_index,
                                    interval_s=self.settings.index_watch_s, grace_s=self.settings.index_grace_s)
        self._warm_up()

    def _warm_up(self) -> None:
        """Load the query embedder and its runtime now (not on a request thread) and the trained ranker, if one is
        in use."""
        embedder = getattr(self.service.index, "embedder", None)
        if embedder is not None:
            try:
                embedder.warm_up()
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

            backend = serving_backend(make_backend(LLMConfig.from_env().model_copy(update={"backend": settings.llm})),
                                      settings, metrics)
        service = build_service(settings.catalog, use_llm=settings.use_llm, backend=backend)
        runtime = cls(service, settings, metrics=metrics)
        runtime.chat_agent = runtime.make_chat()
        runtime.watcher.start()
        return runtime

    def swap_index(self, index: Index) -> None:
        """Serve ``index`` from now on (same LLM, same session store). The new services are built and warmed up
        first, then swapped in one step; requests already running finish on the ones they started with."""
        from agent.service import RecommenderService

        service = RecommenderService(index, backend=self.service.backend)
        plain = RecommenderService(index, backend=None, n_candidates=service.n_candidates)
        chat = None
        if self.chat_agent is not None:
            chat = type(self.chat_agent)(service, self.chat_agent.store, self.chat_agent.config,
                                         chat_model=self.chat_agent.chat_model)
        if service.reranker is not None:
            service.reranker.warm_up()
        index.embedder.warm_up()  # loaded here, not on a request thread
        self.service, self.plain, self.chat_agent = service, plain, chat
        self.lanes = dataclasses.replace(self.lanes, service=service, plain=plain)

    def make_chat(self) -> ChatAgent | None:
        if not chat_available():
            logger.warning("chat agent unavailable: agent.chat.agent cannot be imported")
            return None
        from agent.chat.agent import ChatAgent
        from agent.chat.state import open_session_store

        url = self.settings.sessions_url or self.settings.chat_sessions_path
        store = open_session_store(url, ttl_s=self.settings.chat_session_ttl_s)
        logger.info("chat sessions in %r", store)
        backend = self.service.backend
        if self.settings.chat_tool_calling and backend is not None:
            from agent.chat.config import ChatConfig
            from agent.llm.langchain_chat import chat_model_for

            model = chat_model_for(getattr(backend, "inner", backend))
            return ChatAgent(self.service, store, ChatConfig(tool_calling=True), chat_model=model)
        return ChatAgent(self.service, store)

    def close(self) -> None:
        self.watcher.stop()
        self.queue.shutdown()
        self.explain_queue.shutdown()
        self.io.shutdown(wait=False, cancel_futures=True)

    async def reload_index(self) -> ReloadResult:
        """Move to the catalogue's newest index now, if there is one (``POST /v1/admin/reload``)."""
        return await self._io(self.watcher.check)

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def catalog_name(self) -> str:
        return self.service.catalog.name

    @property
    def llm_enabled(self) -> bool:
        return self.service.reranker is not None

    async def _io(self, fn: Callable[[], T]) -> T:
        return await run_io(self.io, fn)

    def _deadline_s(self, requested: float | None) -> float:
        """The request's deadline in seconds: the server default, or the caller's up to the server maximum."""
        if requested is None:
            return self.settings.deadline_s
        if requested > self.settings.max_deadline_s:
            raise InvalidRequestError(
                f"timeout_s {requested:g} is above this server's maximum of {self.settings.max_deadline_s:g}s "
                "(RECAGENT_MAX_DEADLINE_S)",
                field="timeout_s",
            )
        return requested

    def _check_filters(self, filters: Filters | None) -> Filters | None:
        if filters is None:
            return None
        try:
            return filters.canonical(self.service.catalog.all_genres)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), field="filters") from None

    def _check_history(self, history: Sequence[str] | None) -> None:
        if history is not None and len(history) > self.settings.max_history:
            raise PayloadTooLargeError(
                f"history has {len(history)} items; at most {self.settings.max_history}", field="history"
            )

    # -- recommendations -------------------------------------------------------------------------------------
    async def recommend_events(self, req: RecommendationRequest) -> AsyncIterator[Event]:
        """The answer as events (:mod:`agent.answers`): ``ranked``, one ``reason`` per item when ``explain``,
        then ``done``. Invalid requests raise before the first event."""
        lanes = self.lanes  # one index for the whole request, even if the server moves to a new one meanwhile
        self._check_history(req.history)
        filters = self._check_filters(req.filters)
        timeout_s = self._deadline_s(req.timeout_s)
        deadline = time.monotonic() + timeout_s
        if req.history is not None:
            history = list(req.history)
        else:
            assert req.user_id is not None
            history = await self._io(lambda: lanes.service.user_history(str(req.user_id)))
        query = req.query if req.query and req.query.strip() else None
        use_llm = req.mode != "retrieval" and self.llm_enabled

        def plain() -> Ranked:
            ranked = lanes.plain.rank(history, k=req.k, filters=filters, query=query, use_llm=False,
                                      exclude=req.exclude)
            ranked.answer.mode = req.mode  # asked for the LLM, which is not configured (or too late): said below
            return ranked

        def job(deadline: float) -> Ranked:
            return lanes.service.rank(history, k=req.k, filters=filters, query=query, use_llm=True, mode=req.mode,
                                      exclude=req.exclude, deadline=deadline)

        ranked = await rank_with_deadline(lanes, "recommendations", job, plain, use_llm, deadline, timeout_s,
                                          explain=req.explain)
        async for event in answer_events(lanes, "recommendations", ranked, req.explain, use_llm, deadline,
                                         timeout_s):
            yield event

    async def recommend(self, req: RecommendationRequest) -> RecommendationResponse:
        return self.recommendation_response(req, await _final(self.recommend_events(req)))

    def recommendation_response(self, req: RecommendationRequest,
                                answer: RecommendationAnswer) -> RecommendationResponse:
        return RecommendationResponse(**answer.model_dump(), user_id=req.user_id, catalog=self.catalog_name)

    async def rerank_events(self, req: RerankRequest) -> AsyncIterator[Event]:
        lanes = self.lanes  # one index for the whole request
        self._check_history(req.history)
        if len(req.candidates) > self.settings.max_candidates:
            raise PayloadTooLargeError(
                f"{len(req.candidates)} candidates; at most {self.settings.max_candidates}",
                field="candidates",
            )
        timeout_s = self._deadline_s(req.timeout_s)
        deadline = time.monotonic() + timeout_s
        unknown = [h for h in req.history if not lanes.service.catalog.has_item(h)]
        if unknown:
            from retrieval.candidates import UnknownItemsError

            raise UnknownItemsError(unknown, self.catalog_name, field="history")
        candidates: list[str | FreeItem] = [
            c if isinstance(c, str) else FreeItem(id=c.id, title=c.title, text=c.text) for c in req.candidates
        ]
        use_llm = req.mode != "retrieval" and self.llm_enabled

        def plain() -> Ranked:
            ranked = lanes.plain.rank_given(req.history, candidates, k=req.k, use_llm=False)
            ranked.answer.mode = req.mode
            return ranked

        def job(deadline: float) -> Ranked:
            return lanes.service.rank_given(req.history, candidates, k=req.k, mode=req.mode, deadline=deadline)

        ranked = await rank_with_deadline(lanes, "rerank", job, plain, use_llm, deadline, timeout_s,
                                          explain=req.explain)
        async for event in answer_events(lanes, "rerank", ranked, req.explain, use_llm, deadline, timeout_s):
            yield event

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        return self.rerank_response(await _final(self.rerank_events(req)))

    def rerank_response(self, answer: RecommendationAnswer) -> RerankResponse:
        return RerankResponse(**answer.model_dump(), catalog=self.catalog_name)

    # -- items -----------------------------------------------------------------------------------------------
    async def item(self, item_id: str) -> Item:
        service = self.service
        return Item.model_validate(await self._io(lambda: service.item(item_id)))

    async def search(self, query: str, k: int, genres: list[str]) -> SearchResponse:
        service = self.service
        filters = self._check_filters(Filters(genres=genres)) if genres else None
        hits = await self._io(lambda: service.search(query, k=k, filters=filters))
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
        """The session ``req`` continues: its own, or a new one that has answered ``replay`` (replies dropped, so
        their reasons are templates: no LLM sentences are written for them)."""
        session = req.session_id
        for message in replay:
            session = agent.respond(session, message, user_id=req.user_id, explain=False).session_id
        return session

    async def chat(self, req: ChatRequest, replay: Sequence[str] = ()) -> ChatResponse:
        """One chat turn; ``replay`` (user messages, oldest first) is sent to a new session first. The turn runs
        as :meth:`chat_stream` does (same lanes and deadlines); only its final answer is returned."""
        response: ChatResponse | None = None
        async for piece in self.chat_stream(req, replay):
            if isinstance(piece, ChatResponse):
                response = piece
        if response is None:  # cannot happen: a stream always ends with its answer
            return self._degraded_chat(req.session_id, "the chat turn ended without an answer")
        return response

    async def chat_stream(
        self, req: ChatRequest, replay: Sequence[str] = ()
    ) -> AsyncIterator[str | TurnItems | Reason | ChatResponse]:
        """The turn as it is made (``replay`` as in :meth:`chat`): reply pieces (str), the items with template
        reasons (:class:`~agent.chat.models.TurnItems`), one final :class:`~agent.explain.Reason` per item as the
        LLM writes it, then the final :class:`ChatResponse` (its items carry the final reasons). Errors before the
        first piece propagate (so the edge can answer 404/429); the caller should ``await anext()`` once before
        starting a response.

        The turn is read and ranked on the score lane; once its items are out, the reasons are written on the
        explain lane (as :mod:`agent.answers` does), so long generations never hold score work (a full explain
        lane: the reasons stop at once and stay templates). Closing this iterator early (a client that
        disconnects), or the chat deadline passing, cancels the reasons still being written; the session still
        keeps the turn."""
        from agent.chat.models import TurnItems

        agent = self._agent()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def post(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (shutdown): nobody reads; finish the turn quickly
                cancel.set()

        def drain(events: Iterator[Any], handoff: bool) -> None:
            try:
                for piece in events:
                    post("piece", piece)
                    if handoff and isinstance(piece, TurnItems):  # the rest (the reasons) on the explain lane
                        try:
                            loop.call_soon_threadsafe(explain_lane, events)
                        except RuntimeError:
                            cancel.set()  # no loop to hand over to: the rest, templates only, right here
                        else:
                            return
            except BaseException as exc:
                post("error", exc)
            else:
                post("end", None)

        def explain_lane(events: Iterator[Any]) -> None:
            """On the event loop, whether or not anyone still reads the stream: the turn holds its session until
            it is drained."""
            rest = functools.partial(drain, events, False)
            try:
                self.explain_queue.submit(rest)
            except QueueFullError:
                logger.warning("explain queue full route=chat: the reasons stay templates")
                cancel.set()
                loop.run_in_executor(self.io, contextvars.copy_context().run, rest)

        def work() -> None:
            try:
                session = self._session(agent, req, replay)
                events = agent.respond_stream(session, req.message, user_id=req.user_id, cancelled=cancel.is_set)
            except BaseException as exc:
                post("error", exc)
            else:
                drain(events, handoff=True)

        self.queue.submit(work)
        until = time.monotonic() + self.settings.chat_deadline_s
        try:
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
                if isinstance(value, str | TurnItems | Reason):
                    yield value
                else:
                    response = self._chat_response(value)
                    if response.degraded:
                        self.metrics.degraded.labels(route="chat", cause="agent").inc()
                    yield response
        finally:
            cancel.set()  # a closed stream or the deadline: the reasons still being written stop at the next step

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
        health: dict[str, Any] = backend.health() if backend is not None and hasattr(backend, "health") else {}
        state = health.get("state") or ("in-process" if llm_ok else None)
        return Readiness(
            ready=(llm_ok or not self.settings.use_llm),
            catalog=self.catalog_name,
            index=True,
            llm=llm_ok and state != "open",
            llm_required=self.settings.use_llm,
            llm_state=state,
            llm_health=health,
            model=backend.model_name if backend is not None else None,
            chat=self.chat_agent is not None,
            queue_depth=self.queue.depth + self.explain_queue.depth,
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
