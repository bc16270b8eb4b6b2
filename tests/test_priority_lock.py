"""The model lock's priorities: score passes first, then background ranking passes, then decoding steps."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agent.llm.priority import Priority, PriorityLock
from agent.metrics import Metrics
from agent.work_queue import WorkQueue


def _queue_up(lock: PriorityLock, level: Priority, order: list[str], name: str) -> threading.Thread:
    """A thread that takes ``lock`` at ``level``, notes ``name`` and releases; returned once it is waiting."""
    def run() -> None:
        with lock.hold(level):
            order.append(name)

    before = len(lock._waiting)
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while len(lock._waiting) == before and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(lock._waiting) == before + 1, "the thread never queued for the lock"
    return thread


def test_waiters_are_served_by_priority_then_first_come() -> None:
    lock, order = PriorityLock(), list[str]()
    lock.acquire(Priority.DECODE)
    threads = [_queue_up(lock, Priority.DECODE, order, "decode-1"),
               _queue_up(lock, Priority.BACKGROUND, order, "background"),
               _queue_up(lock, Priority.DECODE, order, "decode-2"),
               _queue_up(lock, Priority.SCORE, order, "score-1"),
               _queue_up(lock, Priority.SCORE, order, "score-2")]
    lock.release()
    for t in threads:
        t.join(10)
    assert order == ["score-1", "score-2", "background", "decode-1", "decode-2"]


def test_a_holder_yields_only_to_higher_priorities_and_keeps_its_depth() -> None:
    lock, order = PriorityLock(), list[str]()
    lock.acquire(Priority.BACKGROUND)
    lock.acquire(Priority.BACKGROUND)  # re-entrant
    same = _queue_up(lock, Priority.BACKGROUND, order, "background-2")
    lock.yield_to_higher()  # nobody above BACKGROUND waits: returns at once, still held
    assert order == [] and lock._owner == threading.get_ident()
    score = _queue_up(lock, Priority.SCORE, order, "score")
    assert lock.waiting_before(Priority.BACKGROUND)
    assert lock.offer() > 0  # the score pass ran meanwhile
    score.join(10)
    assert order == ["score"] and lock._owner == threading.get_ident()
    lock.release()
    assert lock._owner == threading.get_ident()  # one level of re-entry is still held
    lock.release()
    same.join(10)
    assert order == ["score", "background-2"]


def test_offer_outside_the_lock_does_nothing_and_release_needs_the_owner() -> None:
    lock = PriorityLock()
    assert lock.offer() == 0.0
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.yield_to_higher()


def test_the_score_lane_counts_background_jobs_apart() -> None:
    """The batcher waits for company only from running foreground jobs: background jobs (ranking passes of
    requests that go on to explain) never reach it."""
    async def main() -> tuple[int, int]:
        queue = WorkQueue(workers=4, size=4, metrics=Metrics(), name="score")
        release = threading.Event()
        jobs = [queue.submit(release.wait, background=b) for b in (True, True, False)]
        await asyncio.sleep(0.05)
        counts = queue.running, queue.running_foreground
        release.set()
        await asyncio.gather(*jobs)
        assert (queue.running, queue.running_foreground) == (0, 0)
        queue.shutdown()
        return counts

    assert asyncio.run(main()) == (3, 1)
