"""The LLM seam: one small interface every backend implements, chosen by name (``RECAGENT_LLM``)."""

from __future__ import annotations

import contextvars
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

logger = logging.getLogger(__name__)

#: The monotonic deadline of the LLM job running in this thread: the batcher drops work past it, and HTTP
#: backends bound their timeouts by it (set by the server's work queue; None outside a request).
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


class ChatMessage(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


class LLMError(RuntimeError):
    """Any backend failure: unreachable server, timeout, refused request, unusable output."""


@dataclass
class ScoreRequest:
    """Score the ``labels`` as the first token the assistant writes after ``answer_prefix``."""

    messages: list[ChatMessage]
    answer_prefix: str
    labels: Sequence[str]


@dataclass
class MarkerRequest:
    """Score each occurrence of the single-token ``marker`` in the rendered prompt: the log-probability the model
    gives the marker at that position (one forward pass scores every occurrence). A trained ranker puts the
    marker after each candidate line, so the scores rank the candidates. ``adapter`` names the trained weights
    (a folder for the in-process backend, which the OpenAI backend maps to its served LoRA model)."""

    messages: list[ChatMessage]
    marker: str
    expected: int
    adapter: str | None = None


@dataclass
class TextRequest:
    """Free text that continues ``answer_prefix`` at the start of the assistant turn after ``messages``. Decoding
    stops at the first of the ``stop`` strings (left out of the result), at the end-of-turn token, or after
    ``max_tokens`` tokens. The result is the continuation only, without the prefix. Backends that can constrain
    decoding never write the ``banned`` words (case-insensitive, whole tokens) nor, with ``no_digits``, any digit
    (the in-process backend); others may write some of them (an OpenAI-compatible server is sent the words of one
    token and the digits "0" to "9" as ``logit_bias``), and the caller's checks must not rely on it."""

    messages: list[ChatMessage]
    answer_prefix: str = ""
    max_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    banned: tuple[str, ...] = ()
    no_digits: bool = False


def word_variants(word: str) -> list[str]:
    """The spellings of a banned word a backend bans: after a space or not, lower case or capitalised."""
    return sorted({word, f" {word}", word.capitalize(), f" {word.capitalize()}"})


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    calls: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, prompt: int, completion: int, cached: int = 0) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cached_prompt_tokens += cached
        self.calls += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


class LLMBackend(ABC):
    """A chat model that can (1) score single-token labels, (2) write JSON under a schema, (3) write text."""

    name: str = "abstract"

    def __init__(self) -> None:
        self.usage = Usage()

    @property
    @abstractmethod
    def model_name(self) -> str: ...

    @abstractmethod
    def score_labels(self, request: ScoreRequest) -> list[float]:
        """Natural-log probabilities of each label (same order), renormalised over the labels."""

    def score_labels_batch(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Several score requests; backends that can batch override this."""
        return [self.score_labels(r) for r in requests]

    def score_markers(self, request: MarkerRequest) -> list[float]:
        """Log-probability of ``request.marker`` at each of its ``expected`` occurrences, in prompt order."""
        raise LLMError(f"backend {self.name!r} cannot score marker positions (a trained ranker needs the "
                       "transformers backend, or an OpenAI-compatible vLLM server with prompt log-probs)")

    def score_markers_batch(self, requests: Sequence[MarkerRequest]) -> list[list[float]]:
        return [self.score_markers(r) for r in requests]

    @abstractmethod
    def generate_json(self, messages: list[ChatMessage], schema: dict[str, Any], max_tokens: int = 512,
                      temperature: float = 0.0) -> str:
        """Text that parses as JSON valid under ``schema`` (constrained decoding)."""

    @abstractmethod
    def stream_text(self, messages: list[ChatMessage], max_tokens: int = 256,
                    temperature: float = 0.0) -> Iterator[str]:
        """Free text, yielded in pieces as it is decoded."""

    def generate_text(self, messages: list[ChatMessage], max_tokens: int = 256, temperature: float = 0.0) -> str:
        return "".join(self.stream_text(messages, max_tokens=max_tokens, temperature=temperature))

    def complete(self, request: TextRequest) -> str:
        """The continuation of ``request`` (see :class:`TextRequest`)."""
        raise LLMError(f"backend {self.name!r} cannot continue an answer prefix")

    def complete_batch(self, requests: Sequence[TextRequest],
                       cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[int, str]]:
        """``(index, continuation)`` of each request as it completes (in any order). When ``cancelled()`` turns
        true the work stops at its next step and the unfinished requests are never yielded. Backends that can
        decode several requests together (sharing their common prompt prefix) override this; this default
        runs them one after another."""
        for i, request in enumerate(requests):
            if cancelled is not None and cancelled():
                return
            yield i, self.complete(request)

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under this model's tokenizer (used for prompt budgets)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
