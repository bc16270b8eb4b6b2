"""``recagent train embedder``: fine-tune the sentence encoder on behaviour data (sentence-transformers' trainer).

Training pairs come from the training part of each history only (never a validation or test item): the anchor
is the text of the user's history up to a step (:class:`~retrieval.encoder.HistoryText`, most recent last), the
positive is the text of the item that came next. MultipleNegativesRankingLoss scores every anchor against all
positives of its batch (in-batch negatives); the no-duplicates batch sampler keeps one item from being its own
negative. Every ``eval_every`` steps the vector retriever is measured on a fixed sample of validation users
(NDCG@10, full ranking, history items excluded, as the served content source ranks) and the best checkpoint is
kept; a time budget ends training early.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from retrieval.catalog import Catalog, atomic_write_json, swap_in
from retrieval.embeddings import MINILM_NAME, ensure_embedding_model
from retrieval.encoder import PROVENANCE, EncoderProvenance, HistoryText, encoders_dir, save_trained_layers
from retrieval.full_ranking import full_ranks, ndcg_at_10
from retrieval.index import item_texts
from retrieval.provenance import command_line, git_commit, utc_now
from retrieval.sources import popularity_prior
from retrieval.splits import Case, SplitSpec, split_catalog

logger = logging.getLogger(__name__)
_LAYER = re.compile(r"\.layer\.(\d+)\.")
# weights of the popularity prior added to the cosine (beta * log(1 + interactions), never-seen items guessed from
# their nearest seen items: retrieval.sources.popularity_prior, as served): in-batch negatives are drawn in
# proportion to popularity, so the trained cosine leaves popularity out (the logQ correction puts it back)
PRIOR_WEIGHTS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1)


class EncoderTrainConfig(BaseModel):
    batch_size: int = Field(default=64, ge=2, description="pairs per batch (each one's negatives are the others)")
    lr: float = Field(default=2e-4, gt=0)
    train_layers: int = Field(default=2, ge=1, description="top transformer layers trained (the rest stay frozen: "
                              "the backward pass stops there, about twice the pairs per second of a full fine-tune)")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    per_user: int = Field(default=50, ge=1, description="latest training steps per user turned into pairs")
    min_history: int = Field(default=1, ge=1, description="history items an anchor needs at least")
    history_items: int = Field(default=20, ge=1, description="most recent items in a history text")
    max_tokens: int = Field(default=64, ge=16, le=512, description="token budget of a history text")
    epochs: float = Field(default=1.0, gt=0)
    max_minutes: float = Field(default=28.0, gt=0, description="training time budget (the best checkpoint is kept)")
    max_steps: int | None = Field(default=None, ge=1)
    eval_every: int = Field(default=200, ge=1, description="optimiser steps between validation passes")
    val_users: int = Field(default=1000, ge=1, description="fixed sample of validation users measured (all of "
                           "them when there are fewer)")
    seed: int = 0


def target_ranks(users: np.ndarray, items: np.ndarray, histories: Sequence[Sequence[int]],
                 targets: Sequence[int], prior: np.ndarray | None = None) -> list[int]:
    """Full-ranking rank of each target by dot product (unit vectors: cosine) plus ``prior`` per item."""
    scores = users @ items.T
    return full_ranks(scores if prior is None else scores + prior[None, :], histories, targets)


def freeze_below(model: Any, train_layers: int) -> tuple[int, int]:
    """Train only the top ``train_layers`` transformer layers; returns (trainable, total) parameter counts."""
    layer_of = {name: int(m.group(1)) for name, _ in model.named_parameters()
                if (m := _LAYER.search(name)) is not None}
    if not layer_of:
        raise ValueError("the encoder has no numbered transformer layers to train")
    first = max(layer_of.values()) + 1 - train_layers
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad = layer_of.get(name, -1) >= first
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def training_pairs(histories: Mapping[str, Sequence[int]], texts: HistoryText, item_texts_: Sequence[str],
                   config: EncoderTrainConfig) -> tuple[list[str], list[str], list[int]]:
    """(anchor texts, positive texts, positive positions), shuffled with the config's seed."""
    rows: list[tuple[str, str, int]] = []
    for history in histories.values():
        first = max(config.min_history, len(history) - config.per_user)
        for t in range(first, len(history)):
            rows.append((texts(history[:t]), item_texts_[history[t]], history[t]))
    random.Random(config.seed).shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


class EncoderTrainer:
    """Fine-tunes the frozen encoder for one catalogue and writes ``trained_layers.safetensors`` (what ships),
    ``model/`` (the full model, for local use) and ``provenance.json``."""

    def __init__(self, catalog: Catalog, config: EncoderTrainConfig, spec: SplitSpec, out: Path | None = None,
                 base_model: Path | None = None, exclude: set[str] | None = None) -> None:
        self.catalog = catalog
        self.config = config
        self.spec = spec
        self.out = out or encoders_dir(catalog.name)
        self.base_model = base_model or ensure_embedding_model()
        self.exclude = exclude or set()  # item ids removed from every history (the cold-start evaluation)
        self.item_texts = item_texts(catalog)

    def histories(self) -> tuple[dict[str, list[int]], list[Case]]:
        """Training-part histories as positions (excluded items removed) and the validation cases."""
        split = split_catalog(self.catalog, self.spec)
        idx = self.catalog.item_index
        train = {u: [idx[i] for i in h if i not in self.exclude] for u, h in split.train.items()}
        val = [c for c in split.validation if c.target not in self.exclude]
        return train, val

    def run(self) -> EncoderProvenance:
        from datasets import Dataset
        from sentence_transformers import (
            SentenceTransformer,
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )
        from sentence_transformers.base.evaluation.evaluator import BaseEvaluator
        from sentence_transformers.base.sampler import BatchSamplers
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from transformers import TrainerCallback, set_seed

        cfg = self.config
        set_seed(cfg.seed)
        model = SentenceTransformer(str(self.base_model), device="cpu", local_files_only=True)
        model.max_seq_length = cfg.max_tokens
        trainable, total = freeze_below(model, cfg.train_layers)
        logger.info("training %d of %d encoder parameters (top %d layers)", trainable, total, cfg.train_layers)
        texts = HistoryText(self.item_texts, model.tokenizer, cfg.history_items, cfg.max_tokens)
        train, val_cases = self.histories()
        anchors, positives, _ = training_pairs(train, texts, self.item_texts, cfg)
        if len(anchors) < cfg.batch_size:
            raise ValueError(f"catalogue '{self.catalog.name}' gives {len(anchors)} training pairs, fewer than one "
                             f"batch of {cfg.batch_size}; lower --batch-size")
        rng = random.Random(cfg.seed)
        sample = sorted(rng.sample(range(len(val_cases)), min(cfg.val_users, len(val_cases))))
        idx = self.catalog.item_index
        val_hist = [[idx[i] for i in val_cases[s].history if i not in self.exclude] for s in sample]
        val_targets = [idx[val_cases[s].target] for s in sample]
        val_texts = [texts(h) for h in val_hist]
        item_texts_ = self.item_texts
        counts = np.zeros(self.catalog.n_items)
        for history in train.values():  # what the served prior counts, from the training part only
            np.add.at(counts, history, 1)
        log: list[dict[str, Any]] = []
        started = time.perf_counter()

        class VectorRetrieverNDCG(BaseEvaluator):
            """Validation NDCG@10 of the vector retriever (the encoder's user vector against every item)."""

            def __init__(self) -> None:
                super().__init__()
                self.primary_metric = "ndcg@10"

            def __call__(self, model: Any, output_path: str | None = None, epoch: float = -1,
                         steps: int = -1) -> dict[str, float]:
                t0 = time.perf_counter()
                items = model.encode(item_texts_, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
                users = model.encode(val_texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
                log_popularity = popularity_prior(counts, 1.0, items)  # as served, by this checkpoint's item vectors
                by_weight = {}
                for weight in PRIOR_WEIGHTS:  # the popularity prior's weight, chosen here on validation
                    ranks = target_ranks(users, items, val_hist, val_targets, weight * log_popularity)
                    by_weight[weight] = (ndcg_at_10(ranks), float(np.mean([r <= 50 for r in ranks])))
                weight = max(PRIOR_WEIGHTS, key=lambda w: (by_weight[w][0], -w))
                score, recall50 = by_weight[weight]
                log.append({"step": max(steps, 0), "ndcg@10": round(score, 5), "recall@50": round(recall50, 5),
                            "prior_weight": weight, "ndcg@10_no_prior": round(by_weight[0.0][0], 5),
                            "minutes": round((time.perf_counter() - started) / 60, 2),
                            "eval_seconds": round(time.perf_counter() - t0, 1)})
                logger.info("validation step=%s ndcg@10=%.4f recall@50=%.4f prior=%s", steps, score, recall50,
                            weight)
                return self.prefix_name_to_metrics({"ndcg@10": score, "recall@50": recall50}, "val")

        class TimeBudget(TrainerCallback):  # type: ignore[misc]
            """Stop after the time budget, evaluating and saving the last step so that it can be chosen."""

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if time.perf_counter() - started > cfg.max_minutes * 60:
                    control.should_training_stop = True
                    control.should_evaluate = True
                    control.should_save = True
                return control

        evaluator = VectorRetrieverNDCG()
        before = evaluator(model, steps=0)["val_ndcg@10"]
        dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
        checkpoints = self.out.parent / f".{self.out.name}-checkpoints"
        shutil.rmtree(checkpoints, ignore_errors=True)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(checkpoints), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
            per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio,
            batch_sampler=BatchSamplers.NO_DUPLICATES, eval_strategy="steps", eval_steps=cfg.eval_every,
            save_strategy="steps", save_steps=cfg.eval_every, save_total_limit=2, load_best_model_at_end=True,
            metric_for_best_model="eval_val_ndcg@10", greater_is_better=True, logging_steps=25, seed=cfg.seed,
            data_seed=cfg.seed, report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=False,
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                             loss=MultipleNegativesRankingLoss(model), evaluator=evaluator,
                                             callbacks=[TimeBudget()])
        result = trainer.train()
        train_seconds = time.perf_counter() - started
        best = max(log, key=lambda r: (r["ndcg@10"], -r["step"]))
        keep_base = best["ndcg@10"] <= before  # training never beat the frozen encoder: keep it
        staging = self.out.parent / f".{self.out.name}-staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if keep_base:
            model = SentenceTransformer(str(self.base_model), device="cpu", local_files_only=True)
            model.max_seq_length = cfg.max_tokens
            freeze_below(model, cfg.train_layers)
        checkpoint = save_trained_layers(model, staging)  # what ships: only the trained layers
        model.save(str(staging / "model"))  # the full model, materialised here for local use
        (staging / "model" / "CHECKPOINT").write_text(checkpoint)
        steps = int(result.global_step)
        provenance = EncoderProvenance(
            catalog=self.catalog.name, content_hash=self.catalog.content_hash(), base_model=MINILM_NAME,
            checkpoint=checkpoint, command=command_line(), commit=git_commit(),
            seed=cfg.seed, split=self.spec.provenance(),
            config={**cfg.model_dump(), "loss": "MultipleNegativesRankingLoss (in-batch negatives)",
                    "batch_sampler": "no duplicates", "excluded_items": len(self.exclude)},
            train={"pairs": len(anchors), "trainable_parameters": trainable, "parameters": total,
                   "steps": steps, "pairs_seen": steps * cfg.batch_size,
                   "seconds": round(train_seconds, 1), "pairs_per_s": round(steps * cfg.batch_size / train_seconds, 2),
                   "final_loss": round(float(result.training_loss), 4), "log": log},
            validation={"users": len(sample), "ndcg@10_frozen": round(before, 5), "best": best,
                        "kept": "frozen (training never beat it)" if keep_base else f"step {best['step']}"},
            created=utc_now(),
        )
        atomic_write_json(staging / PROVENANCE, json.loads(provenance.model_dump_json()))
        swap_in(staging, self.out)
        shutil.rmtree(checkpoints, ignore_errors=True)
        return provenance
