"""Interaction-based signals fitted on histories: popularity, sequential transitions and one collaborative
item-item model chosen by catalogue size: EASE (a dense n x n inverse, exact and best up to ``max_ease_items``) or,
past that, implicit-feedback ALS from the ``implicit`` library (n x f item factors). With EASE comes SLIT, a linear
next-item model of the same size (:func:`fit_slit`). Fitting is vectorised: no Python
loop runs per interaction. Where the config gives it epochs, a small SASRec-style Transformer over item ids is
trained too (:mod:`retrieval.sasrec`; torch, imported only then)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, Field

from retrieval.sasrec import SASRecConfig, fit_sasrec, load_sasrec, save_sasrec

logger = logging.getLogger(__name__)


class CFConfig(BaseModel):
    ease_lambda: float = Field(default=30.0, gt=0, description="tuned on ML-100k validation (random ties, "
                               "seed 0) by `recagent eval retrieval --tune`")
    ease_decay: float = Field(default=1.0, gt=0, le=1, description="recency weight of the history in the EASE "
                              "source: the item last seen k steps before the latest counts decay^k (1: all alike, "
                              "plain EASE); tuned with the lambda")
    slit_lambda: float = Field(default=300.0, gt=0, description="ridge of the SLIT next-item model (chosen on "
                               "ML-100k validation, random ties, seed 0)")
    slit_decay: float = Field(default=0.9, gt=0, le=1, description="SLIT's recency weight of the history: the item "
                              "k steps before the latest counts decay^k")
    slit_last: int = Field(default=30, ge=1, description="latest history items SLIT reads")
    seq_window: int = Field(default=3, ge=1, description="transitions counted up to this many steps ahead")
    seq_last: int = Field(default=5, ge=1, description="how many of the latest history items vote")
    seq_decay: float = Field(default=0.6, gt=0, le=1)
    max_ease_items: int = Field(default=20000, description="EASE inverts an n x n matrix; ALS above this")
    collaborative: Literal["auto", "ease", "als"] = Field(
        default="auto", description="the collaborative model: 'auto' picks EASE up to max_ease_items, else ALS; an "
        "index manifest records the one fitted",
    )
    als_factors: int = Field(default=64, ge=4, le=512)
    als_iterations: int = Field(default=15, ge=1, le=200)
    als_regularization: float = Field(default=0.05, gt=0)
    als_alpha: float = Field(default=10.0, gt=0, description="confidence of an observed interaction")
    als_seed: int = 0
    sasrec_epochs: int = Field(default=0, ge=0, description="epochs of the SASRec source's training (0: not "
                               "trained); chosen on validation by early stopping in `recagent eval retrieval --tune`")
    sasrec: SASRecConfig = Field(default_factory=SASRecConfig, description="the SASRec source's architecture")
    fitted: Literal["ease", "als"] | None = Field(default=None, description="the model fit_cf fitted (recorded)")

    def chosen(self, n_items: int) -> Literal["ease", "als"]:
        if self.collaborative != "auto":
            return self.collaborative
        return "ease" if n_items <= self.max_ease_items else "als"


@dataclass
class CFModels:
    popularity: np.ndarray  # interaction counts per item position
    transitions: sp.csr_matrix  # row-normalised a -> b transition weights
    ease: np.ndarray | None  # n x n EASE weights (None when ALS is the collaborative model)
    config: CFConfig
    als_items: np.ndarray | None = None  # n x f ALS item factors (None when EASE is)
    slit: np.ndarray | None = None  # n x n SLIT next-item weights (fitted with EASE)
    sasrec: Any = None  # the SASRec model (a torch module) where config.sasrec_epochs > 0

    def save(self, folder: Path) -> None:
        np.save(folder / "popularity.npy", self.popularity)
        sp.save_npz(folder / "transitions.npz", self.transitions)
        if self.ease is not None:
            np.save(folder / "ease.npy", self.ease)
        if self.als_items is not None:
            np.save(folder / "als_items.npy", self.als_items)
        if self.slit is not None:
            np.save(folder / "slit.npy", self.slit)
        if self.sasrec is not None:
            save_sasrec(self.sasrec, folder)

    @classmethod
    def load(cls, folder: Path, config: CFConfig) -> CFModels:
        ease_path, als_path, slit_path = folder / "ease.npy", folder / "als_items.npy", folder / "slit.npy"
        popularity = np.load(folder / "popularity.npy")
        sasrec = load_sasrec(folder, len(popularity), config.sasrec) if config.sasrec_epochs > 0 else None
        return cls(
            popularity=popularity,
            transitions=sp.load_npz(folder / "transitions.npz").tocsr(),
            ease=np.load(ease_path) if ease_path.exists() else None,
            config=config,
            als_items=np.load(als_path) if als_path.exists() else None,
            slit=np.load(slit_path) if slit_path.exists() else None,
            sasrec=sasrec,
        )

    @property
    def collaborative(self) -> str | None:
        return "ease" if self.ease is not None else "als" if self.als_items is not None else None


def _flatten(histories: Mapping[str, Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(user index, item position) of every event, users in mapping order, each user's events in order."""
    lengths = np.fromiter((len(h) for h in histories.values()), dtype=np.int64, count=len(histories))
    users = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)
    items = np.fromiter((p for h in histories.values() for p in h), dtype=np.int64, count=int(lengths.sum()))
    return users, items


def fit_als(x: sp.csr_matrix, config: CFConfig) -> np.ndarray:
    """Item factors of implicit-feedback ALS (``implicit``) on the binary user x item matrix ``x``."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit's own threads do the work; BLAS threads would fight them
        model = AlternatingLeastSquares(factors=config.als_factors, iterations=config.als_iterations,
                                        regularization=config.als_regularization, alpha=config.als_alpha,
                                        random_state=config.als_seed)
        model.fit(x, show_progress=False)
    return np.ascontiguousarray(model.item_factors, dtype=np.float32)


def recency_weights(length: int, decay: float) -> np.ndarray:
    """Weight 1 for the latest item, ``decay`` for the one before, and so on."""
    return decay ** np.arange(length - 1, -1, -1, dtype=np.float64)


def slit_rows(history: Sequence[int], config: CFConfig) -> tuple[list[int], np.ndarray]:
    """The latest ``slit_last`` items of ``history`` and their recency weights (the latest: 1), as SLIT reads a
    history to score it (:func:`fit_slit` builds the same rows for every training step)."""
    prev = list(history)[-config.slit_last:]
    return prev, recency_weights(len(prev), config.slit_decay)


def fit_slit(histories: Mapping[str, Sequence[int]], n_items: int, config: CFConfig) -> np.ndarray:
    """SLIT (the transition part of SLIST, Choi et al., WWW 2021): a ridge regression from each training step's
    recency-weighted history (:func:`slit_rows`) to the item that came next, B = (X'X + lambda I)^-1 X'Y; a user
    is scored by their weighted history times B. A dense n x n solve, as EASE's inverse. The rows are built per lag,
    as the transitions are: no Python loop per interaction."""
    users, items = _flatten(histories)
    first = np.ones(len(items), dtype=bool)  # each user's first event is no training step (nothing before it)
    first[1:] = users[1:] != users[:-1]
    step_of = np.cumsum(~first) - 1  # the training step an event is the target of
    rows, cols, vals = [], [], []
    for lag in range(1, config.slit_last + 1):  # the item ``lag`` events before each target, weight decay^(lag-1)
        same_user = users[:-lag] == users[lag:]
        rows.append(step_of[lag:][same_user])
        cols.append(items[:-lag][same_user])
        vals.append(np.full(int(same_user.sum()), config.slit_decay ** (lag - 1)))
    steps = int((~first).sum())
    x = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(steps, n_items))
    x.sum_duplicates()
    y = sp.csr_matrix((np.ones(steps), (np.arange(steps), items[~first])), shape=(steps, n_items))
    gram = (x.T @ x).toarray()
    gram[np.diag_indices(n_items)] += config.slit_lambda
    return np.linalg.solve(gram, (x.T @ y).toarray()).astype(np.float32)


def fit_cf(histories: Mapping[str, Sequence[int]], n_items: int, config: CFConfig | None = None,
           progress: bool = False, sasrec: Any = None, item_vectors: np.ndarray | None = None) -> CFModels:
    """Fit on per-user position sequences (time-ordered). The config returned names the collaborative model
    fitted (``fitted``: "ease" or "als"). ``progress`` shows SASRec's training, the one part that takes minutes;
    ``sasrec``: a model already trained on these histories with this config (a shipped one), used as it is;
    ``item_vectors``: the content encoder's item vectors, where SASRec's item embeddings start."""
    config = config or CFConfig()
    users, items = _flatten(histories)
    x = sp.csr_matrix((np.ones(len(items), dtype=np.float32), (users, items)), shape=(len(histories), n_items))
    x.sum_duplicates()
    x.data[:] = 1.0  # seen or not
    popularity = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)
    rows, cols, vals = [], [], []
    for gap in range(1, config.seq_window + 1):  # pairs (a, b) of one user's events `gap` steps apart
        same_user = users[:-gap] == users[gap:]
        a, b = items[:-gap][same_user], items[gap:][same_user]
        keep = a != b
        rows.append(a[keep])
        cols.append(b[keep])
        vals.append(np.full(int(keep.sum()), 1.0 / gap, dtype=np.float32))
    trans = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n_items, n_items))
    trans.sum_duplicates()
    row_sums = np.asarray(trans.sum(axis=1)).ravel()
    inv = np.divide(1.0, row_sums, out=np.zeros_like(row_sums), where=row_sums > 0)
    trans = sp.diags(inv.astype(np.float32)) @ trans
    chosen = config.chosen(n_items)
    config = config.model_copy(update={"fitted": chosen})
    ease = als_items = slit = None
    if chosen == "ease":
        slit = fit_slit(histories, n_items, config)
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices(n_items)] += config.ease_lambda
        p = np.linalg.inv(gram)
        ease = (-p / np.diag(p)).astype(np.float32)
        ease[np.diag_indices(n_items)] = 0.0
    else:
        als_items = fit_als(x, config)
    if config.sasrec_epochs < 1:
        sasrec = None
    elif sasrec is None:
        logger.info("training the SASRec source for %d epochs", config.sasrec_epochs)
        sasrec, _ = fit_sasrec(histories, n_items, config.sasrec.model_copy(
            update={"epochs": config.sasrec_epochs, "max_minutes": math.inf}), progress=progress,
            item_vectors=item_vectors)
    return CFModels(popularity=popularity, transitions=sp.csr_matrix(trans), ease=ease, config=config,
                    als_items=als_items, slit=slit, sasrec=sasrec)
