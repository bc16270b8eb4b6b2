"""Routes with the real embedded LLM (SmolLM2-135M in-process) and the micro-batching wrapper around it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from agent.llm.base import LLMBackend
from agent.llm.batching import BatchingBackend
from agent.metrics import Metrics
from agent.rerank import Reranker
from agent.service import RecommenderService
from agent.settings import Settings
from retrieval.index import Index
from retrieval.item_text import natural_title
from serve import create_app

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def real_backend(recagent_test_home: Any) -> Iterator[LLMBackend]:
    from agent.llm.config import LLMConfig
    from agent.llm.registry import make_backend

    backend = make_backend(LLMConfig(backend="transformers"))
    yield backend
    backend.close()


def test_recommend_and_rerank_with_the_real_model(tiny_index: Index, real_backend: LLMBackend) -> None:
    from fastapi.testclient import TestClient

    app = create_app(Settings(llm="transformers", deadline_s=300, micro_batch=False),
                     service=RecommenderService(tiny_index, backend=real_backend))
    with TestClient(app) as c:
        ready = c.get("/readyz").json()
        assert ready["llm"] is True and ready["serving"]["llm_threads"] >= 1 and not ready["serving"]["micro_batch"]
        r = c.post("/v1/recommendations", json={"user_id": "u2", "k": 3, "mode": "score"})
        body = r.json()
        assert r.status_code == 200 and not body["degraded"], body
        assert body["model"] and all(i["llm_score"] is not None for i in body["items"])
        free = {"id": "ext-1", "title": "Moon Base Alpha", "text": "Astronauts defend a lunar space station."}
        r = c.post("/v1/rerank", json={"history": ["s1", "s2"], "candidates": ["s3", free, "a1"], "k": 2,
                                       "explain": True})
        body = r.json()
        assert r.status_code == 200 and not body["degraded"], body
        assert len(body["items"]) == 2 and all(i["reason"] for i in body["items"])
        assert body["reasons_llm"] >= 1, body  # the catalogue item linked to the history: the LLM wrote it
        llm = [i for i in body["items"] if i["reason_source"] == "llm"]
        titles = [tiny_index.catalog.item(h)["title"] for h in ("s1", "s2")]
        assert all(any(natural_title(t) in i["reason"] for t in titles) for i in llm), llm
        assert body["timings"]["llm_ms"] > 0
        assert 'recagent_llm_tokens_total{kind="prompt"}' in c.get("/metrics").text


def test_batched_scores_match_single_scores(tiny_index: Index, real_backend: LLMBackend) -> None:
    batching = BatchingBackend(real_backend, window_ms=1)
    reranker = Reranker(real_backend)
    service = RecommenderService(tiny_index, backend=None)
    requests = []
    for user in ("u2", "u5", "u7"):
        history = service.history_inputs(tiny_index.catalog.user_history(user)[:2])
        candidates = [service.rank_input(c) for c in service.retriever.retrieve(history=[h.item_id for h in history],
                                                                              k=6)]
        requests.append(reranker.score_request(history, candidates))
    single = [real_backend.score_labels(r) for r in requests]
    lengths = {len(real_backend.render(r.messages, r.answer_prefix)) for r in requests}  # type: ignore[attr-defined]
    assert len(lengths) > 1  # rows of different lengths: the right padding is exercised
    cached = real_backend.usage.cached_prompt_tokens
    batched = batching.forward(requests)
    # the instructions every prompt shares ran once: the other two rows count them as cached
    assert real_backend.usage.cached_prompt_tokens - cached >= 2 * 20
    for a, b in zip(single, batched, strict=True):
        assert len(a) == len(b)
        # bf16 in a batch over a shared prefix differs slightly from one unpadded pass; the preferences must agree
        assert np.max(np.abs(np.array(a) - np.array(b))) < 0.35
        assert int(np.argmax(a)) == int(np.argmax(b))


def test_concurrent_requests_share_forward_passes(tiny_index: Index, real_backend: LLMBackend) -> None:
    metrics = Metrics()
    batching = BatchingBackend(real_backend, window_ms=50, max_batch=8, on_batch=metrics.batch_size.observe)
    service = RecommenderService(tiny_index, backend=batching)
    app = create_app(Settings(llm="transformers", workers=4, deadline_s=300), service=service)
    app.state.holder["runtime"].metrics.batch_size = metrics.batch_size
    batching.on_batch = metrics.batch_size.observe

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=300) as c:
            return list(await asyncio.gather(*[
                c.post("/v1/recommendations", json={"user_id": u, "k": 3}) for u in ("u1", "u2", "u5", "u7")]))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 and not r.json()["degraded"] for r in responses), [r.text for r in responses]
    sizes = metrics.registry.get_sample_value("recagent_llm_score_batch_size_sum")
    count = metrics.registry.get_sample_value("recagent_llm_score_batch_size_count")
    assert sizes is not None and count is not None and sizes / count > 1.0, (sizes, count)


def test_score_passes_go_ahead_of_a_running_generation(real_backend: LLMBackend) -> None:
    """While a long batch of reasons decodes, a score request waits at most one layer of a decoding step: it
    finishes before the generation does (the decoding loop offers the model lock between layers and steps)."""
    from agent.llm.base import ScoreRequest, TextRequest

    done: dict[str, float] = {}
    requests = [TextRequest([{"role": "user", "content": f"Write a long story about film {i}."}], max_tokens=60,
                            stop=("\n\n\n",)) for i in range(4)]

    def generate() -> None:
        list(real_backend.complete_batch(requests))
        done["generation"] = time.monotonic()

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(1.0)  # the generation is decoding now
    assert "generation" not in done, "the generation ended too soon to test anything"
    real_backend.score_labels(ScoreRequest([{"role": "user", "content": "Pick A or B."}], "", ["A", "B"]))
    done["score"] = time.monotonic()
    thread.join()
    assert done["score"] < done["generation"]


def test_a_score_pass_runs_between_the_layers_of_a_background_pass(real_backend: LLMBackend) -> None:
    """A background ranking pass (a request that goes on to explain) offers the model to a waiting score pass
    between two decoder layers: the score pass finishes while the background pass is inside its forward pass, and
    each gives the scores it gives alone (the paused pass keeps its own copy of the shared prompt cache, which
    the score pass reuses and crops meanwhile)."""
    from agent.llm.base import ChatMessage, ScoreRequest
    from agent.llm.priority import Priority, priority_var

    inner: Any = getattr(real_backend, "inner", real_backend)
    system: ChatMessage = {"role": "system", "content": "You rank films for a viewer. Answer with one letter. " * 3}
    background = ScoreRequest([system, {"role": "user", "content": "Liked: Heat, Alien. Options: A Up B Jaws"}],
                              "", ["A", "B"])
    score = ScoreRequest([system, {"role": "user", "content": "Liked: Fargo. Options: A Babe B Se7en C Big"}],
                         "", ["A", "B", "C"])
    # each pass alone, in the cache state it meets below (bf16 scores depend on how much of the prompt was cached:
    # a pass whose whole prompt is cached recomputes only its last token, and on some CPUs that rounds differently)
    inner.score_labels(background)
    alone = inner.score_labels(background), inner.score_labels(score)  # whole prompt cached / the system prefix
    inner.score_labels(background)  # the shared cache now holds the background prompt: the score pass crops it

    order: list[str] = []
    results: dict[str, list[float]] = {}
    at_layer = threading.Event()

    def hold_at_layer_ten(module: Any, args: Any) -> None:
        if threading.current_thread().name == "background" and not at_layer.is_set():
            at_layer.set()
            deadline = time.monotonic() + 30
            while not inner._lock.waiting_before(Priority.BACKGROUND) and time.monotonic() < deadline:
                time.sleep(0.001)

    def run_background() -> None:
        priority_var.set(Priority.BACKGROUND)
        results["background"] = inner.score_labels(background)
        order.append("background")

    handle = inner.model.model.layers[10].register_forward_pre_hook(hold_at_layer_ten)
    try:
        thread = threading.Thread(target=run_background, name="background")
        thread.start()
        assert at_layer.wait(30), "the background pass never reached layer 10"
        results["score"] = inner.score_labels(score)
        order.append("score")
        thread.join(60)
    finally:
        handle.remove()
    assert order == ["score", "background"]
    assert np.allclose(results["background"], alone[0], atol=1e-2), (results["background"], alone[0])
    assert np.allclose(results["score"], alone[1], atol=1e-2), (results["score"], alone[1])


def test_batch_passes_are_timed_as_their_own_kind(real_backend: LLMBackend) -> None:
    """The thread count is chosen per kind of pass: the rows' prompt chunks of a batch count as passes of their
    size ("short") and a one-token step of many rows as "decode-batch", so the one-row decode choice (often one
    thread) is not applied to 90-token chunks."""
    from agent.llm.base import TextRequest

    inner: Any = getattr(real_backend, "inner", real_backend)
    governor = inner.governor
    before = dict(governor._samples)
    requests = [TextRequest([{"role": "user", "content": f"Describe film number {i} " + "in some detail " * 12}],
                            max_tokens=4, stop=("\n\n\n",)) for i in range(3)]
    list(real_backend.complete_batch(requests))
    grown = {kind for (kind, threads), n in governor._samples.items() if n > before.get((kind, threads), 0)}
    assert {"short", "decode-batch"} <= grown, grown
