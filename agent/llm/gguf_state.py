"""A llama-family GGUF's weights as a transformers state dict, dequantised with the ``gguf`` package alone.

``convert_gguf`` (:mod:`agent.llm.model_files`) goes through transformers' GGUF loader, whose behaviour changes
between releases (recent ones keep the weights packed). A training machine with another transformers release
must still train on exactly the weights served here: this module needs only numpy, torch and ``gguf``, and a
test checks it reproduces the converted folder bit for bit. The GGUF is a third of that folder's size, which is
what lets it travel to such a machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# llama.cpp tensor names -> transformers' LlamaForCausalLM names ({i}: the layer)
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the q/k projection rows (its rotary embedding pairs halves differently)."""
    dim = weights.shape[0] // heads // 2
    return weights.reshape(heads, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


def field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents() if key in reader.fields else None


def gguf_state_dict(path: Path, dtype: Any = None) -> dict[str, Any]:
    """``{transformers name: tensor}`` for a llama-architecture GGUF (cast to ``dtype``, default bfloat16)."""
    import gguf
    import torch

    reader = gguf.GGUFReader(str(path))
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: architecture {arch!r}, only 'llama' is mapped")
    heads = int(field(reader, "llama.attention.head_count"))
    kv_heads = int(field(reader, "llama.attention.head_count_kv"))
    out = {}
    for t in reader.tensors:
        stem, _, kind = t.name.rpartition(".")
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            if part not in LAYER_NAMES:
                raise ValueError(f"{path.name}: tensor {t.name} has no transformers name here")
            if part in ("attn_q", "attn_k"):
                array = unpermute(array, heads if part == "attn_q" else kv_heads)
            name = f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
        elif stem in TOP_NAMES:
            name = f"{TOP_NAMES[stem]}.{kind}"
        else:
            raise ValueError(f"{path.name}: tensor {t.name} has no transformers name here")
        out[name] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype or torch.bfloat16)
    return out
