"""How one recommendation or rerank request is answered under its deadline, as a stream of events.

1. **Ranking** runs on the score lane (its own work queue): past the deadline, the retrieval order is answered,
   flagged degraded. The ranked list is the first event (``ranked``), in score-mode time. The ranking pass of a
   request that goes on to explain runs as background work (:class:`~agent.llm.priority.Priority`): plain score
   requests go ahead of it.
2. **Reasons** (``explain: true``) run on the explain lane, a separate work queue, so that long generations never
   hold score requests (the in-process backend also lets score passes go first between decoding steps and between
   the layers of one step). When
   every explain worker is busy the reasons come from templates at once (load shedding: queued generation work
   would only miss its deadline and slow the rest). Each reason is an event (``reason``) as soon as the LLM has
   written it and the code checks have passed it.
3. At the deadline, or when the client goes away (the event stream is closed), the remaining work is cancelled
   (it stops at its next decoding step) and every item still without a reason gets a template reason. The
   answer keeps the LLM ranking it has, says who wrote each reason and what degraded; it is the ``done`` event.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from agent.errors import QueueFullError
from agent.explain import Reason, note_degraded
from agent.llm.base import deadline_var
from agent.llm.priority import Priority, priority_var
from agent.metrics import Metrics
from agent.schemas import RecommendationAnswer
from agent.service import Ranked, RecommenderService
from agent.work_queue import WorkQueue

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Event:
    """``ranked``: the list without reasons; ``reason``: one item's reason; ``done``: the whole answer."""

    kind: Literal["ranked", "reason", "done"]
    answer: RecommendationAnswer | None = None
    reason: Reason | None = None
    rank: int | None = None


@dataclass
class Lanes:
    """What answering needs from the server: the two work queues, a thread pool for quick non-LLM work, and the
    services (``plain``: the same index without the LLM)."""

    score: WorkQueue
    explain: WorkQueue
    io: Executor
    service: RecommenderService
    plain: RecommenderService
    metrics: Metrics


async def run_io(executor: Executor, fn: Callable[[], T]) -> T:
    """``fn()`` on ``executor`` (quick non-LLM work), with the caller's context (request id)."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, ctx.run, fn)


async def rank_with_deadline(lanes: Lanes, route: str, job: Callable[[float], Ranked], fallback: Callable[[], Ranked],
                             use_llm: bool, deadline: float, timeout_s: float, explain: bool = False) -> Ranked:
    """``job(deadline)`` on the score lane (or ``fallback()`` without the LLM); the retrieval order, flagged, when
    the deadline passes first. The ranking pass of a request that goes on to ``explain`` runs behind plain score
    requests (:class:`~agent.llm.priority.Priority`), whose callers wait for nothing else."""
    if not use_llm:
        return await run_io(lanes.io, fallback)

    def run() -> Ranked:
        deadline_var.set(deadline)
        priority_var.set(Priority.BACKGROUND if explain else Priority.SCORE)
        return job(deadline)

    future = lanes.score.submit(run, background=explain)
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        ranked = await run_io(lanes.io, fallback)
        ranked.answer.degraded = True
        ranked.answer.reason = f"deadline exceeded ({timeout_s:g}s): retrieval order"
        ranked.answer.model = lanes.service.backend.model_name if lanes.service.backend else None
        logger.warning("deadline exceeded route=%s stage=rank timeout_s=%g", route, timeout_s)
        return ranked


async def answer_events(lanes: Lanes, route: str, ranked: Ranked, explain: bool, use_llm: bool,
                        deadline: float, timeout_s: float) -> AsyncIterator[Event]:
    """The events of one answer after ranking (see the module docstring). Closing the iterator early (a client
    that disconnects) cancels the reasons still being written."""
    t0 = time.perf_counter()
    answer = ranked.answer
    yield Event("ranked", answer=answer.model_copy(deep=True))
    if not explain:
        _count_degraded(lanes, route, answer)
        yield Event("done", answer=answer)
        return
    ranks = {i.item_id: i.rank for i in answer.items}
    reasons: dict[str, Reason] = {}
    service = lanes.service if use_llm else lanes.plain
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stopped: str | None = None

    def work() -> None:
        deadline_var.set(deadline)
        try:
            for reason in service.reasons(ranked, cancelled=cancel.is_set):
                loop.call_soon_threadsafe(inbox.put_nowait, ("reason", reason))
        except BaseException as exc:  # the LLM failed: templates fill in below
            loop.call_soon_threadsafe(inbox.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(inbox.put_nowait, ("end", None))

    try:
        try:
            lane = lanes.explain if service is lanes.service else None
            if lane is None:
                await run_io(lanes.io, work)
            elif lane.depth >= lane.workers:  # shed: a job that waits behind others would miss its deadline
                raise QueueFullError(0)
            else:
                lane.submit(work)
        except QueueFullError:
            stopped = "explanations skipped: every explain worker is busy"
        else:
            while True:
                try:
                    kind, value = await asyncio.wait_for(inbox.get(), timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    stopped = f"deadline exceeded ({timeout_s:g}s) while explaining"
                    logger.warning("deadline exceeded route=%s stage=explain timeout_s=%g", route, timeout_s)
                    break
                if kind == "end":
                    break
                if kind == "error":
                    logger.warning("explain failed route=%s error=%s", route, value)
                    stopped = f"explanations: LLM failed ({type(value).__name__})"
                    break
                reasons[value.item_id] = value
                if answer.timings.first_reason_ms is None:
                    answer.timings.first_reason_ms = round((time.perf_counter() - t0) * 1000, 2)
                yield Event("reason", reason=value, rank=ranks.get(value.item_id))
    finally:
        cancel.set()  # a closed stream, the deadline or an error: the rest stops at its next decoding step
    missing = [i for i in answer.items if i.item_id not in reasons]
    service.explainer.fill(answer, ranked.history, ranked.candidates, reasons)
    if stopped is not None and missing:
        note_degraded(answer, f"{stopped}: {len(missing)} of {len(answer.items)} reasons from templates")
        for item in missing:  # the templates written now are events too, so a stream lists every reason
            if item.reason is not None:
                yield Event("reason", rank=item.rank, reason=Reason(item.item_id, item.reason, item.evidence,
                                                                      "template"))
    answer.timings.explain_ms = round((time.perf_counter() - t0) * 1000, 2)
    _count_degraded(lanes, route, answer)
    yield Event("done", answer=answer)


def _count_degraded(lanes: Lanes, route: str, answer: RecommendationAnswer) -> None:
    if answer.degraded:
        cause = "deadline" if answer.reason and "deadline" in answer.reason else "llm_error"
        lanes.metrics.degraded.labels(route=route, cause=cause).inc()
