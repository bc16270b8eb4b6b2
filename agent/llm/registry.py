"""Backends by name. Heavy imports happen only when a backend is built."""

from __future__ import annotations

from collections.abc import Callable

from agent.llm.base import LLMBackend
from agent.llm.config import LLMConfig


def _transformers(config: LLMConfig) -> LLMBackend:
    from agent.llm.transformers_backend import TransformersBackend

    return TransformersBackend(config)


def _openai(config: LLMConfig) -> LLMBackend:
    """An LLM server behind a circuit breaker: once it keeps failing, calls are refused at once for a while."""
    from agent.llm.breaker import CircuitBreaker, GuardedBackend
    from agent.llm.openai_backend import OpenAIBackend

    breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s, name="LLM")
    return GuardedBackend(OpenAIBackend(config), breaker)


BACKENDS: dict[str, Callable[[LLMConfig], LLMBackend]] = {
    "transformers": _transformers,
    "openai": _openai,
}


def make_backend(config: LLMConfig | None = None) -> LLMBackend:
    config = config or LLMConfig.from_env()
    factory = BACKENDS.get(config.backend)
    if factory is None:
        raise ValueError(f"unknown LLM backend '{config.backend}' (RECAGENT_LLM); choose one of: "
                         f"{', '.join(sorted(BACKENDS))}")
    return factory(config)
