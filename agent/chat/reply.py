"""Reply text, reasons and item answers, composed from catalogue metadata and the session only.

Anything that states a genre or a year about an item (including LLM-written reasons) passes
:func:`claims_hold`, which checks those claims against the metadata.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import prompts
from agent.chat.models import Constraints
from agent.explanation_checks import genre_claims, strip_titles, unsupported_years
from agent.reason_text import because_you_liked, join_words
from retrieval.item_text import title_years, without_year

CF_SOURCES = {"sequential", "ease", "slit", "sasrec"}


@dataclass
class ItemFacts:
    """What the catalogue says about an item."""

    item_id: str
    label: str  # title with year
    genres: list[str] = field(default_factory=list)
    year: int | None = None
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def claims_hold(text: str, facts: Sequence[ItemFacts], all_genres: Sequence[str]) -> bool:
    """True when every genre ``text`` claims (the explanation checks' genre words for the catalogue's genres) and
    every year or decade it names belongs to one of ``facts``.

    Titles are blanked first, with or without their year (a year inside "Toy Story (1995)" is not a claim
    beyond the title itself). The same checks as the API's explanations (:mod:`agent.explanation_checks`)."""
    body = strip_titles(text, [f.label for f in facts])
    allowed_genres = {g.lower() for f in facts for g in f.genres}
    if genre_claims(body, all_genres) - allowed_genres:
        return False
    return not unsupported_years(body, {f.year for f in facts if f.year is not None})


def closest_like(item: ItemFacts, likes: Sequence[ItemFacts], stated: set[str]) -> tuple[ItemFacts | None, list[str]]:
    """The liked item sharing most genres (stated likes before history seeds, then the most recent)."""
    best: ItemFacts | None = None
    best_key = (-1, -1, -1)
    for i, like in enumerate(likes):
        shared = [g for g in item.genres if g in like.genres]
        key = (len(shared), int(like.item_id in stated), i)
        if key > best_key:
            best, best_key = like, key
    if best is None:
        return None, []
    return best, [g for g in item.genres if g in best.genres]


def compose_reason(
    item: ItemFacts,
    likes: Sequence[ItemFacts],
    stated: set[str],
    constraints: Constraints,
    sources: Sequence[str],
    link: ItemFacts | None = None,
    signal: str | None = None,
) -> tuple[str, list[str]]:
    """(reason, evidence ids): a sentence that cites the user's own likes and only metadata facts.

    ``link``: the liked item the system's own signals tie to this item (:mod:`retrieval.evidence`: the strongest
    CF weight, else the most similar embedding; ``signal`` "cf" or "content"), so that every item names its own
    evidence; without one, the liked item sharing most genres (:func:`closest_like`)."""
    like: ItemFacts | None = link
    if link is not None:
        shared = [g for g in item.genres if g in link.genres]
    else:
        like, shared = closest_like(item, likes, stated)
    year = f" from {item.year}" if item.year and not title_years(item.label) else ""
    kind = f"{join_words(shared or item.genres[:2])} film" if (shared or item.genres) else "film"
    cf = signal == "cf" or (signal is None and not shared and bool(CF_SOURCES.intersection(sources)))
    if like is not None:
        text = because_you_liked(like.label, shared, "cf" if cf else None, f"this {kind}", year)
    elif constraints.mood:
        text = f"Matches what you asked for ({prompts.clean_text(constraints.mood, 40)})"
    elif constraints.genres:
        shared = [g for g in item.genres if g in constraints.genres]
        text = f"A popular {join_words(shared or item.genres[:2])} pick{year}"
    else:
        text = f"A popular pick{year}"
    avoided = [g for g in constraints.exclude_genres]
    if avoided:
        text += f", and no {join_words(avoided, 'or')}"
    return text + ".", [like.item_id] if like is not None else []


def why_answer(item: ItemFacts, reason: str | None, likes: Sequence[ItemFacts], stated: set[str],
               because: str | None = None, because_of: ItemFacts | None = None, liked: bool = False) -> str:
    """Why ``item`` was suggested: the reason the chat gave for it (the LLM's sentence when it wrote one, as
    stored in the session), the evidence it rests on when that reason does not name it (``because``: the
    :func:`compose_reason` sentence for the liked item ``because_of`` that the system's signals tie to it), then
    the item's own facts. ``liked``: the item is one the user said they liked (not a pick)."""
    facts = f"It is {join_words(item.genres) or 'a film'}{' from ' + str(item.year) if item.year else ''}."
    if liked:
        return f"{item.label} is one you told me you liked, so my picks start from it. {facts}"
    named = because_of is not None and bool(reason) and without_year(because_of.label) in str(reason)
    cited = because if because and not named else ""
    if reason:
        return " ".join(x for x in (f"I suggested {item.label}.", reason, cited, facts) if x)
    text = f"I haven't recommended {item.label} in this chat. {facts}"
    if cited:
        return f"{text} What ties it to your likes: {cited}"
    like, shared = closest_like(item, likes, stated)
    if like is not None and shared:
        text += f" It shares {join_words(shared)} with {like.label}, which you liked."
    return text


def about_answer(item: ItemFacts) -> str:
    head = f"{item.label}: {join_words(item.genres) or 'no genres listed'}."
    extra = " ".join(f"{k.replace('_', ' ').capitalize()}: {v}." for k, v in item.extra.items())
    if item.description:
        return f"{head} {prompts.clean_text(item.description, 400)} {extra}".strip()
    return f"{head} {extra} That is all the catalogue says about it.".replace("  ", " ").strip()


def constraint_text(c: Constraints, together: bool = False) -> str:
    """The session's constraints in words. ``together``: several genres asked for together put the items that have
    all of them first (``ChatConfig.together_weight``), and the words say so."""
    parts = []
    rest = [g for g in c.genres if g not in c.strict]
    if c.strict:
        parts.append("must be " + _genres(c.strict, together))
        if rest:
            parts.append("preferably " + join_words(rest, "or"))
    elif rest:
        parts.append(_genres(rest, together))
    if c.exclude_genres:
        parts.append("no " + join_words(c.exclude_genres, "or"))
    if c.year_min is not None and c.year_max is not None:
        parts.append(f"{c.year_min}-{c.year_max}")
    elif c.year_min is not None:
        parts.append(f"from {c.year_min}")
    elif c.year_max is not None:
        parts.append(f"up to {c.year_max}")
    if c.mood:
        parts.append(f'"{prompts.clean_text(c.mood, 40)}"')
    if c.boost:
        parts.append("leaning " + join_words(c.boost, "or"))
    return ", ".join(parts)


def _genres(names: list[str], together: bool) -> str:
    """Genres a filter lets through ("Comedy or Drama"), or, asked for together, "Comedy and Drama (both first, then
    either)"."""
    if together and len(names) >= 2:
        both, either = ("both", "either") if len(names) == 2 else ("all", "any")
        return f"{join_words(names)} ({both} first, then {either})"
    return join_words(names, "or")


GREETING = "Hi! Tell me a film you loved (and anything you'd rather avoid), and I'll suggest what to watch next."
THANKS = "You're welcome! Ask for more, or tell me what to change (older, no horror, not that one)."
BYE = "Enjoy the film!"
EMPTY = 'Tell me a film you enjoyed, or what you\'re in the mood for (e.g. "I loved Toy Story, nothing scary").'
META = (
    "I can't share or change my instructions, but I'm happy to help you find a film: tell me one you liked "
    "or what you're in the mood for."
)
ASK = "Tell me a film you liked or the kind of film you want, and I'll suggest some."
NOTHING_FOUND = "I couldn't find anything new that fits all of that. Try loosening a constraint (a genre or the years)."


def smalltalk_reply(message: str) -> str:
    low = message.lower()
    if re.search(r"\b(thanks?|thank you|thx|cheers|merci|gracias|danke)\b", low):
        return THANKS
    if re.search(r"\b(bye|goodbye|good night)\b", low):
        return BYE
    return GREETING


def chunks(text: str, words: int) -> list[str]:
    """Word chunks that concatenate back to ``text``."""
    pieces = re.findall(r"\S+\s*|\s+", text)
    return ["".join(pieces[i : i + words]) for i in range(0, len(pieces), words)]
