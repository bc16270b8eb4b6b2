"""Which sentence encoder a catalogue's index uses, and how it embeds a user.

* ``frozen``: all-MiniLM-L6-v2 as shipped; a user's vector is the recency-weighted mean of their items' vectors.
* ``tuned``: the encoder ``recagent train embedder`` fine-tuned on the catalogue's behaviour data; a user's
  vector is the encoder over the text of their recent history (:class:`HistoryText`), so any history, also one
  the system has never seen, gets a personal vector.

A tuned encoder is a folder with ``trained_layers.safetensors`` (only the trained top layers, about 14 MB for two
MiniLM layers, so it can ship with the package) and ``provenance.json``. The full model is materialised from the
pinned base MiniLM plus those layers on first use (``model/`` beside them, or under ``RECAGENT_HOME`` for a
shipped one). Its checkpoint id is the sha256 prefix of the layers file.

``RECAGENT_ENCODER`` chooses when an index is built: ``auto`` (default: ``RECAGENT_HOME/encoders/<catalog>/``,
else the one shipped in ``retrieval/shipped/<catalog>/``, else frozen), ``frozen``, ``tuned`` (an error when there
is none) or a folder path. The index manifest records the choice (:class:`EncoderRef`) and loading follows the
manifest, never the environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from retrieval.embeddings import (
    MINILM_NAME,
    Embedder,
    Precision,
    encoder_precision,
    ensure_embedding_model,
    precision_name,
)
from retrieval.home import recagent_home

logger = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
TRAINED_LAYERS = "trained_layers.safetensors"
SHIPPED = Path(__file__).parent / "shipped"
ENCODER_CHOICES = ("auto", "frozen", "tuned", "<folder>")
HISTORY_SEPARATOR = " | "


class EncoderMissingError(LookupError):
    """The index names a tuned encoder that is no longer on disk."""


class EncoderRef(BaseModel):
    """The encoder an index was built with (kept in its manifest)."""

    kind: Literal["frozen", "tuned"] = "frozen"
    name: str = Field(default=MINILM_NAME, description="the encoder's name, with its precision unless fp32")
    precision: Precision = Field(default="fp32", description="the encoder's weights "
                                               "(RECAGENT_ENCODER_PRECISION when the index was built)")
    path: str | None = Field(default=None, description="folder of a tuned encoder (model/ + provenance.json)")
    checkpoint: str | None = Field(default=None, description="sha256 prefix of the tuned weights")
    history_items: int = Field(default=20, ge=1, description="most recent items in a user's history text")
    max_tokens: int = Field(default=128, ge=8, description="token budget of a user's history text")
    prior_weight: float = Field(default=0.0, ge=0, description="weight of the popularity prior added to the "
                                "cosine, beta * log(1 + interactions), chosen on validation")
    fusion: dict[str, float] | None = Field(default=None, description="fusion weights tuned on validation with "
                                            "this encoder (used by a new index built with it)")
    ease_lambda: float | None = None
    ease_decay: float | None = None
    sasrec_epochs: int | None = None


class EncoderProvenance(BaseModel):
    catalog: str
    content_hash: str
    base_model: str
    checkpoint: str
    command: str
    commit: str
    seed: int
    split: dict[str, Any]
    config: dict[str, Any]
    train: dict[str, Any] = Field(default_factory=dict, description="examples, steps, time, speed, log")
    validation: dict[str, Any] = Field(default_factory=dict, description="validation NDCG@10 of the vector retriever")
    fusion: dict[str, Any] | None = Field(default=None, description="fusion weights and EASE lambda re-tuned on "
                                          "validation with this encoder")
    created: str


def encoders_dir(catalog: str) -> Path:
    return recagent_home() / "encoders" / catalog


def file_checksum(path: Path) -> str:
    """sha256 prefix of a file: the checkpoint id of a tuned encoder's layers file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def save_trained_layers(model: Any, folder: Path) -> str:
    """Write the parameters that train (``requires_grad``) to ``folder``; returns the checkpoint id."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError("the model has no trained parameters to save")
    save_file(tensors, str(folder / TRAINED_LAYERS))
    return file_checksum(folder / TRAINED_LAYERS)


def materialise(folder: Path, base_model: Path | None = None) -> Path:
    """The full model folder of the tuned encoder in ``folder``: base MiniLM with its trained layers put in,
    built once (atomically) and reused while the checkpoint matches. It is written beside the layers only for an
    encoder trained under ``RECAGENT_HOME/encoders``; any other folder (the one shipped in this package or in
    another checkout whose index the home still names, a user's own folder) is left as it is, and the model is
    built under ``RECAGENT_HOME/encoders/.materialised``."""
    checkpoint = file_checksum(folder / TRAINED_LAYERS)
    writable = folder.resolve().is_relative_to((recagent_home() / "encoders").resolve())
    target = folder / "model" if writable else encoders_dir(".materialised") / f"{folder.name}-{checkpoint}" / "model"
    stamp = target / "CHECKPOINT"
    if stamp.exists() and stamp.read_text().strip() == checkpoint:
        return target
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model or ensure_embedding_model()), device="cpu", local_files_only=True)
    provenance = load_provenance(folder)
    model.max_seq_length = int(provenance.config.get("max_tokens") or 128)
    layers = load_file(str(folder / TRAINED_LAYERS))
    result = model.load_state_dict(layers, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{folder / TRAINED_LAYERS} holds weights the base model lacks: {result.unexpected_keys[:3]}")
    staging = target.with_name(f".{target.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save(str(staging))
    (staging / "CHECKPOINT").write_text(checkpoint)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def load_provenance(folder: Path) -> EncoderProvenance:
    path = folder / PROVENANCE
    if not path.exists():
        raise FileNotFoundError(f"no tuned encoder in {folder} (missing {PROVENANCE}); train one with "
                                "`recagent train embedder`")
    return EncoderProvenance.model_validate(json.loads(path.read_text()))


def record_fusion(folder: Path, weights: dict[str, float], ease_lambda: float, how: str,
                  learned: dict[str, Any] | None = None, ease_decay: float = 1.0, sasrec_epochs: int = 0) -> None:
    """Keep the fusion tuned with this encoder in its provenance (the weights, EASE's lambda and recency decay, the
    SASRec source's epochs, and the learned fusion ranker where one beat the weights), so a new index built with it
    starts there."""
    from retrieval.catalog import atomic_write_json

    prov = load_provenance(folder)
    prov.fusion = {"weights": weights, "ease_lambda": ease_lambda, "ease_decay": ease_decay,
                   "sasrec_epochs": sasrec_epochs, "tuned_on": how}
    if learned is not None:
        prov.fusion["learned"] = learned
    atomic_write_json(folder / PROVENANCE, json.loads(prov.model_dump_json()))


def learned_fusion_of(ref: EncoderRef) -> dict[str, Any] | None:
    """The learned fusion ranker recorded with a tuned encoder (None for the frozen one or where none was kept)."""
    if ref.path is None or not (Path(ref.path) / PROVENANCE).exists():
        return None
    fusion = load_provenance(Path(ref.path)).fusion
    return fusion.get("learned") if fusion else None


def tuned_ref(folder: Path) -> EncoderRef:
    prov = load_provenance(folder)
    cfg = prov.config
    if file_checksum(folder / TRAINED_LAYERS) != prov.checkpoint:
        raise ValueError(f"the trained layers in {folder} do not match its provenance (checkpoint {prov.checkpoint})")
    return EncoderRef(kind="tuned", name=f"{prov.catalog}-tuned-{prov.checkpoint}", path=str(folder.resolve()),
                      checkpoint=prov.checkpoint, history_items=int(cfg.get("history_items", 20)),
                      max_tokens=int(cfg.get("max_tokens", 128)),
                      prior_weight=float(prov.validation.get("best", {}).get("prior_weight", 0.0)),
                      fusion=prov.fusion.get("weights") if prov.fusion else None,
                      ease_lambda=prov.fusion.get("ease_lambda") if prov.fusion else None,
                      ease_decay=prov.fusion.get("ease_decay") if prov.fusion else None,
                      sasrec_epochs=prov.fusion.get("sasrec_epochs") if prov.fusion else None)


def resolve_encoder(catalog: str, choice: str | None = None, precision: str | None = None) -> EncoderRef:
    """The encoder a new index of ``catalog`` is built with, per ``RECAGENT_ENCODER`` and
    ``RECAGENT_ENCODER_PRECISION`` (read at call time)."""
    ref = _resolve_encoder(catalog, choice)
    chosen = encoder_precision(precision)
    if chosen == "fp32":
        return ref
    return ref.model_copy(update={"precision": chosen, "name": precision_name(ref.name, chosen)})


def _resolve_encoder(catalog: str, choice: str | None = None) -> EncoderRef:
    choice = choice if choice is not None else os.environ.get("RECAGENT_ENCODER", "auto")
    if choice == "frozen":
        return EncoderRef()
    if choice in ("auto", "tuned"):
        for folder in (encoders_dir(catalog), SHIPPED / catalog):
            if (folder / PROVENANCE).exists():
                return tuned_ref(folder)
        if choice == "tuned":
            raise ValueError(f"RECAGENT_ENCODER=tuned but catalogue '{catalog}' has no tuned encoder; "
                             f"run `recagent train embedder --catalog {catalog}`")
        return EncoderRef()
    folder = Path(choice).expanduser()
    if not (folder / PROVENANCE).exists():
        raise ValueError(f"RECAGENT_ENCODER={choice!r} is neither a tuned encoder folder nor one of: "
                         f"{', '.join(ENCODER_CHOICES[:3])}")
    return tuned_ref(folder)


def make_embedder(ref: EncoderRef, cache: bool = True) -> Embedder:
    """The embedder of ``ref``; a tuned one must still be on disk with the recorded weights."""
    if ref.kind == "frozen":
        return Embedder(cache=cache, precision=ref.precision)
    assert ref.path is not None
    if not (Path(ref.path) / TRAINED_LAYERS).exists():
        raise EncoderMissingError(f"the index was built with the tuned encoder in {ref.path}, which is gone; re-run "
                                  "`recagent train embedder` or re-index with RECAGENT_ENCODER=frozen")
    return Embedder(materialise(Path(ref.path)), cache=cache, name=ref.name, precision=ref.precision)


class HistoryText:
    """A user's history as one text for the tuned encoder: the most recent items (most recent last) that fit
    the token budget, joined by ``|``."""

    def __init__(self, item_texts: Sequence[str], tokenizer: Any, history_items: int, max_tokens: int) -> None:
        self.item_texts = list(item_texts)
        self.history_items = history_items
        self.max_tokens = max_tokens
        self._tokenizer = tokenizer
        self._lengths: dict[int, int] = {}
        self._sep = len(tokenizer(HISTORY_SEPARATOR, add_special_tokens=False)["input_ids"])

    def _length(self, pos: int) -> int:
        n = self._lengths.get(pos)
        if n is None:
            n = self._lengths[pos] = len(self._tokenizer(self.item_texts[pos], add_special_tokens=False)["input_ids"])
        return n

    def __call__(self, history: Sequence[int]) -> str:
        budget = self.max_tokens - 2  # [CLS] and [SEP]
        chosen: list[int] = []
        for pos in reversed(list(history)[-self.history_items:]):
            cost = self._length(pos) + (self._sep if chosen else 0)
            if chosen and cost > budget:
                break
            chosen.append(pos)
            budget -= cost
        return HISTORY_SEPARATOR.join(self.item_texts[p] for p in reversed(chosen))


def user_vector_fn(ref: EncoderRef, embedder: Embedder,
                   item_texts: Sequence[str]) -> Callable[[Sequence[int]], np.ndarray] | None:
    """For a tuned encoder: history positions -> the user's unit vector (None for the frozen encoder, whose
    users are the mean of their items)."""
    if ref.kind != "tuned":
        return None
    text = HistoryText(item_texts, embedder.model.tokenizer, ref.history_items, ref.max_tokens)

    def encode(history: Sequence[int]) -> np.ndarray:
        return embedder.encode_uncached([text(history)])[0]

    return encode
