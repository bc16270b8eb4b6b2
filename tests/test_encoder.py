"""The fine-tuned encoder (`recagent train embedder`): training pairs from the training part only, the history
text, the index built with the tuned encoder (Chroma records it; user vectors from history text), and the choice
of encoder by ``RECAGENT_ENCODER``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from eval.cold_path import COLD_GRID, GridRow, choose
from eval.embedder_eval import SERVED
from retrieval.catalog import Catalog
from retrieval.embeddings import Embedder
from retrieval.encoder import (
    PROVENANCE,
    TRAINED_LAYERS,
    EncoderMissingError,
    EncoderRef,
    HistoryText,
    encoders_dir,
    file_checksum,
    make_embedder,
    materialise,
    resolve_encoder,
    tuned_ref,
)
from retrieval.encoder_train import EncoderTrainConfig, EncoderTrainer, target_ranks, training_pairs
from retrieval.index import Index, item_texts
from retrieval.splits import SplitSpec, split_catalog


def test_history_text_keeps_the_most_recent_items_within_the_budget(tiny_catalog: Catalog,
                                                                      embedder: Embedder) -> None:
    texts = item_texts(tiny_catalog)
    tokenizer = embedder.model.tokenizer
    history = list(range(tiny_catalog.n_items))
    text = HistoryText(texts, tokenizer, history_items=20, max_tokens=64)(history)
    assert text.endswith(texts[history[-1]])  # most recent last
    assert len(tokenizer(text)["input_ids"]) <= 64
    assert texts[history[0]] not in text  # the oldest did not fit
    few = HistoryText(texts, tokenizer, history_items=2, max_tokens=512)(history)
    assert few == f"{texts[history[-2]]} | {texts[history[-1]]}"
    assert HistoryText(texts, tokenizer, history_items=5, max_tokens=16)([0]) == texts[0]  # one item always stays


def test_training_pairs_come_from_the_training_part_only(tiny_catalog: Catalog, embedder: Embedder) -> None:
    spec = SplitSpec(seed=3)
    trainer = EncoderTrainer(tiny_catalog, EncoderTrainConfig(), spec, out=Path("/nonexistent"))
    train, _ = trainer.histories()
    split = split_catalog(tiny_catalog, spec)
    texts = HistoryText(trainer.item_texts, embedder.model.tokenizer, 20, 128)
    idx = tiny_catalog.item_index
    seen_pairs = 0
    for user, history in train.items():
        anchors, positives, positions = training_pairs({user: history}, texts, trainer.item_texts,
                                                       EncoderTrainConfig())
        seen_pairs += len(anchors)
        assert set(positions) <= set(history)
        held_out = {c.target for c in split.validation + split.test if c.user_id == user}
        for item in held_out - set(split.train[user]):  # a held-out item never reaches this user's pairs
            assert all(trainer.item_texts[idx[item]] not in a for a in anchors)
            assert idx[item] not in positions
    assert seen_pairs > 0
    cold = {"s3", "a3"}
    excluded, val = EncoderTrainer(tiny_catalog, EncoderTrainConfig(), spec, exclude=cold).histories()
    assert not {idx[i] for i in cold} & {p for h in excluded.values() for p in h}
    assert all(c.target not in cold for c in val)


def test_target_ranks_exclude_the_history_and_break_ties_by_position() -> None:
    items = np.eye(4, dtype=np.float32)
    users = np.array([[0.9, 0.5, 0.5, 0.1]], dtype=np.float32)
    assert target_ranks(users, items, [[0]], [1]) == [1]  # item 0 is history; 1 and 2 tie, 1 comes first
    assert target_ranks(users, items, [[0]], [2]) == [2]
    assert target_ranks(users, items, [[]], [3]) == [4]


def test_train_embedder_writes_provenance_and_reindexes(tuned_tiny_index: Index) -> None:
    ref = tuned_tiny_index.manifest.encoder
    assert ref.kind == "tuned" and ref.path is not None and ref.checkpoint
    folder = Path(ref.path)
    provenance = json.loads((folder / PROVENANCE).read_text())
    assert provenance["checkpoint"] == ref.checkpoint == file_checksum(folder / TRAINED_LAYERS)
    assert (folder / TRAINED_LAYERS).stat().st_size < 20e6  # small enough to ship
    assert provenance["seed"] == 1 and provenance["split"]["ties"] == "random"
    assert provenance["command"].startswith("recagent") and provenance["commit"]
    assert provenance["train"]["steps"] == 2 and provenance["train"]["log"][0]["step"] == 0
    assert {"ndcg@10", "recall@50"} <= set(provenance["validation"]["best"])
    metadata = tuned_tiny_index.store.collection.metadata
    assert metadata["encoder"] == ref.name and metadata["checkpoint"] == ref.checkpoint
    assert tuned_tiny_index.manifest.fusion.tuned  # fusion re-tuned on validation with the tuned encoder
    assert provenance["fusion"]["weights"] == tuned_tiny_index.manifest.fusion.weights  # kept for new indexes
    assert provenance["fusion"]["ease_lambda"] == tuned_tiny_index.manifest.cf.ease_lambda
    assert provenance["fusion"]["ease_decay"] == tuned_tiny_index.manifest.cf.ease_decay
    assert tuned_ref(folder).ease_decay == tuned_tiny_index.manifest.cf.ease_decay  # read back for new indexes
    assert provenance["fusion"]["sasrec_epochs"] == tuned_tiny_index.manifest.cf.sasrec_epochs
    assert tuned_ref(folder).sasrec_epochs == tuned_tiny_index.manifest.cf.sasrec_epochs
    vectors = tuned_tiny_index.embedder.embed(item_texts(tuned_tiny_index.catalog))
    np.testing.assert_allclose(vectors, tuned_tiny_index.item_vectors, atol=1e-5)  # Chroma holds the tuned vectors


def test_tuned_index_embeds_any_history_as_text(tuned_tiny_index: Index) -> None:
    user_vector = tuned_tiny_index.user_vector
    assert user_vector is not None
    idx = tuned_tiny_index.catalog.item_index
    space, drama = user_vector([idx["s1"], idx["s2"]]), user_vector([idx["d1"], idx["d2"]])
    assert abs(float(np.linalg.norm(space)) - 1.0) < 1e-4 and float(space @ drama) < 0.99
    retriever = tuned_tiny_index.retriever("content")
    got = [c.item_id for c in retriever.retrieve(["s1", "s4"], 2)]  # a history no user has
    assert set(got) == {"s2", "s3"}
    assert all(h.source == "content" for c in retriever.retrieve(["d4"], 3) for h in c.sources)


def test_encoder_choice_and_a_missing_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECAGENT_HOME", str(tmp_path))
    assert resolve_encoder("nothing-trained") == EncoderRef()
    assert resolve_encoder("nothing-trained", "frozen").kind == "frozen"
    with pytest.raises(ValueError, match="no tuned encoder"):
        resolve_encoder("nothing-trained", "tuned")
    with pytest.raises(ValueError, match="auto, frozen, tuned"):
        resolve_encoder("nothing-trained", str(tmp_path / "nowhere"))
    assert not encoders_dir("nothing-trained").exists()
    with pytest.raises(EncoderMissingError, match="which is gone"):
        make_embedder(EncoderRef(kind="tuned", name="x-tuned-0", path=str(tmp_path / "gone"), checkpoint="0"))


def test_train_embedder_rejects_bad_input() -> None:
    result = CliRunner().invoke(app, ["train", "embedder", "--batch-size", "1"])
    assert result.exit_code == 2 and "--batch-size" in result.output
    result = CliRunner().invoke(app, ["train", "embedder", "--catalog", "no-such-catalogue", "--max-steps", "1"])
    assert result.exit_code == 2 and "no-such-catalogue" in result.output


def test_the_trained_layers_alone_rebuild_the_tuned_encoder(tuned_tiny_index: Index, tmp_path: Path) -> None:
    """What ships is the layers file and the provenance; the base model plus those layers embed as trained."""
    import shutil

    ref = tuned_tiny_index.manifest.encoder
    assert ref.path is not None
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (TRAINED_LAYERS, PROVENANCE):
        shutil.copy(Path(ref.path) / name, copy / name)
    model_dir = materialise(copy)
    assert (model_dir / "CHECKPOINT").read_text() == ref.checkpoint
    rebuilt = Embedder(model_dir, cache=False).embed(item_texts(tuned_tiny_index.catalog))
    np.testing.assert_allclose(rebuilt, tuned_tiny_index.item_vectors, atol=1e-5)
    assert materialise(copy) == model_dir  # built once
    assert not (copy / "model").exists()  # a folder outside the home (another checkout's shipped one) is not written
    (copy / TRAINED_LAYERS).write_bytes(b"not the layers")
    with pytest.raises(ValueError, match="do not match its provenance"):
        resolve_encoder("any", str(copy))


def test_a_new_index_takes_the_fusion_tuned_with_its_encoder() -> None:
    from retrieval.cf import CFConfig
    from retrieval.index import FusionConfig, IndexManifest, fusion_for

    tuned = EncoderRef(kind="tuned", name="c-tuned-1", path="/x", checkpoint="1", fusion={"content": 1.0},
                       ease_lambda=100.0)
    old = IndexManifest(catalog="c", content_hash="h", collection="col", embed_model="m", dim=3, built_at="t",
                        build_seconds=1.0, cf=CFConfig(ease_lambda=30.0),
                        fusion=FusionConfig(weights={"ease": 1.0}, tuned=True))
    fusion, cf = fusion_for(tuned, old)  # the encoder changed: its own tuned weights
    assert fusion.weights == {"content": 1.0} and fusion.tuned and cf.ease_lambda == 100.0
    fusion, cf = fusion_for(EncoderRef(), old)  # same encoder as before: what was tuned for the index stays
    assert fusion.weights == {"ease": 1.0} and cf.ease_lambda == 30.0
    fusion, _ = fusion_for(EncoderRef(), None)
    assert fusion == FusionConfig()


def test_the_popularity_prior_reranks_the_nearest_neighbours(tuned_tiny_index: Index) -> None:
    import dataclasses

    manifest = tuned_tiny_index.manifest.model_copy(deep=True)
    manifest.encoder.prior_weight = 100.0  # the prior dominates: the most popular allowed items come first
    strong = dataclasses.replace(tuned_tiny_index, manifest=manifest)
    popularity = strong.cf.popularity
    got = [c.item_id for c in strong.retriever("content").retrieve(["d4"], 3)]
    positions = [strong.catalog.item_index[i] for i in got]
    assert list(popularity[positions]) == sorted(popularity[positions], reverse=True)
    allowed = np.ones(strong.catalog.n_items, dtype=bool)
    allowed[strong.catalog.item_index["d4"]] = False
    assert popularity[positions[0]] == popularity[allowed].max()
    manifest.encoder.prior_weight = 0.0
    assert dataclasses.replace(tuned_tiny_index, manifest=manifest).content_prior(strong.cf) is None


def test_a_shipped_encoder_is_found_and_materialised_under_the_home(tuned_tiny_index: Index, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import retrieval.encoder as encoder_module

    ref = tuned_tiny_index.manifest.encoder
    assert ref.path is not None
    shipped = tmp_path / "shipped"
    (shipped / "shop").mkdir(parents=True)
    for name in (TRAINED_LAYERS, PROVENANCE):
        shutil.copy(Path(ref.path) / name, shipped / "shop" / name)
    monkeypatch.setattr(encoder_module, "SHIPPED", shipped)
    found = resolve_encoder("shop", "auto")  # nothing trained under the home for "shop": the shipped one
    assert found.kind == "tuned" and found.checkpoint == ref.checkpoint and found.path == str(shipped / "shop")
    assert found.fusion == tuned_tiny_index.manifest.fusion.weights  # a fresh index starts from its tuned weights
    model_dir = materialise(shipped / "shop")
    assert model_dir.is_relative_to(encoders_dir(".materialised")) and not (shipped / "shop" / "model").exists()
    assert resolve_encoder("shop", "frozen").kind == "frozen"


def test_eval_embedder_reports_every_retriever_cold_items_and_query_cost(tuned_tiny_index: Index, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # reports/ is written to the working directory
    name = tuned_tiny_index.catalog.name
    result = CliRunner().invoke(app, ["eval", "embedder", "--catalog", name, "--cold-share", "0.1", "--cold-minutes",
                                      "0.2", "--bootstrap", "20", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reports" / f"embedder-{name}.json").read_text())
    rows = set(report["warm"]["results"]["test"])
    assert {"content, frozen encoder", "content, frozen encoder + popularity prior", "content, tuned encoder",
            "fused, frozen encoder", "fused, tuned encoder", "sequential"} <= rows
    assert any(r.startswith("SASRec") for r in rows)
    assert {"slit", SERVED} <= rows  # every CF source, and the fusion of all the sources a live index serves
    served = report["warm"]["fusion_weights"]["served"]
    assert "sasrec" in served and set(served) > set(report["warm"]["fusion_weights"]["tuned"])
    assert report["cold"]["cold_items"] == 1 and "content, tuned encoder" in report["cold"]["hit@50"]
    assert set(report["cold"]["hit@50"]) >= COLD_CONTENT_ROWS  # cosine only and with the prior, per encoder
    assert report["cold"]["prior_weights"]["frozen"] == report["warm"]["frozen_prior"]["weight"]
    assert report["query_cost"]["users"] >= 1 and report["query_cost"]["p50_ms"] > 0
    qc = report["query_cost"]  # both runtimes timed in the same run, giving the same vectors
    assert set(qc["by_runtime"]) == {"onnx", "torch"} and qc["max_abs_diff"] < 1e-4
    assert all(v > 0 for v in qc["items_per_s"].values())
    assert (tmp_path / "reports" / f"embedder-{name}.png").exists()


COLD_CONTENT_ROWS = {"content, frozen encoder", "content, frozen encoder + popularity prior",
                     "content, tuned encoder, cosine only", "content, tuned encoder"}


def test_eval_embedder_cold_only_skips_the_warm_tables(tuned_tiny_index: Index, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = tuned_tiny_index.catalog.name
    result = CliRunner().invoke(app, ["eval", "embedder", "--catalog", name, "--cold-share", "0.1", "--cold-minutes",
                                      "0.2", "--bootstrap", "20", "--cold-only", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reports" / f"embedder-{name}-cold.json").read_text())
    assert "warm" not in report and "--cold-only" in report["command"]
    assert set(report["cold"]["hit@50"]) >= COLD_CONTENT_ROWS | {"fused, tuned encoder"}
    assert report["cold"]["fusion_weights"] == tuned_tiny_index.manifest.fusion.weights
    assert set(report["cold"]["prior_weights"]) == {"frozen", "tuned"}
    for encoder, weight in report["cold"]["prior_weights"].items():  # a ceiling beside each prior that is used
        ceiling = f"content, {encoder} encoder + true popularity (ceiling)"
        assert (ceiling in report["cold"]["hit@50"]) == (weight > 0), (encoder, weight)
    path = report["cold_path"]  # the cold-item path's weight, chosen on validation in the cold world
    assert [r["weight"] for r in path["grid"]] == list(COLD_GRID) and path["chosen"] in COLD_GRID
    assert path["chosen"] == choose([GridRow(**r) for r in path["grid"]])
    assert f"fused, tuned encoder + cold-item path (weight {path['chosen']:g})" in report["cold"]["hit@50"]
    assert set(path["test"]) == {"off", "on", "on_minus_off"} and path["users"]["test_cold"] >= 1
    markdown = (tmp_path / "reports" / f"embedder-{name}-cold.md").read_text()
    assert "## Cold items" in markdown and "## Warm items" not in markdown and "cosine only" in markdown
    assert "## Cold-item path" in markdown and f"![cold-item path](embedder-{name}-cold-cold-path.png)" in markdown
    assert (tmp_path / "reports" / f"embedder-{name}-cold-cold-path.png").stat().st_size > 0
    assert not (tmp_path / "reports" / f"embedder-{name}.json").exists()  # the full report is left alone


def test_cold_hits_put_a_true_popularity_ceiling_beside_each_prior_in_use(tuned_tiny_index: Index) -> None:
    from eval import embedder_eval as ee

    split = split_catalog(tuned_tiny_index.catalog, SplitSpec(ties="random", seed=0))
    cold = {split.test[0].target, split.test[1].target}
    indexes = {"tuned": ee.with_prior_weight(tuned_tiny_index, 0.07)}
    out = ee.cold_hits(indexes, split, cold, {"sequential": 1.0}, tuned_tiny_index.manifest.cf, progress=False)
    assert out["prior_weights"] == {"tuned": 0.07}
    assert {"content, tuned encoder", "content, tuned encoder, cosine only",
            "content, tuned encoder + true popularity (ceiling)"} <= set(out["hit@50"])
    none = ee.cold_hits({"tuned": ee.with_prior_weight(tuned_tiny_index, 0.0)}, split, cold, {"sequential": 1.0},
                        tuned_tiny_index.manifest.cf, progress=False)
    assert not any("ceiling" in label for label in none["hit@50"])  # no prior, nothing to give true counts to
