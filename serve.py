"""The HTTP API and web chat page: ``python serve.py`` or ``recagent serve`` (127.0.0.1:8000 by default).

Routes are thin: they validate (``agent.api_models``), call the :class:`agent.runtime.Runtime`, and return its
models. Errors become HTTP answers only here, in the exception handlers, always shaped
``{"error": {"type", "message", "field"}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from agent.answers import Event
from agent.api_models import (
    ChatCompletionRequest,
    ChatRequest,
    ChatResponse,
    ErrorResponse,
    Health,
    Item,
    ModelCard,
    ModelList,
    Readiness,
    RecommendationRequest,
    RecommendationResponse,
    RerankRequest,
    RerankResponse,
    SearchResponse,
)
from agent.errors import NotReadyError, QueueFullError, ServiceError
from agent.metrics import Metrics
from agent.runtime import Runtime, request_id_var
from agent.settings import Settings

logger = logging.getLogger("recagent.serve")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/healthz", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
ERRORS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    500: "internal_error",
    503: "unavailable",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": ERRORS[code]} for code in (401, 404, 413, 422, 429, 503)
}
SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON, or with `Accept: text/event-stream` an SSE stream",
    },
    **ERROR_RESPONSES,
}


def web_dir() -> Path:
    return Path(str(resources.files("agent") / "web"))


def error_response(
    status: int,
    message: str,
    field: str | None = None,
    type_: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"type": type_ or ERRORS.get(status, "error"), "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


class UnauthorizedError(ServiceError):
    status = 401
    type = "unauthorized"


# --- middleware ---------------------------------------------------------------------------------------------
class EdgeMiddleware:
    """Request ids, the body-size limit, the access log and the HTTP metrics (pure ASGI, streaming-safe)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        token = request_id_var.set(rid)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            replay = await self._read_body(headers, receive)
            if replay is None:
                await error_response(
                    413,
                    f"request body larger than {self.max_body} bytes",
                    field="body",
                    headers={"x-request-id": rid},
                )(scope, receive, send)
                status["code"] = 413
                return
            await self.app(scope, replay, send_wrapper)
        finally:
            took = time.perf_counter() - t0
            route = scope.get("route")
            path = getattr(route, "path", None) or (
                "/web" if scope["path"].startswith("/web/") else "unmatched"
            )
            self.metrics.requests.labels(method=scope["method"], route=path, status=str(status["code"])).inc()
            self.metrics.latency.labels(route=path).observe(took)
            logger.info(
                "request request_id=%s method=%s route=%s status=%s ms=%.1f",
                rid,
                scope["method"],
                path,
                status["code"],
                took * 1000,
            )
            request_id_var.reset(token)

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> Receive | None:
        """Buffer the body (at most ``max_body`` bytes); a receive that replays it, or None if too big."""
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return None
        if length is None and "transfer-encoding" not in headers:
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# --- app ----------------------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, service: Any = None, chat: Any = None) -> FastAPI:
    """The app. With ``service`` (a RecommenderService) it serves that; otherwise the catalogue and LLM
    named by ``settings`` load in the background at startup (``/readyz`` says when)."""
    settings = settings or Settings()
    metrics = Metrics()
    holder: dict[str, Any] = {}

    if service is not None:
        runtime = Runtime(service, settings, chat=chat, metrics=metrics)
        if chat is None:
            runtime.chat_agent = runtime.make_chat()
        holder["runtime"] = runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if "runtime" not in holder:
            holder["loading"] = asyncio.ensure_future(asyncio.to_thread(Runtime.build, settings, metrics))
        try:
            yield
        finally:  # a runtime given to create_app belongs to the caller and outlives the app's lifespans
            loading = holder.pop("loading", None)
            if loading is not None and loading.done() and not loading.cancelled() and not loading.exception():
                loading.result().close()
                holder.pop("runtime", None)

    app = FastAPI(
        title="recagent",
        version="0.1.0",
        lifespan=lifespan,
        description="Generative LLM recommender: recommendations, explainable reranking, chat and an "
        "OpenAI-compatible chat facade.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.holder = holder

    async def get_runtime() -> Runtime:
        if "runtime" in holder:
            return holder["runtime"]  # type: ignore[no-any-return]
        loading: asyncio.Future[Runtime] | None = holder.get("loading")
        if loading is None:
            raise NotReadyError("the server is starting")
        try:
            holder["runtime"] = await asyncio.shield(loading)
        except Exception as exc:
            logger.error("startup failed error=%s", exc)
            raise NotReadyError(f"the server failed to load: {type(exc).__name__}: {exc}"[:500]) from None
        return holder["runtime"]  # type: ignore[no-any-return]

    bearer = HTTPBearer(auto_error=False, description="RECAGENT_API_KEY, when the server sets one")

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
        if not key:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
            raise UnauthorizedError(
                "missing or wrong API key (Authorization: Bearer <key>)", field="authorization"
            )

    guarded = [Depends(require_key)]
    install_error_handlers(app)

    # -- open routes -----------------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health()

    @app.get("/", include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse((web_dir() / "index.html").read_text(encoding="utf-8"))

    app.mount("/web", StaticFiles(directory=web_dir()), name="web")

    # -- guarded routes: every router below requires the API key -------------------------------------------
    for router in (health_router(settings, holder, metrics), recommend_router(get_runtime),
                   chat_router(get_runtime), openai_router(get_runtime), admin_router(get_runtime)):
        app.include_router(router, dependencies=guarded)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id", "accept"],
            expose_headers=["x-request-id", "retry-after"],
        )
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app


def health_router(settings: Settings, holder: dict[str, Any], metrics: Metrics) -> APIRouter:
    """Readiness and Prometheus metrics (``/healthz``, open to all, stays on the app)."""
    router = APIRouter()

    @router.get(
        "/readyz",
        response_model=Readiness,
        tags=["health"],
        responses={503: {"model": Readiness, "description": "not ready"}, 401: ERROR_RESPONSES[401]},
    )
    async def readyz() -> Response:
        """Readiness: the index and (unless disabled) the LLM are loaded."""
        loading = holder.get("loading")
        if "runtime" not in holder and loading is not None and loading.done() and loading.exception() is None:
            holder["runtime"] = loading.result()
        if "runtime" not in holder:
            return JSONResponse(
                Readiness(
                    ready=False,
                    catalog=settings.catalog,
                    index=False,
                    llm=False,
                    llm_required=settings.use_llm,
                    chat=False,
                ).model_dump(),
                status_code=503,
            )
        ready = holder["runtime"].readiness()
        return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)

    @router.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 401: ERROR_RESPONSES[401]},
    )
    async def metrics_route() -> Response:
        """Prometheus metrics: requests, latencies, LLM tokens, degraded answers, queue."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def recommend_router(get_runtime: Callable[[], Awaitable[Runtime]]) -> APIRouter:
    """Recommendations, explainable reranking of given candidates, and the catalogue's items."""
    router = APIRouter()

    @router.post(
        "/v1/recommendations",
        response_model=RecommendationResponse,
        tags=["recommend"],
        responses=SSE_DOC,
    )
    async def recommendations(req: RecommendationRequest, request: Request, rt: Runtime = Depends(get_runtime)) -> Any:
        """Top ``k`` items for a known user or a given history, with reasons when ``explain``. With ``Accept:
        text/event-stream``: ``ranked`` (the list), one ``reason`` per item as it is written, ``done`` (the
        whole answer, with timings)."""
        if not wants_stream(request):
            return await rt.recommend(req)
        events = await primed(rt.recommend_events(req))
        return event_stream(answer_events(events, lambda a: rt.recommendation_response(req, a)))

    @router.post(
        "/v1/rerank",
        response_model=RerankResponse,
        tags=["recommend"],
        responses=SSE_DOC,
    )
    async def rerank(req: RerankRequest, request: Request, rt: Runtime = Depends(get_runtime)) -> Any:
        """Explainable reranking of caller-given candidates (catalogue ids or free items); streams as
        ``/v1/recommendations`` does."""
        if not wants_stream(request):
            return await rt.rerank(req)
        events = await primed(rt.rerank_events(req))
        return event_stream(answer_events(events, rt.rerank_response))

    @router.get(
        "/v1/items/{item_id}",
        response_model=Item,
        tags=["items"],
        responses=ERROR_RESPONSES,
    )
    async def get_item(item_id: str, rt: Runtime = Depends(get_runtime)) -> Item:
        """One catalogue item."""
        return await rt.item(item_id)

    @router.get(
        "/v1/items",
        response_model=SearchResponse,
        tags=["items"],
        responses=ERROR_RESPONSES,
    )
    async def search_items(
        query: str = Query(min_length=1, max_length=500),
        k: int = Query(10, ge=1, le=100),
        genre: list[str] = Query(default_factory=list, max_length=20),
        rt: Runtime = Depends(get_runtime),
    ) -> SearchResponse:
        """Search the catalogue by free text (semantic), optionally keeping some genres."""
        return await rt.search(query, k, genre)

    return router


def chat_router(get_runtime: Callable[[], Awaitable[Runtime]]) -> APIRouter:
    """The conversational agent, one turn per request."""
    router = APIRouter()

    @router.post("/v1/chat", response_model=ChatResponse, tags=["chat"], responses=SSE_DOC)
    async def chat_route(req: ChatRequest, request: Request, rt: Runtime = Depends(get_runtime)) -> Any:
        """One chat turn. With ``Accept: text/event-stream``: events ``token`` ({"text"}) per reply piece, then
        ``items`` ({"session_id", "items"}: the picks, with template reasons), then, when the LLM writes the
        reasons, one ``reason`` ({"item_id", "rank", "reason", "evidence", "reason_source": "llm" | "template"})
        per item as it is written, then ``done`` (the whole answer; its items carry the final reasons). A client
        that disconnects cancels the reasons still being written."""
        if not wants_stream(request):
            return await rt.chat(req)
        stream = await primed(rt.chat_stream(req))
        return event_stream(chat_events(stream))

    return router


def openai_router(get_runtime: Callable[[], Awaitable[Runtime]]) -> APIRouter:
    """The OpenAI-compatible chat facade over the chat agent."""
    router = APIRouter()

    @router.post(
        "/v1/chat/completions", tags=["openai"], responses=SSE_DOC, response_model=None
    )
    async def chat_completions(req: ChatCompletionRequest, rt: Runtime = Depends(get_runtime)) -> Any:
        """OpenAI-compatible chat completions over the chat agent (model ``recagent``; ``stream`` supported).
        The recommendations also come as ``recommendations``, and the session as ``session_id``: send it back
        to continue that session; without it the conversation is rebuilt by replaying the earlier user
        messages in a new session (see ``Runtime.completion_turn``)."""
        if not req.stream:
            return JSONResponse((await rt.completion(req)).model_dump(mode="json"))
        turn, replay = rt.completion_turn(req)
        stream = await primed(rt.chat_stream(turn, replay))
        return event_stream(completion_events(stream, rt, req.model or "recagent", turn.message))

    @router.get(
        "/v1/models",
        response_model=ModelList,
        tags=["openai"],
        responses=ERROR_RESPONSES,
    )
    async def models() -> ModelList:
        """The one model this facade serves."""
        return ModelList(data=[ModelCard(id="recagent")])

    return router


def admin_router(get_runtime: Callable[[], Awaitable[Runtime]]) -> APIRouter:
    """Operations on a running server (guarded by the API key like every other /v1 route)."""
    from agent.index_watch import ReloadResult

    router = APIRouter(prefix="/v1/admin", tags=["admin"])

    @router.post("/reload", response_model=ReloadResult, responses=ERROR_RESPONSES)
    async def reload_index(rt: Runtime = Depends(get_runtime)) -> ReloadResult:
        """Move to the catalogue's newest index now (servers also check every RECAGENT_INDEX_WATCH_S seconds).
        No request fails during the move: running ones finish on the old index, whose Chroma collection stays
        for RECAGENT_INDEX_GRACE_S."""
        return await rt.reload_index()

    return router


# --- streaming helpers --------------------------------------------------------------------------------------
def wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "").lower()


async def primed(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Pull the first element now, so errors before any output still become proper HTTP errors."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[Any]:
        if first is not None:
            yield first
        async for x in stream:
            yield x

    return rest()


def event_stream(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """An SSE response (sse-starlette frames the events and pings; a client that disconnects cancels the
    generator, whose ``finally`` blocks stop the work behind it)."""
    return EventSourceResponse(events, sep="\n", ping=15, headers={"x-accel-buffering": "no"})


def sse(data: str, event: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=data, event=event, sep="\n")


def _stream_error(exc: Exception) -> str:
    logger.exception("stream failed request_id=%s", request_id_var.get())
    status = exc.status if isinstance(exc, ServiceError) else 500
    message = exc.message if isinstance(exc, ServiceError) else "internal error"
    return json.dumps({"error": {"type": ERRORS.get(status, "error"), "message": message, "field": None}})


async def answer_events(
    events: AsyncIterator[Event], response: Callable[[Any], BaseModel]
) -> AsyncIterator[ServerSentEvent]:
    """``ranked`` (the list without reasons), ``reason`` ({"item_id", "rank", "reason", "evidence",
    "reason_source"}) per item, then ``done`` (``response(answer)``: the whole answer)."""
    try:
        async for event in events:
            if event.kind == "reason" and event.reason is not None:
                r = event.reason
                body = {"item_id": r.item_id, "rank": event.rank, "reason": r.reason, "evidence": r.evidence,
                        "reason_source": r.source}
                yield sse(json.dumps(body, ensure_ascii=False), "reason")
            elif event.answer is not None:
                yield sse(response(event.answer).model_dump_json(), event.kind)
    except Exception as exc:
        yield sse(_stream_error(exc), "error")


async def chat_events(stream: AsyncIterator[Any]) -> AsyncIterator[ServerSentEvent]:
    """A chat turn (:meth:`Runtime.chat_stream`) as SSE: ``token`` ({"text"}) per reply piece; ``items``
    ({"session_id", "items"}: the picks with template reasons, each item with ``reason_source``) once they are
    ranked; ``reason`` ({"item_id", "rank", "reason", "evidence", "reason_source"}) per item as the LLM writes it
    (or its template, when the LLM's sentence was refused or late; only when the LLM writes reasons); then
    ``done`` (the whole answer, its items carrying the final reasons). A turn that streamed no ``items`` event
    (no picks were ready before the answer) gets one just before ``done``."""
    from agent.api_models import ChatItem
    from agent.explain import Reason

    ranks: dict[str, int] = {}
    try:
        async for piece in stream:
            if isinstance(piece, str):
                yield sse(json.dumps({"text": piece}, ensure_ascii=False), "token")
            elif isinstance(piece, Reason):
                body = {"item_id": piece.item_id, "rank": ranks.get(piece.item_id), "reason": piece.reason,
                        "evidence": piece.evidence, "reason_source": piece.source}
                yield sse(json.dumps(body, ensure_ascii=False), "reason")
            elif isinstance(piece, ChatResponse):
                if not ranks:
                    items = [i.model_dump(mode="json") for i in piece.items]
                    yield sse(
                        json.dumps({"session_id": piece.session_id, "items": items}, ensure_ascii=False), "items"
                    )
                yield sse(piece.model_dump_json(), "done")
            else:  # the items, ranked, with template reasons (agent.chat.models.TurnItems)
                ranks = {i.item_id: n for n, i in enumerate(piece.items, 1)}
                items = [ChatItem.model_validate(i.model_dump()).model_dump(mode="json") for i in piece.items]
                yield sse(json.dumps({"session_id": piece.session_id, "items": items}, ensure_ascii=False), "items")
    except Exception as exc:
        yield sse(_stream_error(exc), "error")


async def completion_events(
    stream: AsyncIterator[Any],
    rt: Runtime,
    model: str,
    message: str,
) -> AsyncIterator[ServerSentEvent]:
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> ServerSentEvent:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return sse(json.dumps(body, ensure_ascii=False))

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in stream:
            if isinstance(piece, str):
                yield chunk({"content": piece})
            elif isinstance(piece, ChatResponse):  # the items and reasons come with it (``recommendations``)
                full = rt.completion_response(piece, model, message)
                yield chunk(
                    {},
                    "stop",
                    usage=full.usage.model_dump(),
                    recommendations=[i.model_dump(mode="json") for i in full.recommendations],
                    session_id=piece.session_id,
                    degraded=piece.degraded,
                )
    except Exception as exc:
        yield sse(_stream_error(exc))
    yield sse("[DONE]")


# --- errors -------------------------------------------------------------------------------------------------
def _field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts[:1]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    from agent.service import UnknownUserError
    from retrieval.candidates import UnknownItemsError

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field(tuple(first.get("loc", ())))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(422, f"{field or 'request'}: {first.get('msg', 'invalid')}{more}", field=field)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ServiceError)
    async def on_service(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {}
        if isinstance(exc, QueueFullError):
            headers["retry-after"] = str(exc.retry_after)
        if exc.status == 401:
            headers["www-authenticate"] = "Bearer"
        return error_response(exc.status, exc.message, field=exc.field, type_=exc.type, headers=headers)

    @app.exception_handler(UnknownUserError)
    async def on_unknown_user(request: Request, exc: UnknownUserError) -> JSONResponse:
        return error_response(404, str(exc), field="user_id")

    @app.exception_handler(UnknownItemsError)
    async def on_unknown_items(request: Request, exc: UnknownItemsError) -> JSONResponse:
        field = "item_id" if request.url.path.startswith("/v1/items/") else exc.field
        return error_response(404, str(exc), field=field)

    try:
        from agent.chat.state import SessionBusyError, SessionConflictError, SessionNotFoundError
    except ImportError:  # the chat agent is optional
        pass
    else:

        @app.exception_handler(SessionNotFoundError)
        async def on_unknown_session(request: Request, exc: SessionNotFoundError) -> JSONResponse:
            return error_response(404, str(exc), field="session_id")

        @app.exception_handler(SessionBusyError)
        @app.exception_handler(SessionConflictError)
        async def on_busy_session(request: Request, exc: Exception) -> JSONResponse:
            return error_response(409, str(exc), field="session_id", type_="conflict")

    @app.exception_handler(ValueError)
    async def on_value(request: Request, exc: ValueError) -> JSONResponse:
        logger.info("invalid input request_id=%s error=%s", request_id_var.get(), exc)
        return error_response(422, str(exc)[:500])

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error request_id=%s path=%s", request_id_var.get(), request.url.path)
        return error_response(
            500, "internal error; see the server log for request id " + request_id_var.get()
        )


# --- running ------------------------------------------------------------------------------------------------
class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("httpx", "chromadb", "sentence_transformers", "transformers", "urllib3", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        time.sleep(0.05)
    else:
        raise RuntimeError("uvicorn did not start")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def run(settings: Settings) -> None:
    """Serve until interrupted (one process: the in-process model is shared by all requests)."""
    import uvicorn

    from retrieval.home import configure_offline_environment

    configure_offline_environment()
    configure_logging(settings.log_level)
    logger.info(
        "starting host=%s port=%d catalog=%s llm=%s auth=%s workers=%d queue=%d deadline_s=%g",
        settings.host,
        settings.port,
        settings.catalog,
        settings.llm,
        settings.api_key is not None,
        settings.workers,
        settings.queue_size,
        settings.deadline_s,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="recagent HTTP API and web chat page")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--catalog")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    sys.stderr.write(f"recagent: serving on http://{settings.host}:{settings.port}/ (API docs at /docs)\n")
    run(settings)


if __name__ == "__main__":
    main()
