"""A small behaviour-only sequential model in the SASRec style: a causal Transformer over item ids.

The model is ``transformers.GPT2LMHeadModel`` with a vocabulary of the catalogue's items plus one padding id
(input and output item embeddings tied). It is trained on next-item prediction with cross-entropy over all
items at every position of windows of ``max_len + 1`` interactions cut from each history every ``stride`` steps
back from its end (the latest window alone with stride 0), and scores a user by the logits at the last position
of their history. The fused retriever reads it as the ``sasrec`` source when the index's CF config gives it
epochs (``CFConfig.sasrec_epochs``, chosen on validation by ``recagent eval retrieval --tune``).

Its item embeddings start from the content encoder's item vectors where the index gives them (``init_scale`` > 0,
:func:`item_init`): the pretrained (and behaviour-tuned) text encoder's knowledge of the items is where the
behaviour Transformer starts, the seed's "pretrained Transformer fine-tuned on behaviour" for the item-id model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, model_validator

from retrieval.full_ranking import full_ranks as target_ranks
from retrieval.full_ranking import ndcg_at_10

IGNORE_INDEX = -100
WEIGHTS_FILE = "sasrec.pt"
SHIPPED_FILE = "sasrec.json"  # beside a shipped model: what it was trained on, so an index takes it only then


class SASRecConfig(BaseModel):
    """The architecture and training settings. Windows (stride 25) and dropout .3 come from a scratch probe on ML-100k
    validation (random ties, seed 0): SASRec alone .108 NDCG@10 against .091 trained on each history's latest window;
    of max_len 50 / hidden 64, max_len 100 and hidden 128 (dropout .4), the first was best alone (.108, .103, .101)
    and in the fusion (.141, .140, .140)."""

    max_len: int = Field(default=50, ge=2)
    n_layer: int = Field(default=2, ge=1)
    n_head: int = Field(default=2, ge=1)
    hidden: int = Field(default=64, ge=8)
    dropout: float = Field(default=0.3, ge=0, lt=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=128, ge=1)
    stride: int = Field(default=25, ge=0, description="training windows cut every this many steps back from each "
                        "history's end (0: the latest window alone)")
    epochs: int = 60  # upper bound; early stopping on validation picks the count actually used
    patience: int = 6  # the content-initialised model's validation curve is noisy and still rising at epoch 30
    seed: int = 0
    max_minutes: float = 10.0  # cap on the early-stopped fit; the refit runs the epoch count it chose
    # Item embeddings start from the content encoder's item vectors (centred, projected on their top `hidden`
    # principal axes) scaled to this many times GPT-2's init std .02; 0, or no vectors given: GPT-2's random init.
    # Scratch probe on ML-100k validation (tuned encoder, early stopping, patience 3): SASRec alone / in the fusion,
    # random .107 / .143-.144, scale 1 .108 / .144, 5 .117 / .147, 10 .124 / .148, 20 .081 (stopped at epoch 3);
    # scale 10 with patience 6 (best epoch 33 of 39) .127 / .150.
    init_scale: float = Field(default=10.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _stored_before_init_scale(cls, data: Any) -> Any:
        """A config stored before ``init_scale`` existed (an index manifest names every other field) describes a
        model trained from GPT-2's random init, and says so when read back."""
        if isinstance(data, dict) and "init_scale" not in data and set(cls.model_fields) - {"init_scale"} <= set(data):
            return {**data, "init_scale": 0.0}
        return data


def item_init(vectors: np.ndarray, hidden: int, scale: float) -> np.ndarray:
    """Initial item embeddings from content vectors (items x d): centred, projected on their top ``hidden``
    principal axes (zero columns past d), scaled so their standard deviation is ``scale`` x .02."""
    as_float = vectors.astype(np.float64)
    centred = as_float - as_float.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    out = np.zeros((len(vectors), hidden))
    n = min(hidden, axes.shape[0])
    out[:, :n] = centred @ axes[:n].T
    std = float(out.std())
    return (out / std * 0.02 * scale if std > 0 else out).astype(np.float32)


def _build_model(n_items: int, config: SASRecConfig, item_vectors: np.ndarray | None = None) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt_config = GPT2Config(
        vocab_size=n_items + 1,  # the last id is padding
        n_positions=config.max_len,
        n_embd=config.hidden,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=n_items,
        eos_token_id=n_items,
        pad_token_id=n_items,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(gpt_config)
    if item_vectors is not None and config.init_scale > 0:
        if len(item_vectors) != n_items:
            raise ValueError(f"item vectors hold {len(item_vectors)} items, the model {n_items}")
        with torch.no_grad():
            model.transformer.wte.weight[:n_items] = torch.from_numpy(
                item_init(item_vectors, config.hidden, config.init_scale))
    return model


def windows(history: Sequence[int], max_len: int, stride: int) -> list[list[int]]:
    """Windows of at most ``max_len + 1`` items ending at the history's end and every ``stride`` steps before it
    (the latest alone with stride 0); a history of fewer than two items gives none."""
    h = list(history)
    ends = range(len(h), 1, -stride) if stride > 0 else ([len(h)] if len(h) >= 2 else [])
    return [h[max(0, end - max_len - 1):end] for end in ends]


def _training_rows(histories: Mapping[str, Sequence[int]], n_items: int, max_len: int, stride: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded inputs, attention masks and labels from each history's :func:`windows`."""
    rows = [w for h in histories.values() for w in windows(h, max_len, stride)]
    inputs = np.full((len(rows), max_len), n_items, dtype=np.int64)
    mask = np.zeros((len(rows), max_len), dtype=np.int64)
    labels = np.full((len(rows), max_len), IGNORE_INDEX, dtype=np.int64)
    for i, seq in enumerate(rows):
        if any(not 0 <= x < n_items for x in seq):
            raise ValueError(f"item positions must lie in [0, {n_items})")
        n = len(seq) - 1
        inputs[i, :n] = seq[:-1]
        mask[i, :n] = 1
        labels[i, :n] = seq[1:]
    return inputs, mask, labels


def sasrec_scores(model: Any, histories: Sequence[Sequence[int]], n_items: int, batch_size: int = 256
                  ) -> np.ndarray:
    """Users x items logits from the last position of each history (its last ``n_positions`` items).

    An empty history scores every item 0.
    """
    import torch

    max_len = int(model.config.n_positions)
    out = np.zeros((len(histories), n_items), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(histories), batch_size):
            chunk = [list(h)[-max_len:] for h in histories[start:start + batch_size]]
            keep = [i for i, h in enumerate(chunk) if h]
            if not keep:
                continue
            inputs = torch.full((len(keep), max_len), n_items, dtype=torch.long)
            mask = torch.zeros((len(keep), max_len), dtype=torch.long)
            for row, i in enumerate(keep):
                inputs[row, :len(chunk[i])] = torch.tensor(chunk[i], dtype=torch.long)
                mask[row, :len(chunk[i])] = 1
            logits = model(input_ids=inputs, attention_mask=mask).logits
            last = torch.tensor([len(chunk[i]) - 1 for i in keep])
            picked = logits[torch.arange(len(keep)), last, :n_items]
            out[[start + i for i in keep]] = picked.float().numpy()
    return out


def fit_sasrec(histories: Mapping[str, Sequence[int]], n_items: int, config: SASRecConfig | None = None,
               val: Sequence[tuple[Sequence[int], int]] | None = None, progress: bool = True,
               item_vectors: np.ndarray | None = None) -> tuple[Any, dict[str, Any]]:
    """Train next-item prediction; with ``val`` (history, target) pairs, early-stop on their NDCG@10.
    ``item_vectors``: the content encoder's item vectors (in position order), the item embeddings' start (see
    ``SASRecConfig.init_scale``).

    Returns the model (the best validation epoch's weights when ``val`` is given) and a log
    ``{epochs, best_epoch, val_ndcg, loss, seconds, parameters, stopped}``.
    """
    import torch
    from tqdm.auto import tqdm

    config = config or SASRecConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = _build_model(n_items, config, item_vectors)
    inputs_np, mask_np, labels_np = _training_rows(histories, n_items, config.max_len, config.stride)
    inputs, mask, labels = (torch.from_numpy(a) for a in (inputs_np, mask_np, labels_np))
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    parameters = int(sum(p.numel() for p in model.parameters()))

    started = time.monotonic()
    val_ndcg: list[float] = []
    losses: list[float] = []
    best_epoch, best_score, best_state, since_best = 0, -math.inf, None, 0
    stopped = "epochs"
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        total, count = 0.0, 0
        bar = tqdm(batches, desc=f"training SASRec, epoch {epoch} of {config.epochs}", disable=not progress,
                   leave=False)
        for idx in bar:
            logits = model(input_ids=inputs[idx], attention_mask=mask[idx]).logits[:, :, :n_items]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, n_items), labels[idx].reshape(-1), ignore_index=IGNORE_INDEX)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.item()) * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        losses.append(total / max(count, 1))
        if val is not None:
            hists = [list(h) for h, _ in val]
            ranks = target_ranks(sasrec_scores(model, hists, n_items), hists, [t for _, t in val])
            score = ndcg_at_10(ranks)
            val_ndcg.append(score)
            if progress:
                tqdm.write(f"sasrec epoch {epoch}: loss {losses[-1]:.4f}, val ndcg@10 {score:.4f}")
            if score > best_score:
                best_epoch, best_score, since_best = epoch, score, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
                if since_best >= config.patience:
                    stopped = "patience"
                    break
        else:
            best_epoch = epoch
        if time.monotonic() - started > config.max_minutes * 60:
            stopped = "max_minutes"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    log = {
        "epochs": epoch,
        "best_epoch": best_epoch,
        "val_ndcg": val_ndcg,
        "loss": losses,
        "seconds": round(time.monotonic() - started, 2),
        "parameters": parameters,
        "stopped": stopped,
    }
    return model, log


def save_sasrec(model: Any, folder: Path) -> None:
    import torch

    torch.save(model.state_dict(), folder / WEIGHTS_FILE)


def load_sasrec(folder: Path, n_items: int, config: SASRecConfig) -> Any | None:
    """The model saved in ``folder`` (None where there is none)."""
    import torch

    path = folder / WEIGHTS_FILE
    if not path.exists():
        return None
    model = _build_model(n_items, config)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return model


def histories_digest(histories: Mapping[str, Sequence[int]], n_items: int) -> str:
    """sha256 prefix of what training reads: the item count and every history's positions, in order."""
    import hashlib

    digest = hashlib.sha256(str(n_items).encode())
    for user, history in histories.items():
        digest.update(f"{user}:{','.join(map(str, history))};".encode())
    return digest.hexdigest()[:16]


class ShippedSasrec(BaseModel):
    """A trained model kept with the package (``retrieval/shipped/<catalog>/``): an index whose histories, architecture,
    epochs and encoder are the ones it was trained with loads it instead of training (training is deterministic on
    one host: the copy shipped for ML-100k equals, bit for bit, what a fresh index build trained there; another CPU's
    floating point gives slightly different weights, so the match is by what it was trained on, not by
    re-training)."""

    histories: str  # histories_digest of the training histories
    epochs: int
    config: SASRecConfig
    encoder: str = "none"  # the encoder (tuned: its checkpoint) whose item vectors started the item embeddings
    made_by: str


def ship_sasrec(model: Any, folder: Path, histories: str, epochs: int, config: SASRecConfig, made_by: str,
                encoder: str = "none") -> None:
    from retrieval.catalog import atomic_write_json

    save_sasrec(model, folder)
    meta = ShippedSasrec(histories=histories, epochs=epochs, config=config, encoder=encoder, made_by=made_by)
    atomic_write_json(folder / SHIPPED_FILE, meta.model_dump(mode="json"))


def shipped_sasrec(folder: Path, histories: str, epochs: int, config: SASRecConfig, n_items: int,
                   encoder: str = "none") -> Any | None:
    """The model shipped in ``folder`` where it was trained on these histories (their :func:`histories_digest`) with
    these epochs, architecture and initial item vectors (``encoder``), else None."""
    path = folder / SHIPPED_FILE
    if epochs < 1 or not path.exists():
        return None
    meta = ShippedSasrec.model_validate_json(path.read_text())
    if (meta.histories, meta.epochs, meta.config, meta.encoder) != (histories, epochs, config, encoder):
        return None
    return load_sasrec(folder, n_items, config)
