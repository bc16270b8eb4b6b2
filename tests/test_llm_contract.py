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


@pytest.mark.llm
def test_forward_passes_run_on_the_governors_thread_count(transformers_backend: Any) -> None:
    import torch

    from agent.llm.base import ScoreRequest

    backend = transformers_backend
    request = ScoreRequest(messages=[{"role": "user", "content": "Pick A or B."}], answer_prefix="", labels=["A", "B"])
    for _ in range(6):
        backend._cached_ids = []  # a full pass each time
        with backend.threads_for(10) as step:
            assert torch.get_num_threads() == step.threads
        backend.score_labels(request)
    measured = backend.governor.snapshot()["small"]
    assert set(measured) == {1, backend.config.threads} and all(v > 0 for v in measured.values())


@pytest.mark.vllm
class TestVLLMBackend(LLMBackendContract, RerankerContract):
    @pytest.fixture
    def backend(self, vllm_server: Any) -> Iterator[LLMBackend]:
        from agent.llm.openai_backend import OpenAIBackend

        backend = OpenAIBackend(LLMConfig(backend="openai", url=vllm_server.url, timeout_s=120))
        yield backend
        backend.close()


def test_unreachable_server_degrades_the_rerank_to_retrieval_order() -> None:
    """The real OpenAI client against a closed port: never an exception, the retrieval order, flagged."""
    from agent.llm.openai_backend import OpenAIBackend
    from agent.llm.vllm_server import free_port
    from agent.rerank import Reranker
    from tests.contracts import CANDIDATES, HISTORY

    backend = OpenAIBackend(LLMConfig(backend="openai", url=f"http://127.0.0.1:{free_port()}/v1", timeout_s=2,
                                      served_model="m"))
    for mode in ("score", "generate"):
        answer = Reranker(backend).rerank(HISTORY, CANDIDATES, k=3, mode=mode)  # type: ignore[arg-type]
        assert answer.degraded and "LLM failed" in (answer.reason or "")
        assert [i.item_id for i in answer.items] == [c.item_id for c in CANDIDATES[:3]]
