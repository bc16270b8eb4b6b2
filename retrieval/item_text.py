"""The text that represents an item to the embedding model (and, quoted, to the LLM)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_TRAILING_YEAR = re.compile(r"\(\d{4}\)\s*$")


def item_text(title: str, year: int | None = None, genres: Sequence[str] = (), description: str = "") -> str:
    """Deterministic: ``"<title> (<year>). Genres: a, b. <description>"``; empty parts are left out."""
    title = " ".join(title.split())
    head = title
    if year is not None and not _TRAILING_YEAR.search(title):
        head = f"{title} ({year})"
    parts = [head + "."]
    if genres:
        parts.append("Genres: " + ", ".join(genres) + ".")
    description = " ".join(description.split())
    if description:
        parts.append(description if description.endswith((".", "!", "?")) else description + ".")
    return " ".join(parts)
