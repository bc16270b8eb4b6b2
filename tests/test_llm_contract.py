"""Every backend through the shared contracts: the scripted fake (logic), the real in-process model (llm) and a
real vLLM server (vllm)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agent.llm.base import LLMBackend
from agent.llm.config import LLMConfig
from tests.contracts import LLMBackendContract, RerankerContract
from tests.fakes import ScriptedBackend


class TestScriptedBackend(LLMBackendContract, RerankerContract):
    @pytest.fixture
    def backend(self) -> LLMBackend:
        return ScriptedBackend(prefer=lambda r: len(r.labels) - 1)


@pytest.mark.llm
class TestTransformersBackend(LLMBackendContract, RerankerContract):
    @pytest.fixture
    def backend(self, transformers_backend: LLMBackend) -> LLMBackend:
        return transformers_backend


@pytest.mark.vllm
class TestVLLMBackend(LLMBackendContract, RerankerContract):
    @pytest.fixture
    def backend(self, vllm_server: Any) -> Iterator[LLMBackend]:
        from agent.llm.openai_backend import OpenAIBackend

        backend = OpenAIBackend(LLMConfig(backend="openai", url=vllm_server.url, timeout_s=120))
        yield backend
        backend.close()
