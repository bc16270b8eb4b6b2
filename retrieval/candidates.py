"""What a retriever returns: candidates with provenance."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SourceHit(BaseModel):
    """One source's vote for a candidate: its rank (1-based) and raw score in that source."""

    source: str
    rank: int = Field(ge=1)
    score: float


class Candidate(BaseModel):
    item_id: str
    score: float = Field(description="fused retrieval score: the blend of per-user normalised source scores, or the "
                         "learned fusion's score (any real number; only the order within one list means anything)")
    sources: list[SourceHit] = Field(default_factory=list)


class UnknownItemsError(KeyError):
    """Item ids that the catalogue does not know."""

    def __init__(self, ids: list[str], catalog: str, field: str = "history") -> None:
        self.ids = ids
        self.field = field
        shown = ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
        super().__init__(f"{len(ids)} unknown item id(s) in {field} for catalogue '{catalog}': {shown}")

    def __str__(self) -> str:
        return str(self.args[0])
