"""The sentence of a reason written without the LLM, shared by the API's explanations (:func:`agent.explain.
template_reason`) and the chat's replies (:func:`agent.chat.reply.compose_reason`): one wording, so the two say
the same thing about the same evidence and the claim checks (:mod:`agent.explanation_checks`) hold for both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal


def join_words(words: Sequence[str], last: str = "and") -> str:
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} {last} {words[-1]}"


def because_you_liked(like: str, shared: Sequence[str], signal: Literal["cf", "content"] | None,
                      subject: str = "this", year: str = "") -> str:
    """"Because you liked <like>: ..." (no final full stop): viewers' co-watching when the evidence is CF, else the
    genres the item shares with the liked one, else closeness in content. ``subject`` names the item ("this", or
    "this Drama film"); ``year`` (" from 1995") is added where the sentence describes the item."""
    if signal == "cf":
        return f"Because you liked {like}: viewers who watched it often watched {subject}{year} too"
    if shared:
        return f"Because you liked {like}: it is also {join_words(shared)}{year}"
    return f"Because you liked {like}: {subject}{year} is close to it in content"
