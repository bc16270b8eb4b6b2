"""How many torch threads each in-process forward pass gets, chosen from measured speed.

On a small CPU the best thread count depends on the work and on the machine's load: one short prompt (a few
hundred tokens, or one decoding step) runs faster on one thread whenever waking a second OpenMP thread costs
more than it saves, or another process holds the second core; a micro-batch of thousands of tokens runs
faster on all of them. :class:`ThreadGovernor` keeps a smoothed seconds-per-token figure for each thread count
and each kind of pass, uses the faster one and now and then re-tries the other, so a change of load is noticed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

#: Passes over at least this many new tokens are "large" (micro-batches, long prompts); fewer are "small"; fewer
#: than SHORT_PASS_TOKENS are "short" (prompt chunks, a row's own prompt part). Kinds keep passes of like size
#: together because the per-token figure is not size-free: a pass has a fixed cost (tens of ms here) that a
#: short pass spreads over few tokens, so short passes timed with the others would make their thread count look
#: slow.
LARGE_PASS_TOKENS = 512
SHORT_PASS_TOKENS = 160
#: "decode": one new token of one sequence; "decode-batch": one new token for each row of a batch.
KINDS = ("short", "small", "large", "decode", "decode-batch")


@dataclass
class ForwardPass:
    """One timed pass: the thread count it runs on and the tokens it processes (updatable inside)."""

    kind: str
    threads: int
    tokens: int


def pass_kind(new_tokens: int) -> str:
    return "large" if new_tokens >= LARGE_PASS_TOKENS else "small" if new_tokens >= SHORT_PASS_TOKENS else "short"


class ThreadGovernor:
    """Chooses between one thread and ``max_threads`` per kind of pass (:data:`KINDS`).

    The first measurement of each choice is discarded (warm-up); after that the faster choice by smoothed
    seconds per token is used, and the other one is re-tried after ``explore_every`` passes of that kind; each
    re-try that confirms the choice doubles that interval (up to ``max_explore_every``), a switch resets it.
    """

    def __init__(self, max_threads: int, explore_every: int = 20, max_explore_every: int = 320,
                 smoothing: float = 0.3) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self.choices = sorted({1, max_threads}, reverse=True)
        self.explore_every = explore_every
        self.max_explore_every = max_explore_every
        self.smoothing = smoothing
        self._rate: dict[tuple[str, int], float] = {}
        self._samples: dict[tuple[str, int], int] = {}
        self._since: dict[str, int] = {}  # passes since the last re-try, by kind
        self._interval: dict[str, int] = {}
        self._lock = threading.Lock()

    def _best(self, kind: str) -> int | None:
        if any(self._samples.get((kind, n), 0) < 2 for n in self.choices):
            return None
        return min(self.choices, key=lambda n: self._rate[(kind, n)])

    def choose(self, kind: str) -> int:
        with self._lock:
            if len(self.choices) == 1:
                return self.choices[0]
            best = self._best(kind)
            if best is None:  # the most threads first; each needs a warm-up pass and one measured pass
                return next(n for n in self.choices if self._samples.get((kind, n), 0) < 2)
            if self._since.get(kind, 0) >= self._interval.get(kind, self.explore_every):
                return next(n for n in self.choices if n != best)
            return best

    def record(self, kind: str, threads: int, tokens: int, seconds: float) -> None:
        key = (kind, threads)
        with self._lock:
            before = self._best(kind)
            self._samples[key] = self._samples.get(key, 0) + 1
            if self._samples[key] > 1:  # the first pass is warm-up: allocation and first-touch costs
                rate = seconds / max(tokens, 1)
                old = self._rate.get(key)
                self._rate[key] = rate if old is None else old + self.smoothing * (rate - old)
            if before is None or threads == before:
                self._since[kind] = self._since.get(kind, 0) + 1
                return
            # a re-try of the other choice: back off if it confirmed the choice, start over if it changed it
            interval = self._interval.get(kind, self.explore_every)
            confirmed = self._best(kind) == before
            self._interval[kind] = min(interval * 2, self.max_explore_every) if confirmed else self.explore_every
            self._since[kind] = 0

    def snapshot(self) -> dict[str, dict[int, float]]:
        """Smoothed milliseconds per token by kind and thread count (for logs and reports)."""
        with self._lock:
            out: dict[str, dict[int, float]] = {}
            for (kind, n), rate in self._rate.items():
                out.setdefault(kind, {})[n] = round(rate * 1000, 4)
            return out
