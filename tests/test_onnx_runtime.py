"""Embeddings through ONNX Runtime (``RECAGENT_ENCODER_RUNTIME=onnx``, the default): the real MiniLM exported
once, the same vectors as torch, a stale export replaced, a failed export falling back to torch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval.catalog import Catalog
from retrieval.embeddings import Embedder, embedding_runtime, ensure_embedding_model
from retrieval.encoder import resolve_encoder
from retrieval.index import item_texts
from retrieval.onnx_runtime import ONNX_DIR, ONNX_FILE, STAMP, OnnxSentenceEncoder, weights_stamp


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of MiniLM, so that exports written here touch no other test's model folder."""
    target = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(ensure_embedding_model(), target, ignore=shutil.ignore_patterns(ONNX_DIR))
    return target


def test_onnx_and_torch_give_the_same_vectors(model_copy: Path, tiny_catalog: Catalog) -> None:
    texts = item_texts(tiny_catalog) + ["", "x" * 2000]  # empty and truncated texts too
    onnx = Embedder(model_copy, cache=False, runtime="onnx")
    torch_ = Embedder(model_copy, cache=False, runtime="torch")
    got, want = onnx.embed(texts), torch_.embed(texts)
    assert onnx.runtime == "onnx"
    assert got.shape == want.shape and got.dtype == np.float32
    assert float(np.abs(got - want).max()) < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    folder = model_copy / ONNX_DIR
    assert (folder / ONNX_FILE).exists() and (folder / STAMP).read_text() == weights_stamp(model_copy)


def test_a_stale_export_is_replaced(model_copy: Path) -> None:
    embedder = Embedder(model_copy, cache=False, runtime="onnx")
    embedder.embed(["warm"])  # make sure an export exists
    folder = model_copy / ONNX_DIR
    (folder / STAMP).write_text("weights-of-another-checkpoint")
    (folder / ONNX_FILE).write_bytes(b"not an onnx graph")
    encoder = OnnxSentenceEncoder(embedder.model, model_copy)
    assert (folder / STAMP).read_text() == weights_stamp(model_copy)
    options = encoder._session.get_session_options()  # idle threads must not spin on the LLM's cores
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    want = Embedder(model_copy, cache=False, runtime="torch").embed(["a stale export"])
    assert float(np.abs(encoder.encode(["a stale export"]) - want).max()) < 1e-5


def test_a_failed_export_falls_back_to_torch(model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    import retrieval.onnx_runtime as onnx_runtime

    private = tmp_path / "model"
    shutil.copytree(model_copy, private, ignore=shutil.ignore_patterns(ONNX_DIR))

    def broken(model: object, target: Path) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_runtime, "export", broken)
    embedder = Embedder(private, cache=False, runtime="onnx")
    with caplog.at_level(logging.WARNING, logger="retrieval.embeddings"):
        vectors = embedder.embed(["still embedded"])
    assert embedder.runtime == "torch" and vectors.shape == (1, embedder.dim)
    assert "exporter crashed" in caplog.text
    assert not (private / ONNX_DIR).exists()  # nothing half-written left behind


def test_the_runtime_is_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECAGENT_ENCODER_RUNTIME", raising=False)
    assert embedding_runtime() == "onnx"
    monkeypatch.setenv("RECAGENT_ENCODER_RUNTIME", "Torch")
    assert embedding_runtime() == "torch"
    monkeypatch.setenv("RECAGENT_ENCODER_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="tensorrt.*onnx, torch"):
        Embedder(cache=False)


def test_warm_up_exports_before_the_first_request(model_copy: Path, tmp_path: Path) -> None:
    private = tmp_path / "model"
    shutil.copytree(model_copy, private, ignore=shutil.ignore_patterns(ONNX_DIR))
    embedder = Embedder(private, cache=False, runtime="onnx")
    embedder.warm_up()  # what a server does at start-up and on an index swap
    assert (private / ONNX_DIR / STAMP).read_text() == weights_stamp(private)
    assert embedder.model_calls == 0 and embedder.runtime == "onnx"


def test_int8_precision_is_its_own_encoder_close_to_fp32(model_copy: Path, tiny_catalog: Catalog,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    texts = item_texts(tiny_catalog)
    fp32 = Embedder(model_copy, cache=False, runtime="onnx")
    int8 = Embedder(model_copy, cache=False, runtime="onnx", precision="int8")
    a, b = fp32.embed(texts), int8.embed(texts)
    assert int8.runtime == "onnx" and (model_copy / ONNX_DIR / "model-int8.onnx").exists()
    cosine = (a * b).sum(axis=1)  # both unit vectors
    assert cosine.min() > 0.97 and not np.allclose(a, b, atol=1e-4)  # close, and quantised for real
    # its own name (manifest, cache keys), so an int8 index never serves fp32 query vectors or cached vectors
    assert int8.name == f"{model_copy.name}-int8" and fp32.name == model_copy.name
    with pytest.raises(ValueError, match="needs RECAGENT_ENCODER_RUNTIME=onnx"):
        Embedder(model_copy, cache=False, runtime="torch", precision="int8")
    monkeypatch.setenv("RECAGENT_ENCODER_PRECISION", "int4")  # read when a new index picks its encoder
    with pytest.raises(ValueError, match="'int4' is not one of: fp32, int8"):
        resolve_encoder("movielens-100k", "frozen")
    monkeypatch.setenv("RECAGENT_ENCODER_PRECISION", "int8")
    ref = resolve_encoder("movielens-100k", "frozen")
    assert (ref.precision, ref.name) == ("int8", "all-MiniLM-L6-v2-int8")
