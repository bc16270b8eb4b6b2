"""Store a catalogue with its index atomically, and fetch the built-in MovieLens-100k."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from retrieval import movielens
from retrieval.catalog import Catalog, catalog_root, list_catalogs, load_catalog, swap_in, write_catalog_tables
from retrieval.embeddings import Embedder
from retrieval.home import catalogs_dir
from retrieval.index import IndexManifest, build_index, read_manifest

logger = logging.getLogger(__name__)


def save_and_index(catalog: Catalog, embedder: Embedder | None = None, progress: bool = True) -> IndexManifest:
    """Write the catalogue and build its index in a staging folder, then replace any previous version.

    Until the final rename the previous catalogue and index stay untouched and usable; the previous Chroma
    collection is retired (see :func:`retrieval.index.build_index`), so servers still on it keep working.
    """
    final = catalog_root(catalog.name)
    old = read_manifest(final / "index")
    staging = tempfile.mkdtemp(dir=catalogs_dir(), prefix=f".staging-{catalog.name}-")
    try:
        root = Path(staging)
        write_catalog_tables(catalog, root / "catalog")
        manifest = build_index(catalog, root / "index", embedder=embedder, progress=progress, replaces=old)
        swap_in(root, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def reindex(name: str, embedder: Embedder | None = None, progress: bool = True) -> IndexManifest:
    catalog = load_catalog(name)
    assert catalog.root is not None
    return build_index(catalog, catalog.root / "index", embedder=embedder, progress=progress)


def fetch_movielens(embedder: Embedder | None = None, progress: bool = True, force: bool = False) -> Catalog:
    """Fetch, convert and index MovieLens-100k unless it is already stored (and indexed)."""
    if not force and movielens.NAME in list_catalogs():
        catalog = load_catalog(movielens.NAME)
        assert catalog.root is not None
        if read_manifest(catalog.root / "index") is None:
            reindex(movielens.NAME, embedder=embedder, progress=progress)
        return catalog
    raw = movielens.fetch_raw()
    save_and_index(movielens.convert(raw), embedder=embedder, progress=progress)
    return load_catalog(movielens.NAME)


def ensure_catalog(name: str, embedder: Embedder | None = None, progress: bool = True) -> Catalog:
    """Load a stored catalogue; MovieLens-100k is fetched when missing, others must be ingested."""
    if name == movielens.NAME:
        return fetch_movielens(embedder=embedder, progress=progress)
    catalog = load_catalog(name)
    assert catalog.root is not None
    if read_manifest(catalog.root / "index") is None:
        reindex(name, embedder=embedder, progress=progress)
    return catalog
