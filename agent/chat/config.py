"""Typed configuration of the conversational agent."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from agent.chat.genre_reader import GenreReaderConfig


class ChatConfig(BaseModel):
    k: int = Field(default=5, ge=1, le=20, description="items recommended per turn")
    use_llm: bool = Field(default=True, description="LLM intent parsing and reranking (False: rules + retrieval)")
    llm_intent: Literal["always", "fallback", "never"] = Field(
        default="fallback",
        description="when to ask the LLM for a structured intent: every turn, only when the rules understood "
        "nothing (the default: the small model is slow and the rules win where they match anyway), or never",
    )
    rerank_mode: Literal["score", "generate"] = "score"
    llm_genres: bool = Field(
        default=True, description="with the LLM on, a request in words the lexicon has no genre for ('sheriffs and "
        "saloons') gets the genre the LLM reads in it (agent.chat.genre_reader), when it reads one clearly",
    )
    genre_reader: GenreReaderConfig = Field(default_factory=GenreReaderConfig)
    tool_calling: bool = Field(
        default=False, description="a chat model that makes tool calls (a served model behind ChatOpenAI) picks the "
        "items through the recommender's LangChain tools (agent.chat.tool_loop); the usual path when it picks none",
    )
    first_tool_choice: Literal["auto", "required"] = Field(
        default="required", description="the tool loop's first model call: 'required' makes it call a tool (a "
        "server such as vLLM constrains the output to the tools' schemas, so a small model still makes a "
        "well-formed call; the loop runs only on turns that ask for items), 'auto' lets it answer in text",
    )
    llm_explain: bool = Field(
        default=True,
        description="with the LLM on, one LLM-written reason per item (agent.explain: all items decoded as one "
        "batch, each checked against the metadata, streamed as written); otherwise, and for any reason not "
        "written or not passing its checks by the turn's deadline, reasons are composed from metadata and the "
        "item's own evidence",
    )
    seed_history: int = Field(default=5, ge=0, le=50, description="recent items of a known user seeded as likes")
    max_message_chars: int = Field(default=2000, ge=50, description="longer messages are truncated with a note")
    session_ttl_s: float = Field(default=86400.0, gt=0, description="idle sessions expire after this long")
    allow_unknown_session_ids: bool = Field(
        default=False,
        description="create a session for an unknown id instead of raising SessionNotFoundError",
    )
    fuzzy_accept: float = Field(default=86.0, ge=0, le=100, description="title match score taken without doubt")
    fuzzy_min: float = Field(default=72.0, ge=0, le=100, description="lowest title match score considered")
    ambiguity_margin: float = Field(
        default=10.0, ge=0, description="runner-up within this many points is surfaced as ambiguous"
    )
    vector_min_similarity: float = Field(default=0.55, ge=-1, le=1, description="vector-store fallback for titles")
    intent_max_tokens: int = Field(default=160, ge=32)
    turn_deadline_s: float = Field(
        default=30.0, gt=0, description="LLM deadline per turn (rerank, then reasons; late reasons stay templates)"
    )
    max_turns_kept: int = Field(default=50, ge=1, description="turns stored per session (oldest dropped)")
    stream_chunk_words: int = Field(default=3, ge=1)
    soft_pool: int = Field(
        default=20, ge=1, le=100,
        description="candidates re-ranked softly when a mood ('funnier') or a reference item ('like Heat') is in play",
    )
    mood_boost: float = Field(
        default=0.5, ge=0,
        description="added to a candidate's rank score (1 for the first, falling evenly to 0) when it has one of the "
        "mood's genres: moods re-rank, never filter",
    )
    together_weight: float = Field(
        default=1.0, ge=0, description="with several genres asked for together ('action and adventure'), added "
        "times the share of them a candidate has, so that the items with all of them come first (0: any of them, "
        "in retrieval order)",
    )
    reference_weight: float = Field(
        default=0.5, ge=0, description="added, times the share of the reference item's genres a candidate has"
    )
