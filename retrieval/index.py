"""Build, store and load a catalogue's retrieval index (Chroma collection + CF models + fusion weights)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from retrieval.catalog import Catalog, atomic_write_json, swap_in
from retrieval.cf import CFConfig, CFModels, fit_cf
from retrieval.embeddings import Embedder
from retrieval.encoder import SHIPPED, EncoderRef, learned_fusion_of, make_embedder, resolve_encoder, user_vector_fn
from retrieval.filter_blocks import FilterBlocks
from retrieval.filters import genre_key
from retrieval.item_text import item_text
from retrieval.learned_fusion import LearnedFusion, LearnedRetriever
from retrieval.provenance import utc_now
from retrieval.retriever import RETRIEVERS, BlendRetriever
from retrieval.sasrec import WEIGHTS_FILE, SASRecConfig, histories_digest, shipped_sasrec
from retrieval.sources import (
    AlsSource,
    ContentSource,
    EaseSource,
    PopularitySource,
    SasrecSource,
    SequentialSource,
    SlitSource,
    Source,
    popularity_prior,
)
from retrieval.vector_store import ItemVectorStore, delete_collection, make_client

logger = logging.getLogger(__name__)

# a fresh index's weights: tuned on ML-100k validation (random ties, seed 0; with EASE lambda 30, CFConfig's
# default) by `recagent eval retrieval --tune`, which re-tunes both for any catalogue and stores them with its index
DEFAULT_WEIGHTS = {"sequential": 1.0, "ease": 0.5, "content": 0.2, "mostpop": 0.1}


# ML-100k, seeded random ties: validation with 10% of the items (seeded) removed from every history and a cold
# encoder trained without them (reports/embedder-movielens-100k.md, "Cold-item path", eval.cold_path.choose): the best
# Recall@50 over all 943 validation users among the weights within 1e-4 of the best NDCG@10 (0, .5 and 1 tie there;
# 1.5 costs .0007). Test, same world: Recall@50 +.004 [+.001, +.010], NDCG@10 +.000, cold items hit@50 .000 -> .039.
COLD_WEIGHT = 0.5


class FusionConfig(BaseModel):
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    pool: int = Field(default=200, ge=10, description="items each source contributes before fusion")
    cold: float = Field(default=COLD_WEIGHT, ge=0, description=(
        "the cold-item path: weight added to the content source's for items no one has interacted with yet, so a "
        "history-only request can bring up a new item (0: off). Chosen on validation with 10% of the items made "
        "cold by `recagent eval embedder`; `eval retrieval --tune` keeps it (its validation holds too few cold "
        "targets to choose it)"))
    tuned: bool = False
    tuned_on: str | None = None
    learned: LearnedFusion | None = Field(
        default=None, description="the learned fusion ranker (retrieval.learned_fusion), where it beat these weights "
        "on validation: the fused retriever then ranks with it",
    )


RETIRE_GRACE_S = 600.0  # how long a replaced collection stays queryable for servers still on the old index


class RetiredCollection(BaseModel):
    name: str
    at: float = Field(description="when it was replaced (unix time)")


class IndexManifest(BaseModel):
    catalog: str
    content_hash: str
    collection: str
    embed_model: str
    encoder: EncoderRef = Field(default_factory=EncoderRef, description="frozen or tuned (which checkpoint)")
    dim: int
    built_at: str
    build_seconds: float
    build_phases: dict[str, float] = Field(default_factory=dict, description="seconds spent embedding "
                                           "(embed_s), filling Chroma (vector_store_s) and fitting CF (cf_s)")
    cf: CFConfig = Field(default_factory=CFConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    retired: list[RetiredCollection] = Field(
        default_factory=list, description="collections of earlier builds, removed once RETIRE_GRACE_S has passed "
        "(running servers move to this index within their watch interval)",
    )


def purge_retired(manifest: IndexManifest, client: Any, grace_s: float = RETIRE_GRACE_S) -> list[str]:
    """Delete the retired collections older than ``grace_s``; their names (deleting twice is harmless)."""
    now = time.time()
    gone = [r.name for r in manifest.retired if now - r.at >= grace_s and r.name != manifest.collection]
    for name in gone:
        delete_collection(client, name)
    if gone:
        logger.info("retired collections deleted catalog=%s names=%s", manifest.catalog, gone)
    return gone


class IndexNotBuiltError(LookupError):
    def __init__(self, catalog: str) -> None:
        super().__init__(f"catalogue '{catalog}' has no index yet; run `recagent index --catalog {catalog}`")


def item_texts(catalog: Catalog) -> list[str]:
    return [item_text(r["title"], None if r["year"] is None or r["year"] != r["year"] else int(r["year"]),
                      list(r["genres"]), r["description"] or "")
            for r in catalog.items.to_dict("records")]


def item_metadata(catalog: Catalog, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    """Chroma metadata of items ``start:stop`` (title, year, one flag per genre for ``where`` filters); built per
    batch, as a million items' dicts would take gigabytes."""
    genres = catalog.all_genres
    out = []
    window = slice(start, stop)
    for item_id, title, item_genres, year in zip(catalog.item_ids[window], catalog.titles_by_pos[window],
                                                 catalog.genres_by_pos[window], catalog.years_by_pos[window],
                                                 strict=True):
        meta: dict[str, Any] = {"item_id": item_id, "title": title[:200],
                                "year": -1 if np.isnan(year) else int(year)}
        meta.update({genre_key(g): g in item_genres for g in genres})
        out.append(meta)
    return out


def position_histories(catalog: Catalog, histories: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    idx = catalog.item_index
    return {u: [idx[i] for i in h] for u, h in histories.items()}


def build_index(catalog: Catalog, dest: Path, embedder: Embedder | None = None, progress: bool = True,
                fusion: FusionConfig | None = None, encoder: EncoderRef | None = None,
                grace_s: float = RETIRE_GRACE_S, replaces: IndexManifest | None = None) -> IndexManifest:
    """Build into a staging folder beside ``dest`` and swap it in. The old collection is retired, not deleted:
    running servers keep querying it until they load the new index (they watch the manifest), and it goes once
    ``grace_s`` has passed (by a later build, or a server that has moved on). ``replaces``: the index being
    replaced when ``dest`` is a fresh folder (a whole catalogue swapped in at once).

    The encoder is ``encoder``, else the frozen one when an ``embedder`` is given, else the one
    ``RECAGENT_ENCODER`` chooses for the catalogue (its tuned encoder when it has one)."""
    start = time.perf_counter()
    if encoder is None:
        encoder = (EncoderRef(name=embedder.name, precision=embedder.precision) if embedder is not None
                   else resolve_encoder(catalog.name))
    if embedder is None or embedder.name != encoder.name:
        embedder = make_embedder(encoder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-staging-"))
    client = make_client()
    collection = f"rc-{catalog.name}-{uuid.uuid4().hex[:8]}"[:60]
    old_manifest = read_manifest(dest)
    phases: dict[str, float] = {}
    try:
        clock = time.perf_counter()
        vectors = embedder.embed(item_texts(catalog), progress=progress)
        np.save(staging / "item_vectors.npy", vectors)
        phases["embed_s"] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        store = ItemVectorStore(client, collection, embedder, create=True,
                                metadata={"encoder": encoder.name, "checkpoint": encoder.checkpoint or "frozen"})
        store.add(catalog.item_ids, vectors, lambda a, b: item_metadata(catalog, a, b), progress=progress)
        phases["vector_store_s"] = round(time.perf_counter() - clock, 2)
        if store.count() != catalog.n_items:
            raise RuntimeError(f"Chroma holds {store.count()} items, expected {catalog.n_items}")
        fusion, cf_config = fusion_for(encoder, old_manifest, fusion)
        retired = []
        previous = old_manifest or replaces
        if previous is not None:
            retired = [r for r in previous.retired if time.time() - r.at < grace_s]
            if previous.collection != collection:
                retired.append(RetiredCollection(name=previous.collection, at=time.time()))
        clock = time.perf_counter()
        histories = position_histories(catalog, catalog.histories())
        shipped = shipped_sasrec(SHIPPED / catalog.name, histories_digest(histories, catalog.n_items),
                                 cf_config.sasrec_epochs, cf_config.sasrec, catalog.n_items,
                                 sasrec_init(encoder, cf_config.sasrec))
        if shipped is not None:
            logger.info("SASRec: the model shipped for %s (same histories and settings), not trained again",
                        catalog.name)
        cf = fit_cf(histories, catalog.n_items, cf_config, progress=progress, sasrec=shipped, item_vectors=vectors)
        cf.save(staging)
        phases["cf_s"] = round(time.perf_counter() - clock, 2)
        cf_config, fusion = cf.config, collaborative_weights(fusion, cf.config)
        manifest = IndexManifest(
            catalog=catalog.name, content_hash=catalog.content_hash(), collection=collection,
            embed_model=embedder.name, encoder=encoder, dim=int(vectors.shape[1]),
            built_at=utc_now(),
            build_seconds=round(time.perf_counter() - start, 2), build_phases=phases, cf=cf_config,
            fusion=fusion, retired=retired,
        )
        atomic_write_json(staging / "manifest.json", manifest.model_dump(mode="json"))
        swap_in(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        delete_collection(client, collection)
        raise
    if previous is not None:  # what an earlier build retired and no server can still be using
        purge_retired(previous.model_copy(update={"collection": collection}), client, grace_s)
    logger.info("index built catalog=%s items=%d seconds=%.1f", catalog.name, catalog.n_items,
                manifest.build_seconds)
    return manifest


def sasrec_init(encoder: EncoderRef, config: SASRecConfig) -> str:
    """Names the item vectors SASRec's item embeddings start from (a shipped model's match): the encoder, tuned
    ones by their checkpoint; "none" for GPT-2's random init."""
    return (encoder.checkpoint or encoder.name) if config.init_scale > 0 else "none"


def fusion_for(encoder: EncoderRef, old: IndexManifest | None,
               fusion: FusionConfig | None = None) -> tuple[FusionConfig, CFConfig]:
    """The fusion weights and CF config of a new index: the previous index's when it used the same encoder, else
    those tuned with the encoder (kept in its provenance), else the previous index's or the defaults."""
    cf = old.cf if old else CFConfig()
    if fusion is not None:
        return fusion, cf
    if old is not None and old.encoder.name == encoder.name:
        return old.fusion, cf
    if encoder.fusion is not None:
        if encoder.ease_lambda is not None:
            cf = cf.model_copy(update={"ease_lambda": encoder.ease_lambda})
        if encoder.ease_decay is not None:
            cf = cf.model_copy(update={"ease_decay": encoder.ease_decay})
        if encoder.sasrec_epochs is not None:
            cf = cf.model_copy(update={"sasrec_epochs": encoder.sasrec_epochs})
        learned = learned_fusion_of(encoder)
        return FusionConfig(weights=dict(encoder.fusion), tuned=True,
                            tuned_on=f"validation, with encoder {encoder.name}",
                            learned=LearnedFusion.model_validate(learned) if learned else None), cf
    return (old.fusion if old else FusionConfig()), cf


def collaborative_weights(fusion: FusionConfig, cf: CFConfig) -> FusionConfig:
    """The fusion weights for the collaborative model fitted: tuned or default weights name "ease"; a catalogue
    past EASE's size gets ALS in its place, with the same weight (until `eval retrieval --tune` re-tunes it)."""
    weights = dict(fusion.weights)
    have, other = ("als", "ease") if cf.fitted == "als" else ("ease", "als")
    if other in weights:
        weights[have] = weights.get(have, 0.0) + weights.pop(other)
    learned = fusion.learned
    if learned is not None and other in learned.sources:  # its features name the model no longer fitted
        logger.warning("learned fusion dropped: it reads %s, and %s is fitted now; the weights rank until "
                       "`recagent eval retrieval --tune` re-tunes", other, have)
        learned = None
    if weights == fusion.weights and learned is fusion.learned:
        return fusion
    return fusion.model_copy(update={"weights": weights, "learned": learned})


def read_manifest(folder: Path) -> IndexManifest | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    return IndexManifest.model_validate(json.loads(path.read_text()))


def save_fusion(folder: Path, fusion: FusionConfig) -> None:
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no index manifest in {folder}")
    manifest.fusion = fusion
    atomic_write_json(folder / "manifest.json", manifest.model_dump(mode="json"))


def save_cf(folder: Path, catalog: Catalog, config: CFConfig) -> None:
    """Refit the index's CF models on the catalogue's histories with ``config`` (e.g. a tuned EASE lambda) and
    store them with the config in the manifest, so that serving and later rebuilds use it."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no index manifest in {folder}")
    cf = fit_cf(position_histories(catalog, catalog.histories()), catalog.n_items, config,
                item_vectors=np.load(folder / "item_vectors.npy"))
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".cf-"))
    try:
        cf.save(staging)
        if cf.ease is None:
            (folder / "ease.npy").unlink(missing_ok=True)
        if cf.als_items is None:
            (folder / "als_items.npy").unlink(missing_ok=True)
        if cf.sasrec is None:
            (folder / WEIGHTS_FILE).unlink(missing_ok=True)
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.cf = cf.config
    manifest.fusion = collaborative_weights(manifest.fusion, cf.config)
    atomic_write_json(folder / "manifest.json", manifest.model_dump(mode="json"))


@dataclass
class Index:
    """A loaded index: build retrievers by name, optionally over CF models fitted on other histories."""

    catalog: Catalog
    manifest: IndexManifest
    store: ItemVectorStore
    item_vectors: np.ndarray
    cf: CFModels
    embedder: Embedder

    def embed_text(self, text: str) -> np.ndarray:
        return self.embedder.embed([text])[0]

    @cached_property
    def user_vector(self) -> Callable[[Sequence[int]], np.ndarray] | None:
        """History positions -> the tuned encoder's user vector (None with the frozen encoder)."""
        return user_vector_fn(self.manifest.encoder, self.embedder, item_texts(self.catalog))

    @cached_property
    def filter_blocks(self) -> FilterBlocks:
        """Per-filter blocks of item vectors, shared by every retriever of this index (used past the size scored
        in memory whole: ``retrieval.filter_blocks``)."""
        return FilterBlocks(self.item_vectors)

    def content_prior(self, cf: CFModels) -> np.ndarray | None:
        """The tuned encoder's popularity prior over items, from ``cf``'s counts (None without one); an item ``cf``
        has never seen gets the mean prior of its nearest seen items by this index's item vectors
        (:func:`~retrieval.sources.popularity_prior`)."""
        weight = self.manifest.encoder.prior_weight
        return popularity_prior(cf.popularity, weight, self.item_vectors) if weight > 0 else None

    def sources(self, cf: CFModels | None = None) -> dict[str, Source]:
        cf = cf or self.cf
        sources: dict[str, Source] = {
            "mostpop": PopularitySource(cf),
            "sequential": SequentialSource(cf),
            "content": ContentSource(self.store, self.item_vectors, self.catalog.item_index, self.embed_text,
                                     user_vector=self.user_vector, prior=self.content_prior(cf),
                                     blocks=self.filter_blocks),
        }
        if cf.ease is not None:
            sources["ease"] = EaseSource(cf)
        if cf.als_items is not None:
            sources["als"] = AlsSource(cf)
        if cf.slit is not None:
            sources["slit"] = SlitSource(cf)
        if cf.sasrec is not None:
            sources["sasrec"] = SasrecSource(cf)
        return sources

    def retriever(self, name: str = "fused", cf: CFModels | None = None,
                  weights: Mapping[str, float] | None = None, cold: float | None = None) -> BlendRetriever:
        """The retriever ``name`` (one of :data:`RETRIEVERS`) over ``cf`` (default: the index's CF models); for
        "fused", ``weights`` and ``cold`` (the cold-item weight) default to the manifest's."""
        if name not in RETRIEVERS:
            raise ValueError(f"unknown retriever '{name}'; choose one of: {', '.join(RETRIEVERS)}")
        cf = cf or self.cf
        sources = self.sources(cf)
        learned = self.manifest.fusion.learned
        if name == "fused" and weights is None and learned is not None:
            return LearnedRetriever(self.catalog, sources, learned, popularity=cf.popularity,
                                    pool=self.manifest.fusion.pool)
        if name == "fused":
            chosen = dict(weights if weights is not None else self.manifest.fusion.weights)
            chosen = {n: w for n, w in chosen.items() if n in sources}
        else:
            if name not in sources:
                raise ValueError(f"retriever '{name}' is not available for catalogue '{self.catalog.name}'")
            chosen = {name: 1.0}
        return BlendRetriever(self.catalog, sources, chosen, popularity=cf.popularity,
                              pool=self.manifest.fusion.pool,
                              cold=(self.manifest.fusion.cold if cold is None else cold) if name == "fused" else 0.0)

    def fit_cf(self, histories: Mapping[str, Sequence[str]], config: CFConfig | None = None,
               sasrec: Any = None) -> CFModels:
        """CF models fitted on ``histories`` with ``config`` (default: the manifest's); ``sasrec``: a SASRec model
        already trained on them with that config (see :func:`retrieval.cf.fit_cf`)."""
        return fit_cf(position_histories(self.catalog, histories), self.catalog.n_items, config or self.manifest.cf,
                      sasrec=sasrec, item_vectors=self.item_vectors)


def load_index(catalog: Catalog, embedder: Embedder | None = None, folder: Path | None = None) -> Index:
    """The catalogue's index (or the one built in ``folder``), queried with the encoder its manifest names."""
    if folder is None:
        assert catalog.root is not None, "load_index needs a stored catalogue"
        folder = catalog.root / "index"
    manifest = read_manifest(folder)
    if manifest is None:
        raise IndexNotBuiltError(catalog.name)
    if embedder is None or embedder.name != manifest.encoder.name:
        embedder = make_embedder(manifest.encoder)  # the encoder that made the vectors embeds the queries
    store = ItemVectorStore(make_client(), manifest.collection, embedder)
    return Index(catalog=catalog, manifest=manifest, store=store,
                 item_vectors=np.load(folder / "item_vectors.npy"),
                 cf=CFModels.load(folder, manifest.cf), embedder=embedder)
