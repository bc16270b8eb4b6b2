"""The runtime's micro-batcher: concurrent score requests share a forward pass; stale work is dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.llm.base import LLMError, ScoreRequest, deadline_var
from agent.llm.batching import BatchingBackend


class _Inner:
    """Just enough of the transformers backend's surface for BatchingBackend to accept it."""

    name = "inner"
    model = tokenizer = render = label_id = torch = threads_for = scoring = None

    def __init__(self) -> None:
        from agent.llm.base import Usage

        self._lock = threading.Lock()
        self.usage = Usage()
        self.model_name = "inner-model"

    def close(self) -> None:
        pass


class _Recording(BatchingBackend):
    def __init__(self, window_ms: float, in_flight: Callable[[], int] | None = None) -> None:
        super().__init__(_Inner(), window_ms=window_ms, max_batch=8, in_flight=in_flight)  # type: ignore[arg-type]
        self.batches: list[int] = []

    def forward(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.batches.append(len(requests))
        time.sleep(0.05)
        return [[float(i)] * len(r.labels) for i, r in enumerate(requests)]


def _request() -> ScoreRequest:
    return ScoreRequest(messages=[], answer_prefix="", labels=["A", "B"])


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    batcher = _Recording(window_ms=100)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: batcher.score_labels(_request()), range(4)))
    assert sorted(batcher.batches, reverse=True)[0] > 1, batcher.batches
    assert sum(batcher.batches) == 4
    assert all(len(r) == 2 for r in results)
    assert batcher.score_labels_batch([_request(), _request()]) == [[0.0, 0.0], [1.0, 1.0]]
    batcher.close()


def test_expired_work_is_dropped_before_the_forward_pass() -> None:
    batcher = _Recording(window_ms=1)
    token = deadline_var.set(time.monotonic() - 1)
    try:
        with pytest.raises(LLMError, match="deadline"):
            batcher.score_labels(_request())
    finally:
        deadline_var.reset(token)
    assert batcher.batches == []
    assert batcher.score_labels(_request()) == [0.0, 0.0]
    batcher.close()


def test_a_lone_request_does_not_wait_for_company() -> None:
    batcher = _Recording(window_ms=5000, in_flight=lambda: 1)
    t0 = time.monotonic()
    assert batcher.score_labels(_request()) == [0.0, 0.0]
    assert time.monotonic() - t0 < 2.5  # far below the 5 s window (and its 25 s cap)
    assert batcher.batches == [1]
    batcher.close()


def test_the_window_closes_once_every_running_job_has_arrived() -> None:
    batcher = _Recording(window_ms=5000, in_flight=lambda: 3)
    t0 = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: batcher.score_labels(_request()), range(3)))
    assert time.monotonic() - t0 < 2.5
    assert batcher.batches == [3]
    assert sorted(r[0] for r in results) == [0.0, 1.0, 2.0]
    batcher.close()


def test_background_passes_bypass_the_batcher() -> None:
    """The ranking pass of a request that goes on to explain runs on the backend's own path, behind the score
    passes (the batcher's shared forward pass would put it level with them)."""
    from agent.llm.priority import Priority, priority_var

    calls: list[str] = []
    batcher = _Recording(window_ms=1)

    def own_path(request: ScoreRequest) -> list[float]:
        calls.append(threading.current_thread().name)
        return [0.5, 0.5]

    batcher.inner.score_labels = own_path
    token = priority_var.set(Priority.BACKGROUND)
    try:
        assert batcher.score_labels_batch([_request(), _request()]) == [[0.5, 0.5], [0.5, 0.5]]
    finally:
        priority_var.reset(token)
    assert batcher.batches == [] and calls == [threading.current_thread().name] * 2
    assert batcher.score_labels(_request()) == [0.0, 0.0] and batcher.batches == [1]
    batcher.close()
