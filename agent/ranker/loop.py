"""The trained ranker's optimisation over encoded examples: the objective, validation NDCG@10 and the loop.

It needs torch, numpy, tqdm and peft and nothing else of the project's stack, so the same loop runs in
``recagent train ranker`` on this machine and in ``python -m agent.ranker.accelerated`` on an accelerator machine
that has torch but none of the serving packages (the examples are encoded here, see ``--export``).

An example's score for a candidate is the log-odds of the marker token read after its line (one forward pass
scores the whole window), as :meth:`agent.rerank.Reranker.marker_scores` computes it when serving. Objectives:
* ``residual``: the cross-entropy of the next item over ``beta * minmax(retrieval score) + scale * ranker score``,
  beta and scale learned with the adapter, so the ranker learns corrections to the retrieval order;
* ``listwise``: the cross-entropy over ``scale * ranker score`` alone.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from scipy.special import logsumexp
from tqdm import tqdm

from agent.scoring import fuse, log_odds, minmax

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Labelled(Protocol):
    """Retrieval scores in retrieval order, and the next item's index among them (None: not retrieved)."""

    @property
    def scores(self) -> Sequence[float]: ...

    @property
    def target(self) -> int | None: ...


@dataclass
class Encoded:
    """One example as the ranker's prompt: token ids, the positions whose hidden state predicts each marker (in
    presentation order), the candidate (retrieval-order index) shown at each presentation slot, and the labels."""

    ids: list[int]
    reads: list[int]
    order: list[int]
    slot: int | None  # presentation slot of the next item
    scores: tuple[float, ...] = ()  # retrieval scores, retrieval order
    target: int | None = None  # retrieval-order index of the next item


@dataclass
class LoopConfig:
    lr: float = 3e-4
    warmup_steps: int = 20
    batch_size: int = 8
    max_minutes: float = 45.0
    max_steps: int | None = None
    eval_every: int = 60
    objective: Literal["residual", "listwise"] = "residual"
    seed: int = 0


@dataclass
class LoopResult:
    steps: int
    seen: int
    seconds: float
    log: list[dict[str, Any]]
    baseline: dict[str, float]
    score_scale: float | None  # None: not recorded (a run rebuilt from its log)
    beta: float | None
    retrieval_only_loss: float
    retrieval_only_beta: float
    best: float = -1.0
    seen_before: int = 0  # examples seen before a resume (the speed counts this run's only)

    @property
    def kept_step(self) -> int:
        return int(max(self.log, key=lambda r: (r["best_fused"], -r["step"]))["step"])


def marker_scores(model: Any, batch: Sequence[Encoded], marker_id: int, device: Any = None) -> list[Any]:
    """Scores per example (presentation order): the marker's log-odds after each candidate line, from one
    right-padded forward pass of the causal LM ``model`` (its ``model`` trunk and ``lm_head``)."""
    import torch

    width = max(len(e.ids) for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
    hidden = model.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    rows = torch.tensor([row for row, e in enumerate(batch) for _ in e.reads], device=hidden.device)
    cols = torch.tensor([r for e in batch for r in e.reads], device=hidden.device)
    logits = model.lm_head(hidden[rows, cols]).float()
    scores = log_odds(torch.log_softmax(logits, dim=-1)[:, marker_id])
    return list(torch.split(scores, [len(e.reads) for e in batch]))


def score_encoded(model: Any, encoded: Sequence[Encoded], marker_id: int, device: Any = None,
                  batch_size: int = 8) -> list[np.ndarray]:
    """Ranker scores per candidate in retrieval order."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start: start + batch_size]
            for enc, in_order in zip(chunk, marker_scores(model, chunk, marker_id, device), strict=True):
                scores = np.zeros(len(enc.order))
                scores[enc.order] = in_order.float().cpu().numpy()
                out.append(scores)
    return out


def fit_retrieval_beta(examples: Sequence[Labelled]) -> tuple[float, float]:
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


def ndcg_at_10(order: Sequence[int], target: int | None) -> float:
    if target is None:
        return 0.0
    for rank, i in enumerate(order[:10], start=1):
        if i == target:
            return 1.0 / math.log2(rank + 1)
    return 0.0


def ndcg_table(examples: Sequence[Labelled], scores: Sequence[np.ndarray]) -> dict[str, float]:
    """NDCG@10 of the retrieval order, the ranker alone and the best alpha blend (with that alpha)."""
    def mean(alpha: float) -> float:
        return float(np.mean([ndcg_at_10([int(i) for i in fuse(list(e.scores), s.tolist(), alpha)[1]], e.target)
                              for e, s in zip(examples, scores, strict=True)]))

    out = {"retrieval": mean(0.0), "ranker": mean(1.0)}
    fused = {a: mean(a) for a in ALPHAS}
    best_alpha = max(ALPHAS, key=lambda a: (round(fused[a], 6), -a))
    out.update(best_fused=fused[best_alpha], best_alpha=best_alpha)
    return {k: round(v, 5) for k, v in out.items()}


def train_loop(model: Any, train: Sequence[Encoded], val: Sequence[Encoded], cfg: LoopConfig, marker_id: int,
               ckpt: Path, device: Any = None, resume: bool = False, progress: bool = True) -> LoopResult:
    """Train the peft ``model`` on ``train``; validation NDCG@10 on ``val`` every ``cfg.eval_every`` steps.
    The best adapter (the untrained one included) is kept in ``ckpt/best``; ``ckpt/adapter`` and
    ``ckpt/state.pt`` let an interrupted run resume."""
    import torch

    if not train:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    causal = model.base_model.model
    state = torch.load(ckpt / "state.pt", weights_only=False) if resume and (ckpt / "state.pt").exists() else None
    model.eval()
    baseline_scores = score_encoded(causal, val, marker_id, device)
    baseline = ndcg_table(val, baseline_scores)
    # a learned temperature on the scores, started at 1 / their spread: the untrained scores are confidently
    # spread, and without it the first steps shrink them by wrecking what ranks them (ranking and the min-max
    # fusion do not depend on it, so serving ignores it)
    spread = float(np.mean([np.std(x) for x in baseline_scores if x.size > 1] or [1.0]) or 1.0)
    # (the residual objective starts the ranker's term small, at the retrieval term's loss, and lets it grow)
    start = 0.3 if cfg.objective == "residual" else 1.0
    log_scale = torch.nn.Parameter(torch.tensor(math.log(start / max(spread, 1e-3)), device=device))
    beta0, retrieval_loss = fit_retrieval_beta(train)
    if cfg.objective == "residual" and progress:
        tqdm.write(f"{len(train)} training examples; the retrieval term alone: beta {beta0:.2f}, loss "
                   f"{retrieval_loss:.4f} (the line the ranker has to get under)")
    beta = torch.nn.Parameter(torch.tensor(beta0 if cfg.objective == "residual" else 0.0, device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    extra = [log_scale, beta] if cfg.objective == "residual" else [log_scale]
    optim = torch.optim.AdamW([{"params": params, "lr": cfg.lr}, {"params": extra, "lr": 1e-2}], weight_decay=0.0)
    step, seen, best, log, elapsed0 = 0, 0, -1.0, [], 0.0
    if state is not None:
        optim.load_state_dict(state["optim"])
        with torch.no_grad():
            log_scale.copy_(state["log_scale"])
            beta.copy_(state.get("beta", beta.detach()))
        step, seen, best, log, elapsed0 = state["step"], state["seen"], state["best"], state["log"], state["elapsed"]
    else:  # the untrained scorer is the first candidate: a step must beat it to be kept
        best = baseline["best_fused"]
        model.save_pretrained(str(ckpt / "best"))
        log.append({"step": 0, "examples": 0, "loss": None, "minutes": 0.0, **baseline})
    seen0 = seen
    t0 = time.perf_counter() - elapsed0
    budget = cfg.max_minutes * 60
    bar = tqdm(desc="training ranker", unit="ex", disable=not progress, initial=seen, total=len(train))
    losses: list[float] = []
    order = list(range(len(train)))
    random.Random(f"{cfg.seed}:order").shuffle(order)
    model.train()
    while time.perf_counter() - t0 < budget and (cfg.max_steps is None or step < cfg.max_steps):
        first = seen % len(train)
        batch = [train[i] for i in order[first: first + cfg.batch_size]]
        optim.param_groups[0]["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        terms = []
        for sc, enc in zip(marker_scores(causal, batch, marker_id, device), batch, strict=True):
            assert enc.slot is not None, "every training example holds its next item"
            logits = sc * log_scale.exp()
            if cfg.objective == "residual":
                ret = torch.tensor(minmax(enc.scores)[enc.order], dtype=logits.dtype, device=logits.device)
                logits = logits + beta * ret
            terms.append(-torch.log_softmax(logits, dim=-1)[enc.slot])
        loss = torch.stack(terms).mean()
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        step += 1
        seen += len(batch)
        losses.append(float(loss.detach()))
        rate = (seen - seen0) / max(1e-9, time.perf_counter() - t0 - elapsed0)
        bar.update(len(batch))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", ex_s=f"{rate:.2f}", step=step,
                        scale=f"{float(log_scale.detach().exp()):.3f}", beta=f"{float(beta.detach()):.2f}")
        if step % cfg.eval_every == 0:
            model.eval()
            table = ndcg_table(val, score_encoded(causal, val, marker_id, device))
            model.train()
            log.append({"step": step, "examples": seen, "loss": float(np.mean(losses[-cfg.eval_every:])),
                        "minutes": round((time.perf_counter() - t0) / 60, 2), **table})
            bar.write(f"step {step}: loss {log[-1]['loss']:.3f} validation {table}")
            if table["best_fused"] > best:
                best = table["best_fused"]
                model.save_pretrained(str(ckpt / "best"))
            model.save_pretrained(str(ckpt / "adapter"))
            torch.save({"optim": optim.state_dict(), "log_scale": log_scale.detach(), "beta": beta.detach(),
                        "step": step, "seen": seen, "best": best, "log": log,
                        "elapsed": time.perf_counter() - t0}, ckpt / "state.pt")
    bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    final = ndcg_table(val, score_encoded(causal, val, marker_id, device))
    log.append({"step": step, "examples": seen, "loss": float(np.mean(losses[-cfg.eval_every:])) if losses
                else float("nan"), "minutes": round(seconds / 60, 2), **final})
    if final["best_fused"] >= best or not (ckpt / "best").exists():
        model.save_pretrained(str(ckpt / "best"))
        best = final["best_fused"]
    return LoopResult(steps=step, seen=seen, seconds=seconds, log=log, baseline=baseline,
                      score_scale=float(log_scale.detach().exp()), beta=float(beta.detach()),
                      retrieval_only_loss=retrieval_loss, retrieval_only_beta=beta0, best=best, seen_before=seen0)
