"""Backends by name. Heavy imports happen only when a backend is built."""

from __future__ import annotations

from collections.abc import Callable

from agent.llm.base import LLMBackend
from agent.llm.config import LLMConfig


def _transformers(config: LLMConfig) -> LLMBackend:
    from agent.llm.transformers_backend import TransformersBackend

    return TransformersBackend(config)


def _openai(config: LLMConfig) -> LLMBackend:
    from agent.llm.openai_backend import OpenAIBackend

    return OpenAIBackend(config)


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
