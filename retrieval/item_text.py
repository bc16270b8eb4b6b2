"""The text that represents an item to the embedding model (and, quoted, to the LLM), and the one place that
reads a catalogue title's parts: its release year in parentheses and an article moved to the end
("Godfather, The (1972)")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# articles that catalogues move behind a comma ("Vie est belle, La (1993)")
ARTICLES = ("The", "A", "An", "Les", "La", "Le", "Il", "El", "Das", "Der", "Die")
#: a release year as people write one in free text ("made in 1994"): the one pattern the chat's lexicon, its intent
#: parser and the explanation checks build on
YEAR_DIGITS = r"(?:19|20)\d\d"
YEAR_IN_TEXT = re.compile(rf"\b({YEAR_DIGITS})\b")
_YEAR = re.compile(r"\s*\((\d{4})\)")
_TRAILING_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_ARTICLE_LAST = re.compile(rf"^(?P<body>.+?),\s*(?P<art>{'|'.join(ARTICLES)})$")


@dataclass(frozen=True)
class TitleParts:
    """``"Godfather, The (1972)"`` -> body "Godfather", article "The", year 1972 (the years in parentheses that
    end the title are left out of the body; of several, ``year`` is the first)."""

    body: str
    article: str | None = None
    year: int | None = None

    @property
    def natural(self) -> str:
        """As people write it, without the year: "The Godfather"."""
        return f"{self.article} {self.body}" if self.article else self.body

    @property
    def listed(self) -> str:
        """As the catalogue lists it, without the year: "Godfather, The"."""
        return f"{self.body}, {self.article}" if self.article else self.body


def title_parts(title: object) -> TitleParts:
    text = " ".join(str(title).split())
    year = None
    while (m := _TRAILING_YEAR.search(text)) is not None:
        year, text = int(m.group(1)), text[: m.start()]
    m = _ARTICLE_LAST.match(text)
    return TitleParts(m.group("body"), m.group("art"), year) if m else TitleParts(text, None, year)


def title_years(title: object) -> tuple[int, ...]:
    """Every year written in parentheses in a title, in order."""
    return tuple(int(y) for y in _YEAR.findall(str(title)))


def trailing_year(title: object) -> int | None:
    """The year in parentheses that ends a title ("Heat (1995)" -> 1995), or None."""
    m = _TRAILING_YEAR.search(str(title))
    return int(m.group(1)) if m else None


def without_year(title: object) -> str:
    """A title without its trailing year, otherwise as written: "Godfather, The (1972)" -> "Godfather, The"."""
    return _TRAILING_YEAR.sub("", str(title))


def natural_title(title: object) -> str:
    """A catalogue title as people write it, without its year: "Godfather, The (1972)" -> "The Godfather"."""
    return title_parts(title).natural


def item_text(title: str, year: int | None = None, genres: Sequence[str] = (), description: str = "") -> str:
    """Deterministic: ``"<title> (<year>). Genres: a, b. <description>"``; empty parts are left out."""
    title = " ".join(title.split())
    head = title
    if year is not None and trailing_year(title) is None:
        head = f"{title} ({year})"
    parts = [head + "."]
    if genres:
        parts.append("Genres: " + ", ".join(genres) + ".")
    description = " ".join(description.split())
    if description:
        parts.append(description if description.endswith((".", "!", "?")) else description + ".")
    return " ".join(parts)
