"""What a message asks for: deterministic rules, the LLM under a JSON schema, and how the two are merged.

Rules win where they matched something explicit; the LLM fills in what they missed, and only with values
that are grounded (titles must occur in the message, genres come from the catalogue's list).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rapidfuzz import fuzz
from rapidfuzz.distance import OSA

import prompts
from agent.chat import lexicon as lx
from agent.llm.base import LLMBackend, LLMError
from retrieval.item_text import YEAR_IN_TEXT

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

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
    boost: list[str] = Field(default_factory=list, description="genres of a mood ('funnier'): re-rank, never filter")
    strict: list[str] = Field(default_factory=list, description="genres stated as a must ('has to be animated')")
    reference: list[str] = Field(
        default_factory=list, description="liked titles asked to be matched ('something like Heat'): a new reference"
    )
    reject_all: bool = Field(default=False, description="turns down the whole last list ('forget those')")

    def signals(self) -> bool:
        return bool(
            self.liked
            or self.disliked
            or self.boost
            or self.reject_all
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
        # one-word synonyms a typo away ("draama", "horor", "westren") are found too (see :meth:`typos`)
        self.single = {w: gs for w, gs in self.words.items() if re.fullmatch(r"[a-z']+", w) and len(w) >= 5}
        self.moods: dict[str, tuple[str, ...]] = {}
        for phrase, canons in lx.MOODS.items():
            targets = tuple(lookup[c.lower()] for c in canons if c.lower() in lookup)
            if targets:
                self.moods[phrase] = targets

    def find(self, text: str) -> list[tuple[int, tuple[str, ...]]]:
        if self.pattern is None:
            return []
        found = [(m.start(), self.words[m.group(1).lower()]) for m in self.pattern.finditer(text)]
        return sorted(found + self.typos(text))

    def typos(self, text: str) -> list[tuple[int, tuple[str, ...]]]:
        """Genre words misspelt by one edit (a letter added, dropped, changed or two swapped): words of five or
        more letters that are no known word, matched to synonyms of five or more letters, one of the two at least
        six long (so "prime" never reads as "crime")."""
        out: list[tuple[int, tuple[str, ...]]] = []
        for m in re.finditer(r"[A-Za-z']{5,}", text):
            word = m.group(0).lower()
            if word in self.words or word in lx.STOPWORDS or word in lx.NOT_TYPOS or lx.MOOD_PATTERN.fullmatch(word):
                continue
            for synonym, gs in self.single.items():
                if max(len(word), len(synonym)) >= 6 and OSA.distance(word, synonym, score_cutoff=1) <= 1:
                    out.append((m.start(), gs))
                    break
        return out

    def lean_genres(self, word: str) -> tuple[str, ...]:
        """The genres a genre word leans to besides its own (a key of :data:`lexicon.GENRE_LEANS`)."""
        known = {g for gs in self.words.values() for g in gs}
        return tuple(g for g in lx.GENRE_LEANS.get(word.lower(), ()) if g in known)

    def mood_genres(self, phrase: str) -> tuple[str, ...]:
        """The genres a mood phrase (a key of :data:`lexicon.MOODS`) boosts in this catalogue."""
        return self.moods.get(phrase.lower(), ())

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


# a comma before a catalogue title's moved article ("Usual Suspects, The (1995)") separates nothing
_NOT_A_SEPARATOR = r"(?!\s*(?:the|a|an|la|le|les|il|el|das|der|die)\s*(?:\(\d{4}\)|$|,|;|\s+and\b|\s+&))"


def _segments(body: str) -> list[str]:
    return [s.strip(" '\"") for s in re.split(r"," + _NOT_A_SEPARATOR + r"|;", body, flags=re.I) if s.strip(" '\"")]


def _clauses(text: str) -> list[str]:
    return [c for c in re.split(r"[.,;!?\n]+|\bbut\b", text) if c.strip()]


def _year_span(token: str) -> tuple[int, int]:
    """(first, last) year of a year ("1994") or a decade ("80s", "'90s", "1990s", "nineties")."""
    t = token.lower().strip("'")
    if t.startswith("the "):
        t = t[4:].strip("'")
    if t in lx.DECADE_WORDS:
        return lx.DECADE_WORDS[t], lx.DECADE_WORDS[t] + 9
    if t.endswith("s"):
        d = t[:-1].strip("'")
        start = int(d) if len(d) == 4 else (1900 + int(d) if int(d) >= 20 else 2000 + int(d))
        return start, start + 9
    return int(t), int(t)


def _negates(clause: str, at: int, genres: GenreLexicon) -> bool:
    """A negation governs the bound at ``at`` ("skip anything from before the 80s", "nothing after 1990"): it comes
    within a few words before it, with no genre word in between ("no horror before 1990" negates the horror)."""
    for neg in lx.NEGATION.finditer(clause[:at]):
        between = clause[neg.end() : at]
        if len(between.split()) <= 4 and not genres.find(between):
            return True
    return False


def _only_when(body: str, genres: GenreLexicon) -> bool:
    """A like-cue's body that names a time and nothing else (beside genre words and filler): "like 90s stuff"."""
    when = [lx.DECADE, lx.DECADE_WORD, YEAR_IN_TEXT]
    if not any(p.search(body) for p in when):
        return False
    rest = genres.pattern.sub(" ", body) if genres.pattern else body
    for p in when:
        rest = p.sub(" ", rest)
    return all(w.lower() in lx.STOPWORDS for w in re.findall(r"[\w']+", rest))


def _years(text: str, genres: GenreLexicon) -> tuple[int | None, int | None]:
    """The year bounds a message states: ranges, decades (several: their span), before/after a year or decade
    (flipped when negated), and "from 1994" (that year; "from 1994 on": from it)."""
    lo: int | None = None
    hi: int | None = None
    for clause in _clauses(text):
        taken: list[tuple[int, int]] = []

        def free(m: re.Match[str], taken: list[tuple[int, int]] = taken) -> bool:
            return not any(a < m.end() and m.start() < b for a, b in taken)

        for m in lx.YEAR_RANGE.finditer(clause):
            a, b = sorted((int(m.group("a")), int(m.group("b"))))
            lo, hi = a, b
            taken.append(m.span())
        for m in lx.BEFORE.finditer(clause):
            if free(m):
                first = _year_span(m.group("y"))[0]
                if _negates(clause, m.start(), genres):
                    lo = first
                else:
                    hi = first - 1
                taken.append(m.span())
        for m in lx.AFTER.finditer(clause):
            if free(m):
                first, last = _year_span(m.group("y"))
                since = m.group(0).lower().startswith("since")
                if _negates(clause, m.start(), genres):
                    hi = last if not since else first - 1
                else:
                    lo = first if since else last + 1
                taken.append(m.span())
        spans = [
            _year_span(m.group(0))
            for pattern in (lx.DECADE, lx.DECADE_WORD)
            for m in pattern.finditer(clause)
            if free(m)
        ]
        if spans:
            lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        for m in lx.FROM_YEAR.finditer(clause):
            if free(m):
                y = int(m.group("y"))
                lo, hi = (y, hi) if m.group("on") else (y, y)
    return lo, hi


def mood_words(text: str, genres: GenreLexicon) -> str:
    """The words of ``text`` that say what is wanted beyond what the rules read elsewhere: without genre words,
    stopwords, years, decades and "older" / "newer" ("a road trip with old friends" -> "road trip friends")."""
    kept = [
        w
        for w in re.findall(r"[\w'-]+", genres.pattern.sub(" ", text) if genres.pattern else text)
        if w.lower() not in lx.STOPWORDS
        and not any(ch.isdigit() for ch in w)
        and not w.lower().endswith("n't")
        and not lx.OLDER.fullmatch(w)
        and not lx.NEWER.fullmatch(w)
        and not lx.DECADE.fullmatch(w)
        and not lx.DECADE_WORD.fullmatch(w)
    ]
    return " ".join(kept)


def parse_rules(message: str, genres: GenreLexicon) -> Intent:
    """Read a (cleaned) message with patterns only."""
    text = message.strip()
    if not text:
        return Intent(kind="empty")
    # a critique of the last list ("ignore the previous suggestions") is no attempt to rewrite the instructions
    if lx.INJECTION.search(lx.REJECT_ALL.sub(" ", text)):
        return Intent(kind="meta")
    intent = Intent()
    rest = text
    described: list[str] = []  # "more like a road trip with old friends": a description, not a title
    # dislikes first ("didn't like" contains "like"), then likes; their spans leave the text
    for cue, slot in ((lx.DISLIKE_CUE, "disliked"), (lx.LIKE_CUE, "liked")):
        for m in list(cue.finditer(rest)):
            body = _cut_body(m.group("body"))
            if not body or _only_when(body, genres):
                continue
            # "something like X", "in the vein of X": X is a reference to match, not only a like
            cue_text = " ".join(rest[m.start() : m.start("body")].split())
            reference = slot == "liked" and bool(lx.REFERENCE_CUE.search(cue_text))
            if slot == "liked" and lx.NOT_TITLE_START.match(body):
                if reference:
                    described.append(body)
                continue
            for seg in _segments(body):
                as_genres = genres.only_genres(seg)
                if as_genres:
                    target = intent.genres if slot == "liked" else intent.exclude_genres
                    target.extend(g for g in as_genres if g not in target)
                else:
                    getattr(intent, slot).append(seg)
                    if reference:
                        intent.reference.append(seg)
            end = m.start("body") + len(body)
            rest = rest[: m.start()] + " " * (end - m.start()) + rest[end:]
    # critiques of the whole last list
    if lx.REJECT_ALL.search(rest):
        intent.reject_all = True
        rest = lx.REJECT_ALL.sub(lambda m: " " * len(m.group(0)), rest)
    intent.more = bool(lx.MORE.search(rest)) or intent.reject_all
    if lx.REJECT.search(rest):
        intent.reject_last = True
    else:
        for m in lx.REJECT_TITLE.finditer(rest):
            if not genres.only_genres(m.group("t")) and not re.match(
                r"(quite|really|so|too|very|sure|yet)\b", m.group("t"), re.I
            ):
                intent.reject.append(_cut_body(m.group("t")))
    # questions (a why-question is read from the whole message: "why would I like the 2nd one" has a like-cue)
    why = lx.WHY.search(text)
    about = lx.ABOUT.search(rest)
    if why:
        intent = Intent(kind="why")
        asked = why.group("t").strip(" '\"")
        intent.target = "" if lx.THAT_ONE.match(asked) else asked
        return intent
    if about:
        intent.kind = "about"
        asked = next(g for g in about.groups() if g).strip(" '\"")
        intent.target = "" if lx.THAT_ONE.match(asked) else asked
        if not intent.target and (position := lx.POSITION.search(text)) is not None:  # "what's it about, the 2nd?"
            intent.target = position.group(0)
        return intent
    if (
        lx.SMALLTALK.match(text)
        and not (intent.liked or intent.disliked)
        and len(text.split()) <= 6
        and not genres.find(text)
        and not lx.MOOD_PATTERN.search(text)
    ):
        intent.kind = "smalltalk"
        return intent
    # moods ("funnier", "more romantic") re-rank softly; their words leave the text, so they filter nothing
    moody = bool(lx.MOOD_PATTERN.search(rest))
    for m in list(lx.MOOD_PATTERN.finditer(rest)):
        intent.boost.extend(g for g in genres.mood_genres(m.group(1)) if g not in intent.boost)
        rest = rest[: m.start()] + " " * (m.end() - m.start()) + rest[m.end() :]
    # eras and years
    if lx.OLDER.search(rest):
        intent.era = "older"
    elif lx.NEWER.search(rest):
        intent.era = "newer"
    intent.year_min, intent.year_max = _years(rest, genres)
    # genres: negated within their clause (excluded), after "more" (a mood), after "must"/"only" (strict), or wanted
    for clause in _clauses(rest):
        neg = lx.NEGATION.search(clause)
        strict = lx.STRICT.search(clause)
        for pos, gs in genres.find(clause):
            if neg is not None and neg.start() < pos:
                target = intent.exclude_genres
            elif re.search(r"\bmore\s+(?:of\s+(?:a|an|the)\s+)?$", clause[:pos], re.I):
                target, moody = intent.boost, True
            else:
                target = intent.genres
                if strict is not None and strict.start() < pos:
                    intent.strict.extend(g for g in gs if g not in intent.strict)
            target.extend(g for g in gs if g not in target)
    for m in lx.GENRE_LEAN.finditer(rest):  # "a romcom": a Romance, preferably a Comedy
        intent.boost.extend(g for g in genres.lean_genres(m.group(1)) if g not in intent.boost)
    intent.genres = [g for g in intent.genres if g not in intent.exclude_genres]
    intent.strict = [g for g in intent.strict if g in intent.genres]
    intent.boost = [g for g in intent.boost if g not in intent.exclude_genres]
    # mood: what is wanted (or described after "more like"), minus the words already understood
    mood_match = lx.MOOD.search(rest)
    for mood_text in [mood_match.group("m")] if mood_match else described:
        words = mood_words(mood_text, genres)
        if words:
            intent.mood = prompts.clean_text(f"{intent.mood} {words}".strip(), 80)
    if intent.reject_last or intent.reject or intent.reject_all or intent.era or (moody and not intent.liked):
        intent.kind = "critique"
    return intent


# --- the LLM ----------------------------------------------------------------------


_FORMS: dict[tuple[str, ...], type[LLMIntent]] = {}


def intent_form(genres: tuple[str, ...]) -> type[LLMIntent]:
    """:class:`LLMIntent` for one catalogue: its genres as enums, titles 1-60 characters (as :func:`intent_schema`).
    The class LangChain's structured output decodes under and validates with; its instances are LLMIntents."""
    form = _FORMS.get(genres)
    if form is None:
        from typing import Annotated

        from pydantic import StringConstraints, create_model

        title = Annotated[str, StringConstraints(min_length=1, max_length=60)]
        genre: Any = Literal.__getitem__(genres) if genres else Annotated[str, StringConstraints(max_length=30)]
        genre_list: Any = list[genre]
        form = create_model(
            "LLMIntentForm", __base__=LLMIntent, __doc__=LLMIntent.__doc__,
            liked_titles=(list[title], Field(max_length=4)),
            disliked_titles=(list[title], Field(max_length=4)),
            include_genres=(genre_list, Field(max_length=3)),
            exclude_genres=(genre_list, Field(max_length=3)),
        )
        if len(_FORMS) >= 16:
            _FORMS.pop(next(iter(_FORMS)))
        _FORMS[genres] = form
    return form


def llm_intent(
    model: BaseChatModel | LLMBackend, message: str, last_titles: list[str], genres: list[str], max_tokens: int = 160
) -> LLMIntent:
    """The LLM's reading through LangChain: ``model.with_structured_output(intent_form(genres))`` on the rendered
    ``chat_intent.v1`` prompt. ``model`` is any LangChain chat model, or a project backend (wrapped in
    :class:`agent.llm.langchain_chat.RecagentChatModel`: decoding under the form's JSON schema). Raises LLMError on
    any failure (the caller falls back to the rules)."""
    from langchain_core.language_models import BaseChatModel

    from agent.llm.langchain_chat import RecagentChatModel

    chat = model if isinstance(model, BaseChatModel) else RecagentChatModel(backend=model)
    if "max_tokens" in type(chat).model_fields:
        chat = chat.model_copy(update={"max_tokens": max_tokens})
    tpl = prompts.load("chat_intent", "v1")
    rendered = tpl.render(message=message, last=", ".join(last_titles[:5]) or "nothing yet", genres=genres)
    try:
        got = chat.with_structured_output(intent_form(tuple(genres))).invoke(rendered.messages)
        return LLMIntent.model_validate(got.model_dump() if isinstance(got, BaseModel) else got)
    except LLMError:
        raise
    except NotImplementedError as exc:
        raise LLMError(f"{type(chat).__name__} has no structured output") from exc
    except ValidationError as exc:
        raise LLMError(f"invalid intent: {exc}") from exc
    except Exception as exc:  # OutputParserException, HTTP errors of a LangChain client, ...
        raise LLMError(f"intent LLM call failed: {type(exc).__name__}: {str(exc)[:300]}") from exc


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
