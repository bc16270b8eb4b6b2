"""Sentence embeddings through ONNX Runtime: the same sentence-transformer, exported once, run without torch.

A tuned encoder turns every request's history into a query vector, so that pass is on the request path;
``recagent eval embedder`` times it through both runtimes in one run, with the largest difference between their
vectors and each runtime's throughput over the catalogue's item texts (the "Query cost" section of its report).

The whole sentence-transformer (transformer, pooling, normalisation) is exported with ``torch.onnx.export`` into
``<model folder>/onnx/model.onnx``, stamped with the sha256 prefix of the model's weights, and checked against
torch on probe texts before it is used; a model whose export fails or disagrees falls back to torch with a
warning. Tokenisation stays sentence-transformers' own (``preprocess``), so truncation and padding are the
same. (``optimum`` would do the export, but it pins transformers < 4.58, and this project runs 5.x.)

Precision ``int8`` (``RECAGENT_ENCODER_PRECISION=int8``, recorded in the index manifest) runs a copy of that export
with its weights quantised by ONNX Runtime's dynamic quantisation (``quantize_dynamic``, signed 8-bit, one scale per
output channel), about twice as fast on this CPU; it is checked against torch by cosine (``MIN_INT8_COSINE``), since
its vectors differ from the fp32 ones by design. ``recagent eval encoder-precision`` measures speed and retrieval
quality of both on one catalogue.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
STAMP = "WEIGHTS"
PRECISIONS = ("fp32", "int8")
INT8_FILE = "model-int8.onnx"
PROBES = ("a", "Toy Story (1995) Animation, Children's, Comedy | Heat (1995) Action, Crime, Thriller",
          "Casablanca (1942) Drama, Romance, War " * 12)
MAX_ABS_DIFF = 1e-4
MIN_INT8_COSINE = 0.97  # per-channel int8 MiniLM: mean .992, min .98 against fp32 on synthetic item texts


class OnnxExportError(RuntimeError):
    """The model could not be exported to ONNX, or the export disagrees with torch."""


def weights_stamp(model_dir: Path) -> str:
    """sha256 prefix over the model folder's weight files: an export is reused only while they are unchanged."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise OnnxExportError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _tensor_inputs(features: dict[str, Any]) -> list[str]:
    return [k for k, v in features.items() if hasattr(v, "shape")]


def export(model: Any, target: Path) -> None:
    """Write the sentence-transformer ``model`` (transformer + pooling + normalisation) to ``target`` as ONNX,
    with dynamic batch and sequence axes, atomically."""
    import torch

    features = model.preprocess(list(PROBES[:2]))
    names = _tensor_inputs(features)
    extras = {k: v for k, v in features.items() if k not in names}  # e.g. modality="text": constant in the graph

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model({**dict(zip(names, tensors, strict=True)), **extras})["sentence_embedding"]

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}-{os.getpid()}-{threading.get_ident()}")
    axes = {name: {0: "batch", 1: "tokens"} for name in names} | {"embedding": {0: "batch"}}
    model.eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape branches, all constant for this graph
        torch.onnx.export(SentenceEmbedding(), tuple(features[k] for k in names), str(staging), input_names=names,
                          output_names=["embedding"], dynamic_axes=axes, opset_version=17, dynamo=False)
    try:
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)


class _DropNote(logging.Filter):
    """Drops ONNX Runtime's "please consider pre-processing" note, logged on the root logger by every quantisation
    (the graph comes straight from the exporter; the cosine check decides whether the result is good enough)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


def quantise(source: Path, target: Path) -> None:
    """``target``: the ONNX graph ``source`` with int8 weights (dynamic quantisation, per output channel),
    written atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    staging = target.with_name(f".{target.name}-{os.getpid()}-{threading.get_ident()}")
    note = _DropNote()
    logging.getLogger().addFilter(note)
    try:
        quantize_dynamic(str(source), str(staging), weight_type=QuantType.QInt8, per_channel=True)
        staging.replace(target)
    finally:
        logging.getLogger().removeFilter(note)
        staging.unlink(missing_ok=True)


class OnnxSentenceEncoder:
    """``encode(texts) -> float32 vectors`` of a sentence-transformer through ONNX Runtime (thread-safe), in fp32
    or with int8 weights (``precision``)."""

    def __init__(self, model: Any, model_dir: Path, threads: int | None = None, precision: str = "fp32") -> None:
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise ValueError(f"encoder precision {precision!r} is not one of: {', '.join(PRECISIONS)}")
        self._model = model
        self.precision = precision
        folder = Path(model_dir) / ONNX_DIR
        target = folder / (ONNX_FILE if precision == "fp32" else INT8_FILE)
        stamp_file = folder / (STAMP if precision == "fp32" else f"{STAMP}-int8")
        stamp = weights_stamp(Path(model_dir))
        fresh = not (stamp_file.exists() and stamp_file.read_text() == stamp and target.exists())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        # no spinning after a run: ONNX Runtime's threads otherwise busy-wait on the cores that the LLM's next
        # forward pass (or a torch pass) needs right after
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            if fresh:
                stamp_file.unlink(missing_ok=True)
                fp32 = folder / ONNX_FILE
                if precision == "fp32" or not ((folder / STAMP).exists() and (folder / STAMP).read_text() == stamp
                                               and fp32.exists()):
                    export(model, fp32)
                if precision == "int8":
                    quantise(fp32, target)
            self._session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
            self._inputs = [i.name for i in self._session.get_inputs()]
            if fresh:
                self._check(model)
                staging = folder / f".{stamp_file.name}-{os.getpid()}"
                staging.write_text(stamp)
                staging.replace(stamp_file)
        except Exception as exc:  # the exporter's and ONNX Runtime's failures share no base class
            if fresh:
                stamp_file.unlink(missing_ok=True)
                target.unlink(missing_ok=True)
            raise OnnxExportError(f"could not run {model_dir} through ONNX Runtime: {exc}") from exc

    def _check(self, model: Any) -> None:
        got = self.encode(PROBES)
        want = model.encode(list(PROBES), convert_to_numpy=True, show_progress_bar=False)
        if self.precision == "int8":
            unit = got / np.linalg.norm(got, axis=1, keepdims=True)
            cosine = float((unit * (want / np.linalg.norm(want, axis=1, keepdims=True))).sum(axis=1).min())
            if cosine < MIN_INT8_COSINE:
                raise OnnxExportError(f"the int8 model's vectors are at cosine {cosine:.3f} from torch's "
                                      f"(< {MIN_INT8_COSINE})")
            return
        diff = float(np.abs(got - want).max())
        if diff > MAX_ABS_DIFF:
            raise OnnxExportError(f"the ONNX export differs from torch by {diff:.2e} (> {MAX_ABS_DIFF})")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        features = self._model.preprocess(list(texts))
        feed = {name: features[name].numpy().astype(np.int64) for name in self._inputs}
        return np.asarray(self._session.run(None, feed)[0], dtype=np.float32)
