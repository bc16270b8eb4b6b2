"""Public result models of the chat agent (Turn, ChatItem, TurnItems) and the persisted session state."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ChatItem(BaseModel):
    item_id: str
    title: str
    reason: str
    evidence: list[str] = Field(default_factory=list, description="liked item ids the reason rests on")
    genres: list[str] = Field(default_factory=list)
    year: int | None = None
    score: float = 0.0
    reason_source: Literal["llm", "template"] = Field(
        default="template", description="who wrote the reason: the LLM (checked against the metadata) or a template"
    )


class Turn(BaseModel):
    session_id: str
    reply: str
    items: list[ChatItem] = Field(default_factory=list)
    degraded: bool = False
    reason: str | None = Field(default=None, description="why the turn is degraded")
    intent: dict[str, object] | None = None
    decided_by: str = "rules"


class TurnItems(BaseModel):
    """A streamed turn's items as soon as they are ranked, before the LLM has written their reasons (their
    reasons are templates until then)."""

    session_id: str
    items: list[ChatItem] = Field(default_factory=list)


class Constraints(BaseModel):
    genres: list[str] = Field(default_factory=list, description="hard: every pick has one of these")
    exclude_genres: list[str] = Field(default_factory=list)
    year_min: int | None = None
    year_max: int | None = None
    mood: str = ""
    boost: list[str] = Field(
        default_factory=list, description="soft: a mood's genres ('funnier'), moved up among the candidates"
    )
    strict: list[str] = Field(
        default_factory=list, description="genres stated as a must: they outlive a new reference item"
    )


class PendingChoice(BaseModel):
    """An ambiguous title: the option taken and the alternatives offered to the user."""

    mention: str
    chosen: str
    options: list[str]
    slot: Literal["liked", "disliked"] = "liked"


class TurnRecord(BaseModel):
    user: str
    reply: str
    items: list[str] = Field(default_factory=list)
    kind: str = ""
    decided_by: str = "rules"
    at: float = 0.0


class SessionState(BaseModel):
    session_id: str
    catalog: str
    user_id: str | None = None
    created: float
    updated: float
    version: int = Field(default=0, ge=0, description="saves so far: a save must name the version it read")
    liked: list[str] = Field(default_factory=list, description="oldest first")
    seeded: list[str] = Field(default_factory=list, description="liked ids that came from the user's history")
    disliked: list[str] = Field(default_factory=list)
    rejected: list[str] = Field(default_factory=list, description="recommended items the user turned down")
    recommended: list[str] = Field(default_factory=list)
    named: list[str] = Field(default_factory=list, description="items the user mentioned in any way")
    last_items: list[str] = Field(default_factory=list)
    reasons: dict[str, str] = Field(default_factory=dict, description="reason given for each recommended id")
    constraints: Constraints = Field(default_factory=Constraints)
    reference: list[str] = Field(
        default_factory=list,
        description="items the user asked to match ('something like Heat'): the history retrieval starts from",
    )
    evidence: dict[str, list[str]] = Field(
        default_factory=dict, description="liked ids each recommended item's reason rests on"
    )
    pending: PendingChoice | None = None
    turns: list[TurnRecord] = Field(default_factory=list)

    def excluded(self) -> set[str]:
        return set(self.liked) | set(self.disliked) | set(self.rejected) | set(self.recommended) | set(self.named)
