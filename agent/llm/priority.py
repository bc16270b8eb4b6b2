"""Who goes first on the in-process model: a lock with three priority levels.

One model serves every request, one forward pass at a time. Work that a caller is waiting for right now goes
first, so that long generations (reasons) never hold short score passes back for more than one step:

* ``SCORE``: a ranking pass whose caller wants only the ranked list (the common request);
* ``BACKGROUND``: the ranking pass of a request that goes on to explain its list (its caller waits for reasons
  anyway);
* ``DECODE``: one step of a generation (a chunk of prompt tokens, or one new token per row).

A holder offers the lock to waiters of a higher priority between steps and, inside a forward pass, between the
model's layers (:meth:`PriorityLock.offer`, called by the in-process backend's layer hooks): a score pass waits
for at most one layer of a lower-priority pass, which resumes where it stopped. The level of the work a thread
runs is in :data:`priority_var` (set by the server's lanes; ``SCORE`` outside a request). Within a level,
waiters are served first come, first served.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum


class Priority(IntEnum):
    SCORE = 0
    BACKGROUND = 1
    DECODE = 2


#: The priority of the LLM work running in this thread (see the module docstring).
priority_var: contextvars.ContextVar[Priority] = contextvars.ContextVar("llm_priority", default=Priority.SCORE)


class PriorityLock:
    """A re-entrant lock handed to the waiter with the highest priority (lowest level), first come first served
    within a level."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._level = 0  # the owner's
        self._depth = 0
        self._tickets = itertools.count()
        self._waiting: list[tuple[int, int]] = []  # (level, ticket) of every waiting thread

    def _my_turn(self, level: int, ticket: int) -> bool:
        return self._owner is None and min(self._waiting) == (level, ticket)

    def _wait_for_turn(self, level: int, keep_place: bool = False) -> None:
        """With ``_cond`` held: queue up and wait until this thread owns the lock (``keep_place``: ahead of the
        waiters of its own level, for a holder that stepped aside)."""
        ticket = next(self._tickets)
        entry = (level, -ticket if keep_place else ticket)
        self._waiting.append(entry)
        try:
            while not self._my_turn(*entry):
                self._cond.wait()
        finally:
            self._waiting.remove(entry)
            self._cond.notify_all()  # the next waiter may be up once the owner releases
        self._owner = threading.get_ident()

    def acquire(self, level: int) -> None:
        with self._cond:
            if self._owner == threading.get_ident():
                self._depth += 1
                return
            self._wait_for_turn(level)
            self._depth, self._level = 1, level

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a PriorityLock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @contextmanager
    def hold(self, level: int) -> Iterator[None]:
        self.acquire(level)
        try:
            yield
        finally:
            self.release()

    def waiting_before(self, level: int) -> bool:
        """Whether a thread with a higher priority than ``level`` waits for the lock."""
        return any(w < level for w, _ in self._waiting)

    def yield_to_higher(self) -> None:
        """Held by this thread: let every waiter with a higher priority than the level it was taken at go first,
        then take the lock back (same level and depth) ahead of the waiters of its own level. Returns at once
        when none waits."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("yield of a PriorityLock this thread does not hold")
            level = self._level
            if not self.waiting_before(level):
                return
            depth, self._owner, self._depth = self._depth, None, 0
            self._cond.notify_all()
            self._wait_for_turn(level, keep_place=True)
            self._depth, self._level = depth, level

    def offer(self) -> float:
        """:meth:`yield_to_higher` when this thread holds the lock, else nothing; the seconds it waited. Cheap
        when nobody waits (called between the layers of every forward pass)."""
        if not self._waiting or self._owner != threading.get_ident():
            return 0.0
        t0 = time.perf_counter()
        self.yield_to_higher()
        return time.perf_counter() - t0


__all__ = ["Priority", "PriorityLock", "priority_var"]
