"""Per-item reasons in chat turns (:mod:`agent.explain` through the real chat agent on the tiny catalogue, with
fake LLM backends): templates that name each item's own evidence first, then one LLM sentence per item as it is
written (checked against the metadata), the turn's deadline and cancellation, and "why the first one?" answered
with the stored reason."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from agent.chat.agent import ChatAgent
from agent.chat.config import ChatConfig
from agent.chat.models import SessionState, Turn, TurnItems
from agent.chat.state import SQLiteSessionStore
from agent.explain import Reason
from agent.llm.base import TextRequest
from agent.service import RecommenderService
from retrieval.catalog import Catalog
from retrieval.index import Index

sys.path.insert(0, str(Path(__file__).parent))
from fakes import ScriptedBackend  # noqa: E402
from test_api_fakes import FakeBackend  # noqa: E402


class SlowReasons(FakeBackend):
    """The fake LLM, ``reason_s`` seconds per reason (the other calls are instant); counts the reasons asked."""

    def __init__(self, reason_s: float) -> None:
        super().__init__()
        self.reason_s, self.reasons, self.threads = reason_s, 0, set[str]()

    def complete(self, request: TextRequest) -> str:
        self.reasons += 1
        self.threads.add(threading.current_thread().name)
        time.sleep(self.reason_s)
        return super().complete(request)


class WrongGenre(FakeBackend):
    """An LLM that claims a genre the catalogue does not give the item: the checks must refuse it."""

    def complete(self, request: TextRequest) -> str:
        return "is a Horror film, as scary as it gets."


def make_agent(tiny_index: Index, tmp_path: Path, backend: object, **config: object) -> ChatAgent:
    service = RecommenderService(tiny_index, backend=backend)  # type: ignore[arg-type]
    return ChatAgent(service, SQLiteSessionStore(tmp_path / "sessions.sqlite"), ChatConfig(**config))  # type: ignore[arg-type]


def split(events: Sequence[object]) -> tuple[str, list[TurnItems], list[Reason], Turn]:
    """The reply chunks joined, the items events, the reason events and the final turn; checks their order."""
    kinds = ["str" if isinstance(e, str) else type(e).__name__ for e in events]
    assert kinds[-1] == "Turn" and kinds.count("Turn") == 1, kinds
    order = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert order in (["str", "TurnItems", "Reason", "Turn"], ["str", "TurnItems", "Turn"], ["str", "Turn"]), order
    turn = events[-1]
    assert isinstance(turn, Turn)
    return ("".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, TurnItems)],
            [e for e in events if isinstance(e, Reason)], turn)


def test_stream_sends_items_then_one_llm_reason_each_then_the_turn(tiny_index: Index, tmp_path: Path,
                                                                     tiny_catalog: Catalog) -> None:
    agent = make_agent(tiny_index, tmp_path, FakeBackend())
    text, shown, reasons, turn = split(list(agent.respond_stream(None, "I loved Star Voyager, what next?")))
    assert text == turn.reply and not turn.degraded, turn.reason
    assert len(shown) == 1 and [i.item_id for i in shown[0].items] == [i.item_id for i in turn.items]
    assert all(i.reason and i.reason_source == "template" for i in shown[0].items)
    assert [r.item_id for r in reasons] == [i.item_id for i in turn.items]  # one each, in rank order here
    for reason, item in zip(reasons, turn.items, strict=True):
        assert reason.source == item.reason_source == "llm" and reason.reason == item.reason
        assert reason.evidence == item.evidence == ["s1"] and "Star Voyager" in item.reason
        assert str(tiny_catalog.item(item.item_id)["title"]) in item.reason  # each sentence is about its item
    assert len({i.reason for i in turn.items}) == len(turn.items)
    state = agent.store.get(turn.session_id)
    assert state is not None and all(state.reasons[i.item_id] == i.reason for i in turn.items)
    # "why the first one?" answers with the stored LLM sentence, then the item's facts
    first, second = turn.items[0], turn.items[1]
    why = agent.respond(turn.session_id, "why the first one?")
    assert first.reason in why.reply and first.title in why.reply and why.items == []
    assert f"It is {first.genres[0]}" in why.reply
    assert second.reason in agent.respond(turn.session_id, "why the second one?").reply
    assert "only suggested" in agent.respond(turn.session_id, "why the 9th one?").reply


def test_respond_returns_the_final_reasons(tiny_index: Index, tmp_path: Path) -> None:
    agent = make_agent(tiny_index, tmp_path, ScriptedBackend(), k=3)
    turn = agent.respond(None, "I loved The Glass Slipper, nothing dramatic please")
    assert turn.items and not any("Drama" in i.genres for i in turn.items)
    assert all(i.reason_source == "llm" and "film you may like" in i.reason for i in turn.items)
    assert all(i.evidence == ["a1"] and "The Glass Slipper" in i.reason for i in turn.items)
    # no LLM sentences when the caller asks for none (replayed turns) or the config says so
    plain = agent.respond(turn.session_id, "more please", explain=False)
    assert plain.items and all(i.reason_source == "template" for i in plain.items)
    off = make_agent(tiny_index, tmp_path, ScriptedBackend(), k=3, llm_explain=False)
    assert all(i.reason_source == "template" for i in off.respond(None, "I loved The Glass Slipper").items)


def test_templates_name_each_items_own_evidence(tiny_index: Index, tmp_path: Path) -> None:
    agent = make_agent(tiny_index, tmp_path, None, use_llm=False)
    text, shown, reasons, turn = split(list(agent.respond_stream(None, "what should I watch?", user_id="u3")))
    assert reasons == [] and shown and turn.items  # without the LLM, the items' templates are final
    assert all(i.reason_source == "template" and len(i.evidence) == 1 for i in turn.items)
    evidence = {i.evidence[0] for i in turn.items}
    assert len(evidence) > 1, [(i.item_id, i.evidence) for i in turn.items]  # not one liked item for all
    labels = {e: agent.resolver.label(e) for e in evidence}
    assert all(labels[i.evidence[0]] in i.reason for i in turn.items)
    assert len({i.reason for i in turn.items}) == len(turn.items), [i.reason for i in turn.items]


def test_refused_llm_sentences_stay_templates(tiny_index: Index, tmp_path: Path) -> None:
    agent = make_agent(tiny_index, tmp_path, WrongGenre())
    _, shown, reasons, turn = split(list(agent.respond_stream(None, "I loved Twelve Verdicts")))
    assert turn.items and len(reasons) == len(turn.items)
    assert all(r.source == "template" and "Horror" not in r.reason for r in reasons)
    assert [i.reason for i in turn.items] == [i.reason for i in shown[0].items]
    assert not turn.degraded  # a refused sentence is the checks working, not a degraded turn


def test_llm_failure_keeps_templates_and_says_so(tiny_index: Index, tmp_path: Path) -> None:
    class NoText(FakeBackend):
        def complete(self, request: TextRequest) -> str:
            from agent.llm.base import LLMError

            raise LLMError("no text today")

    agent = make_agent(tiny_index, tmp_path, NoText())
    _, _, reasons, turn = split(list(agent.respond_stream(None, "I loved Twelve Verdicts")))
    assert turn.items and [r.item_id for r in reasons] == [i.item_id for i in turn.items]
    assert all(i.reason_source == "template" for i in turn.items)
    assert turn.degraded and turn.reason and "LLM failed (LLMError)" in turn.reason


def test_the_turn_deadline_holds_for_reasons(tiny_index: Index, tmp_path: Path) -> None:
    backend = SlowReasons(reason_s=0.4)
    agent = make_agent(tiny_index, tmp_path, backend, turn_deadline_s=1.0)
    agent.respond(None, "warm-up: I loved Star Voyager", explain=False)  # ranking is quick from now on
    t0 = time.monotonic()
    _, _, reasons, turn = split(list(agent.respond_stream(None, "I loved Star Voyager")))
    assert time.monotonic() - t0 < 5.0
    assert turn.items and [r.item_id for r in reasons] == [i.item_id for i in turn.items]  # every item, once
    late = [i for i in turn.items if i.reason_source == "template"]
    assert late and all(r.source == i.reason_source for r, i in zip(reasons, turn.items, strict=True))
    assert turn.degraded and turn.reason and "deadline exceeded (1s) while writing reasons" in turn.reason
    assert f"{len(late)} of {len(turn.items)} reasons from templates" in turn.reason
    state = agent.store.get(turn.session_id)
    assert state is not None and [state.reasons[i.item_id] for i in turn.items] == [i.reason for i in turn.items]


def test_cancelling_stops_the_reasons_and_keeps_the_session(tiny_index: Index, tmp_path: Path) -> None:
    backend = SlowReasons(reason_s=0.3)
    agent = make_agent(tiny_index, tmp_path, backend)
    gone = threading.Event()
    events = []
    for event in agent.respond_stream(None, "I loved Star Voyager", cancelled=gone.is_set):
        events.append(event)
        if isinstance(event, TurnItems):
            gone.set()  # the client went away once it had the items
    _, shown, _, turn = split(events)
    assert backend.reasons <= 1 < len(turn.items)
    assert all(i.reason_source == "template" for i in turn.items)
    assert turn.degraded and turn.reason and "reasons stopped" in turn.reason
    state = agent.store.get(turn.session_id)
    assert state is not None and state.last_items == [i.item_id for i in shown[0].items]


def test_runtime_stream_runs_reasons_on_the_explain_lane_and_cancels_on_close(tiny_index: Index,
                                                                             tmp_path: Path) -> None:
    from agent.api_models import ChatRequest, ChatResponse
    from agent.runtime import Runtime
    from agent.settings import Settings

    backend = SlowReasons(reason_s=0.3)
    agent = make_agent(tiny_index, tmp_path, backend)
    runtime = Runtime(agent.service, Settings(llm="fake"), chat=agent)

    async def whole() -> list[object]:
        return [p async for p in runtime.chat_stream(ChatRequest(message="I loved Star Voyager"))]

    async def closed_early() -> SessionState:
        stream = cast(AsyncGenerator[Any, None], runtime.chat_stream(ChatRequest(message="I loved Nebula Drift")))
        async for piece in stream:
            if isinstance(piece, TurnItems):
                await stream.aclose()  # what a disconnecting client does to the stream
                break
        else:
            raise AssertionError("no items")
        deadline = time.monotonic() + 10
        while (state := agent.store.get(piece.session_id)) is None or not state.turns:  # the turn goes on
            assert time.monotonic() < deadline, "the turn was never saved"
            await asyncio.sleep(0.05)
        return state

    try:
        pieces = asyncio.run(whole())
        final = pieces[-1]
        assert isinstance(final, ChatResponse) and final.items and not final.degraded
        reasons = [p for p in pieces if isinstance(p, Reason)]
        assert [r.item_id for r in reasons] == [i.item_id for i in final.items]
        assert all(i.reason_source == "llm" for i in final.items)
        assert backend.threads and all(t.startswith("explain") for t in backend.threads), backend.threads
        backend.reasons = 0
        state = asyncio.run(closed_early())
        assert backend.reasons <= 2 < len(state.last_items)  # the reasons stopped soon after the close
        assert all(state.reasons[i] for i in state.last_items)  # the rest kept their templates
    finally:
        runtime.close()


@pytest.mark.parametrize("message", ["why that one?", "why the first one?"])
def test_why_before_any_pick(tiny_index: Index, tmp_path: Path, message: str) -> None:
    agent = make_agent(tiny_index, tmp_path, FakeBackend())
    assert "haven't recommended anything yet" in agent.respond(None, message).reply
