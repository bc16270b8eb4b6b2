"""The trained ranker: examples that never see held-out items, a real (short) LoRA training run on the tiny
catalogue, the adapter served by the in-process backend with the same scores as in training, and its
selection by ``RECAGENT_RANKER``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.ranker.artifact import PROVENANCE, resolve_ranker
from agent.ranker.examples import Example, training_examples
from agent.ranker.loop import fit_retrieval_beta
from agent.rerank import RankInput, RerankConfig, Reranker
from agent.scoring import log_odds
from cli.main import app
from retrieval.cf import CFModels
from retrieval.index import Index
from retrieval.splits import SplitSpec, split_catalog
from tests.fakes import ScriptedBackend


def test_training_examples_never_see_a_held_out_item(tiny_index: Index) -> None:
    spec = SplitSpec()
    split = split_catalog(tiny_index.catalog, spec)
    full = tiny_index.catalog.histories(spec.ties, spec.seed)
    fitted: list[dict[str, list[str]]] = []

    def spy(histories: Mapping[str, Sequence[str]]) -> CFModels:
        fitted.append({u: list(h) for u, h in histories.items()})
        return tiny_index.fit_cf(histories)

    examples, stats = training_examples(tiny_index, split.train, window=5, per_user=8, min_history=1, folds=2,
                                        fit=spy, progress=False)
    assert examples and stats.examples == len(examples)
    for e in examples:  # the query and the label are events of the training part, before both held-out events
        assert e.target is not None
        events = e.history + [e.candidates[e.target]]
        assert events == full[e.user_id][: len(events)] and len(events) <= len(full[e.user_id]) - 2
    assert len(fitted) == 2
    users_per_fit = [set(f) for f in fitted]
    for f in fitted:  # the retrievers were fitted on training parts only, never on a user's held-out events
        for user, hist in f.items():
            assert hist == split.train[user] and len(hist) <= max(1, len(full[user]) - 2)
    for e in examples:  # each example's candidates come from a retriever fitted without that user
        assert sum(e.user_id not in users for users in users_per_fit) == 1


def test_the_window_is_never_a_silent_cut() -> None:
    history = [RankInput("h", "Toy Story (1995)", "", genres=["Comedy"], year=1995)]
    candidates = [RankInput(f"c{i}", f"Film {i:02d} (1990)", "", 1.0 - i / 30, genres=["Comedy"], year=1990)
                  for i in range(12)]
    config = RerankConfig(max_candidates=5)
    answer = Reranker(ScriptedBackend(), config).rerank(history, candidates, k=8, alpha=1.0)
    ids = [i.item_id for i in answer.items]
    assert len(ids) == 8 and set(ids[:5]) == {f"c{i}" for i in range(5)}
    assert ids[5:] == ["c5", "c6", "c7"]  # past the window: retrieval order
    assert all(i.llm_score is None for i in answer.items[5:])
    assert answer.reranked == 5 and answer.note and "retrieval order" in answer.note


def test_the_retrieval_term_alone_is_fitted_as_the_line_to_beat() -> None:
    # targets sit at the top of the retrieval order: a positive beta lowers the loss below chance (ln 4)
    examples = [Example("u", ["h"], ["a", "b", "c", "d"], t, scores=(0.9, 0.5, 0.3, 0.1)) for t in (0, 0, 0, 1)]
    beta, loss = fit_retrieval_beta(examples)
    assert beta > 0 and loss < np.log(4)
    # reversed: the retrieval scores say nothing useful, beta stays 0 and the loss is chance
    flipped = [Example("u", ["h"], ["a", "b", "c", "d"], 3, scores=(0.9, 0.5, 0.3, 0.1))]
    assert fit_retrieval_beta(flipped) == (0.0, pytest.approx(np.log(4)))


def test_a_ranker_trained_in_retrieval_order_is_served_in_retrieval_order() -> None:
    history = [RankInput("h", "Toy Story (1995)", "", year=1995)]
    candidates = [RankInput(f"c{i}", f"Film {i:02d}", "", 1.0 - i / 10) for i in range(6)]
    config = RerankConfig()
    config.use_trained(None, "trained:test", "rerank_trained.v2", " §", alpha=1.0, window=6, order="retrieval")
    reranker = Reranker(ScriptedBackend(), config)
    assert reranker.marker_orders(history, candidates, perms=3) == [list(range(6))]
    request = reranker.marker_request(history, candidates, list(range(6)))
    lines = request.messages[-1]["content"].splitlines()
    assert lines[-6:] == [f'"Film {i:02d}" §' for i in range(6)]
    config.trained_order = "shuffled"
    assert sorted(reranker.marker_orders(history, candidates, perms=1)[0]) == list(range(6))


def test_marker_scorer_ranks_a_window_past_the_letters() -> None:
    history = [RankInput("h", "Toy Story (1995)", "", year=1995)]
    candidates = [RankInput(f"c{i}", f"Film {50 - i:02d}", "", 1.0 - i / 60, year=1990 + i % 10)
                  for i in range(40)]
    config = RerankConfig()
    config.use_trained(None, "trained:test", "rerank_trained.v1", " §", alpha=1.0, window=40)
    answer = Reranker(ScriptedBackend(), config).rerank(history, candidates, k=3)
    # the scripted backend prefers the line whose text sorts first: "... Film 11 ..." is candidate c39
    assert answer.items[0].item_id == "c39" and answer.reranked == 40 and answer.ranker == "trained:test"


@pytest.mark.llm
@pytest.mark.slow
def test_train_a_ranker_and_serve_it(tiny_index: Index, transformers_backend: Any, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from agent.ranker.train import RankerTrainer, TrainConfig

    out = tmp_path / "ranker"
    config = TrainConfig(window=4, windows=[3, 5], min_history=1, folds=2, max_steps=2, batch_size=2,
                         eval_every=1, val_users=4, lora_r=4, top_layers=2)
    trainer = RankerTrainer(tiny_index, transformers_backend, config, SplitSpec(), out=out, progress=False)
    provenance = trainer.run()
    saved = json.loads((out / PROVENANCE).read_text())
    assert saved["catalog"] == tiny_index.catalog.name and saved["train"]["steps"] == 2
    assert saved["choices"]["window"] in (3, 5) and saved["split"]["ties"] == "random"
    assert (out / "adapter_model.safetensors").exists()
    assert not out.with_name(f".{out.name}-checkpoint").exists()
    assert provenance.validation["users"] == 4
    assert [r["step"] for r in saved["train"]["log"]] == [0, 1, 2, 2]  # untrained, each step, final
    # the default recipe: candidates in retrieval order, the ranker trained as a correction of the retrieval term
    assert saved["prompt"] == "rerank_trained.v2" and saved["order"] == "retrieval"
    assert saved["train"]["recipe"]["objective"] == "residual" and saved["train"]["retrieval_only_loss"] > 0

    from eval.ranker_report import write_training_report

    report = write_training_report(provenance, tmp_path / "reports")
    assert "kept the adapter of step" in report.read_text() and report.with_name(
        f"ranker-{tiny_index.catalog.name}-training.png").stat().st_size > 0

    # the serving path scores exactly what training optimised
    example = trainer.validation_examples(5)[0]
    order = list(range(len(example.candidates)))[::-1]
    encoded = trainer.encode(example, order)
    base = AutoModelForCausalLM.from_pretrained(transformers_backend.model_dir, dtype=transformers_backend.dtype)
    with torch.inference_mode():
        trained = trainer.marker_scores(PeftModel.from_pretrained(base, str(out)).base_model.model, [encoded])[0]
    history = trainer.reranker.trim_history(trainer.service.history_inputs(example.history))
    request = trainer.reranker.marker_request(history, trainer.service.history_inputs(example.candidates), order)
    request.adapter = str(out)
    served = transformers_backend.score_markers(request)
    # serving merges the adapter into the (bf16) weights, training runs it beside them: the roundings differ a little,
    # the ranking they give does not
    assert np.allclose(log_odds(np.array(served)), trained.numpy(), rtol=0.05, atol=0.1)
    assert (np.argsort(log_odds(np.array(served))) == np.argsort(trained.numpy())).all()
    request.adapter = None
    assert not np.allclose(transformers_backend.score_markers(request), served, atol=1e-5)  # the adapter is applied

    # RECAGENT_RANKER picks it; the reranker then scores with the adapter, window and alpha chosen for it
    monkeypatch.setenv("RECAGENT_RANKER", str(out))
    rerank = RerankConfig.load(tiny_index)
    assert rerank.scorer == "markers" and rerank.adapter == str(out)
    assert rerank.max_candidates == saved["choices"]["window"] and rerank.alpha("score") == saved["choices"]["alpha"]
    monkeypatch.setenv("RECAGENT_RANKER", "zero-shot")
    assert RerankConfig.load(tiny_index).scorer == "labels"

    # `eval rerank` with that ranker: its window, alpha re-tuned on validation and kept with the ranker, and the
    # zero-shot model measured on the same users in the same run
    monkeypatch.chdir(tmp_path)  # reports/ is written to the working directory
    result = CliRunner().invoke(app, ["eval", "rerank", "--catalog", tiny_index.catalog.name, "--ranker", str(out),
                                      "--users", "3", "--bias-users", "0", "--tune", "--compare-zero-shot", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reports" / f"rerank-{tiny_index.catalog.name}-score.json").read_text())
    assert report["notes"]["ranker"] == f"trained:{tiny_index.catalog.name}"
    assert report["notes"]["prompt"] == "rerank_trained.v2" and report["notes"]["candidates"] == rerank.max_candidates
    assert {"validation", "test"} <= set(report["zero_shot"]) and "alpha_grid" in report
    retuned = json.loads((out / PROVENANCE).read_text())
    assert retuned["choices"]["alpha"] == report["alpha"] and "alpha_retuned" in retuned["validation"]

    # tuning generate mode (which the trained ranker does not serve) keeps the ranker's alpha and stores the
    # generate alpha with the zero-shot choices
    result = CliRunner().invoke(app, ["eval", "rerank", "--catalog", tiny_index.catalog.name, "--ranker", str(out),
                                      "--mode", "generate", "--users", "3", "--bias-users", "0", "--tune", "--json"])
    assert result.exit_code == 0, result.output
    generate = json.loads((tmp_path / "reports" / f"rerank-{tiny_index.catalog.name}-generate.json").read_text())
    assert json.loads((out / PROVENANCE).read_text())["choices"] == retuned["choices"]
    stored = RerankConfig.stored_tuning(tiny_index)
    assert stored.modes["generate"].tuned and stored.modes["generate"].alpha == generate["alpha"]
    assert "score" not in stored.modes or not stored.modes["score"].tuned  # the ranker's alpha is not copied


def test_ranker_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.ranker.artifact import RankerChoices, RankerProvenance

    monkeypatch.setenv("RECAGENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECAGENT_RANKER", raising=False)
    assert resolve_ranker("nothing-here", "abc") is None
    with pytest.raises(ValueError, match="zero-shot"):
        resolve_ranker("x", "abc", choice=str(tmp_path / "missing"))
    folder = tmp_path / "home" / "rankers" / "cat"
    folder.mkdir(parents=True)
    record = RankerProvenance(catalog="cat", content_hash="abc", prompt="rerank_trained.v1", marker=" §",
                              base_model="m", command="recagent train ranker", commit="x", seed=0, split={},
                              choices=RankerChoices(alpha=0.3, window=30), created="now")
    (folder / PROVENANCE).write_text(record.model_dump_json())
    found = resolve_ranker("cat", "abc")
    assert found is not None and found.folder == folder and found.provenance.choices.window == 30
    assert resolve_ranker("cat", "other-version") == found  # an ingest since training keeps it (with a warning)
    assert resolve_ranker("cat", "abc", choice="zero-shot") is None
    assert resolve_ranker("cat", "abc", choice=str(folder)) == found
    monkeypatch.setenv("RECAGENT_RANKER", "")  # set but empty: the default (auto), not the folder "."
    assert resolve_ranker("cat", "abc") == found


def test_log_odds_has_no_ceiling_and_agrees_across_numpy_and_torch() -> None:
    import torch

    logp = np.log(np.array([0.5, 0.9, 0.999999, 1e-6]))
    odds = log_odds(logp)
    assert np.allclose(odds[:2], [0.0, np.log(9.0)]) and odds[2] > 13 and odds[3] < -13
    assert np.allclose(log_odds(torch.tensor(logp)).numpy(), odds, atol=1e-4)
    assert np.isfinite(log_odds(np.array([0.0]))).all()  # a certain marker stays finite


@pytest.mark.llm
def test_the_gguf_reader_gives_the_served_weights_bit_for_bit(transformers_backend: Any) -> None:
    # what a training machine with another transformers release loads is exactly what is served here
    from safetensors.torch import load_file

    from agent.llm.gguf_state import gguf_state_dict
    from agent.llm.model_files import source_gguf

    gguf = source_gguf(Path(transformers_backend.model_dir))
    assert gguf is not None and gguf.stat().st_size < 0.5 * (Path(transformers_backend.model_dir)
                                                            / "model.safetensors").stat().st_size
    served = load_file(str(Path(transformers_backend.model_dir) / "model.safetensors"))
    read = gguf_state_dict(gguf)
    assert set(read) == set(served)
    assert all(read[k].dtype == served[k].dtype and bool((read[k] == served[k]).all()) for k in served)
    assert source_gguf(Path("/elsewhere/some-model")) is None


@pytest.mark.llm
@pytest.mark.slow
def test_a_ranker_trained_on_another_machine_from_an_export(tiny_index: Index, transformers_backend: Any,
                                                             tmp_path: Path) -> None:
    from agent.ranker import accelerated
    from agent.ranker.train import RankerTrainer, TrainConfig

    out = tmp_path / "ranker"
    config = TrainConfig(window=4, windows=[3, 5], min_history=1, folds=2, batch_size=2, eval_every=1, val_users=4,
                         lora_r=4, top_layers=2)
    trainer = RankerTrainer(tiny_index, transformers_backend, config, SplitSpec(), out=out, progress=False)
    export = trainer.export(tmp_path / "export")
    recipe = json.loads((export / accelerated.RECIPE).read_text())
    assert (export / recipe["base"]["gguf"]).exists() and (export / "config" / "config.json").exists()
    assert recipe["content_hash"] == tiny_index.manifest.content_hash and len(recipe["val_users"]) == 4

    # the training machine needs none of the serving stack: the entry point imports the loop and the GGUF reader
    probe = ("import sys, agent.ranker.accelerated, agent.llm.gguf_state; print(sorted({m.split('.')[0] for m in "
             "sys.modules} & {'pydantic', 'chromadb', 'langchain_core', 'retrieval', 'fastapi', 'prompts', "
             "'sentence_transformers', 'onnxruntime'}))")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"

    run = tmp_path / "run"
    with pytest.raises(SystemExit):  # not an export: argparse names what is missing
        accelerated.main([str(tmp_path), str(run)])
    assert accelerated.main([str(export), str(run), "--max-steps", "2", "--device", "cpu", "--quiet",
                             "--lora-r", "2", "--targets", "q_proj,k_proj,v_proj"]) == 0
    record = json.loads((run / accelerated.RUN_RECORD).read_text())
    assert record["result"]["steps"] == 2 and record["recipe"]["lora"]["r"] == 2
    provenance = trainer.finish_from(run)
    saved = json.loads((out / PROVENANCE).read_text())
    assert saved["train"]["steps"] == 2 and saved["train"]["recipe"]["lora_r"] == 2
    assert saved["train"]["recipe"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert "cpu" in saved["train"]["trained_on"] and (out / "adapter_model.safetensors").exists()
    assert provenance.choices.window in (3, 5) and provenance.validation["users"] == 4

    # a run made from other data is refused, nothing installed from it
    record["recipe"]["content_hash"] = "another"
    (run / accelerated.RUN_RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="another version"):
        trainer.finish_from(run)
    with pytest.raises(ValueError, match="run.json"):
        trainer.finish_from(tmp_path)
