"""Typed configuration of the LLM backends, read from ``RECAGENT_*`` variables when asked (never at import)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field


class LLMConfig(BaseModel):
    backend: str = Field(default="transformers", description="transformers | openai (RECAGENT_LLM)")
    model_path: str | None = Field(default=None, description="local HF folder (RECAGENT_LLM_MODEL); "
                                   "default: SmolLM2-135M-Instruct converted from its GGUF wheel")
    threads: int = Field(default=2, ge=1, description="most torch threads for the in-process model "
                         "(RECAGENT_LLM_THREADS)")
    thread_policy: Literal["adaptive", "fixed"] = Field(
        default="adaptive", description="adaptive: each kind of forward pass (short prompt, micro-batch, decoding) "
        "runs on one thread or on `threads`, whichever is measured faster; fixed: always `threads` "
        "(RECAGENT_LLM_THREAD_POLICY)")
    url: str = Field(default="http://127.0.0.1:8001/v1", description="OpenAI-compatible base URL (RECAGENT_LLM_URL)")
    api_key: str = Field(default="EMPTY", description="RECAGENT_LLM_API_KEY")
    served_model: str | None = Field(default=None, description="model name on the server (RECAGENT_LLM_SERVED_MODEL);"
                                     " read from /v1/models when unset")
    ranker_model: str = Field(default="recagent-ranker", description="the trained ranker's LoRA module name on the "
                              "server (RECAGENT_LLM_RANKER_MODEL; `recagent llm serve` serves it under this name)")
    timeout_s: float = Field(default=30.0, gt=0, description="per-request timeout (RECAGENT_LLM_TIMEOUT)")

    @classmethod
    def from_env(cls) -> LLMConfig:
        env = os.environ
        values: dict[str, object] = {}
        mapping = {"RECAGENT_LLM": "backend", "RECAGENT_LLM_MODEL": "model_path", "RECAGENT_LLM_THREADS": "threads",
                   "RECAGENT_LLM_THREAD_POLICY": "thread_policy",
                   "RECAGENT_LLM_URL": "url", "RECAGENT_LLM_API_KEY": "api_key",
                   "RECAGENT_LLM_SERVED_MODEL": "served_model", "RECAGENT_LLM_RANKER_MODEL": "ranker_model",
                   "RECAGENT_LLM_TIMEOUT": "timeout_s"}
        for var, field in mapping.items():
            if env.get(var):
                values[field] = env[var]
        return cls.model_validate(values)
