"""Every request and response model of the HTTP API (the OpenAPI schema at ``/docs`` comes from here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.schemas import Mode, RecommendationAnswer
from retrieval.filters import Filters

ItemId = str
_ID = Field(min_length=1, max_length=200)


# --- errors -------------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    type: str = Field(
        description="machine-readable kind: invalid_request, not_found, payload_too_large, "
        "unauthorized, overloaded, internal_error, ..."
    )
    message: str
    field: str | None = Field(default=None, description="the offending request field, dotted, when known")


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- recommendations and reranking --------------------------------------------------------------------------
class RecommendationRequest(BaseModel):
    """Give exactly one of ``user_id`` (a known user) or ``history`` (item ids, oldest first)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str | None = Field(default=None, min_length=1, max_length=200)
    history: list[ItemId] | None = Field(default=None, description="item ids, oldest first (cold users)")
    k: int = Field(default=10, ge=1, le=100)
    filters: Filters | None = None
    query: str | None = Field(default=None, max_length=500, description="free text describing what is wanted")
    exclude: list[ItemId] = Field(default_factory=list, max_length=1000, description="ids never returned")
    explain: bool = Field(default=False, description="LLM reasons and evidence per item")
    mode: Mode = Field(default="score", description="score | generate (LLM), retrieval (no LLM)")
    timeout_s: float | None = Field(
        default=None, gt=0, le=600, description="deadline for this request (capped by the server's)"
    )

    @model_validator(mode="after")
    def _one_of(self) -> RecommendationRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class RecommendationResponse(RecommendationAnswer):
    user_id: str | None = None
    catalog: str


class FreeCandidate(BaseModel):
    """A candidate supplied by the caller that need not be in the catalogue."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    title: str = Field(min_length=1, max_length=300)
    text: str = Field(default="", max_length=2000)


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(default_factory=list, description="catalogue item ids, oldest first")
    candidates: list[ItemId | FreeCandidate] = Field(
        min_length=1, description="catalogue ids or free items, in the caller's (retrieval) order"
    )
    k: int = Field(default=10, ge=1, le=100)
    explain: bool = False
    mode: Mode = "score"
    timeout_s: float | None = Field(default=None, gt=0, le=600)


class RerankResponse(RecommendationAnswer):
    catalog: str


# --- items --------------------------------------------------------------------------------------------------
class Item(BaseModel):
    item_id: str
    title: str
    description: str = ""
    genres: list[str] = Field(default_factory=list)
    year: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchHit(Item):
    score: float


class SearchResponse(BaseModel):
    query: str
    items: list[SearchHit]


# --- chat ---------------------------------------------------------------------------------------------------
class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="continue this conversation (omit to start one)",
    )
    user_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="a known user whose history personalises the answers",
    )
    message: str = Field(min_length=1, max_length=4000)


class ChatItem(BaseModel):
    item_id: str
    title: str
    reason: str | None = None
    evidence: list[str] = Field(default_factory=list)
    genres: list[str] = Field(default_factory=list)
    year: int | None = None
    score: float | None = None
    reason_source: Literal["llm", "template"] | None = Field(
        default=None, description="who wrote the reason: the LLM (checked against the metadata) or a template"
    )


class ChatResponse(BaseModel):
    session_id: str
    reply: str
    items: list[ChatItem] = Field(default_factory=list)
    degraded: bool = False
    reason: str | None = None
    intent: dict[str, Any] | None = None
    decided_by: str | None = None


# --- OpenAI-compatible facade -------------------------------------------------------------------------------
class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="text, or OpenAI content parts"
    )

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if isinstance(p, dict))
        return ""


class ChatCompletionRequest(BaseModel):
    """OpenAI ``chat.completions`` request; the last user message is the turn. Sampling fields are
    accepted and ignored. ``session_id`` (an extension, returned by every answer) continues that
    conversation; without it a new one is rebuilt by replaying the earlier user messages."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(default="recagent", max_length=200)
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=500)
    stream: bool = False
    user: str | None = Field(default=None, max_length=200, description="a known user id (personalises)")
    session_id: str | None = Field(default=None, min_length=1, max_length=200)
    temperature: float | None = None
    max_tokens: int | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = "stop"


class CompletionUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = "recagent"
    choices: list[Choice]
    usage: CompletionUsage = Field(default_factory=CompletionUsage)
    recommendations: list[ChatItem] = Field(default_factory=list, description="structured recommendations")
    session_id: str
    degraded: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "recagent"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- health -------------------------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    catalog: str
    index: bool
    llm: bool = Field(description="the LLM is loaded and, for a remote server, its circuit is not open")
    llm_required: bool
    llm_state: str | None = Field(default=None, description="in-process, or a remote server's circuit breaker: "
                                  "closed (healthy), open (failing: answers degrade at once), half_open (probing)")
    llm_health: dict[str, Any] = Field(default_factory=dict, description="the breaker's failures, last error and "
                                       "when it retries (remote LLM only)")
    model: str | None = None
    chat: bool
    queue_depth: int = 0
    serving: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="the settings that shape throughput (no secrets), for load reports")
