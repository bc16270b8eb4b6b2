"""A small behaviour-only sequential baseline in the SASRec style: a causal Transformer over item ids.

The model is ``transformers.GPT2LMHeadModel`` with a vocabulary of the catalogue's items plus one padding id
(input and output item embeddings tied). It is trained on next-item prediction with cross-entropy over all
items at every position of each user's most recent ``max_len + 1`` interactions, and scores a user by the
logits at the last position of their history.

Protocol of :func:`evaluate_sasrec` (no held-out label reaches training or any choice): fit on the validation
fit histories with early stopping on the validation cases, which picks the number of epochs E; then refit from
scratch (same seed) on the test fit histories for exactly E epochs, with no early stopping, and score the test
cases.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from retrieval.catalog import Catalog
from retrieval.full_ranking import full_ranks as target_ranks
from retrieval.full_ranking import ndcg_at_10
from retrieval.splits import Split

IGNORE_INDEX = -100


class SASRecConfig(BaseModel):
    max_len: int = 50
    n_layer: int = 2
    n_head: int = 2
    hidden: int = 64
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 30  # upper bound; early stopping on validation picks the count actually used
    patience: int = 3
    seed: int = 0
    max_minutes: float = 8.0  # cap on the early-stopped fit; the refit runs the epoch count it chose


def _build_model(n_items: int, config: SASRecConfig) -> Any:
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
    return GPT2LMHeadModel(gpt_config)


def _training_rows(histories: Mapping[str, Sequence[int]], n_items: int, max_len: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded inputs, attention masks and labels from each history's last ``max_len + 1`` items."""
    rows = [list(h)[-(max_len + 1):] for h in histories.values() if len(h) >= 2]
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
               val: Sequence[tuple[Sequence[int], int]] | None = None, progress: bool = True
               ) -> tuple[Any, dict[str, Any]]:
    """Train next-item prediction; with ``val`` (history, target) pairs, early-stop on their NDCG@10.

    Returns the model (the best validation epoch's weights when ``val`` is given) and a log
    ``{epochs, best_epoch, val_ndcg, loss, seconds, parameters, stopped}``.
    """
    import torch
    from tqdm.auto import tqdm

    config = config or SASRecConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = _build_model(n_items, config)
    inputs_np, mask_np, labels_np = _training_rows(histories, n_items, config.max_len)
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
        bar = tqdm(batches, desc=f"sasrec epoch {epoch}", disable=not progress, leave=False)
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


def evaluate_sasrec(catalog: Catalog, split: Split, config: SASRecConfig | None = None, progress: bool = True
                    ) -> dict[str, Any]:
    """Validation ranks from the early-stopped fit, test ranks from a refit for exactly the best epoch count."""
    config = config or SASRecConfig()
    index = catalog.item_index
    n_items = catalog.n_items

    def positions(histories: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
        return {u: [index[i] for i in h] for u, h in histories.items()}

    val_cases = [([index[i] for i in c.history], index[c.target]) for c in split.validation]
    model, val_log = fit_sasrec(positions(split.fit_histories("validation")), n_items, config,
                                val=val_cases, progress=progress)
    val_hists = [h for h, _ in val_cases]
    val_ranks = target_ranks(sasrec_scores(model, val_hists, n_items), val_hists, [t for _, t in val_cases])
    best_epochs = max(int(val_log["best_epoch"]), 1)

    # Refit from scratch for exactly E epochs: no validation, no early stopping, no time cap.
    refit_config = config.model_copy(update={"epochs": best_epochs, "max_minutes": math.inf})
    model, test_log = fit_sasrec(positions(split.fit_histories("test")), n_items, refit_config, progress=progress)
    test_cases = [([index[i] for i in c.history], index[c.target]) for c in split.test]
    test_hists = [h for h, _ in test_cases]
    test_ranks = target_ranks(sasrec_scores(model, test_hists, n_items), test_hists, [t for _, t in test_cases])
    return {
        "validation": [int(r) for r in val_ranks],
        "test": [int(r) for r in test_ranks],
        "log": {"validation_fit": val_log, "test_fit": test_log, "config": config.model_dump()},
        "best_epochs": best_epochs,
    }
