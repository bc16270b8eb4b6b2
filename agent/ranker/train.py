"""`recagent train ranker`: LoRA fine-tuning of the in-process model to rank the retriever's candidates.

Each example is rendered with the serving prompt (``Reranker.marker_request``: by default ``rerank_trained.v2``,
the candidates in retrieval order, each line closed by a marker token; ``v1`` shuffles them and names each one's
retrieval rank). The score of a candidate is the log-odds of the marker after its line, read from one forward
pass, as ``Reranker.marker_scores`` computes it from ``score_markers`` when serving.

Objectives (``--objective``):
* ``residual`` (default): the cross-entropy of the next item over ``beta * minmax(retrieval score) + scale *
  ranker score``, beta and scale learned with the adapter. The retrieval order is given, so the ranker learns
  only corrections to it, which is what the served blend ``alpha * llm + (1 - alpha) * retrieval`` uses; the loss
  of the retrieval term alone (beta fitted on the examples) is logged as the line the ranker has to get under.
* ``listwise``: the cross-entropy over the ranker's scores alone (the first recipe: it stayed at chance).

Validation NDCG@10 on a fixed sample of validation users is measured every ``eval_every`` steps and the best
adapter is kept; at the end alpha and the rerank window are chosen on those validation users. Checkpoints
(adapter, optimiser, position) allow ``--resume``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator
from scipy.special import logsumexp
from tqdm import tqdm

from agent.llm.transformers_backend import TransformersBackend
from agent.ranker.artifact import PROVENANCE, RankerChoices, RankerProvenance, rankers_dir
from agent.ranker.examples import Example, evaluation_examples, training_examples
from agent.rerank import RerankConfig, Reranker, TrainedOrder, fuse, log_odds, minmax
from agent.service import RecommenderService
from retrieval.catalog import atomic_write_json, swap_in
from retrieval.index import Index
from retrieval.provenance import command_line, git_commit, utc_now
from retrieval.splits import SplitSpec, split_catalog

logger = logging.getLogger(__name__)
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class TrainConfig(BaseModel):
    window: int = Field(default=20, ge=2, le=100, description="candidates per training example")
    windows: list[int] = Field(default_factory=lambda: [20, 30, 50], description="serving windows compared on "
                               "validation at the end")
    per_user: int = Field(default=16, ge=1, description="next-item steps per user (the latest of the train part)")
    min_history: int = Field(default=3, ge=1, description="history items an example's query holds at least")
    folds: int = Field(default=4, ge=2, description="user folds: each fold's candidates come from CF fitted on "
                       "the other folds")
    insert_missing: bool = Field(default=False, description="put the next item in when it was not retrieved "
                                 "(otherwise such steps are dropped)")
    prompt: str = Field(default="v2", description="version of prompts/rerank_trained.*.jinja")
    order: TrainedOrder = Field(default="retrieval", description="candidate presentation order in training and "
                                "serving")
    objective: Literal["residual", "listwise"] = "residual"
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    top_layers: int = Field(default=10, ge=1, description="adapt only the top layers (a shorter backward pass)")
    lr: float = Field(default=3e-4, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    batch_size: int = Field(default=8, ge=1)
    max_minutes: float = Field(default=45.0, gt=0, description="training stops after this (then the final choices)")
    max_steps: int | None = Field(default=None, ge=1)
    eval_every: int = Field(default=60, ge=1, description="steps between validation measurements")
    val_users: int = Field(default=150, ge=1)
    seed: int = 0

    @field_validator("prompt")
    @classmethod
    def _prompt_exists(cls, version: str) -> str:
        import prompts

        prompts.load("rerank_trained", version)  # an unknown version: ValueError listing the prompts there are
        return version


@dataclass
class Encoded:
    ids: list[int]
    reads: list[int]  # positions whose hidden state predicts each marker, in presentation order
    target: int | None  # presentation slot of the next item
    order: list[int]  # candidate (retrieval-order) index at each presentation slot


class RankerTrainer:
    def __init__(self, index: Index, backend: TransformersBackend, config: TrainConfig, spec: SplitSpec,
                 out: Path | None = None, progress: bool = True) -> None:
        import torch

        self.torch = torch
        self.index = index
        self.backend = backend
        self.config = config
        self.spec = spec
        self.progress = progress
        self.out = out or rankers_dir(index.catalog.name)
        rerank = RerankConfig()
        rerank.use_trained(None, "training", f"rerank_trained.{config.prompt}", rerank.marker, 1.0, config.window,
                           config.order)
        self.service = RecommenderService(index, backend=backend, config=rerank)
        self.reranker: Reranker = self.service.reranker  # type: ignore[assignment]
        self.marker_id = backend.label_id(rerank.marker)
        self.split = split_catalog(index.catalog, spec)

    # --- encoding ------------------------------------------------------------------------------------------
    def encode(self, example: Example, order: Sequence[int] | None = None) -> Encoded:
        """The example as the ranker's prompt, its candidates presented in ``order`` (default: the order the
        reranker uses when serving, one seeded shuffle)."""
        cands = self.service.history_inputs(example.candidates)
        history = self.reranker.trim_history(self.service.history_inputs(example.history))
        order = list(order) if order is not None else self.reranker.marker_orders(history, cands, 1)[0]
        request = self.reranker.marker_request(history, cands, order)
        ids = self.backend.render(request.messages)
        reads = [p - 1 for p in self.backend.marker_positions(ids, request)]
        target = None if example.target is None else order.index(example.target)
        return Encoded(ids, reads, target, order)

    def marker_scores(self, model: Any, batch: Sequence[Encoded]) -> list[Any]:
        """Scores per example (presentation order): the marker's log-odds after each candidate line, from one
        right-padded forward pass (``Reranker.marker_scores`` applies ``log_odds`` to the backend's log-probs)."""
        torch = self.torch
        width = max(len(e.ids) for e in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            mask[row, : len(e.ids)] = 1
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = torch.tensor([row for row, e in enumerate(batch) for _ in e.reads])
        cols = torch.tensor([r for e in batch for r in e.reads])
        logits = model.lm_head(hidden[rows, cols]).float()
        scores = log_odds(torch.log_softmax(logits, dim=-1)[:, self.marker_id])
        return list(torch.split(scores, [len(e.reads) for e in batch]))

    # --- validation ----------------------------------------------------------------------------------------
    def validation_examples(self, window: int) -> list[Example]:
        cases = sorted(self.split.validation, key=lambda c: c.user_id)
        rng = random.Random(self.config.seed)
        sample = sorted(rng.sample(cases, min(self.config.val_users, len(cases))), key=lambda c: c.user_id)
        return evaluation_examples(self.index, sample, self.split.fit_histories("validation"), window)

    def score_examples(self, model: Any, examples: Sequence[Example], batch_size: int = 8) -> list[np.ndarray]:
        """Ranker scores per candidate (retrieval order), each example presented in its serving order."""
        torch = self.torch
        encoded = [self.encode(e) for e in examples]
        out = []
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start: start + batch_size]
                for enc, scores_in_order in zip(chunk, self.marker_scores(model, chunk), strict=True):
                    scores = np.zeros(len(enc.order))
                    scores[enc.order] = scores_in_order.numpy()
                    out.append(scores)
        return out

    # --- training ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RankerProvenance:
        torch = self.torch
        from peft import LoraConfig, PeftModel, get_peft_model

        cfg = self.config
        torch.manual_seed(cfg.seed)
        ckpt = self.out.with_name(f".{self.out.name}-checkpoint")
        examples, stats = training_examples(
            self.index, self.split.train, cfg.window, cfg.per_user, min_history=cfg.min_history, folds=cfg.folds,
            seed=cfg.seed, insert_missing=cfg.insert_missing, progress=self.progress)
        if not examples:
            raise ValueError(f"catalogue '{self.index.catalog.name}' gives no training examples: no training "
                             f"history holds more than {cfg.min_history} items (--min-history)")
        val = self.validation_examples(max(cfg.windows))
        val_window = [cut(e, cfg.window) for e in val]
        n_layers = int(self.backend.model.config.num_hidden_layers)
        from transformers import AutoModelForCausalLM

        # a copy of the weights: the backend's own model stays untouched for scoring and generation
        base = AutoModelForCausalLM.from_pretrained(self.backend.model_dir, dtype=self.backend.dtype)
        if resume and (ckpt / "state.pt").exists():
            model = PeftModel.from_pretrained(base, str(ckpt / "adapter"), is_trainable=True)
            state = torch.load(ckpt / "state.pt", weights_only=False)
        else:
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.target_modules,
                              layers_to_transform=list(range(max(0, n_layers - cfg.top_layers), n_layers)))
            model = get_peft_model(base, lora)
            state = None
        causal = model.base_model.model
        model.eval()
        baseline_scores = self.score_examples(causal, val_window)
        baseline = ndcg_table(val_window, baseline_scores)
        logger.info("validation before training %s", baseline)
        # a learned temperature on the scores, started at 1 / their spread: the untrained scores are confidently
        # spread, and without it the first steps shrink them by wrecking what ranks them (ranking and the min-max
        # fusion do not depend on it, so serving ignores it)
        spread = float(np.mean([np.std(x) for x in baseline_scores if x.size > 1]) or 1.0)
        # (the residual objective starts the ranker's term small, at the retrieval term's loss, and lets it grow)
        start = 0.3 if cfg.objective == "residual" else 1.0
        log_scale = torch.nn.Parameter(torch.tensor(math.log(start / max(spread, 1e-3))))
        beta0, retrieval_loss = fit_retrieval_beta(examples)
        if cfg.objective == "residual" and self.progress:
            tqdm.write(f"{len(examples)} training examples; the retrieval term alone: beta {beta0:.2f}, loss "
                       f"{retrieval_loss:.4f} (the line the ranker has to get under)")
        beta = torch.nn.Parameter(torch.tensor(beta0 if cfg.objective == "residual" else 0.0))
        params = [p for p in model.parameters() if p.requires_grad]
        extra = [log_scale, beta] if cfg.objective == "residual" else [log_scale]
        optim = torch.optim.AdamW([{"params": params, "lr": cfg.lr}, {"params": extra, "lr": 1e-2}],
                                  weight_decay=0.0)
        step, seen, best, history_log, elapsed0 = 0, 0, -1.0, [], 0.0
        if state is not None:
            optim.load_state_dict(state["optim"])
            with torch.no_grad():
                log_scale.copy_(state["log_scale"])
                beta.copy_(state.get("beta", beta.detach()))
            step, seen, best, history_log, elapsed0 = (state["step"], state["seen"], state["best"],
                                                       state["log"], state["elapsed"])
        else:  # the untrained scorer is the first candidate: a step must beat it to be kept
            best = baseline["best_fused"]
            model.save_pretrained(str(ckpt / "best"))
            history_log.append({"step": 0, "examples": 0, "loss": None, "minutes": 0.0, **baseline})
        rng = random.Random(f"{cfg.seed}:{step}")
        t0 = time.perf_counter() - elapsed0
        budget = cfg.max_minutes * 60
        bar = tqdm(desc="training ranker", unit="ex", disable=not self.progress, initial=seen,
                   total=len(examples))
        losses: list[float] = []
        model.train()
        while time.perf_counter() - t0 < budget and (cfg.max_steps is None or step < cfg.max_steps):
            start = seen % len(examples)
            chunk = examples[start: start + cfg.batch_size]
            batch = []
            for e in chunk:
                order = list(range(len(e.candidates)))
                if cfg.order == "shuffled":
                    rng.shuffle(order)
                batch.append(self.encode(e, order))
            optim.param_groups[0]["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            scores = self.marker_scores(causal, batch)
            terms = []
            for sc, e, enc in zip(scores, chunk, batch, strict=True):
                assert enc.target is not None, "every training example holds its next item"
                logits = sc * log_scale.exp()
                if cfg.objective == "residual":
                    logits = logits + beta * torch.tensor(minmax(e.scores)[enc.order], dtype=logits.dtype)
                terms.append(-torch.log_softmax(logits, dim=-1)[enc.target])
            loss = torch.stack(terms).mean()
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            step += 1
            seen += len(chunk)
            losses.append(float(loss.detach()))
            rate = (seen - (state["seen"] if state else 0)) / max(1e-9, time.perf_counter() - t0 - elapsed0)
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", ex_s=f"{rate:.2f}", step=step,
                            scale=f"{float(log_scale.exp()):.3f}", beta=f"{float(beta):.2f}")
            if step % cfg.eval_every == 0:
                model.eval()
                table = ndcg_table(val_window, self.score_examples(causal, val_window))
                model.train()
                history_log.append({"step": step, "examples": seen, "loss": float(np.mean(losses[-cfg.eval_every:])),
                                    "minutes": round((time.perf_counter() - t0) / 60, 2), **table})
                bar.write(f"step {step}: loss {history_log[-1]['loss']:.3f} validation {table}")
                if table["best_fused"] > best:
                    best = table["best_fused"]
                    model.save_pretrained(str(ckpt / "best"))
                model.save_pretrained(str(ckpt / "adapter"))
                torch.save({"optim": optim.state_dict(), "log_scale": log_scale.detach(), "beta": beta.detach(),
                            "step": step, "seen": seen,
                            "best": best,
                            "log": history_log, "elapsed": time.perf_counter() - t0}, ckpt / "state.pt")
        bar.close()
        train_s = time.perf_counter() - t0
        model.eval()
        final = ndcg_table(val_window, self.score_examples(causal, val_window))
        history_log.append({"step": step, "examples": seen, "loss": float(np.mean(losses[-cfg.eval_every:]))
                            if losses else float("nan"), "minutes": round(train_s / 60, 2), **final})
        if final["best_fused"] >= best or not (ckpt / "best").exists():
            model.save_pretrained(str(ckpt / "best"))
            best = final["best_fused"]
        # the best adapter, back on a clean base model, chooses alpha and the window on validation
        clean: Any = model.unload()
        chosen = PeftModel.from_pretrained(clean, str(ckpt / "best"))
        chosen.eval()
        causal = chosen.base_model.model
        per_window = {}
        for w in cfg.windows:
            subset = [cut(e, w) for e in val]
            t = time.perf_counter()
            scores = self.score_examples(causal, subset)
            per_window[w] = {**ndcg_table(subset, scores),
                             "seconds_per_user": round((time.perf_counter() - t) / max(1, len(subset)), 4)}
        window = max(per_window, key=lambda w: (round(per_window[w]["best_fused"], 4), -w))
        choices = RankerChoices(alpha=per_window[window]["best_alpha"], window=window)
        return self.save(chosen, ckpt, choices, {
            "recipe": cfg.model_dump(), "examples_built": stats.examples, "examples_used": len(examples),
            "target_retrieved_rate":
            round(stats.hit_rate, 4), "inserted": stats.inserted, "examples_seen": seen, "steps": step,
            "seconds": round(train_s, 1), "examples_per_second": round(seen / max(train_s, 1e-9), 3),
            "kept_step": max(history_log, key=lambda r: (r["best_fused"], -r["step"]))["step"],
            "score_scale": round(float(log_scale.exp()), 4), "beta": round(float(beta), 4),
            "retrieval_only_loss": round(retrieval_loss, 4), "retrieval_only_beta": round(beta0, 4),
            "log": history_log}, {"users": len(val), "before_training": baseline, "windows": per_window,
                                  "chosen": choices.model_dump()})

    def save(self, model: Any, ckpt: Path, choices: RankerChoices, train: dict[str, Any],
             validation: dict[str, Any]) -> RankerProvenance:
        staging = self.out.with_name(f".{self.out.name}-staging")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging))
        for extra in ("README.md",):
            (staging / extra).unlink(missing_ok=True)
        provenance = RankerProvenance(
            catalog=self.index.catalog.name, content_hash=self.index.manifest.content_hash,
            prompt=f"rerank_trained.{self.reranker.config.trained_prompt}", order=self.reranker.config.trained_order,
            marker=self.reranker.config.marker,
            base_model=self.backend.model_name, command=command_line(), commit=git_commit(),
            seed=self.config.seed, split=self.spec.provenance(), train=train, validation=validation,
            choices=choices, created=utc_now())
        atomic_write_json(staging / PROVENANCE, json.loads(provenance.model_dump_json()))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        swap_in(staging, self.out)
        shutil.rmtree(ckpt, ignore_errors=True)
        return provenance


def fit_retrieval_beta(examples: Sequence[Example]) -> tuple[float, float]:
    """(beta, loss): the cross-entropy of the next item over ``beta * minmax(retrieval score)`` alone, beta
    fitted on a grid over the examples: the loss a ranker that adds nothing to the retrieval order gets."""
    rows = [(minmax(e.scores), e.target) for e in examples if e.target is not None and len(e.scores) > 1]
    if not rows:
        return 0.0, float("nan")

    def loss(b: float) -> float:
        return float(np.mean([logsumexp(b * ret) - b * ret[target] for ret, target in rows]))

    grid = [0.25 * i for i in range(0, 41)]
    losses = [loss(b) for b in grid]
    best = int(np.argmin(losses))
    return grid[best], losses[best]


def cut(example: Example, window: int) -> Example:
    """The example with only the first ``window`` candidates (the target's index kept when inside)."""
    target = example.target if example.target is not None and example.target < window else None
    return Example(example.user_id, example.history, example.candidates[:window], target,
                   scores=example.scores[:window])


def ndcg_at_10(order: Sequence[int], target: int | None) -> float:
    if target is None:
        return 0.0
    for rank, i in enumerate(order[:10], start=1):
        if i == target:
            return 1.0 / math.log2(rank + 1)
    return 0.0


def ndcg_table(examples: Sequence[Example], scores: Sequence[np.ndarray]) -> dict[str, float]:
    """NDCG@10 of the retrieval order, the ranker alone and the best alpha blend (with that alpha)."""
    def mean(alpha: float) -> float:
        return float(np.mean([ndcg_at_10([int(i) for i in fuse(list(e.scores), s.tolist(), alpha)[1]], e.target)
                              for e, s in zip(examples, scores, strict=True)]))

    out = {"retrieval": mean(0.0), "ranker": mean(1.0)}
    fused = {a: mean(a) for a in ALPHAS}
    best_alpha = max(ALPHAS, key=lambda a: (round(fused[a], 6), -a))
    out.update(best_fused=fused[best_alpha], best_alpha=best_alpha)
    return {k: round(v, 5) for k, v in out.items()}
