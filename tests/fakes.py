"""A scripted LLM backend for unit tests of the logic around the LLM seam (never a stand-in for the real model
in integration tests). It plugs in through the production interface."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from agent import explanation_checks as xc
from agent.llm.base import ChatMessage, LLMBackend, LLMError, MarkerRequest, ScoreRequest, TextRequest, cut_at_stop


def _valid_instance(schema: dict[str, Any], salt: str = "") -> Any:
    """A small JSON value that validates under the (simple) schemas the reranker and agent use."""
    kind = schema.get("type")
    if "enum" in schema:
        values = schema["enum"]
        return values[int(hashlib.sha256(salt.encode()).hexdigest(), 16) % len(values)] if values else None
    if kind == "object":
        return {k: _valid_instance(v, f"{salt}/{k}") for k, v in schema.get("properties", {}).items()
                if k in schema.get("required", [])}
    if kind == "array":
        n = schema.get("minItems", 1 if schema.get("maxItems", 1) else 0)
        return [_valid_instance(schema.get("items", {}), f"{salt}/{i}") for i in range(n)]
    if kind == "string":
        return "x" * max(schema.get("minLength", 0), 12)
    if kind == "integer":
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    return None


#: What :meth:`ScriptedBackend.complete` continues any prefix with (before stop strings and ``max_tokens`` cut it);
#: ``{genre}``: the recommended item's first genre in the prompt (:func:`prompt_genre`), so that the sentence makes a
#: claim the explanation checks can verify
SCRIPTED_SENTENCE = "is a {genre} film you may like.\nSecond line."


def _genres_in(text: str) -> list[str]:
    found = [(text.find(g), g) for g in xc.GENRE_WORDS if re.search(rf"(?<![\w-]){re.escape(g)}(?![\w-])", text)]
    return [g for _, g in sorted(found)]


def prompt_genre(request: TextRequest) -> str:
    """The first genre named in the prompt's "Recommended:" part (``explain_item``) that the watched item has too
    where the sentence goes on "like <watched item>, it", else its first genre, else "good"."""
    text = " ".join(m["content"] for m in request.messages).lower()
    item, _, watched = text.split("recommended:", 1)[1].partition("the user watched") if "recommended:" in text \
        else ("", "", "")
    genres = _genres_in(item)
    if ", like " in request.answer_prefix:
        genres = [g for g in genres if g in _genres_in(watched)] or genres
    return genres[0] if genres else "good"


def genre_sentence(request: TextRequest) -> str:
    """A one-line reason that claims the recommended item's first genre."""
    return SCRIPTED_SENTENCE.format(genre=prompt_genre(request)).split("\n")[0]


class ScriptedBackend(LLMBackend):
    """Deterministic scores (favouring the label given by ``prefer``) and schema-valid JSON.

    ``fail_times`` makes the first N calls raise LLMError; ``json_text`` overrides generate_json's output.
    """

    name = "scripted"

    def __init__(self, prefer: Callable[[ScoreRequest], int] | None = None, fail_times: int = 0,
                 json_text: str | Callable[[list[ChatMessage], dict[str, Any]], str] | None = None) -> None:
        super().__init__()
        self.prefer = prefer
        self.fail_times = fail_times
        self.json_text = json_text
        self.calls: list[str] = []

    @property
    def model_name(self) -> str:
        return "scripted-test-model"

    def _maybe_fail(self, kind: str) -> None:
        self.calls.append(kind)
        if self.fail_times > 0:
            self.fail_times -= 1
            raise LLMError("scripted failure")

    def score_labels(self, request: ScoreRequest) -> list[float]:
        self._maybe_fail("score")
        n = len(request.labels)
        best = self.prefer(request) if self.prefer else 0
        raw = [2.0 if i == best else -float(i) / n for i in range(n)]
        norm = math.log(sum(math.exp(x) for x in raw))
        self.usage.add("score", 100, 0)
        return [x - norm for x in raw]

    def score_markers(self, request: MarkerRequest) -> list[float]:
        """Marker scores that prefer the candidate line whose text sorts first (a fixed, checkable rule)."""
        self._maybe_fail("markers")
        lines = [line for line in request.messages[-1]["content"].splitlines() if line.endswith(request.marker)]
        if len(lines) != request.expected:
            raise LLMError(f"prompt holds {len(lines)} marker lines, expected {request.expected}")
        ranked = sorted(range(len(lines)), key=lambda i: lines[i].split(" ", 1)[1])
        self.usage.add("markers", 100, 0)
        return [-1.0 - ranked.index(i) for i in range(len(lines))]

    def generate_json(self, messages: list[ChatMessage], schema: dict[str, Any], max_tokens: int = 512,
                      temperature: float = 0.0) -> str:
        self._maybe_fail("json")
        self.usage.add("json", 100, 20)
        if callable(self.json_text):
            return self.json_text(messages, schema)
        if self.json_text is not None:
            return self.json_text
        return json.dumps(_valid_instance(schema, json.dumps(messages)[:200]))

    def stream_text(self, messages: list[ChatMessage], max_tokens: int = 256,
                    temperature: float = 0.0) -> Iterator[str]:
        self._maybe_fail("text")
        yield from ["Hello", " there", "."]

    def complete(self, request: TextRequest) -> str:
        """A short fixed sentence (then a second line), cut at the first stop string and at ``max_tokens`` words."""
        self._maybe_fail("complete")
        genre = prompt_genre(request)
        genre = "good" if genre in {w.lower() for w in request.banned} else genre  # it honours bans, as real ones do
        words = SCRIPTED_SENTENCE.format(genre=genre).split(" ")[: max(request.max_tokens, 0)]
        self.usage.add("reason", 100, len(words))
        return cut_at_stop(" ".join(words), request.stop)[0]

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)
