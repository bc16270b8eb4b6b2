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
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="weights of the in-process model (RECAGENT_LLM_DTYPE); auto: bfloat16 where the "
        "CPU has bf16 instructions (AVX512-BF16 or AMX), else float32 (bf16 emulated on AVX2 is several times "
        "slower)")
    url: str = Field(default="http://127.0.0.1:8001/v1", description="OpenAI-compatible base URL (RECAGENT_LLM_URL)")
    api_key: str = Field(default="EMPTY", description="RECAGENT_LLM_API_KEY")
    served_model: str | None = Field(default=None, description="model name on the server (RECAGENT_LLM_SERVED_MODEL);"
                                     " read from /v1/models when unset")
    ranker_model: str = Field(default="recagent-ranker", description="the trained ranker's LoRA module name on the "
                              "server (RECAGENT_LLM_RANKER_MODEL; `recagent llm serve` serves it under this name)")
    timeout_s: float = Field(default=30.0, gt=0, description="per-request timeout (RECAGENT_LLM_TIMEOUT); a request's "
                             "deadline, when it has one, shortens it")
    breaker_failures: int = Field(default=3, ge=1, description="consecutive failures of an LLM server that open its "
                                  "circuit breaker (RECAGENT_LLM_BREAKER_FAILURES)")
    breaker_cooldown_s: float = Field(default=10.0, gt=0, description="seconds an open circuit refuses calls before "
                                      "one probe call may try the server again (RECAGENT_LLM_BREAKER_COOLDOWN_S)")

    @classmethod
    def from_env(cls) -> LLMConfig:
        env = os.environ
        values: dict[str, object] = {}
        mapping = {"RECAGENT_LLM": "backend", "RECAGENT_LLM_MODEL": "model_path", "RECAGENT_LLM_THREADS": "threads",
                   "RECAGENT_LLM_THREAD_POLICY": "thread_policy", "RECAGENT_LLM_DTYPE": "dtype",
                   "RECAGENT_LLM_URL": "url", "RECAGENT_LLM_API_KEY": "api_key",
                   "RECAGENT_LLM_SERVED_MODEL": "served_model", "RECAGENT_LLM_RANKER_MODEL": "ranker_model",
                   "RECAGENT_LLM_TIMEOUT": "timeout_s", "RECAGENT_LLM_BREAKER_FAILURES": "breaker_failures",
                   "RECAGENT_LLM_BREAKER_COOLDOWN_S": "breaker_cooldown_s"}
        for var, field in mapping.items():
            if env.get(var):
                values[field] = env[var]
        return cls.model_validate(values)


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (Linux: the flags in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def torch_dtype(config: LLMConfig) -> str:
    """The torch dtype name the in-process model loads with."""
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if cpu_has_bf16() else "float32"
