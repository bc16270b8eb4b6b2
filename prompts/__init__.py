"""Versioned prompt templates: ``prompts/<name>.<version>.jinja``.

A template file has sections introduced by ``=== system ===``, ``=== user ===`` and ``=== assistant ===``; the
assistant section (possibly empty) is the prefix the model continues from. Variables are rendered with Jinja2
(StrictUndefined). Untrusted text (item and user text) must go through the ``q`` filter, which quotes it as a
JSON string so it stays data: it cannot end a section, change the instructions or the output format.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

PROMPT_DIR = Path(__file__).parent
_SECTION = re.compile(r"^=== (system|user|assistant) ===$", re.MULTILINE)


def clean_text(text: object, limit: int = 300) -> str:
    """Printable, single-line, bounded text."""
    s = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in str(text))
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def quote(text: object, limit: int = 300) -> str:
    return json.dumps(clean_text(text, limit), ensure_ascii=False)


@dataclass(frozen=True)
class RenderedPrompt:
    messages: list[dict[str, str]]
    answer_prefix: str


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:12]

    @property
    def id(self) -> str:
        return f"{self.name}.{self.version}"

    def sections(self) -> dict[str, str]:
        parts = _SECTION.split(self.source)
        out: dict[str, str] = {}
        for i in range(1, len(parts) - 1, 2):
            out[parts[i]] = parts[i + 1].strip("\n")
        if "user" not in out:
            raise ValueError(f"prompt {self.id} has no '=== user ===' section")
        return out

    def render(self, **variables: Any) -> RenderedPrompt:
        env = _env()
        messages = []
        sections = self.sections()
        for role in ("system", "user"):
            if role in sections:
                text = env.from_string(sections[role]).render(**variables).strip()
                messages.append({"role": role, "content": text})
        prefix = env.from_string(sections.get("assistant", "")).render(**variables).strip("\n")
        return RenderedPrompt(messages=messages, answer_prefix=prefix)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["q"] = quote
    env.filters["clean"] = clean_text
    return env


def available() -> list[str]:
    return sorted(p.name[: -len(".jinja")] for p in PROMPT_DIR.glob("*.jinja"))


def load(name: str, version: str = "v1") -> PromptTemplate:
    path = PROMPT_DIR / f"{name}.{version}.jinja"
    if not path.exists():
        raise ValueError(f"unknown prompt '{name}.{version}'; available: {', '.join(available())}")
    return PromptTemplate(name=name, version=version, source=path.read_text(encoding="utf-8"))
