"""Resolve titles the user typed to catalogue ids: rapidfuzz over normalised titles, then the vector store.

Normalisation drops a trailing ``(1995)``, moves a trailing article back to the front ("Sword in the Stone,
The" -> "the sword in the stone") and strips punctuation, so "the sword in the stone", "Sword in the Stone"
and "sword in the stone 1963" all meet the same key.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rapidfuzz import fuzz, process

from retrieval.catalog import Catalog
from retrieval.item_text import ARTICLES, title_parts

logger = logging.getLogger(__name__)
_YEAR = re.compile(r"\(?\b(1[89]\d\d|20\d\d)\b\)?\s*$")
_ARTICLE_SUFFIX = re.compile(rf"^(?P<body>.+?),\s*(?P<art>{'|'.join(ARTICLES)})\s*$", re.I)
_LEADING_ARTICLE = re.compile(r"^(the|a|an)\s+")


def normalise_title(title: str) -> tuple[str, int | None]:
    """(key, year written in the title or None)."""
    text = unicodedata.normalize("NFKD", title)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).strip()
    year = None
    m = _YEAR.search(text)
    if m and m.start() > 0:
        year = int(m.group(1))
        text = text[: m.start()].strip()
    text = re.sub(r"\s*\([^)]*\)\s*$", "", text)  # "(a.k.a. ...)" alternative titles
    m2 = _ARTICLE_SUFFIX.match(text)
    if m2:
        text = f"{m2.group('art')} {m2.group('body')}"
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split()), year


@dataclass
class Resolution:
    """The outcome for one mention: ``item_id`` None when nothing matched well enough."""

    mention: str
    item_id: str | None = None
    score: float = 0.0
    alternatives: list[str] = field(default_factory=list)
    via: str = "fuzzy"  # fuzzy | vector | none

    @property
    def ambiguous(self) -> bool:
        return bool(self.alternatives)


class TitleResolver:
    def __init__(
        self,
        catalog: Catalog,
        accept: float = 86.0,
        minimum: float = 72.0,
        margin: float = 10.0,
        vector_query: Callable[[str, int], list[tuple[str, float]]] | None = None,
        vector_min: float = 0.55,
    ) -> None:
        self.catalog = catalog
        self.accept = accept
        self.minimum = minimum
        self.margin = margin
        self.vector_query = vector_query
        self.vector_min = vector_min
        self.ids = catalog.item_ids
        keys = [normalise_title(t) for t in catalog.titles_by_pos]
        self.keys = [k for k, _ in keys]
        self.years = [
            y if y is not None else _as_int(yy) for (_, y), yy in zip(keys, catalog.years_by_pos, strict=True)
        ]
        self.bare = [_LEADING_ARTICLE.sub("", k) for k in self.keys]
        self.exact: dict[str, list[int]] = {}
        for pos, (key, bare) in enumerate(zip(self.keys, self.bare, strict=True)):
            self.exact.setdefault(key, []).append(pos)
            if bare != key:
                self.exact.setdefault(bare, []).append(pos)

    def label(self, item_id: str) -> str:
        """The display title, with the year when the title lacks one."""
        item = self.catalog.item(item_id)
        parts = title_parts(item["title"])  # "Terminator, The (1984)" -> "The Terminator (1984)"
        year = parts.year if parts.year is not None else item["year"]
        return parts.natural if year is None else f"{parts.natural} ({year})"

    def _scores(self, key: str) -> list[tuple[int, float]]:
        """Up to 8 best titles per key list (plain and without a leading article) scoring at least ``minimum``,
        merged by best score; sorted by score, ties by catalogue position."""
        bare = _LEADING_ARTICLE.sub("", key)
        hits: dict[int, float] = {}
        for choices, query in ((self.keys, key), (self.bare, bare)):
            for pos, score in _best(query, choices, limit=8, cutoff=self.minimum):
                hits[pos] = max(hits.get(pos, 0.0), score)
        return sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))

    def resolve(self, mention: str, prefer: list[str] | None = None) -> Resolution:
        """Best catalogue id for a mention; ``prefer`` ids (e.g. the last recommended) win near-ties."""
        key, year = normalise_title(mention)
        if not key:
            return Resolution(mention=mention, via="none")
        scored = self._scores(key)
        if year is not None:  # a year the user wrote settles ties between remakes
            scored = [(p, s + (4.0 if self.years[p] == year else -4.0)) for p, s in scored]
            scored.sort(key=lambda kv: (-kv[1], kv[0]))
        if prefer:
            pref = {self.catalog.item_index[i] for i in prefer if self.catalog.has_item(i)}
            scored = [(p, s + (3.0 if p in pref else 0.0)) for p, s in scored]
            scored.sort(key=lambda kv: (-kv[1], kv[0]))
        if scored and scored[0][1] >= self.minimum:
            best_pos, best = scored[0]
            if best >= self.accept or self.vector_query is None:
                alts = [
                    self.ids[p]
                    for p, s in scored[1:4]
                    if s >= max(self.minimum, best - self.margin)
                    and not (year is not None and self.keys[p] == self.keys[best_pos])
                ]
                return Resolution(
                    mention=mention, item_id=self.ids[best_pos], score=min(best, 100.0), alternatives=alts[:2]
                )
        return self._vector(mention, scored)

    def _vector(self, mention: str, scored: list[tuple[int, float]]) -> Resolution:
        if self.vector_query is None or len(mention) < 4:
            return Resolution(mention=mention, via="none")
        try:
            hits = self.vector_query(mention, 3)
        except Exception as exc:  # the store is a convenience here, never fatal
            logger.warning("title vector lookup failed mention=%r error=%s", mention[:60], exc)
            return Resolution(mention=mention, via="none")
        hits = [(i, s) for i, s in hits if self.catalog.has_item(i)]
        if not hits or hits[0][1] < self.vector_min:
            if scored:  # a weak fuzzy match, offered with its runner-up
                pos, score = scored[0]
                return Resolution(
                    mention=mention,
                    item_id=self.ids[pos],
                    score=score,
                    alternatives=[self.ids[p] for p, _ in scored[1:3]],
                )
            return Resolution(mention=mention, via="none")
        alts = [i for i, s in hits[1:3] if s >= hits[0][1] - 0.03]
        return Resolution(
            mention=mention,
            item_id=hits[0][0],
            score=round(hits[0][1] * 100, 1),
            alternatives=alts,
            via="vector",
        )

    def scan(self, text: str, max_words: int = 7) -> list[tuple[str, str]]:
        """Exact catalogue titles inside free text, as (matched text, item id), longest first, no overlaps.

        One-word titles count only when the word is capitalised in the text and at least 4 letters long.
        """
        words = text.split()
        norm = [normalise_title(w)[0] for w in words]
        taken = [False] * len(words)
        out: list[tuple[str, str]] = []
        for n in range(min(max_words, len(words)), 0, -1):
            for i in range(len(words) - n + 1):
                if any(taken[i : i + n]):
                    continue
                key = " ".join(x for x in norm[i : i + n] if x)
                if not key or key in _COMMON or key not in self.exact:
                    continue
                if n == 1 and (len(key) < 4 or not words[i][:1].isupper()):
                    continue
                pos = self.exact[key][0]
                out.append((" ".join(words[i : i + n]), self.ids[pos]))
                taken[i : i + n] = [True] * n
        return out


_COMMON = {
    "the",
    "a",
    "an",
    "it",
    "you",
    "love",
    "like",
    "something",
    "nothing",
    "movie",
    "film",
    "films",
    "movies",
    "more",
    "less",
    "older",
    "newer",
    "why",
    "what",
    "please",
    "thanks",
    "hello",
    "tonight",
    "i",
    "me",
    "and",
    "or",
    "not",
    "no",
    "yes",
    "ok",
    "okay",
    "one",
    "that one",
    "this one",
    "about",
    "home",
    "good",
    "great",
    "fine",
    "friends",
    "family",
    "kids",
    "horror",
    "comedy",
    "drama",
    "action",
    "romance",
    "war",
    "western",
    "crime",
    "fantasy",
    "mystery",
    "thriller",
    "musical",
    "animation",
}


def _score(a: str, b: str, **_: object) -> float:
    """Whole-title similarity: the best of plain and word-order-insensitive ratios."""
    return max(fuzz.ratio(a, b), fuzz.token_sort_ratio(a, b))


def _best(query: str, choices: list[str], limit: int, cutoff: float) -> list[tuple[int, float]]:
    """``process.extract(query, choices, scorer=_score, limit=limit, score_cutoff=cutoff)`` as (position, score):
    the same scores, order (score, then position) and cut, but each ratio scored over every choice by rapidfuzz's
    native ``cdist`` instead of a Python call per title."""
    native = min(max(cutoff, 0.0), 100.0)  # rapidfuzz's range; the exact cut is applied below
    scores = np.maximum(
        process.cdist([query], choices, scorer=fuzz.ratio, dtype=np.float64, score_cutoff=native)[0],
        process.cdist([query], choices, scorer=fuzz.token_sort_ratio, dtype=np.float64, score_cutoff=native)[0],
    )
    idx = np.flatnonzero(scores >= cutoff)
    order = idx[np.lexsort((idx, -scores[idx]))][:limit]
    return [(int(p), float(scores[p])) for p in order]


def _as_int(value: float) -> int | None:
    return None if value != value else int(value)
