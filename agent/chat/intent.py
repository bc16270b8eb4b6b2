"""What a message asks for: deterministic rules, the LLM under a JSON schema, and how the two are merged.

Rules win where they matched something explicit; the LLM fills in what they missed, and only with values
that are grounded (titles must occur in the message, genres come from the catalogue's list).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rapidfuzz import fuzz

import prompts
from agent.chat import lexicon as lx
from agent.llm.base import LLMBackend, LLMError

logger = logging.getLogger(__name__)

Kind = Literal["recommend", "critique", "why", "about", "smalltalk", "meta", "empty"]
Era = Literal["", "older", "newer"]


class Intent(BaseModel):
    """The merged reading of one message (titles still as the user wrote them)."""

    kind: Kind = "recommend"
    liked: list[str] = Field(default_factory=list)
    disliked: list[str] = Field(default_factory=list)
    genres: list[str] = Field(default_factory=list)
    exclude_genres: list[str] = Field(default_factory=list)
    era: Era = ""
    year_min: int | None = None
    year_max: int | None = None
    mood: str = ""
    target: str = Field(default="", description="title asked about ('' = the last pick)")
    reject_last: bool = False
    reject: list[str] = Field(default_factory=list, description="titles of earlier picks turned down")
    scanned: bool = Field(default=False, description="liked titles found by scanning, without a cue")
    more: bool = Field(default=False, description="asks for more or other picks")

    def signals(self) -> bool:
        return bool(
            self.liked
            or self.disliked
            or self.genres
            or self.exclude_genres
            or self.era
            or self.year_min is not None
            or self.year_max is not None
            or self.mood
            or self.reject_last
            or self.reject
            or self.more
            or self.kind in ("why", "about", "smalltalk", "meta", "empty")
        )


class LLMIntent(BaseModel):
    """The form the LLM fills in (its JSON schema is the decoding grammar)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["recommend", "critique", "why", "about", "smalltalk"]
    liked_titles: list[str] = Field(max_length=4)
    disliked_titles: list[str] = Field(max_length=4)
    include_genres: list[str] = Field(max_length=3)
    exclude_genres: list[str] = Field(max_length=3)
    era: Literal["any", "older", "newer"]
    mood: str = Field(max_length=60)
    asked_title: str = Field(max_length=60)


def intent_schema(genres: list[str]) -> dict[str, Any]:
    """LLMIntent's JSON schema with the catalogue's genres as enums and bounded strings."""
    schema = LLMIntent.model_json_schema()
    props = schema["properties"]
    for name in ("liked_titles", "disliked_titles"):
        props[name]["items"] = {"type": "string", "minLength": 1, "maxLength": 60}
    for name in ("include_genres", "exclude_genres"):
        props[name]["items"] = (
            {"type": "string", "enum": list(genres)} if genres else {"type": "string", "maxLength": 30}
        )
    for prop in props.values():
        prop.pop("title", None)
    schema.pop("title", None)
    return schema


# --- rules ----------------------------------------------------------------------


class GenreLexicon:
    """Synonyms mapped onto one catalogue's genre names."""

    def __init__(self, known: list[str]) -> None:
        lookup = {g.lower(): g for g in known}
        self.words: dict[str, tuple[str, ...]] = {}
        for canon, words in lx.GENRE_SYNONYMS.items():
            target = lookup.get(canon.lower())
            if target:
                for w in words:
                    self.words[w] = (*self.words.get(w, ()), target)
        for word, canons in lx.MULTI_GENRE.items():
            targets = tuple(lookup[c.lower()] for c in canons if c.lower() in lookup)
            if targets:
                self.words[word] = targets
        for g in known:  # the catalogue's own names, singular and a simple plural
            low = g.lower()
            for w in (low, low + "s", low.replace("-", " ")):
                self.words.setdefault(w, (g,))
        alternation = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<![\w-])({alternation})(?![\w-])", re.I) if self.words else None

    def find(self, text: str) -> list[tuple[int, tuple[str, ...]]]:
        if self.pattern is None:
            return []
        return [(m.start(), self.words[m.group(1).lower()]) for m in self.pattern.finditer(text)]

    def only_genres(self, text: str) -> tuple[str, ...] | None:
        """The genres when ``text`` is nothing but genre words (and filler), else None."""
        found = self.find(text)
        if not found or self.pattern is None:
            return None
        rest = self.pattern.sub(" ", text.lower())
        if any(w not in lx.STOPWORDS for w in re.findall(r"[\w']+", rest)):
            return None
        return tuple(dict.fromkeys(g for _, gs in found for g in gs))


def _cut_body(body: str) -> str:
    m = lx.BODY_STOP.search(body)
    if m:
        body = body[: m.start()]
    body = body.strip(" ,'\"")
    while True:
        trimmed = lx.FILLER_TAIL.sub("", body).strip(" ,'\"")
        if trimmed == body:
            return body
        body = trimmed


def _segments(body: str) -> list[str]:
    return [s.strip(" '\"") for s in re.split(r",|;", body) if s.strip(" '\"")]


def _clauses(text: str) -> list[str]:
    return [c for c in re.split(r"[.,;!?\n]+|\bbut\b", text) if c.strip()]


def parse_rules(message: str, genres: GenreLexicon) -> Intent:
    """Read a (cleaned) message with patterns only."""
    text = message.strip()
    if not text:
        return Intent(kind="empty")
    if lx.INJECTION.search(text):
        return Intent(kind="meta")
    intent = Intent()
    rest = text
    # dislikes first ("didn't like" contains "like"), then likes; their spans leave the text
    for cue, slot in ((lx.DISLIKE_CUE, "disliked"), (lx.LIKE_CUE, "liked")):
        for m in list(cue.finditer(rest)):
            body = _cut_body(m.group("body"))
            if not body or (slot == "liked" and lx.NOT_TITLE_START.match(body)):
                continue
            for seg in _segments(body):
                as_genres = genres.only_genres(seg)
                if as_genres:
                    target = intent.genres if slot == "liked" else intent.exclude_genres
                    target.extend(g for g in as_genres if g not in target)
                else:
                    getattr(intent, slot).append(seg)
            end = m.start("body") + len(body)
            rest = rest[: m.start()] + " " * (end - m.start()) + rest[end:]
    intent.more = bool(lx.MORE.search(rest))
    if lx.REJECT.search(rest):
        intent.reject_last = True
    else:
        for m in lx.REJECT_TITLE.finditer(rest):
            if not genres.only_genres(m.group("t")) and not re.match(
                r"(quite|really|so|too|very|sure|yet)\b", m.group("t"), re.I
            ):
                intent.reject.append(_cut_body(m.group("t")))
    # questions
    why = lx.WHY.search(rest)
    about = lx.ABOUT.search(rest)
    if why:
        intent.kind = "why"
        asked = why.group("t").strip(" '\"")
        intent.target = "" if lx.THAT_ONE.match(asked) else asked
        return intent
    if about:
        intent.kind = "about"
        asked = next(g for g in about.groups() if g).strip(" '\"")
        intent.target = "" if lx.THAT_ONE.match(asked) else asked
        return intent
    if (
        lx.SMALLTALK.match(text)
        and not (intent.liked or intent.disliked)
        and len(text.split()) <= 6
        and not genres.find(text)
    ):
        intent.kind = "smalltalk"
        return intent
    # eras and years
    if lx.OLDER.search(rest):
        intent.era = "older"
    elif lx.NEWER.search(rest):
        intent.era = "newer"
    dec = lx.DECADE.search(rest)
    if dec:
        d = dec.group("d")
        start = int(d) if len(d) == 4 else (1900 + int(d) if int(d) >= 20 else 2000 + int(d))
        intent.year_min, intent.year_max = start, start + 9
    if (b := lx.BEFORE.search(rest)) is not None:
        intent.year_max = int(b.group("y")) - 1
    if (a := lx.AFTER.search(rest)) is not None and not dec:
        intent.year_min = int(a.group("y")) + (0 if a.group(0).lower().startswith("from") else 1)
    # genres, negated within their clause or not
    for clause in _clauses(rest):
        neg = lx.NEGATION.search(clause)
        for pos, gs in genres.find(clause):
            negated = neg is not None and neg.start() < pos
            target = intent.exclude_genres if negated else intent.genres
            target.extend(g for g in gs if g not in target)
    intent.genres = [g for g in intent.genres if g not in intent.exclude_genres]
    # mood: what is wanted, minus the words already understood
    mood_match = lx.MOOD.search(rest)
    if mood_match:
        mood_text = mood_match.group("m")
        leftover = [
            w
            for w in re.findall(r"[\w'-]+", genres.pattern.sub(" ", mood_text) if genres.pattern else mood_text)
            if w.lower() not in lx.STOPWORDS
            and not lx.OLDER.fullmatch(w)
            and not lx.NEWER.fullmatch(w)
            and not lx.DECADE.fullmatch(w)
        ]
        if leftover:
            intent.mood = prompts.clean_text(" ".join(leftover), 80)
    if intent.reject_last or intent.reject or intent.era:
        intent.kind = "critique"
    return intent


# --- the LLM ----------------------------------------------------------------------


def llm_intent(
    backend: LLMBackend, message: str, last_titles: list[str], genres: list[str], max_tokens: int = 160
) -> LLMIntent:
    """The LLM's reading; raises LLMError on any failure (the caller falls back to the rules)."""
    tpl = prompts.load("chat_intent", "v1")
    rendered = tpl.render(message=message, last=", ".join(last_titles[:5]) or "nothing yet", genres=genres)
    raw = backend.generate_json(rendered.messages, intent_schema(genres), max_tokens=max_tokens)  # type: ignore[arg-type]
    try:
        return LLMIntent.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValidationError, TypeError) as exc:
        raise LLMError(f"invalid intent JSON: {exc}; output starts {raw[:120]!r}") from exc


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def grounded(title: str, message: str) -> bool:
    """A title the LLM extracted counts only when (nearly) written in the message."""
    t = _norm(title)
    return len(t) >= 3 and fuzz.partial_ratio(t, _norm(message)) >= 90


def _covered(title: str, mentions: list[str]) -> bool:
    return any(fuzz.ratio(_norm(title), _norm(m)) >= 80 or _norm(title) in _norm(m) for m in mentions)


def merge(rules: Intent, llm: LLMIntent | None, message: str, known_genres: list[str]) -> tuple[Intent, str]:
    """(intent, decided_by): rules where they matched, grounded LLM values where they did not."""
    if llm is None:
        return rules, "rules"
    known = set(known_genres)
    rejected: list[str] = []
    added = False
    merged = rules.model_copy(deep=True)
    for src, slot in ((llm.liked_titles, "liked"), (llm.disliked_titles, "disliked")):
        for title in src:
            clean = prompts.clean_text(title, 60)
            mentions = rules.liked + rules.disliked + rules.reject + [rules.target]
            if not grounded(clean, message):
                rejected.append(f"{slot}:{clean[:30]}")
            elif not _covered(clean, mentions):
                getattr(merged, slot).append(clean)
                added = True
    if not rules.signals():  # the rules understood nothing: take the rest of the LLM's form
        if llm.kind in ("why", "about"):
            merged.kind = llm.kind
            target = prompts.clean_text(llm.asked_title, 60)
            merged.target = target if target and grounded(target, message) else ""
            added = True
        else:
            merged.kind = (
                "smalltalk"
                if llm.kind == "smalltalk" and not merged.liked
                else ("critique" if llm.kind == "critique" else "recommend")
            )
            merged.exclude_genres = [g for g in dict.fromkeys(llm.exclude_genres) if g in known]
            merged.genres = [
                g for g in dict.fromkeys(llm.include_genres) if g in known and g not in merged.exclude_genres
            ]
            merged.era = "" if llm.era == "any" else llm.era
            merged.mood = prompts.clean_text(llm.mood, 80)
            added = added or merged.signals()
    if rejected:
        logger.info("llm intent values rejected values=%s", ",".join(rejected))
    if not added:
        return merged, "rules"
    return merged, "both" if rules.signals() else "llm"
