"""Where recagent keeps everything it downloads or builds: ``RECAGENT_HOME``."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path("~/.cache/recagent")


def recagent_home() -> Path:
    """The home folder, read from the environment at call time (never at import)."""
    home = Path(os.environ.get("RECAGENT_HOME", str(DEFAULT_HOME))).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def configure_offline_environment(home: Path | None = None) -> Path:
    """Point every third-party cache under the home folder, forbid hub look-ups and telemetry, and make OpenMP
    waits passive.

    Uses ``setdefault`` so an explicit environment still wins.
    """
    home = home or recagent_home()
    defaults = {
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "SENTENCE_TRANSFORMERS_HOME": str(home / "hf" / "sentence-transformers"),
        "ANONYMIZED_TELEMETRY": "False",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLCONFIGDIR": str(home / "matplotlib"),
        "XDG_CACHE_HOME": str(home / "xdg-cache"),
        "VLLM_CACHE_ROOT": str(home / "vllm-cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # OpenMP waits (read when torch is first imported, so this must run before any torch import). libgomp's
        # default spins so long that every torch op crawls once another process holds a core (7 s instead of
        # 0.4 s for a 600-token forward pass here); never spinning makes each hand-off to a second thread cost
        # more than it saves on short prompts. A short spin keeps hand-offs fast on an idle machine, and the
        # LLM's thread governor (agent/llm/threads.py) falls back to one thread when the machine is busy.
        "GOMP_SPINCOUNT": "30000",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return home


def catalogs_dir(home: Path | None = None) -> Path:
    path = (home or recagent_home()) / "catalogs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir(home: Path | None = None) -> Path:
    path = (home or recagent_home()) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
