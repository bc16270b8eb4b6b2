"""A bounded pool of worker threads for LLM jobs: a full queue answers :class:`QueueFullError` (HTTP 429)."""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from agent.errors import QueueFullError
from agent.metrics import Metrics

T = TypeVar("T")


class WorkQueue:
    """A fixed thread pool with a bound on jobs waiting or running; full -> :class:`QueueFullError`."""

    def __init__(self, workers: int, size: int, metrics: Metrics, name: str = "llm") -> None:
        self.workers = workers
        self.size = size
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._pending = 0
        self._background = 0  # of which submitted as background work
        self._lock = threading.Lock()
        self._mean_job_s = 1.0
        metrics.queue_depth.labels(lane=name).set_function(lambda: self._pending)

    @property
    def depth(self) -> int:
        return self._pending

    @property
    def running(self) -> int:
        """Jobs on a worker now (the rest of ``depth`` waits for one)."""
        return min(self._pending, self.workers)

    @property
    def running_foreground(self) -> int:
        """Jobs on a worker now, not counting background jobs (an estimate: background jobs count as running
        first)."""
        return max(0, self.running - self._background)

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_job_s * self._pending / self.workers))

    def submit(self, fn: Callable[[], T], background: bool = False) -> asyncio.Future[T]:
        """Run ``fn`` on a worker (``background``: work no caller waits on alone, such as the ranking pass of a
        request that goes on to explain; see :attr:`running_foreground`)."""
        with self._lock:
            if self._pending >= self.size + self.workers:
                self.metrics.rejected.inc()
                raise QueueFullError(self.retry_after())
            self._pending += 1
            self._background += background
        ctx = contextvars.copy_context()

        def job() -> T:
            t0 = time.perf_counter()
            try:
                return ctx.run(fn)
            finally:
                took = time.perf_counter() - t0
                self.metrics.job_seconds.observe(took)
                with self._lock:
                    self._pending -= 1
                    self._background -= background
                    self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * took

        try:
            return asyncio.get_running_loop().run_in_executor(self.executor, job)
        except BaseException:
            with self._lock:
                self._pending -= 1
                self._background -= background
            raise

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
