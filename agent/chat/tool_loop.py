"""A tool-calling loop for chat models that make tool calls (``ChatOpenAI`` on a vLLM server started with tool
parsing, or any LangChain chat model implementing ``bind_tools``).

The model is bound to the recommender's LangChain tools (:func:`agent.langchain_tools.recagent_tools`:
``search_items``, ``recommend``, ``explain``) and decides which to call with which arguments; the loop runs the calls,
feeds their results back as ``ToolMessage`` objects and repeats, at most ``max_steps`` model calls (and
``max_calls_per_step`` tool calls per model call), until the model answers without tool calls, the step limit or
the deadline. What comes back (:class:`ToolLoopResult`) holds only catalogue ids that a tool returned, minus the
session's exclusions and any item that breaks its filters, whatever the model wrote or asked for; the model's final
text is returned cleaned (single line, bounded) but otherwise unchecked: callers compose replies from the items.
``decided_by`` is ``"llm-tools"``.

:func:`tool_turn` runs the loop for one chat turn from a session (prompt ``chat_tools.v1``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import prompts
from agent.llm.base import LLMError

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import BaseTool

    from agent.chat.models import SessionState
    from agent.service import RecommenderService
    from retrieval.catalog import Catalog
    from retrieval.filters import Filters

logger = logging.getLogger(__name__)

MAX_STEPS = 4
MAX_CALLS_PER_STEP = 4
#: Tool results longer than this are cut before they go back to the model.
MAX_TOOL_CONTENT = 6000

Stopped = Literal["answer", "step_limit", "deadline", "error"]


@dataclass
class ToolCallRecord:
    """One tool call the model asked for: its arguments, whether it ran, and the ids its result held."""

    name: str
    args: dict[str, Any]
    ok: bool
    error: str | None = None
    returned: list[str] = field(default_factory=list)


@dataclass
class ToolLoopResult:
    items: list[str]
    text: str
    calls: list[ToolCallRecord]
    steps: int
    stopped: Stopped
    dropped: dict[str, str] = field(default_factory=dict)  # id -> why it was left out
    reasons: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    decided_by: str = "llm-tools"


def _passes(catalog: Catalog, item_id: str, filters: Filters | None) -> bool:
    if filters is None:
        return True
    item = catalog.item(item_id)
    genres = {str(g).lower() for g in item["genres"]}  # type: ignore[attr-defined]
    year = item["year"] if isinstance(item["year"], int) else None
    if filters.genres and not genres & {g.lower() for g in filters.genres}:
        return False
    if genres & {g.lower() for g in filters.exclude_genres}:
        return False
    if filters.year_min is not None and (year is None or year < filters.year_min):
        return False
    return not (filters.year_max is not None and (year is None or year > filters.year_max))


def _returned_ids(out: dict[str, Any]) -> list[str]:
    rows = out.get("items")
    if not isinstance(rows, list):
        return []
    return [str(r["item_id"]) for r in rows if isinstance(r, dict) and "item_id" in r]


def _content(out: object) -> str:
    text = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_TOOL_CONTENT else text[: MAX_TOOL_CONTENT - 1] + "…"


def run_tool_loop(
    model: BaseChatModel,
    tools: Sequence[BaseTool],
    messages: LanguageModelInput,
    *,
    catalog: Catalog,
    exclude: Iterable[str] = (),
    filters: Filters | None = None,
    k: int = 5,
    max_steps: int = MAX_STEPS,
    max_calls_per_step: int = MAX_CALLS_PER_STEP,
    deadline: float | None = None,
    first_tool_choice: str | None = None,
) -> ToolLoopResult:
    """Let ``model`` call ``tools`` (see the module docstring). ``messages``: the conversation so far (messages,
    ``(role, text)`` pairs or a string). ``deadline``: a ``time.monotonic()`` time after which no further model
    call starts. ``first_tool_choice``: the first model call's ``tool_choice`` (``"required"``: it must call a tool,
    which a server like vLLM enforces by constraining the output to the tools' schemas, so that even a small model
    makes a well-formed call; later calls are free to answer). Raises :class:`LLMError` only when ``model`` cannot
    bind tools; a failing model call ends the loop with ``stopped="error"`` (the items found so far are kept)."""
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
    from langchain_core.prompt_values import PromptValue

    try:
        bound = model.bind_tools(list(tools))
        first = bound if first_tool_choice in (None, "auto") else model.bind_tools(list(tools),
                                                                                    tool_choice=first_tool_choice)
    except NotImplementedError as exc:
        raise LLMError(f"{type(model).__name__} does not make tool calls") from exc
    by_name = {t.name: t for t in tools}
    if isinstance(messages, str):
        history: list[Any] = [HumanMessage(messages)]
    elif isinstance(messages, PromptValue):
        history = list(messages.to_messages())
    else:
        history = list(messages)
    excluded = set(exclude)
    records: list[ToolCallRecord] = []
    reasons: dict[str, str] = {}
    text, steps, error = "", 0, None
    stopped: Stopped = "step_limit"

    def reply(call_id: str | None, name: str, content: str, ok: bool) -> ToolMessage:
        return ToolMessage(content=content, tool_call_id=call_id or "", name=name, status="success" if ok else "error")

    for _ in range(max_steps):
        if deadline is not None and time.monotonic() > deadline:
            stopped = "deadline"
            break
        try:
            ai = (first if steps == 0 else bound).invoke(history)
        except Exception as exc:  # LLMError, HTTP errors, an open circuit: the caller falls back
            stopped, error = "error", f"{type(exc).__name__}: {str(exc)[:300]}"
            logger.warning("tool loop: model call failed error=%s", error)
            break
        steps += 1
        if not isinstance(ai, BaseMessage):
            stopped, error = "error", f"the model returned {type(ai).__name__}, not a message"
            break
        history.append(ai)
        calls = list(ai.tool_calls) if isinstance(ai, AIMessage) else []
        invalid = list(ai.invalid_tool_calls) if isinstance(ai, AIMessage) else []
        if not calls and not invalid:
            text, stopped = prompts.clean_text(ai.text, 600), "answer"
            break
        for bad in invalid:  # every call id gets an answer, or the next request is refused
            records.append(ToolCallRecord(str(bad.get("name") or "?"), {}, False, "invalid arguments"))
            history.append(reply(bad.get("id"), str(bad.get("name") or "?"),
                                 f"error: invalid tool call: {bad.get('error') or 'arguments are not JSON'}", False))
        for n, call in enumerate(calls):
            name, args = call["name"], dict(call.get("args") or {})
            tool = by_name.get(name)
            if n >= max_calls_per_step:
                out: object = f"error: skipped; at most {max_calls_per_step} tool calls per step"
            elif tool is None:
                out = f"error: unknown tool {name!r}; the tools are {', '.join(sorted(by_name))}"
            else:
                try:
                    out = tool.invoke(args)  # a dict, or the error text of a bad argument (the tools handle them)
                except Exception as exc:
                    out = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            ok = isinstance(out, dict)
            record = ToolCallRecord(name, args, ok, None if ok else str(out)[:300])
            if isinstance(out, dict):
                record.returned = _returned_ids(out)
                if name == "explain" and isinstance(out.get("item"), dict) and isinstance(out.get("reason"), str):
                    reasons[str(out["item"].get("item_id"))] = prompts.clean_text(out["reason"], 300)
            records.append(record)
            history.append(reply(call.get("id"), name, _content(out), ok))
    items, dropped = _select(records, catalog, excluded, filters, k)
    reasons = {i: r for i, r in reasons.items() if catalog.has_item(i) and i not in excluded}
    logger.info("tool loop steps=%d calls=%s stopped=%s items=%s dropped=%d", steps,
                ",".join(r.name for r in records), stopped, ",".join(items), len(dropped))
    return ToolLoopResult(items=items, text=text, calls=records, steps=steps, stopped=stopped, dropped=dropped,
                          reasons=reasons, error=error)


def _select(records: list[ToolCallRecord], catalog: Catalog, excluded: set[str], filters: Filters | None,
            k: int) -> tuple[list[str], dict[str, str]]:
    """The ids the tool calls returned, the latest call's first, kept only when they are catalogue items that are
    not excluded and pass ``filters``; at most ``k``."""
    items: list[str] = []
    dropped: dict[str, str] = {}
    for record in reversed(records):
        for item_id in record.returned:
            if item_id in items or item_id in dropped:
                continue
            if not catalog.has_item(item_id):
                dropped[item_id] = "not in the catalogue"
            elif item_id in excluded:
                dropped[item_id] = "excluded by the session"
            elif not _passes(catalog, item_id, filters):
                dropped[item_id] = "breaks the session's filters"
            elif len(items) < k:
                items.append(item_id)
    return items, dropped


def tool_turn(service: RecommenderService, state: SessionState, message: str, model: BaseChatModel, *, k: int = 5,
              max_steps: int = MAX_STEPS, deadline: float | None = None,
              tools: Sequence[BaseTool] | None = None, first_tool_choice: str | None = None) -> ToolLoopResult:
    """One chat turn through the tool loop: the session (liked, disliked, excluded ids, constraints) and the
    message in the ``chat_tools.v1`` prompt; the session's exclusions and constraints bound the items."""
    from agent.langchain_tools import recagent_tools
    from retrieval.filters import Filters

    catalog = service.catalog

    def named(ids: Iterable[str]) -> str:
        return "; ".join(f"{i}: {prompts.clean_text(catalog.item(i)['title'], 80)}" for i in ids
                         if catalog.has_item(i)) or "none"

    c = state.constraints
    filters = Filters(genres=c.genres, exclude_genres=c.exclude_genres, year_min=c.year_min, year_max=c.year_max)
    shown = filters.model_dump(exclude_defaults=True)
    rendered = prompts.load("chat_tools", "v1").render(
        liked=named(state.liked[-20:]), disliked=named(state.disliked[-10:]),
        excluded=", ".join(sorted(state.excluded())[:60]) or "none",
        constraints=", ".join(f"{key}={value}" for key, value in shown.items()) or "none", message=message)
    return run_tool_loop(model, tools if tools is not None else recagent_tools(service),
                         [(m["role"], m["content"]) for m in rendered.messages], catalog=catalog,
                         exclude=state.excluded(), filters=None if filters.is_empty() else filters, k=k,
                         max_steps=max_steps, deadline=deadline, first_tool_choice=first_tool_choice)


__all__ = ["MAX_STEPS", "ToolCallRecord", "ToolLoopResult", "run_tool_loop", "tool_turn"]
