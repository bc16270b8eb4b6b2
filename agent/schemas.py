"""Output models of the recommender (JSON schema exported by `recagent schema`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from retrieval.candidates import SourceHit

Mode = Literal["score", "generate", "retrieval"]


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    rank: int = Field(ge=1)
    score: float = Field(description="final score: alpha * llm + (1 - alpha) * retrieval, per-user normalised")
    llm_score: float | None = Field(default=None, description="normalised LLM preference (None without LLM)")
    retrieval_score: float = Field(description="normalised retrieval score")
    sources: list[SourceHit] = Field(default_factory=list)
    reason: str | None = None
    reason_source: Literal["llm", "template"] | None = Field(
        default=None, description="who wrote the reason: the LLM (checked by code), or a metadata template")
    evidence: list[str] = Field(default_factory=list, description="history item ids the reason rests on")
    genres: list[str] = Field(default_factory=list)
    year: int | None = None


class Timings(BaseModel):
    retrieval_ms: float = 0.0
    llm_ms: float = 0.0
    explain_ms: float = 0.0
    first_reason_ms: float | None = Field(default=None, description="from the ranked list to the first reason")
    total_ms: float = 0.0


class RecommendationAnswer(BaseModel):
    items: list[RecommendedItem]
    model: str | None = Field(default=None, description="LLM that ranked/explained (None without LLM)")
    mode: Mode
    degraded: bool = Field(default=False, description="True when part of the LLM's work is missing: the ranking "
                           "(then `reranked` is 0 and the list is the retrieval order) or some reasons (then "
                           "they come from templates); `reason` says which")
    reason: str | None = Field(default=None, description="why the answer is degraded")
    reasons_llm: int | None = Field(default=None, description="how many of the items' reasons the LLM wrote (None "
                                    "when no explanations were asked for)")
    raw_duplicates: int | None = Field(default=None, description="generate mode: repeated ids in the model's raw "
                                       "list (dropped; the list is completed in retrieval order)")
    timings: Timings = Field(default_factory=Timings)
    dropped_evidence: int = Field(default=0, description="evidence ids removed because not in the history")
    tokens: dict[str, int] = Field(default_factory=dict)
    ranker: str | None = Field(default=None, description="which LLM ranker scored: 'zero-shot' or 'trained:<catalog>'")
    reranked: int = Field(default=0, description="how many candidates the LLM ranked (the rerank window)")
    note: str | None = Field(default=None, description="what the answer holds beyond the LLM's window, if anything")
