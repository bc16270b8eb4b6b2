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
(adapter, optimiser, position) allow ``--resume``. The optimisation itself is :func:`agent.ranker.loop.train_loop`.

Training elsewhere (a GPU machine without the serving stack): ``export`` writes the encoded examples, the recipe
and the base model's GGUF; ``python -m agent.ranker.accelerated`` runs the same loop there; ``finish_from`` checks
the run's data and validation users, then chooses alpha and the window here, as ``run`` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator
from tqdm import tqdm

from agent.llm.transformers_backend import TransformersBackend
from agent.ranker.accelerated import EXAMPLES, RECIPE, RUN_RECORD
from agent.ranker.artifact import PROVENANCE, RankerChoices, RankerProvenance, rankers_dir
from agent.ranker.examples import Example, evaluation_examples, training_examples
from agent.ranker.loop import Encoded, LoopConfig, LoopResult, ndcg_table, score_encoded, train_loop
from agent.ranker.loop import marker_scores as loop_marker_scores
from agent.rerank import RerankConfig, Reranker, TrainedOrder
from agent.service import RecommenderService
from retrieval.catalog import atomic_write_json, swap_in
from retrieval.index import Index
from retrieval.provenance import command_line, git_commit, utc_now
from retrieval.splits import SplitSpec, split_catalog

logger = logging.getLogger(__name__)


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
        slot = None if example.target is None else order.index(example.target)
        return Encoded(ids, reads, order, slot, tuple(example.scores), example.target)

    def marker_scores(self, model: Any, batch: Sequence[Encoded]) -> list[Any]:
        """Scores per example (presentation order), as :func:`agent.ranker.loop.marker_scores` computes them."""
        return loop_marker_scores(model, batch, self.marker_id)

    # --- examples ------------------------------------------------------------------------------------------
    def validation_examples(self, window: int) -> list[Example]:
        cases = sorted(self.split.validation, key=lambda c: c.user_id)
        rng = random.Random(self.config.seed)
        sample = sorted(rng.sample(cases, min(self.config.val_users, len(cases))), key=lambda c: c.user_id)
        return evaluation_examples(self.index, sample, self.split.fit_histories("validation"), window)

    def score_examples(self, model: Any, examples: Sequence[Example], batch_size: int = 8) -> list[np.ndarray]:
        """Ranker scores per candidate (retrieval order), each example presented in its serving order."""
        return score_encoded(model, [self.encode(e) for e in examples], self.marker_id, batch_size=batch_size)

    def encoded_examples(self) -> tuple[list[Encoded], list[Encoded], list[Example], dict[str, Any]]:
        """(training examples, validation examples at the training window, both encoded; the validation
        examples at the largest serving window; example statistics). Training examples are presented in
        retrieval order, or with ``order="shuffled"`` in one seeded shuffle each."""
        cfg = self.config
        examples, stats = training_examples(
            self.index, self.split.train, cfg.window, cfg.per_user, min_history=cfg.min_history, folds=cfg.folds,
            seed=cfg.seed, insert_missing=cfg.insert_missing, progress=self.progress)
        if not examples:
            raise ValueError(f"catalogue '{self.index.catalog.name}' gives no training examples: no training "
                             f"history holds more than {cfg.min_history} items (--min-history)")
        rng = random.Random(f"{cfg.seed}:presentation")
        train = []
        for e in tqdm(examples, desc="encoding ranker examples", unit="ex", disable=not self.progress):
            order = list(range(len(e.candidates)))
            if cfg.order == "shuffled":
                rng.shuffle(order)
            train.append(self.encode(e, order))
        val = self.validation_examples(max(cfg.windows))
        val_window = [self.encode(cut(e, cfg.window)) for e in val]
        return train, val_window, val, {"examples_built": stats.examples, "examples_used": len(examples),
                                        "target_retrieved_rate": round(stats.hit_rate, 4),
                                        "inserted": stats.inserted}

    def lora_config(self) -> dict[str, Any]:
        cfg = self.config
        n_layers = int(self.backend.model.config.num_hidden_layers)
        return {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                "target_modules": list(cfg.target_modules),
                "layers_to_transform": list(range(max(0, n_layers - cfg.top_layers), n_layers))}

    def loop_config(self) -> LoopConfig:
        cfg = self.config
        return LoopConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size,
                          max_minutes=cfg.max_minutes, max_steps=cfg.max_steps, eval_every=cfg.eval_every,
                          objective=cfg.objective, seed=cfg.seed)

    # --- training ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RankerProvenance:
        torch = self.torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        ckpt = self.checkpoint_dir
        torch.manual_seed(self.config.seed)
        train, val_window, val, stats = self.encoded_examples()
        # a copy of the weights: the backend's own model stays untouched for scoring and generation
        base = AutoModelForCausalLM.from_pretrained(self.backend.model_dir, dtype=self.backend.dtype)
        if resume and (ckpt / "state.pt").exists():
            model = PeftModel.from_pretrained(base, str(ckpt / "adapter"), is_trainable=True)
        else:
            model = get_peft_model(base, LoraConfig(**self.lora_config()))
        result = train_loop(model, train, val_window, self.loop_config(), self.marker_id, ckpt, resume=resume,
                            progress=self.progress)
        return self.finish(ckpt / "best", result, stats, val, where=f"this machine ({machine()})",
                           base=model.unload())

    @property
    def checkpoint_dir(self) -> Path:
        return self.out.with_name(f".{self.out.name}-checkpoint")

    def finish(self, adapter: Path, result: LoopResult, stats: dict[str, Any], val: Sequence[Example],
               where: str, base: Any = None) -> RankerProvenance:
        """The kept adapter, on a clean base model (``base``: the training copy with its adapter unloaded; else
        loaded), chooses alpha and the serving window on the validation users (scored here, as serving will), then
        the ranker folder is written with its provenance."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if base is None:
            base = AutoModelForCausalLM.from_pretrained(self.backend.model_dir, dtype=self.backend.dtype)
        chosen = PeftModel.from_pretrained(base, str(adapter))
        chosen.eval()
        causal = chosen.base_model.model
        per_window = {}
        for w in self.config.windows:
            subset = [cut(e, w) for e in val]
            t = time.perf_counter()
            scores = self.score_examples(causal, subset)
            per_window[w] = {**ndcg_table(subset, scores),
                             "seconds_per_user": round((time.perf_counter() - t) / max(1, len(subset)), 4)}
        window = max(per_window, key=lambda w: (round(per_window[w]["best_fused"], 4), -w))
        choices = RankerChoices(alpha=per_window[window]["best_alpha"], window=window)
        return self.save(chosen, self.checkpoint_dir, choices, {
            "recipe": self.config.model_dump(), **stats, "examples_seen": result.seen, "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "examples_per_second": round((result.seen - result.seen_before) / max(result.seconds, 1e-9), 3),
            "trained_on": where, "kept_step": result.kept_step, "score_scale": rounded(result.score_scale),
            "beta": rounded(result.beta), "retrieval_only_loss": round(result.retrieval_only_loss, 4),
            "retrieval_only_beta": round(result.retrieval_only_beta, 4), "log": result.log},
            {"users": len(val), "before_training": result.baseline, "windows": per_window,
             "chosen": choices.model_dump()})

    # --- training elsewhere: export the encoded examples, finish from the run's output ---------------------
    def export(self, folder: Path) -> Path:
        """Write what ``python -m agent.ranker.accelerated`` needs to train on another machine: the encoded
        examples, the recipe and the base model (the GGUF it was converted from where there is one, else the
        model folder). Nothing in it reaches past the training part, except the validation users' examples that
        choose the kept step, as here."""
        from agent.llm.model_files import source_gguf

        train, val_window, val, stats = self.encoded_examples()
        staging = folder.with_name(f".{folder.name}-staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.torch.save({"train": [dataclasses.asdict(e) for e in train],
                         "val": [dataclasses.asdict(e) for e in val_window]}, staging / EXAMPLES)
        gguf = source_gguf(Path(self.backend.model_dir))
        if gguf is not None:
            shutil.copy2(gguf, staging / gguf.name)
            (staging / "config").mkdir()
            shutil.copy2(Path(self.backend.model_dir) / "config.json", staging / "config" / "config.json")
            base = {"gguf": gguf.name}
        else:
            shutil.copytree(self.backend.model_dir, staging / "base")
            base = {"folder": "base"}
        atomic_write_json(staging / RECIPE, {
            "catalog": self.index.catalog.name, "content_hash": self.index.manifest.content_hash,
            "base": base, "dtype": str(self.backend.dtype).removeprefix("torch."), "marker_id": self.marker_id,
            "lora": self.lora_config(),
            "loop": dataclasses.asdict(self.loop_config()), "recipe": self.config.model_dump(), "stats": stats,
            "split": self.spec.provenance(), "val_users": [e.user_id for e in val], "command": command_line(),
            "commit": git_commit(), "created": utc_now()})
        swap_in(staging, folder)
        return folder

    def finish_from(self, run: Path) -> RankerProvenance:
        """Finish a run of ``agent.ranker.accelerated`` (its output folder): check it was trained on this
        catalogue's data with this recipe, then choose alpha and the window here and write the ranker."""
        path = run / RUN_RECORD
        if not path.exists():
            raise ValueError(f"{run} holds no {RUN_RECORD}: give the output folder of "
                                    "`python -m agent.ranker.accelerated`")
        record = json.loads(path.read_text())
        recipe = record["recipe"]
        self.config = TrainConfig.model_validate(recipe["recipe"])  # the recipe as it ran there
        if recipe["content_hash"] != self.index.manifest.content_hash or recipe["split"] != self.spec.provenance():
            raise ValueError(f"{run} was trained on another version of the data or split (hash "
                             f"{recipe['content_hash']}, split {recipe['split']}); export again with --export")
        val = self.validation_examples(max(self.config.windows))
        if [e.user_id for e in val] != recipe["val_users"]:
            raise ValueError(f"{run} kept its step on other validation users: use the same --val-users and --seed "
                             "as the export")
        result = LoopResult(**record["result"])
        stats = {**recipe["stats"], "export_command": recipe["command"], "run_command": record["command"],
                 **({"run_note": record["note"]} if record.get("note") else {})}
        return self.finish(run / "best", result, stats, val, where=record["machine"])

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


def cut(example: Example, window: int) -> Example:
    """The example with only the first ``window`` candidates (the target's index kept when inside)."""
    target = example.target if example.target is not None and example.target < window else None
    return Example(example.user_id, example.history, example.candidates[:window], target,
                   scores=example.scores[:window])


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def machine() -> str:
    import platform

    import torch

    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
