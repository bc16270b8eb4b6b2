"""Prometheus metrics of one app, in a registry of their own (LLM token counters read at scrape time)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.llm.base import LLMBackend


class _UsageCollector(Collector):
    """LLM token counters read from the backend's running usage at scrape time."""

    def __init__(self, backend: Callable[[], LLMBackend | None]) -> None:
        self.backend = backend

    def collect(self) -> Iterator[CounterMetricFamily]:
        tokens = CounterMetricFamily("recagent_llm_tokens", "LLM tokens processed", labels=["kind"])
        calls = CounterMetricFamily("recagent_llm_calls", "LLM calls", labels=["kind"])
        backend = self.backend()
        if backend is not None:
            usage = backend.usage
            tokens.add_metric(["prompt"], usage.prompt_tokens)
            tokens.add_metric(["completion"], usage.completion_tokens)
            tokens.add_metric(["cached_prompt"], usage.cached_prompt_tokens)
            for kind, n in sorted(usage.by_kind.items()):
                calls.add_metric([kind], n)
        yield tokens
        yield calls


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "recagent_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "recagent_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60),
            registry=r,
        )
        self.degraded = Counter(
            "recagent_degraded_answers", "answers flagged degraded", ["route", "cause"], registry=r
        )
        self.rejected = Counter(
            "recagent_queue_rejected", "requests refused because the work queue was full", registry=r
        )
        self.queue_depth = Gauge("recagent_queue_depth", "LLM jobs waiting or running", ["lane"], registry=r)
        self.job_seconds = Histogram(
            "recagent_llm_job_seconds",
            "time of one LLM job (queue excluded)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60),
            registry=r,
        )
        self.batch_size = Histogram(
            "recagent_llm_score_batch_size",
            "score prompts per forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )

    def watch_usage(self, backend: Callable[[], LLMBackend | None]) -> None:
        self.registry.register(_UsageCollector(backend))
