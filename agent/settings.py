"""The server's one configuration object, read from ``RECAGENT_*`` variables when built (never at import)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from retrieval.catalog import DEFAULT_CATALOG


class Settings(BaseSettings):
    """``recagent serve`` settings. Every field ``x`` is read from ``RECAGENT_X``."""

    model_config = SettingsConfigDict(env_prefix="RECAGENT_", extra="ignore", case_sensitive=False)

    host: str = Field(default="127.0.0.1", description="interface to listen on")
    port: int = Field(default=8000, ge=0, le=65535)
    catalog: str = Field(default=DEFAULT_CATALOG, description="catalogue served")
    llm: str = Field(
        default="transformers",
        description="LLM backend passed to LLMConfig (transformers | openai), or 'none' for retrieval only",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="when set, every route but /healthz and the web page needs `Authorization: Bearer <key>`",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins, comma-separated ('*' for any)"
    )
    queue_size: int = Field(default=64, ge=1, description="LLM jobs waiting at most; beyond it: 429")
    workers: int = Field(default=8, ge=1, le=64, description="threads running LLM work (concurrent jobs)")
    deadline_s: float = Field(
        default=10.0, gt=0, description="default deadline of a request: past it the answer keeps what the LLM has "
        "done (else the retrieval order) and fills the missing reasons from templates, flagged degraded",
    )
    max_deadline_s: float = Field(
        default=120.0, gt=0, description="the largest `timeout_s` a caller may ask for (larger ones get 422)"
    )
    explain_workers: int = Field(
        default=2, ge=1, le=64, description="threads writing explanations (a lane of their own, so that "
        "generation never holds score requests)",
    )
    chat_deadline_s: float = Field(default=60.0, gt=0, description="deadline of one chat turn")
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="larger request bodies get 413")
    max_history: int = Field(default=500, ge=1, description="longer caller-given histories get 413")
    max_candidates: int = Field(default=100, ge=1, description="more rerank candidates get 413")
    chat_session_ttl_s: int = Field(default=86400, ge=1, description="idle chat sessions expire after this long")
    sessions_url: str | None = Field(
        default=None, description="where chat sessions live, shared by every replica: redis://host:port/db, "
        "sqlite:///path/sessions.sqlite (unset: chat_sessions_path, else sessions.sqlite under RECAGENT_HOME)",
    )
    chat_sessions_path: str | None = Field(
        default=None, description="SQLite file of chat sessions when sessions_url is unset (default: "
        "RECAGENT_HOME/sessions.sqlite)",
    )
    index_watch_s: float = Field(
        default=5.0, ge=0, description="how often the server checks for a new index of its catalogue and moves to "
        "it without a failed request (0: only on POST /v1/admin/reload)",
    )
    index_grace_s: float = Field(
        default=600.0, ge=0, description="a replaced Chroma collection is deleted this long after its replacement "
        "(so that every replica has moved on)",
    )
    chat_tool_calling: bool = Field(
        default=False, description="with RECAGENT_LLM=openai on a server that makes tool calls (vLLM with "
        "--enable-auto-tool-choice), chat turns pick their items through the recommender's LangChain tools",
    )
    micro_batch: bool = Field(
        default=True, description="batch score requests that arrive together (in-process LLM)"
    )
    batch_window_ms: float = Field(default=50.0, ge=0, description="how long the batcher waits for company")
    max_batch: int = Field(default=8, ge=1, le=64)
    log_level: str = Field(default="INFO")

    @field_validator("catalog")
    @classmethod
    def _catalog_name(cls, value: str) -> str:
        from retrieval.catalog import check_catalog_name

        return check_catalog_name(value, "RECAGENT_CATALOG")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @property
    def use_llm(self) -> bool:
        return self.llm.strip().lower() not in ("none", "off", "")
