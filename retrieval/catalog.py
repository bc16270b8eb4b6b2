"""The internal catalogue: items, interactions and (optionally) users of one named data set.

On disk a catalogue is a folder ``RECAGENT_HOME/catalogs/<name>/`` holding ``catalog/`` (parquet tables and a
manifest) and ``index/`` (what ``retrieval.index`` builds). A new version is always written to a staging folder
and swapped in by rename, so a failed ingest or build never damages the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from retrieval.home import catalogs_dir
from retrieval.provenance import utc_now

ITEM_COLUMNS = ["item_id", "title", "description", "genres", "year", "metadata"]
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "rating"]
DEFAULT_CATALOG = "movielens-100k"
CATALOG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}")
TIE_RULES = ("id", "random")  # how a user's events with equal timestamps are ordered; "random" is the default


def check_ties(ties: str) -> str:
    """``ties`` if it is a known tie rule, else a ValueError naming the choices."""
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule '{ties}'; choose one of: {', '.join(TIE_RULES)}")
    return ties


def describe_order(ties: str, seed: int) -> str:
    """How ``histories(ties, seed)`` orders each user's events, in words for reports."""
    if check_ties(ties) == "id":
        return "per user by time, ties in time broken by item id (catalogue order)"
    return f"per user by time, ties in time broken by seeded random order (seed {seed})"


def tie_keys(interactions: pd.DataFrame, seed: int) -> np.ndarray:
    """A pseudo-random sort key per interaction that depends only on (seed, user_id, item_id): reproducible and
    independent of file order."""
    hash_key = hashlib.sha256(f"recagent-ties:{seed}".encode()).hexdigest()[:16]  # pandas wants 16 bytes
    pairs = interactions[["user_id", "item_id"]].astype(str)
    return pd.util.hash_pandas_object(pairs, index=False, hash_key=hash_key).to_numpy()


class CatalogNotFoundError(LookupError):
    def __init__(self, name: str, available: Sequence[str]) -> None:
        choices = ", ".join(available) or "none yet"
        super().__init__(
            f"catalogue '{name}' does not exist (available: {choices}); "
            f"run `recagent data fetch movielens-100k` or `recagent ingest --name {name} ...`"
        )
        self.name = name


@dataclass
class Catalog:
    """Items, interactions and users of one catalogue, with id <-> position lookups."""

    name: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame | None = None
    root: Path | None = None
    _histories: dict[tuple[str, int], dict[str, list[str]]] = field(default_factory=dict, repr=False)

    @cached_property
    def item_ids(self) -> list[str]:
        return [str(x) for x in self.items["item_id"].tolist()]

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {item_id: pos for pos, item_id in enumerate(self.item_ids)}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item(self, item_id: str) -> dict[str, object]:
        pos = self.item_index[item_id]
        row = self.items.iloc[pos]
        return {
            "item_id": item_id,
            "title": str(row["title"]),
            "description": str(row["description"] or ""),
            "genres": list(row["genres"]),
            "year": None if pd.isna(row["year"]) else int(row["year"]),
            "metadata": json.loads(row["metadata"] or "{}"),
        }

    def has_item(self, item_id: str) -> bool:
        return item_id in self.item_index

    @cached_property
    def genres_by_pos(self) -> list[list[str]]:
        return [list(g) for g in self.items["genres"].tolist()]

    @cached_property
    def years_by_pos(self) -> np.ndarray:
        return self.items["year"].astype("float64").fillna(np.nan).to_numpy()

    @cached_property
    def titles_by_pos(self) -> list[str]:
        return [str(t) for t in self.items["title"].tolist()]

    @cached_property
    def genre_matrix(self) -> np.ndarray:
        """Bool genre x position matrix, rows in ``all_genres`` order: built once, so that filters are numpy
        operations rather than loops over the catalogue."""
        row = {g: i for i, g in enumerate(self.all_genres)}
        matrix = np.zeros((len(row), self.n_items), dtype=bool)
        pairs = [(row[g], pos) for pos, gs in enumerate(self.genres_by_pos) for g in gs]
        if pairs:
            rows, cols = np.asarray(pairs, dtype=np.int64).T
            matrix[rows, cols] = True
        return matrix

    @cached_property
    def genre_masks(self) -> dict[str, np.ndarray]:
        """Each genre's row of ``genre_matrix``: True at the positions of items having that genre."""
        return dict(zip(self.all_genres, self.genre_matrix, strict=True))

    @cached_property
    def all_genres(self) -> list[str]:
        return sorted({g for gs in self.genres_by_pos for g in gs})

    def sorted_interactions(self, ties: str = "random", seed: int = 0) -> pd.DataFrame:
        """Interactions ordered per user by time. Equal timestamps (MovieLens stores ratings in batches that share
        one) are ordered by ``ties``: "id" by the item's catalogue position, "random" by a seeded pseudo-random
        key of (seed, user, item)."""
        df = self.interactions.copy()
        if check_ties(ties) == "id":
            df["_tie"] = df["item_id"].map(self.item_index)
        else:
            df["_tie"] = tie_keys(df, seed)
        df = df.sort_values(["user_id", "timestamp", "_tie"], kind="mergesort")
        return df.drop(columns="_tie").reset_index(drop=True)

    def histories(self, ties: str = "random", seed: int = 0) -> dict[str, list[str]]:
        """Each user's item ids in time order, ties in time broken by ``ties`` (see ``sorted_interactions``)."""
        key = (check_ties(ties), seed)
        if key not in self._histories:
            df = self.sorted_interactions(ties, seed)
            self._histories[key] = {str(u): [str(i) for i in g["item_id"]]
                                    for u, g in df.groupby("user_id", sort=False)}
        return self._histories[key]

    def user_history(self, user_id: str) -> list[str]:
        hist = self.histories().get(str(user_id))
        if hist is None:
            raise KeyError(f"user '{user_id}' has no interactions in catalogue '{self.name}'")
        return hist

    def content_hash(self) -> str:
        """sha256 prefix of the items and interactions as values, not as in-memory types: a catalogue hashes the same
        fresh from a converter (genres as lists) and read back from parquet (genres as arrays)."""
        digest = hashlib.sha256()
        for frame in (self.items, self.interactions):
            canonical = frame.apply(lambda column: column.map(_canonical_cell))
            digest.update(pd.util.hash_pandas_object(canonical, index=False).to_numpy().tobytes())
        return digest.hexdigest()[:16]


def _canonical_cell(value: object) -> str:
    """One table cell as text that does not depend on how it was loaded: sequences (a list, a tuple, a numpy array)
    as a JSON list of their elements' text, missing values as ""."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return json.dumps([_canonical_cell(v) for v in value])
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


class InvalidCatalogNameError(ValueError):
    pass


def check_catalog_name(name: str, where: str = "catalogue name") -> str:
    """``name`` if it is safe as a folder and file name (it becomes both), else a clear error naming ``where``."""
    if not isinstance(name, str) or not CATALOG_NAME.fullmatch(name) or ".." in name:
        raise InvalidCatalogNameError(
            f"{where} {name!r}: use letters, digits, '.', '_' or '-' (at most 60 characters, starting with a letter "
            "or digit, no '..')"
        )
    return name


def catalog_root(name: str) -> Path:
    return catalogs_dir() / check_catalog_name(name)


def list_catalogs() -> list[str]:
    return sorted(p.name for p in catalogs_dir().iterdir() if p.is_dir() and not p.name.startswith("."))


def write_catalog_tables(catalog: Catalog, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    catalog.items.to_parquet(folder / "items.parquet", index=False)
    catalog.interactions.to_parquet(folder / "interactions.parquet", index=False)
    if catalog.users is not None:
        catalog.users.to_parquet(folder / "users.parquet", index=False)
    manifest = {
        "name": catalog.name,
        "n_items": int(len(catalog.items)),
        "n_interactions": int(len(catalog.interactions)),
        "n_users": int(catalog.interactions["user_id"].nunique()),
        "content_hash": catalog.content_hash(),
        "created": utc_now(),
    }
    atomic_write_json(folder / "manifest.json", manifest)


def load_catalog(name: str = DEFAULT_CATALOG) -> Catalog:
    root = catalog_root(name)
    folder = root / "catalog"
    if not (folder / "manifest.json").exists():
        raise CatalogNotFoundError(name, list_catalogs())
    users_path = folder / "users.parquet"
    return Catalog(
        name=name,
        items=pd.read_parquet(folder / "items.parquet"),
        interactions=pd.read_parquet(folder / "interactions.parquet"),
        users=pd.read_parquet(users_path) if users_path.exists() else None,
        root=root,
    )


def atomic_write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` with renames; the old folder is removed only after the swap."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}-{time.time_ns()}")
        final.rename(old)
    try:
        staging.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
