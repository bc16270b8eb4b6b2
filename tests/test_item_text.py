"""The one reader of catalogue titles (retrieval.item_text): trailing years, articles moved behind a comma."""

from __future__ import annotations

import pytest

from retrieval.item_text import (
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
