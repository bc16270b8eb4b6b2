"""The one reader of catalogue titles (retrieval.item_text): trailing years, articles moved behind a comma; and the
one pattern for a year written in free text."""

from __future__ import annotations

import pytest

from agent.chat import lexicon as lx
from agent.explanation_checks import year_claims
from retrieval.item_text import (
    YEAR_IN_TEXT,
    TitleParts,
    item_text,
    natural_title,
    title_parts,
    title_years,
    trailing_year,
    without_year,
)


@pytest.mark.parametrize(("title", "bare"), [
    ("Heat (1995)", "Heat"),
    ("Seven (Se7en) (1995)", "Seven (Se7en)"),
    ("Blade Runner", "Blade Runner"),
    ("2001 (A Space Odyssey)", "2001 (A Space Odyssey)"),
    ("Love (1999) Story", "Love (1999) Story"),
])
def test_without_year_strips_only_a_trailing_year(title: str, bare: str) -> None:
    assert without_year(title) == bare


@pytest.mark.parametrize(("title", "parts", "natural"), [
    ("Godfather, The (1972)", TitleParts("Godfather", "The", 1972), "The Godfather"),
    ("Vie est belle, La  (1993)", TitleParts("Vie est belle", "La", 1993), "La Vie est belle"),
    ("Heat (1995)", TitleParts("Heat", None, 1995), "Heat"),
    ("Star Wars (1977) (1997)", TitleParts("Star Wars", None, 1977), "Star Wars"),
    ("Love (1999) Story", TitleParts("Love (1999) Story", None, None), "Love (1999) Story"),
    ("Things, Theory of", TitleParts("Things, Theory of", None, None), "Things, Theory of"),
])
def test_title_parts(title: str, parts: TitleParts, natural: str) -> None:
    assert title_parts(title) == parts
    assert natural_title(title) == natural
    assert parts.listed == without_year(without_year(" ".join(title.split()))).strip()  # as listed, no years


def test_years_in_a_title() -> None:
    assert title_years("Star Wars (1977) (1997)") == (1977, 1997)
    assert trailing_year("Star Wars (1977) (1997)") == 1997
    assert trailing_year("Love (1999) Story") is None
    assert item_text("Heat (1995)", 1995, ["Action"]) == "Heat (1995). Genres: Action."
    assert item_text("Heat", 1995) == "Heat (1995)."


def test_one_year_pattern_serves_the_chat_lexicon_and_the_explanation_checks():
    """A year in free text is read by one pattern (``YEAR_IN_TEXT``): the chat's era cues and the explanation
    checks' year claims see the same years, and a decade ("1990s") is not one."""
    text = "made in 1994 or 2031, not the 1990s, not 1812 or 21034"
    assert YEAR_IN_TEXT.findall(text) == ["1994", "2031"]
    assert year_claims(text)[0] == {1994, 2031}
    from_year = lx.FROM_YEAR.search("something from 2031 on")
    assert from_year is not None and from_year["y"] == "2031"
    year_range = lx.YEAR_RANGE.search("between 1994 and 2031")
    assert year_range is not None and year_range.group("a", "b") == ("1994", "2031")
    assert lx.FROM_YEAR.search("something from 1812") is None
