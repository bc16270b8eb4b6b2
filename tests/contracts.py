"""Shared contract tests: every LLM backend, and the reranker over it, must pass these (as lenskit's
ScorerTests do). Subclass and provide a ``backend`` fixture."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from agent.explain import Explainer
from agent.llm.base import ChatMessage, LLMBackend, ScoreRequest, TextRequest
from agent.rerank import RankInput, RerankConfig, Reranker

MESSAGES = [{"role": "system", "content": "You recommend movies."},
            {"role": "user", "content": "I loved Toy Story. Pick one.\nA. Aladdin\nB. Heat\nC. Casino\n"
                                        "Answer with one letter."}]

HISTORY = [RankInput("1", "Toy Story (1995)", "Toy Story (1995). Animation, Children's, Comedy.",
                     genres=["Animation", "Children's", "Comedy"], year=1995),
           RankInput("71", "Lion King, The (1994)", "Lion King, The (1994). Animation, Children's, Musical.",
                     genres=["Animation", "Children's", "Musical"], year=1994)]
CANDIDATES = [
    RankInput("95", "Aladdin (1992)", "", 0.9, genres=["Animation", "Children's", "Comedy"], year=1992),
    RankInput("6", "Heat (1995)", "", 0.8, genres=["Action", "Crime", "Thriller"], year=1995),
    RankInput("7", "Casino (1995)", "", 0.7, genres=["Drama", "Thriller"], year=1995),
    RankInput("8", "Babe (1995)", "", 0.6, genres=["Children's", "Comedy", "Drama"], year=1995),
    RankInput("9", "Alien (1979)", "", 0.5, genres=["Action", "Horror", "Sci-Fi"], year=1979),
]


class LLMBackendContract:
    """What the reranker and the agent rely on from any backend."""

    #: a word the backend writes for the banned-word test's prompt when nothing bans it (SmolLM2: "Disney")
    bannable = "disney"

    def test_score_labels_is_a_distribution_over_the_labels(self, backend: LLMBackend) -> None:
        scores = backend.score_labels(ScoreRequest(MESSAGES, "", list("ABC")))  # type: ignore[arg-type]
        assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
        assert math.isclose(sum(math.exp(s) for s in scores), 1.0, abs_tol=1e-3)

    def test_batch_matches_single_calls(self, backend: LLMBackend) -> None:
        reqs = [ScoreRequest(MESSAGES, "", list("ABC")), ScoreRequest(MESSAGES, "", list("AB"))]  # type: ignore[arg-type]
        batch = backend.score_labels_batch(reqs)
        assert [len(b) for b in batch] == [3, 2]
        single = backend.score_labels(reqs[0])
        assert max(abs(a - b) for a, b in zip(batch[0], single, strict=True)) < 0.2

    def test_generate_json_validates_against_the_schema(self, backend: LLMBackend) -> None:
        schema: dict[str, Any] = {
            "type": "object", "additionalProperties": False, "required": ["pick"],
            "properties": {"pick": {"type": "array", "minItems": 2, "maxItems": 2,
                                    "items": {"type": "string", "enum": ["95", "6", "7"]}}}}
        data = json.loads(backend.generate_json(MESSAGES, schema, max_tokens=48))  # type: ignore[arg-type]
        assert set(data) == {"pick"} and len(data["pick"]) == 2
        assert set(data["pick"]) <= {"95", "6", "7"}

    def test_stream_text_yields_text(self, backend: LLMBackend) -> None:
        pieces = list(backend.stream_text([{"role": "user", "content": "Say hello."}], max_tokens=6))
        assert pieces and "".join(pieces).strip()

    def test_complete_batch_continues_every_prefix_once(self, backend: LLMBackend) -> None:
        system: ChatMessage = {"role": "system", "content": "You describe films in a few words."}
        requests = [TextRequest([system, {"role": "user", "content": f"Describe {t} in a few words."}],
                                answer_prefix=f"{t} is", max_tokens=8, stop=("\n",))
                    for t in ("Toy Story", "Heat", "Casino")]
        got = dict(backend.complete_batch(requests))
        assert sorted(got) == [0, 1, 2]
        assert all(isinstance(t, str) and "\n" not in t for t in got.values())
        assert any(t.strip() for t in got.values())

    def test_complete_never_writes_a_banned_word(self, backend: LLMBackend) -> None:
        messages: list[ChatMessage] = [
            {"role": "system", "content": "You explain film recommendations. Finish the sentence in a few words by "
                                          "naming the genres given."},
            {"role": "user", "content": 'Recommended: "Toy Story, a comedy film from 1995".'}]
        free, banned = (backend.complete(TextRequest(messages, answer_prefix="You may enjoy Toy Story because it is a",
                                                     max_tokens=6, stop=("\n",), banned=words))
                        for words in ((), (self.bannable,)))
        assert self.bannable in free.lower(), free  # what it writes unhindered, so that the ban can be seen
        assert self.bannable not in banned.lower(), banned

    def test_complete_batch_stops_when_cancelled(self, backend: LLMBackend) -> None:
        requests = [TextRequest([{"role": "user", "content": "Count to ten."}], max_tokens=8)] * 2
        assert list(backend.complete_batch(requests, cancelled=lambda: True)) == []

    def test_count_tokens_grows_with_text(self, backend: LLMBackend) -> None:
        assert 0 < backend.count_tokens("Toy Story") < backend.count_tokens("Toy Story " * 20)


class RerankerContract:
    """Both modes over a backend: only candidate ids, no duplicates, no seen items, k items, evidence in the
    history, alpha = 0 keeps the retrieval order."""

    @pytest.fixture
    def reranker(self, backend: LLMBackend) -> Reranker:
        return Reranker(backend, RerankConfig())

    @pytest.mark.parametrize("mode", ["score", "generate"])
    def test_answer_holds_only_candidates(self, reranker: Reranker, mode: str) -> None:
        answer = reranker.rerank(HISTORY, CANDIDATES, k=3, mode=mode, alpha=1.0)  # type: ignore[arg-type]
        ids = [i.item_id for i in answer.items]
        assert not answer.degraded, answer.reason
        assert len(ids) == 3 and len(set(ids)) == 3
        assert set(ids) <= {c.item_id for c in CANDIDATES}
        assert [i.rank for i in answer.items] == [1, 2, 3]
        for item in answer.items:
            assert item.llm_score is not None and 0.0 <= item.llm_score <= 1.0

    def test_explanations_for_a_score_ranking(self, reranker: Reranker) -> None:
        answer = reranker.rerank(HISTORY, CANDIDATES, k=3, mode="score")
        Explainer(reranker.backend, None).explain(answer, HISTORY, CANDIDATES)
        assert not answer.degraded, answer.reason
        history_ids = {h.item_id for h in HISTORY}
        for item in answer.items:
            assert item.reason and item.reason_source in ("llm", "template"), item
            assert set(item.evidence) <= history_ids
        assert answer.reasons_llm == sum(i.reason_source == "llm" for i in answer.items)
        # Aladdin and Babe share genres with the history: the LLM writes their reasons, naming the evidence
        for item in answer.items:
            if item.item_id in ("95", "8") and item.reason_source == "llm":
                assert any(h.title.split(" (")[0].split(",")[0] in (item.reason or "") for h in HISTORY), item

    @pytest.mark.parametrize("mode", ["score", "generate"])
    def test_alpha_zero_reproduces_the_retrieval_order(self, reranker: Reranker, mode: str) -> None:
        answer = reranker.rerank(HISTORY, CANDIDATES, k=5, mode=mode, alpha=0.0)  # type: ignore[arg-type]
        assert [i.item_id for i in answer.items] == [c.item_id for c in CANDIDATES]

    def test_seen_items_never_come_back(self, reranker: Reranker) -> None:
        seen = RankInput("95", "Aladdin (1992)", "", genres=["Animation"])
        answer = reranker.rerank([*HISTORY, seen], CANDIDATES, k=4, mode="score")
        assert "95" not in [i.item_id for i in answer.items]
