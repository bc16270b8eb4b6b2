"""A trained ranker on disk: a LoRA adapter folder plus ``provenance.json`` (how it was made, what it measured,
and the serving choices made on validation: alpha, window).

Where the reranker looks for a catalogue's ranker (``RECAGENT_RANKER``):
* ``auto`` (default): ``RECAGENT_HOME/rankers/<catalog>/`` (what ``recagent train ranker`` writes), else the one
  shipped in the package (``agent/ranker/shipped/<catalog>/``); a re-index or an ingest keeps it (a warning says
  when the catalogue's data changed since training); with none, the zero-shot model;
* ``zero-shot``: never a trained ranker (label scoring with the untrained model);
* a folder path: that ranker.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, Field

from agent.rerank import TrainedOrder
from retrieval.home import recagent_home

logger = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
SHIPPED = Path(__file__).parent / "shipped"
RANKER_CHOICES = ("auto", "zero-shot", "<folder>")


class RankerChoices(BaseModel):
    """Serving choices made on validation users at the end of training."""

    alpha: float = Field(ge=0.0, le=1.0, description="weight of the ranker in the final score")
    window: int = Field(ge=1, le=100, description="candidates the ranker scores (the rest keep retrieval order)")


class RankerProvenance(BaseModel):
    catalog: str
    content_hash: str
    prompt: str = Field(description="prompt template id the ranker was trained and is served with")
    order: TrainedOrder = Field(default="shuffled", description="candidate presentation order it was trained and "
                                "is served with")
    marker: str
    base_model: str
    command: str
    commit: str
    seed: int
    split: dict[str, object]
    train: dict[str, object] = Field(default_factory=dict, description="recipe, examples seen, time, speed")
    validation: dict[str, object] = Field(default_factory=dict, description="validation metrics")
    choices: RankerChoices
    created: str


class RankerArtifact(BaseModel):
    folder: Path
    provenance: RankerProvenance

    @property
    def name(self) -> str:
        return f"trained:{self.provenance.catalog}"

    @classmethod
    def load(cls, folder: Path) -> RankerArtifact:
        path = folder / PROVENANCE
        if not path.exists():
            raise FileNotFoundError(f"no ranker in {folder} (missing {PROVENANCE}); train one with "
                                    "`recagent train ranker`")
        return cls(folder=folder, provenance=RankerProvenance.model_validate(json.loads(path.read_text())))


def rankers_dir(catalog: str) -> Path:
    return recagent_home() / "rankers" / catalog


def resolve_ranker(catalog: str, content_hash: str, choice: str | None = None) -> RankerArtifact | None:
    """The trained ranker to serve for ``catalog`` (None: zero-shot), per ``RECAGENT_RANKER``."""
    choice = choice if choice is not None else (os.environ.get("RECAGENT_RANKER") or "auto")  # set but empty: auto
    if choice == "zero-shot":
        return None
    if choice != "auto":
        folder = Path(choice).expanduser()
        if not folder.is_dir():
            raise ValueError(f"RECAGENT_RANKER={choice!r} is neither a ranker folder nor one of: "
                             f"{', '.join(RANKER_CHOICES[:2])}")
        return RankerArtifact.load(folder)
    for folder in (rankers_dir(catalog), SHIPPED / catalog):
        if not (folder / PROVENANCE).exists():
            continue
        artifact = RankerArtifact.load(folder)
        if artifact.provenance.content_hash != content_hash:  # an ingest changed the data: still the best ranker
            logger.warning("ranker in %s was trained on another version of catalogue %s (hash %s, now %s); "
                           "retrain it with `recagent train ranker --catalog %s`", folder, catalog,
                           artifact.provenance.content_hash, content_hash, catalog)
        return artifact
    return None


def store_alpha(folder: str | None, alpha: float, how: str) -> Path | None:
    """Record a re-tuned alpha in a ranker's provenance (rankers under ``RECAGENT_HOME`` only; the shipped one
    is part of the package and stays as committed). Returns the file written, if any."""
    if folder is None or Path(folder).resolve().is_relative_to(SHIPPED.resolve()):
        return None
    artifact = RankerArtifact.load(Path(folder))
    record = artifact.provenance
    record.choices = record.choices.model_copy(update={"alpha": alpha})
    record.validation = {**record.validation, "alpha_retuned": {"alpha": alpha, "how": how}}
    from retrieval.catalog import atomic_write_json

    path = Path(folder) / PROVENANCE
    atomic_write_json(path, json.loads(record.model_dump_json()))
    return path
