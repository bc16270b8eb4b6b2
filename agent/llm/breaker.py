"""A circuit breaker in front of an LLM server: once it keeps failing, calls are refused at once for a while
instead of each one waiting for its own connection error or time-out.

:class:`CircuitBreaker` is the state machine (thread-safe):

* ``closed``: calls go through; ``failures_to_open`` consecutive failures open it.
* ``open``: calls are refused at once with :class:`CircuitOpenError` for ``cooldown_s`` seconds.
* ``half_open``: the cooldown is over; the next call goes through as the one probe (others are still refused
  while it runs). The probe's success closes the circuit, its failure opens it again for another cooldown.

:class:`GuardedBackend` wraps any :class:`LLMBackend` with one (``registry.make_backend`` wraps the OpenAI-compatible
backend). What counts is told by the :class:`LLMError` the inner backend raises, through its ``server_fault``
attribute: true (the default: unreachable, time-out, HTTP 5xx) is a failure; false (the server answered, but the
answer does not serve the request: HTTP 4xx, unusable output) proves the server works, so it counts as a success;
None (nothing reached the server: the request's deadline had passed) counts as neither.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

from agent.llm.base import ChatMessage, LLMBackend, LLMError, MarkerRequest, ScoreRequest, TextRequest

logger = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
T = TypeVar("T")

#: What :attr:`GuardedBackend.model_name` says when the model was never named and the server cannot be asked.
UNKNOWN_MODEL = "unknown"


class CircuitOpenError(LLMError):
    """Refused by an open circuit, without calling the server."""

    server_fault = None  # a refusal tells nothing new about the server


def server_fault(exc: BaseException) -> bool | None:
    """True when ``exc`` counts against the server, False when it proves the server answered, None when neither."""
    value = getattr(exc, "server_fault", True)
    return None if value is None else bool(value)


class CircuitBreaker:
    """Counts consecutive failures of one dependency and refuses calls while it is deemed down (see the module
    docstring). Use :meth:`acquire` before a call, then exactly one of :meth:`success`, :meth:`failure` or
    :meth:`release` with what :meth:`acquire` returned."""

    def __init__(self, failures_to_open: int = 3, cooldown_s: float = 10.0, name: str = "LLM",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failures_to_open < 1:
            raise ValueError("failures_to_open must be at least 1")
        if cooldown_s <= 0:
            raise ValueError("cooldown_s must be positive")
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self.name = name
        self.clock = clock
        self._lock = threading.Lock()
        self._state: State = "closed"  # "half_open" only while a probe is (or was) let through
        self._failures = 0
        self._last_error: str | None = None
        self._opened_at: float | None = None  # clock() time
        self._opened_wall: float | None = None  # time.time(), for reports
        self._probe_in_flight = False
        self.times_opened = 0

    # -- state -----------------------------------------------------------------------------------------------
    def _current(self, now: float) -> State:
        if self._state == "open" and self._opened_at is not None and now - self._opened_at >= self.cooldown_s:
            return "half_open"
        return self._state

    @property
    def state(self) -> State:
        with self._lock:
            return self._current(self.clock())

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def retry_in_s(self) -> float | None:
        """Seconds until the next probe may go (0 once it may), None while closed."""
        with self._lock:
            return self._retry_in(self.clock())

    def _retry_in(self, now: float) -> float | None:
        if self._state == "closed" or self._opened_at is None:
            return None
        return max(0.0, self._opened_at + self.cooldown_s - now)

    def health(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            return {"state": self._current(now), "consecutive_failures": self._failures,
                    "failures_to_open": self.failures_to_open, "cooldown_s": self.cooldown_s,
                    "last_error": self._last_error, "opened_at": self._opened_wall,
                    "retry_in_s": None if (r := self._retry_in(now)) is None else round(r, 3),
                    "probe_in_flight": self._probe_in_flight, "times_opened": self.times_opened}

    # -- calls -----------------------------------------------------------------------------------------------
    def acquire(self) -> bool:
        """Let one call through (True when it is the half-open probe), or raise :class:`CircuitOpenError`."""
        with self._lock:
            now = self.clock()
            state = self._current(now)
            if state == "closed":
                return False
            if state == "half_open" and not self._probe_in_flight:
                self._state = "half_open"
                self._probe_in_flight = True
                logger.info("%s circuit half-open: probing after %d failures", self.name, self._failures)
                return True
            if state == "half_open":
                wait = "a probe call is testing the server now"
            else:
                wait = f"retrying in {self._retry_in(now) or 0.0:.1f}s"
            raise CircuitOpenError(f"{self.name} circuit open after {self._failures} failures; {wait}: "
                                   f"{self._last_error}")

    def success(self, probe: bool = False) -> None:
        """The call reached a working server: close the circuit."""
        with self._lock:
            if self._state != "closed":
                logger.info("%s circuit closed after %d failures (%s)", self.name, self._failures,
                            "probe succeeded" if probe else "a call succeeded")
            self._state = "closed"
            self._failures = 0
            self._last_error = None
            self._opened_at = self._opened_wall = None
            self._probe_in_flight = False

    def failure(self, error: BaseException | str, probe: bool = False) -> None:
        """The call failed for the server's sake: count it; open the circuit at the threshold, or again when the
        probe failed."""
        with self._lock:
            now = self.clock()
            self._failures += 1
            self._last_error = str(error)[:500]
            if probe and self._state == "half_open":
                self._probe_in_flight = False
                self._open(now, "probe failed")
            elif self._state == "closed" and self._failures >= self.failures_to_open:
                self._open(now, f"{self._failures} consecutive failures")

    def release(self, probe: bool = False) -> None:
        """The call ended without telling anything about the server (abandoned, or it never reached it)."""
        if probe:
            with self._lock:
                self._probe_in_flight = False

    def _open(self, now: float, why: str) -> None:
        self._state = "open"
        self._opened_at = now
        self._opened_wall = time.time()
        self.times_opened += 1
        logger.warning("%s circuit open (%s) for %.1fs; last error: %s", self.name, why, self.cooldown_s,
                       self._last_error)

    def settle(self, exc: BaseException, probe: bool = False) -> None:
        """Record the outcome told by an :class:`LLMError` (see :func:`server_fault`)."""
        fault = server_fault(exc)
        if fault is None:
            self.release(probe)
        elif fault:
            self.failure(exc, probe)
        else:
            self.success(probe)


class GuardedBackend(LLMBackend):
    """Any backend behind a :class:`CircuitBreaker`: every call goes to ``inner`` unless the circuit is open, when
    it raises :class:`CircuitOpenError` at once. ``count_tokens`` and ``model_name`` never fail (serving and
    degraded answers need them): a token estimate (characters / 4) and the last known (or configured) model name
    stand in. Shares ``inner``'s :class:`Usage`; other attributes (``config``, ``base_url``, ...) are ``inner``'s."""

    def __init__(self, inner: LLMBackend, breaker: CircuitBreaker | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.breaker = breaker or CircuitBreaker()
        self.usage = inner.usage
        self.name = inner.name
        self._model_name: str | None = None

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes this wrapper lacks
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def health(self) -> dict[str, Any]:
        """The breaker's state (state, consecutive_failures, last_error, opened_at, retry_in_s, ...)."""
        return self.breaker.health()

    # -- guarding --------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        probe = self.breaker.acquire()
        try:
            result = fn(*args, **kwargs)
        except LLMError as exc:
            self.breaker.settle(exc, probe)
            raise
        except BaseException:
            self.breaker.release(probe)
            raise
        self.breaker.success(probe)
        return result

    def _iterate(self, make: Callable[[], Iterator[T]]) -> Iterator[T]:
        """Guard a lazy call: the breaker is asked at the first ``next()``; the first item proves the server
        answered; no item at all (an empty result, a cancelled batch, a caller that stopped early) tells nothing."""
        probe = self.breaker.acquire()
        told = False
        try:
            for item in make():
                if not told:
                    self.breaker.success(probe)
                    told, probe = True, False
                yield item
        except LLMError as exc:
            told = True
            self.breaker.settle(exc, probe)
            raise
        finally:
            if not told:
                self.breaker.release(probe)

    # -- the interface ---------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        if self._model_name is not None:
            return self._model_name
        try:
            name = self._call(lambda: self.inner.model_name)
        except LLMError as exc:
            configured = getattr(getattr(self.inner, "config", None), "served_model", None)
            logger.debug("model name unavailable: %s", exc)
            return str(configured) if configured else UNKNOWN_MODEL
        self._model_name = name
        return name

    def score_labels(self, request: ScoreRequest) -> list[float]:
        return self._call(self.inner.score_labels, request)

    def score_labels_batch(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        return self._call(self.inner.score_labels_batch, requests)

    def score_markers(self, request: MarkerRequest) -> list[float]:
        return self._call(self.inner.score_markers, request)

    def score_markers_batch(self, requests: Sequence[MarkerRequest]) -> list[list[float]]:
        return self._call(self.inner.score_markers_batch, requests)

    def generate_json(self, messages: list[ChatMessage], schema: dict[str, Any], max_tokens: int = 512,
                      temperature: float = 0.0) -> str:
        return self._call(self.inner.generate_json, messages, schema, max_tokens=max_tokens,
                          temperature=temperature)

    def stream_text(self, messages: list[ChatMessage], max_tokens: int = 256,
                    temperature: float = 0.0) -> Iterator[str]:
        return self._iterate(lambda: self.inner.stream_text(messages, max_tokens=max_tokens,
                                                            temperature=temperature))

    def generate_text(self, messages: list[ChatMessage], max_tokens: int = 256, temperature: float = 0.0) -> str:
        return self._call(self.inner.generate_text, messages, max_tokens=max_tokens, temperature=temperature)

    def complete(self, request: TextRequest) -> str:
        return self._call(self.inner.complete, request)

    def complete_batch(self, requests: Sequence[TextRequest],
                       cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[int, str]]:
        return self._iterate(lambda: self.inner.complete_batch(requests, cancelled))

    def count_tokens(self, text: str) -> int:
        try:
            return self._call(self.inner.count_tokens, text)
        except LLMError as exc:
            logger.debug("token count estimated: %s", exc)
            return max(1, len(text) // 4) if text else 0

    def close(self) -> None:
        self.inner.close()
