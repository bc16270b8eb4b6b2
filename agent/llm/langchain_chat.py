"""The project's LLM backends as LangChain chat models.

* :class:`RecagentChatModel` (a ``BaseChatModel``) adapts any :class:`agent.llm.base.LLMBackend`: the in-process
  ``transformers`` model or the OpenAI-compatible one (vLLM). Text comes from the backend's ``generate_text`` /
  ``stream_text``. :meth:`RecagentChatModel.with_structured_output` is overridden: it binds the schema's JSON schema
  to the model, so the call is the backend's *constrained* decoding (``generate_json``: an xgrammar grammar in
  process, ``response_format: json_schema`` on vLLM), then parses and validates the JSON (a pydantic class gives a
  validated instance, a dict schema a dict). LangChain's default path (a forced tool call) would need tool calls,
  which a small in-process model cannot make reliably; decoding under the schema's grammar always yields text the
  schema accepts. The adapter has no ``bind_tools``: it does not make tool calls.
* :func:`chat_model_for` picks the chat model for a backend: ``langchain_openai.ChatOpenAI`` pointed at the served
  model when the backend is the OpenAI-compatible one (native tool calls), else the adapter. A backend behind a
  circuit breaker (:class:`agent.llm.breaker.GuardedBackend`) keeps it: the ``ChatOpenAI`` gets a callback that asks
  the same breaker before every call and reports its outcome (:class:`BreakerCallback`).

Heavy imports (``langchain_openai``, ``openai``) happen inside functions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from agent.llm.base import ChatMessage, LLMBackend, LLMError, cut_at_stop

if TYPE_CHECKING:
    from agent.llm.breaker import CircuitBreaker

logger = logging.getLogger(__name__)

#: The keyword bound to the model by :meth:`RecagentChatModel.with_structured_output`: the JSON schema to decode under.
SCHEMA_KWARG = "response_schema"


class StructuredOutputError(LLMError):
    """The model's structured output did not parse or validate (the server answered: not held against it)."""

    server_fault = False


def to_backend_messages(messages: Sequence[BaseMessage]) -> list[ChatMessage]:
    """LangChain messages as the backends' ``{"role", "content"}`` dicts. Tool results become user turns that name
    the tool (the backends' chat templates have no tool role)."""
    out: list[ChatMessage] = []
    for m in messages:
        text = m.text if isinstance(m.content, list) else str(m.content)
        if isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, AIMessage):
            role = "assistant"
        elif isinstance(m, ToolMessage):
            role, text = "user", f"Result of tool {m.name or 'call'}: {text}"
        elif isinstance(m, HumanMessage):
            role = "user"
        else:
            role = getattr(m, "role", "user") if getattr(m, "role", "") in ("system", "user", "assistant") else "user"
        out.append({"role": role, "content": str(text)})
    return out


def json_schema_of(schema: dict[str, Any] | type) -> dict[str, Any]:
    """The JSON schema to decode under: a pydantic class's own, or a dict taken as a JSON schema (an OpenAI
    function / ``json_schema`` wrapper is unwrapped)."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, dict):
        if "json_schema" in schema and isinstance(schema["json_schema"], dict):  # {"type": "json_schema", ...}
            schema = schema["json_schema"]
        for key in ("schema", "parameters"):  # {"name", "schema"} / an OpenAI function
            if isinstance(schema.get(key), dict):
                return dict(schema[key])
        return dict(schema)
    raise TypeError(f"with_structured_output takes a pydantic class or a JSON schema dict, not {schema!r}")


class RecagentChatModel(BaseChatModel):
    """Any :class:`LLMBackend` as a LangChain chat model (see the module docstring).

    ``max_tokens`` and ``temperature`` are defaults; ``bind(max_tokens=..., temperature=...)`` or the same keywords
    on ``invoke`` override them. Backend failures raise :class:`LLMError` (callers fall back as they do for the
    backend itself)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: Any = Field(description="the project LLMBackend this model runs on")
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)

    @property
    def _llm_type(self) -> str:
        return f"recagent-{getattr(self.backend, 'name', 'backend')}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"backend": getattr(self.backend, "name", "?"), "max_tokens": self.max_tokens,
                "temperature": self.temperature}

    def _options(self, kwargs: dict[str, Any]) -> tuple[int, float]:
        return int(kwargs.get("max_tokens") or self.max_tokens), float(kwargs.get("temperature", self.temperature))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        backend: LLMBackend = self.backend
        max_tokens, temperature = self._options(kwargs)
        chat = to_backend_messages(messages)
        schema = kwargs.get(SCHEMA_KWARG)
        if schema is not None:
            text = backend.generate_json(chat, schema, max_tokens=max_tokens, temperature=temperature)
        else:
            text = backend.generate_text(chat, max_tokens=max_tokens, temperature=temperature)
            if stop:
                text, _ = cut_at_stop(text, stop)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        if kwargs.get(SCHEMA_KWARG) is not None:  # constrained JSON comes whole
            result = self._generate(messages, stop, run_manager, **kwargs)
            yield ChatGenerationChunk(message=AIMessageChunk(content=str(result.generations[0].message.content)))
            return
        backend: LLMBackend = self.backend
        max_tokens, temperature = self._options(kwargs)
        hold = max((len(s) for s in stop or () if s), default=1) - 1  # a stop string may span pieces
        sent, text = 0, ""
        for piece in backend.stream_text(to_backend_messages(messages), max_tokens=max_tokens,
                                         temperature=temperature):
            text += piece
            cut, found = cut_at_stop(text, stop or ())
            upto = len(cut) if found else max(sent, len(text) - hold)
            if upto > sent:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text[sent:upto]))
                if run_manager is not None:
                    run_manager.on_llm_new_token(text[sent:upto], chunk=chunk)
                yield chunk
                sent = upto
            if found:
                return
        if len(text) > sent:
            yield ChatGenerationChunk(message=AIMessageChunk(content=text[sent:]))

    def with_structured_output(self, schema: dict[str, Any] | type, *, include_raw: bool = False,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable that decodes under ``schema``'s JSON schema (the backend's ``generate_json``) and returns a
        validated instance of ``schema`` (a pydantic class) or a dict (a JSON schema dict). With ``include_raw``:
        ``{"raw": AIMessage, "parsed": ... | None, "parsing_error": Exception | None}``. Invalid output raises
        ``OutputParserException`` (``include_raw`` False). ``method`` / ``strict`` keywords are accepted and
        ignored: decoding is always under the schema's grammar."""
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser

        unknown = set(kwargs) - {"method", "strict"}
        if unknown:
            raise ValueError(f"unsupported keyword(s) for with_structured_output: {sorted(unknown)}")
        json_schema = json_schema_of(schema)
        parser: Runnable[Any, Any] = (
            PydanticOutputParser(pydantic_object=schema)
            if isinstance(schema, type) and issubclass(schema, BaseModel)
            else JsonOutputParser()
        )
        llm = self.bind(**{SCHEMA_KWARG: json_schema},
                        ls_structured_output_format={"kwargs": {"method": "json_schema"}, "schema": json_schema})
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")


# --- the factory ------------------------------------------------------------------------------------------------


def _unwrap(backend: LLMBackend) -> tuple[LLMBackend, CircuitBreaker | None]:
    from agent.llm.breaker import GuardedBackend

    if isinstance(backend, GuardedBackend):
        return backend.inner, backend.breaker
    return backend, None


def is_openai_compatible(backend: LLMBackend) -> bool:
    from agent.llm.openai_backend import OpenAIBackend

    return isinstance(_unwrap(backend)[0], OpenAIBackend)


def chat_model_for(backend: LLMBackend, *, native: bool = True, max_tokens: int | None = None,
                   temperature: float = 0.0, timeout_s: float | None = None) -> BaseChatModel:
    """The LangChain chat model for ``backend``: ``ChatOpenAI`` at the served model's base URL (its
    ``LLMConfig.url``, API key, served model name; no retries, the backend's timeout; the backend's circuit breaker
    through :class:`BreakerCallback`) when the backend is the OpenAI-compatible one and ``native`` is true; else
    :class:`RecagentChatModel` over ``backend`` (its structured output and text go through the backend itself, so
    request deadlines, usage counters and the breaker apply as to any backend call)."""
    if native and is_openai_compatible(backend):
        from langchain_openai import ChatOpenAI

        inner, breaker = _unwrap(backend)
        config = inner.config  # type: ignore[attr-defined]
        options: dict[str, Any] = {
            "model": backend.model_name, "base_url": config.url, "api_key": SecretStr(config.api_key or "EMPTY"),
            "temperature": temperature, "max_retries": 0, "timeout": timeout_s or config.timeout_s,
        }
        if max_tokens is not None:
            options["max_tokens"] = max_tokens
        if breaker is not None:
            options["callbacks"] = [BreakerCallback(breaker)]
        return ChatOpenAI(**options)
    return RecagentChatModel(backend=backend, max_tokens=max_tokens or 256, temperature=temperature)


def supports_tool_calls(model: BaseChatModel) -> bool:
    """Whether ``model`` implements ``bind_tools`` (the adapter and plain fakes do not)."""
    return type(model).bind_tools is not BaseChatModel.bind_tools


class BreakerCallback(BaseCallbackHandler):
    """Puts a LangChain chat model's calls behind a :class:`CircuitBreaker`: an open circuit refuses the call
    before it is sent (``CircuitOpenError`` propagates, ``raise_error``); a completed call closes it; an error
    counts as the server's fault unless the server answered (an HTTP 4xx other than 408 and 429)."""

    raise_error = True

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self._probes: dict[UUID, bool] = {}
        self._lock = threading.Lock()

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID,
                            **kwargs: Any) -> None:
        probe = self.breaker.acquire()
        with self._lock:
            self._probes[run_id] = probe

    def _pop(self, run_id: UUID) -> bool | None:
        with self._lock:
            return self._probes.pop(run_id, None)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        probe = self._pop(run_id)
        if probe is not None:
            self.breaker.success(probe)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        probe = self._pop(run_id)
        if probe is None:
            return
        status = getattr(error, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
            self.breaker.success(probe)
        else:
            self.breaker.failure(error, probe)


__all__ = ["SCHEMA_KWARG", "BreakerCallback", "RecagentChatModel", "StructuredOutputError", "chat_model_for",
           "is_openai_compatible", "json_schema_of", "supports_tool_calls", "to_backend_messages"]
