"""Metadata filters shared by every retrieval source (a numpy mask) and by Chroma (a ``where`` clause)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


def genre_key(genre: str) -> str:
    """Chroma metadata key for one genre flag."""
    return "genre_" + re.sub(r"[^a-z0-9]+", "_", genre.lower()).strip("_")


class Filters(BaseModel):
    """Genres to include (any of) or exclude, and an inclusive year range."""

    model_config = ConfigDict(extra="forbid")

    genres: list[str] = Field(default_factory=list, description="keep items having any of these genres")
    exclude_genres: list[str] = Field(default_factory=list, description="drop items having any of these genres")
    year_min: int | None = Field(default=None, ge=0, le=3000)
    year_max: int | None = Field(default=None, ge=0, le=3000)

    @model_validator(mode="after")
    def _check_range(self) -> Filters:
        if self.year_min is not None and self.year_max is not None and self.year_min > self.year_max:
            raise ValueError(f"year_min {self.year_min} is greater than year_max {self.year_max}")
        return self

    def is_empty(self) -> bool:
        return not (self.genres or self.exclude_genres or self.year_min is not None or self.year_max is not None)

    def canonical(self, known_genres: list[str]) -> Filters:
        """Match genre names case-insensitively to the catalogue's; unknown names raise ValueError."""
        lookup = {g.lower(): g for g in known_genres}

        def fix(names: list[str]) -> list[str]:
            out = []
            for name in names:
                if name.lower() not in lookup:
                    raise ValueError(f"unknown genre '{name}' (known: {', '.join(known_genres)})")
                out.append(lookup[name.lower()])
            return out

        return self.model_copy(update={"genres": fix(self.genres), "exclude_genres": fix(self.exclude_genres)})

    def mask(self, genres: Mapping[str, np.ndarray] | Sequence[Sequence[str]], years_by_pos: np.ndarray) -> np.ndarray:
        """Boolean array over catalogue positions: True where the item passes.

        ``genres`` is either each genre's bool mask over positions (``Catalog.genre_masks``, built once per
        catalogue: the fast path, numpy only) or each position's genre list (``Catalog.genres_by_pos``), from
        which those masks are built first. A genre no item has matches nothing."""
        masks = genres if isinstance(genres, Mapping) else genre_masks(genres)
        n = len(years_by_pos)
        keep = np.ones(n, dtype=bool)
        if self.genres:
            keep &= _any_of(masks, self.genres, n)
        if self.exclude_genres:
            keep &= ~_any_of(masks, self.exclude_genres, n)
        if self.year_min is not None:
            keep &= np.nan_to_num(years_by_pos, nan=-1) >= self.year_min
        if self.year_max is not None:
            keep &= np.nan_to_num(years_by_pos, nan=np.inf) <= self.year_max
        return keep

    def where(self) -> dict[str, Any] | None:
        """The same filter as a Chroma ``where`` clause (items store every genre flag and ``year``, -1 if unknown)."""
        clauses: list[dict[str, Any]] = []
        if self.genres:
            ors: list[dict[str, Any]] = [{genre_key(g): True} for g in self.genres]
            clauses.append(ors[0] if len(ors) == 1 else {"$or": ors})
        clauses.extend({genre_key(g): False} for g in self.exclude_genres)
        if self.year_min is not None:
            clauses.append({"year": {"$gte": self.year_min}})
        if self.year_max is not None:
            clauses.extend([{"year": {"$lte": self.year_max}}, {"year": {"$gte": 0}}])
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def genre_masks(genres_by_pos: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Each genre's bool mask over positions, from each position's genre list (one pass over the items)."""
    masks: dict[str, np.ndarray] = {}
    for pos, item_genres in enumerate(genres_by_pos):
        for g in item_genres:
            if g not in masks:
                masks[g] = np.zeros(len(genres_by_pos), dtype=bool)
            masks[g][pos] = True
    return masks


def _any_of(masks: Mapping[str, np.ndarray], names: Sequence[str], n: int) -> np.ndarray:
    """True where an item has any of ``names``."""
    rows = [masks[g] for g in dict.fromkeys(names) if g in masks]
    if not rows:
        return np.zeros(n, dtype=bool)
    return rows[0].copy() if len(rows) == 1 else np.logical_or.reduce(rows)
