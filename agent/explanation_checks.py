"""Code checks of explanations and recommendation lists; no LLM involved.

Per explanation: the reason is not empty, does not repeat itself, is a whole sentence (it does not stop on "a",
"who" or "is"), cites evidence only from the user's history, every genre or year it claims is true of the
recommended item or of the history items it rests on (the cited evidence, or the whole history when none is
cited), and every other content word it uses is in the text of those items (title, description) or in a small
vocabulary of words that claim nothing (:data:`GENERIC_WORDS`): "a film about a dystopian future" fails for an
item whose metadata says nothing of the future. Titles are removed before looking for claims, so "Star Wars" is
not read as a War claim nor "Toy Story (1995)" as a year claim.

Per list: invalid ids (not in the catalogue or not among the candidates), duplicates and already-seen items.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel

from retrieval.item_text import YEAR_IN_TEXT, title_parts, title_years

CHECKS = ("empty", "repetition", "incomplete", "unknown_item", "unknown_history_item", "already_seen",
          "evidence_not_in_history", "genre_claim", "year_claim", "content_claim", "says_nothing")

# Words that claim a genre (MovieLens genre names; other catalogues' genres match their own name).
GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "action": (r"action(?:-packed)?", r"action films?"),
    "adventure": (r"adventures?", r"adventurous"),
    "animation": (r"animat(?:ion|ed)", r"cartoons?"),
    "children's": (r"children'?s", r"kids'?", r"for children"),
    "comedy": (r"comed(?:y|ies)", r"comedic"),
    "crime": (r"crimes?", r"gangsters?", r"mob"),
    "documentary": (r"documentar(?:y|ies)",),
    "drama": (r"dramas?", r"dramatic"),
    "fantasy": (r"fantas(?:y|ies)",),
    "film-noir": (r"film[- ]noir", r"noir"),
    "horror": (r"horror", r"scary"),
    "musical": (r"musicals?",),
    "mystery": (r"myster(?:y|ies)",),
    "romance": (r"romance", r"romantic", r"love stor(?:y|ies)"),
    "sci-fi": (r"sci-?fi", r"science[- ]fiction", r"scifi"),
    "thriller": (r"thrillers?",),
    "war": (r"war films?", r"war movies?", r"war dramas?", r"war stor(?:y|ies)", r"wartime", r"war"),
    "western": (r"westerns?",),
}


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: words an explanation may use without the metadata holding them: function words, words that claim nothing
#: checkable about an item, and the words of the system's own signals that the templates use ("viewers who watched
#: it often watched this too", "close to it in content"); the genre and year words have their own checks
GENERIC_WORDS = _word_set("""
a an the and or but nor of to in on at for with from by as into about than then so if both either also too very more
most much many such same similar another other one ones it it's its this that that's these those there you you'll
your you're may might will would could should can enjoy enjoyed like liked likes love loved is are was were be
been being has have had because who which whose what when where how all any some just well
film films movie movies picture pictures story stories tale tales genre genres kind kinds type types sort style
tone mood feel feeling era decade decades year years time classic classics great good fun entertaining favorite
favourite example mix mixes blend blends combines combining elements element combination plot theme themes made
released set fans fan watch
watched watching early late mid
viewers viewer often chosen people history yours close content
""")
#: of those, the words that state one of the system's signals (co-watching, a history like the user's, closeness in
#: content): a reason that uses them says something, as one that names a genre or a year does
SIGNAL_WORDS = frozenset({"viewers", "viewer", "chosen", "history", "content"})
#: the words of the reasons' opening ("You may enjoy X because, like Y, it"), which claim nothing
_OPENING_WORDS = frozenset({"you", "may", "enjoy", "because", "like", "it"})
#: a sentence that ends on one of these was cut off ("it's a film about a young.")
UNFINISHED = _word_set("""
a an the and or but of to in on at for with from by as into about than who which whose that that's is are was
were be been being has have had it it's its his her their this these those year very more most same both
young
""")
_DECADE = re.compile(r"(?<![\w'])(?:(19|20)|')?(\d)0'?s\b")
_WORD = re.compile(r"[a-z0-9']+")


class Violation(BaseModel):
    check: str
    detail: str


@dataclass(frozen=True)
class ItemFacts:
    item_id: str
    title: str
    genres: tuple[str, ...] = ()
    years: tuple[int, ...] = ()  # the metadata year and any year in the title (re-releases differ)
    words: frozenset[str] = frozenset()  # the words of its title and text (description): what a reason may use


def make_facts(item: Mapping[str, object]) -> ItemFacts:
    """Facts of a catalogue item (its mapping: title, genres, year, and description or text when it has them)."""
    title = str(item.get("title", ""))
    years = set(title_years(title))
    year = item.get("year")
    if isinstance(year, int | float) and year == year:
        years.add(int(year))
    genres = item.get("genres") or []
    text = " ".join(str(item.get(key) or "") for key in ("title", "description", "text"))
    return ItemFacts(item_id=str(item["item_id"]), title=title,
                     genres=tuple(str(g) for g in genres) if isinstance(genres, list | tuple) else (),
                     years=tuple(sorted(years)), words=frozenset(content_words(text)))


def words_of(text: str) -> list[str]:
    """Lower-case words of ``text`` (letters, inner apostrophes and hyphens)."""
    return re.findall(r"[a-z][a-z'-]*[a-z]|[a-z]", text.lower())


def forms(word: str) -> set[str]:
    """``word``, its parts when hyphenated, and a possessive's or plural's stem ("aliens" -> "alien")."""
    out = {word, *word.split("-")} - {""}
    for w in list(out):
        if w.endswith("'s"):
            out.add(w[:-2])
        elif w.endswith("s") and len(w) > 3:
            out.add(w[:-1])
    return out


def content_words(text: str) -> set[str]:
    """Every form (:func:`forms`) of the words of ``text``: what a reason may take from an item's text."""
    return {f for w in words_of(text) for f in forms(w)}


def unfinished(reason: str) -> bool:
    """The sentence stops mid-way: its last word is an article, a preposition, a pronoun or a verb that needs
    more ("... a film about a group of", "... it is")."""
    words = words_of(reason)
    return bool(words) and words[-1] in UNFINISHED


@lru_cache(maxsize=32)
def _genre_vocabulary_words(vocabulary: tuple[str, ...]) -> frozenset[str]:
    """The words of the genres' names and of the patterns that claim them ("science[- ]fiction"): checked by the
    genre check, so free for the content check."""
    words: set[str] = set()
    for genre in vocabulary:
        patterns = " ".join(re.sub(r"[^a-z']+", " ", p) for p in GENRE_WORDS.get(genre.lower(), ()))
        words |= content_words(" ".join([genre, *genre_words(genre), patterns]))
    return frozenset(words)


def unsupported_words(text: str, support: Sequence[ItemFacts], vocabulary: Iterable[str]) -> list[str]:
    """The content words of ``text`` (titles already removed) that neither the ``support`` items' own words, nor
    a genre word of ``vocabulary``, nor :data:`GENERIC_WORDS` hold."""
    allowed = set(GENERIC_WORDS) | _genre_vocabulary_words(tuple(vocabulary))
    for facts in support:
        allowed |= facts.words

    def holds(word: str) -> bool:  # the word or its stem; a compound ("comedy-action") when each part does
        parts = [p for p in word.split("-") if p] if "-" in word else [word]
        return all(p in allowed or bool(forms(p) & allowed) or bool(_DECADE.fullmatch(p)) for p in parts)

    return sorted({w for w in words_of(text) if not holds(w)})


def shared_facts(item: ItemFacts, other: ItemFacts) -> ItemFacts:
    """What ``item`` and ``other`` have in common (genres, years, words), as the facts of ``item``: a reason that
    says "like <other>, it ..." claims what follows of both, so it is checked against these."""
    return ItemFacts(item_id=item.item_id, title=item.title, genres=tuple(g for g in item.genres if g in other.genres),
                     years=tuple(y for y in item.years if y in other.years), words=item.words & other.words)


def facts_for(catalog: object, ids: Iterable[str]) -> dict[str, ItemFacts]:
    """Facts of the ``ids`` that exist in ``catalog`` (a :class:`retrieval.catalog.Catalog`)."""
    out = {}
    for i in dict.fromkeys(ids):
        if catalog.has_item(i):  # type: ignore[attr-defined]
            out[i] = make_facts(catalog.item(i))  # type: ignore[attr-defined]
    return out


def title_variants(title: str) -> list[str]:
    """``"Godfather, The (1972)"`` -> "Godfather, The (1972)", "The Godfather (1972)", "The Godfather",
    "Godfather" (longest first). The catalogue's comma form counts only with its year: without it, it would
    swallow the article of a following sentence ("... Sound of Music, The Blues Brothers is ...")."""
    parts = title_parts(title)
    variants = {parts.natural, parts.body}
    if parts.year:
        variants |= {f"{parts.natural} ({parts.year})", f"{parts.listed} ({parts.year})"}
    return sorted((v for v in variants if len(v) >= 2), key=len, reverse=True)


def strip_titles(reason: str, titles: Iterable[str]) -> str:
    text = reason
    for title in titles:
        for v in title_variants(title):
            if v.lower() in text.lower():  # a cheap test first: most titles are absent, and compiling costs
                text = re.sub(re.escape(v), " ", text, flags=re.IGNORECASE)
    return text


def genre_words(genre: str) -> list[str]:
    """Plain words that claim ``genre`` (the literal ones among :data:`GENRE_WORDS`, and the genre's own name):
    what a generator must not write about an item without that genre."""
    g = genre.lower()
    words = {g, *(p for p in GENRE_WORDS.get(g, ()) if re.fullmatch(r"[a-z' -]+", p))}
    words |= {"animated"} if g == "animation" else set()
    words |= {"romantic", "love story", "love stories"} if g == "romance" else set()
    words |= {"dramatic"} if g == "drama" else {"comedic", "comedies"} if g == "comedy" else set()
    words |= {"children", "kids"} if g == "children's" else {"sci"} if g == "sci-fi" else set()
    return sorted(words)


def genre_claims(text: str, vocabulary: Iterable[str]) -> set[str]:
    """Canonical (lower-case) genres the text names, also inside a compound ("comedy-drama": comedy and drama)."""
    low = text.lower()
    split = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", low)
    texts = (low, split) if split != low else (low,)
    found = set()
    for genre in vocabulary:
        g = genre.lower()
        patterns = GENRE_WORDS.get(g, (re.escape(g),))
        if any(re.search(rf"(?<![\w-]){p}(?![\w-])", t) for p in patterns for t in texts):
            found.add(g)
    return found


def year_claims(text: str) -> tuple[set[int], set[int]]:
    """(years, decade starts) the text names: "1995" -> year; "90s", "1990s", "'90s" -> decade 1990."""
    years = {int(y) for y in YEAR_IN_TEXT.findall(text)}
    decades = set()
    for century, digit in _DECADE.findall(text):
        if century:
            decades.add(int(century) * 100 + int(digit) * 10)
        else:
            decades.add((2000 if digit in "012" else 1900) + int(digit) * 10)
    no_decade_years = {y for y in years if not re.search(rf"{y}'?s\b", text)}
    return no_decade_years, decades


def unsupported_years(text: str, true_years: set[int]) -> list[str]:
    """The years ("1995") and decades ("1990s") ``text`` names that none of ``true_years`` supports."""
    years, decades = year_claims(text)
    return [str(y) for y in sorted(years) if y not in true_years] + \
        [f"{d}s" for d in sorted(decades) if not any(d <= y < d + 10 for y in true_years)]


def is_empty(reason: str) -> bool:
    words = _WORD.findall(reason.lower())
    return len(reason.strip()) < 10 or sum(any(ch.isalpha() for ch in w) for w in words) < 3


def repetition(reason: str) -> str | None:
    """A description of the repetition, or None."""
    words = _WORD.findall(reason.lower())
    for a, b, c in zip(words, words[1:], words[2:], strict=False):
        if a == b == c:
            return f"word '{a}' three times in a row"
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    seen: set[tuple[str, ...]] = set()
    for t in trigrams:
        if t in seen:
            return f"phrase '{' '.join(t)}' repeated"
        seen.add(t)
    if len(words) >= 8 and len(set(words)) / len(words) < 0.5:
        return f"only {len(set(words))} distinct words out of {len(words)}"
    return None


def check_explanation(history: Sequence[str], item_id: str, reason: str | None, evidence: Sequence[str],
                      facts: Mapping[str, ItemFacts], genre_vocabulary: Iterable[str] | None = None
                      ) -> list[Violation]:
    """Every violation of one explanation (empty list when it passes)."""
    reason = reason or ""
    out: list[Violation] = []
    hist = set(history)
    if item_id not in facts:
        out.append(Violation(check="unknown_item", detail=f"item '{item_id}' is not in the catalogue"))
    unknown_history = [h for h in history if h not in facts]
    if unknown_history:
        out.append(Violation(check="unknown_history_item",
                             detail=f"history ids {unknown_history[:5]} are not in the catalogue"))
    if item_id in hist:
        out.append(Violation(check="already_seen", detail=f"item '{item_id}' is in the history"))
    outside = [e for e in evidence if e not in hist]
    if outside:
        out.append(Violation(check="evidence_not_in_history", detail=f"evidence {outside} not in the history"))
    if is_empty(reason):
        out.append(Violation(check="empty", detail=f"reason {reason!r} says nothing"))
        return out
    rep = repetition(reason)
    if rep:
        out.append(Violation(check="repetition", detail=rep))
    if unfinished(reason):
        out.append(Violation(check="incomplete", detail=f"reason stops mid-sentence: {reason[-40:]!r}"))
    item = facts.get(item_id)
    if item is not None:
        cited = [facts[i] for i in ([e for e in evidence if e in hist] or list(history)) if i in facts]
        others = [f.title for i, f in facts.items() if i != item_id]
        wrong_genres: set[str] = set()
        wrong_years: list[str] = []
        wrong_words: set[str] = set()
        claims = 0  # genres, years and words of the items' own text the reason names
        vocabulary = list(dict.fromkeys([*GENRE_WORDS, *(g.lower() for g in genre_vocabulary or ())]))
        for clause, names_other in clauses(reason, item.title, others):
            support = [item, *cited] if names_other else [item]
            true_genres = {g.lower() for f in support for g in f.genres}
            named = genre_claims(clause, vocabulary)
            wrong_genres |= named - true_genres
            wrong_years += unsupported_years(clause, {y for f in support for y in f.years})
            wrong_words |= set(unsupported_words(clause, support, vocabulary))
            own = {w for f in support for w in f.words} - GENERIC_WORDS - _OPENING_WORDS
            claims += len(named) + sum(map(len, year_claims(clause)))
            claims += len(set(words_of(clause)) & (own | SIGNAL_WORDS))
        if wrong_genres:
            out.append(Violation(check="genre_claim", detail=f"claims {sorted(wrong_genres)}; item genres "
                                 f"{list(item.genres)}"))
        if wrong_years:
            out.append(Violation(check="year_claim", detail=f"claims {wrong_years}; item years {list(item.years)}"))
        if wrong_words:
            out.append(Violation(check="content_claim", detail=f"words {sorted(wrong_words)[:8]} are not in the "
                                 "metadata of the item or of the items it rests on"))
        elif claims == 0:  # "it's a film from the decade": true of anything
            out.append(Violation(check="says_nothing", detail="names no genre, year or word of the items' text"))
    return out


def clauses(reason: str, item_title: str, other_titles: Sequence[str]) -> list[tuple[str, bool]]:
    """Clauses of the reason with titles removed, each flagged when it names another (history) item: claims in
    such a clause may be about that item; claims elsewhere must hold for the recommended item."""
    text = reason
    for title in sorted(other_titles, key=len, reverse=True):
        for v in title_variants(title):
            if v.lower() in text.lower():  # a cheap test first: a reason names one or two of the titles
                text = re.sub(rf"(?<!\w){re.escape(v)}(?!\w)", " \x01 ", text, flags=re.IGNORECASE)
    text = strip_titles(text, [item_title])
    parts = re.split(r"[,;:.!?]|\s-\s|\bbut\b|\bwhile\b", text)
    return [(p.replace("\x01", " "), "\x01" in p) for p in parts if p.strip()]


def list_checks(ranked: Sequence[str], history: Sequence[str], allowed: Iterable[str] | None = None
                ) -> dict[str, int]:
    """Counts over one recommendation list: ids outside ``allowed``, duplicates, already-seen items."""
    allowed_set = set(allowed) if allowed is not None else None
    hist = set(history)
    return {
        "items": len(ranked),
        "invalid": sum(1 for i in ranked if allowed_set is not None and i not in allowed_set),
        "duplicates": len(ranked) - len(set(ranked)),
        "already_seen": sum(1 for i in ranked if i in hist),
    }


def violation_rates(results: Sequence[Sequence[Violation]]) -> dict[str, float]:
    """Share of explanations failing each check, and failing any."""
    n = len(results)
    if n == 0:
        return {c: float("nan") for c in (*CHECKS, "any")}
    rates = {c: sum(any(v.check == c for v in r) for r in results) / n for c in CHECKS}
    rates["any"] = sum(bool(r) for r in results) / n
    return rates


def list_rates(counts: Sequence[Mapping[str, int]], degraded: Sequence[bool] = ()) -> dict[str, float]:
    """Invalid, duplicate and already-seen rates over all listed items; invalid-output rate over lists."""
    items = sum(c["items"] for c in counts) or 1
    out = {name + "_rate": sum(c[name] for c in counts) / items for name in ("invalid", "duplicates", "already_seen")}
    out["invalid_output_rate"] = (sum(degraded) / len(degraded)) if degraded else 0.0
    return out
