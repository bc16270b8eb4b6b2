"""The int8 encoder end to end: an index built with RECAGENT_ENCODER_PRECISION=int8 records it and embeds its
queries with it, and `recagent eval encoder-precision` compares the two precisions on one catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retrieval.catalog import Catalog, load_catalog
from retrieval.catalog_store import save_and_index
from retrieval.index import load_index
from tests.conftest import drop_catalog, new_catalog_name


def test_an_int8_index_records_its_precision_and_queries_with_it(tiny_catalog: Catalog,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    name = new_catalog_name("int8")
    monkeypatch.setenv("RECAGENT_ENCODER", "frozen")
    monkeypatch.setenv("RECAGENT_ENCODER_PRECISION", "int8")
    try:
        manifest = save_and_index(Catalog(name=name, items=tiny_catalog.items.copy(),
                                          interactions=tiny_catalog.interactions.copy()), progress=False)
        assert (manifest.encoder.precision, manifest.encoder.name) == ("int8", "all-MiniLM-L6-v2-int8")
        assert set(manifest.build_phases) == {"embed_s", "vector_store_s", "cf_s"}
        monkeypatch.setenv("RECAGENT_ENCODER_PRECISION", "fp32")  # a server reads the precision from the index
        index = load_index(load_catalog(name))
        assert index.embedder.precision == "int8" and index.embedder.name == manifest.encoder.name
        hits = index.store.query_text("a funny animated film", 3)
        assert len(hits) == 3 and all(0 < sim <= 1.0001 for _, sim in hits)
    finally:
        drop_catalog(name)


def test_eval_encoder_precision_reports_speed_and_quality_of_both(tiny_catalog: Catalog, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import app

    monkeypatch.chdir(tmp_path)  # reports/ is written to the working directory
    result = CliRunner().invoke(app, ["eval", "encoder-precision", "--catalog", tiny_catalog.name, "--users", "10",
                                      "--encoder", "frozen"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reports" / f"encoder-precision-{tiny_catalog.name}-frozen.json").read_text())
    assert set(report["precisions"]) == {"fp32", "int8"} and report["users"] >= 1
    assert report["cosine"]["min"] > 0.97 and report["speedup"] > 0
    for precision in ("fp32", "int8"):
        assert report["precisions"][precision]["texts_per_s"] > 0
        assert set(report["precisions"][precision]["quality"]) == {"content", "fused"}
    assert "int8 - fp32 (paired)" in (tmp_path / "reports" / f"encoder-precision-{tiny_catalog.name}-frozen.md"
                                      ).read_text()
    bad = CliRunner().invoke(app, ["eval", "encoder-precision", "--catalog", tiny_catalog.name, "--encoder", "x"])
    assert bad.exit_code != 0 and "choose index or frozen" in bad.output
