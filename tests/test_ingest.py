"""`recagent ingest` and retrieval.ingest: every bad input exits 2 naming file, row and column; replacing a
catalogue is atomic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from retrieval.catalog import Catalog, catalogs_dir, load_catalog
from retrieval.catalog_store import save_and_index
from retrieval.embeddings import Embedder
from retrieval.index import load_index, purge_retired, read_manifest
from retrieval.ingest import CatalogInputError, read_catalog
from retrieval.vector_store import make_client

if TYPE_CHECKING:
    from conftest import TinyCatalogFiles

GOOD_ITEMS = "item_id,title,genres,year\ni1,Alpha,Drama|Crime,1990\ni2,Beta,Comedy,1991\ni3,Gamma,Drama,\n"
GOOD_INTERACTIONS = "user_id,item_id,timestamp\nu1,i1,10\nu1,i2,20\nu2,i3,30\n"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def flat(text: str) -> str:
    return " ".join(text.split())


def cli(*args: str | Path) -> Result:
    # a wide console so rich does not wrap the message
    return CliRunner(env={"COLUMNS": "4000"}).invoke(app, [str(a) for a in args])


def ingest_cli(name: str, items: Path, interactions: Path, *extra: str) -> Result:
    return cli("ingest", "--name", name, "--items", items, "--interactions", interactions, *extra)


def expect_error(tmp_path: Path, items: Path, interactions: Path, file: Path, row: int | None,
                 column: str | None, fragment: str, line: int | None = None) -> CatalogInputError:
    """Both ways in: read_catalog raises a located CatalogInputError, and the CLI exits 2 saying the same."""
    with pytest.raises(CatalogInputError) as info:
        read_catalog("bad", items, interactions)
    err = info.value
    assert (err.file, err.row, err.column) == (str(file), row, column)
    if line is not None:
        assert err.line == line
    assert fragment in str(err)

    result = ingest_cli("bad-input", items, interactions)
    assert result.exit_code == 2, result.output
    message = flat(result.output)
    assert str(file) in message
    if row is not None:
        assert f"row {row}" in message
    if line is not None:
        assert f"line {line}" in message
    if column is not None:
        assert f"column '{column}'" in message
    assert fragment in message
    assert not (catalogs_dir() / "bad-input").exists()
    return err


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, Path]:
    return write(tmp_path / "items.csv", GOOD_ITEMS), write(tmp_path / "interactions.csv", GOOD_INTERACTIONS)


# --- bad input ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path, good: tuple[Path, Path]) -> None:
    missing = tmp_path / "nope" / "items.csv"
    expect_error(tmp_path, missing, good[1], missing, None, None, "file not found")


def test_missing_column(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "no-title.csv", "item_id,name\ni1,Alpha\n")
    err = expect_error(tmp_path, items, good[1], items, None, "title", "missing required column(s) title")
    assert "found: item_id, name" in str(err)


def test_missing_interaction_column(tmp_path: Path, good: tuple[Path, Path]) -> None:
    inter = write(tmp_path / "inter.csv", "user,item_id\nu1,i1\n")
    expect_error(tmp_path, good[0], inter, inter, None, "user_id", "missing required column(s) user_id")


def test_empty_file(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "empty.csv", "")
    expect_error(tmp_path, items, good[1], items, None, None, "file is empty")


def test_header_only_csv(tmp_path: Path, good: tuple[Path, Path]) -> None:
    inter = write(tmp_path / "header-only.csv", "user_id,item_id,timestamp\n")
    expect_error(tmp_path, good[0], inter, inter, None, None, "header but no rows")


def test_duplicate_item_ids(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "dup.csv", "item_id,title\ni1,Alpha\ni2,Beta\ni1,Alpha again\n")
    expect_error(tmp_path, items, good[1], items, 3, "item_id",
                 "duplicate item id 'i1' (first seen at row 1)", line=4)


def test_empty_title(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "blank.csv", "item_id,title\ni1,Alpha\ni2,  \n")
    expect_error(tmp_path, items, good[1], items, 2, "title", "empty title", line=3)


def test_unknown_items_in_interactions(tmp_path: Path, good: tuple[Path, Path]) -> None:
    rows = ["u1,i1,1", "u1,x1,2", "u1,i2,3"] + [f"u2,x{n},{n + 10}" for n in range(2, 8)]
    inter = write(tmp_path / "inter.csv", "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    err = expect_error(tmp_path, good[0], inter, inter, 2, "item_id", "7 interaction(s) name unknown items",
                       line=3)
    message = str(err)
    for example in ("row 2 (line 3): 'x1'", "row 4 (line 5): 'x2'", "row 7 (line 8): 'x5'"):
        assert example in message
    assert "'x6'" not in message  # only the first examples are shown
    assert "--drop-unknown" in message


def test_drop_unknown_proceeds(tmp_path: Path, tiny_catalog_files: TinyCatalogFiles, tiny_catalog: Catalog,
                               scratch_catalog_name: str) -> None:
    # tiny_catalog is requested so the tiny items' embeddings are cached: the CLI's index build needs no model
    items = tiny_catalog_files.items_csv
    inter = write(tmp_path / "inter.csv", "user_id,item_id,timestamp\nu1,s1,1\nu1,x1,2\nu1,s2,3\nu2,a1,4\n")
    catalog, dropped = read_catalog("x", items, inter, drop_unknown=True)
    assert dropped == 1 and catalog.histories() == {"u1": ["s1", "s2"], "u2": ["a1"]}

    result = ingest_cli(scratch_catalog_name, items, inter, "--drop-unknown")
    assert result.exit_code == 0, result.output
    assert "dropped 1 interaction(s)" in flat(result.output)
    stored = load_catalog(scratch_catalog_name)
    assert sorted(stored.interactions["item_id"]) == ["a1", "s1", "s2"]


def test_unparsable_timestamp(tmp_path: Path, good: tuple[Path, Path]) -> None:
    inter = write(tmp_path / "inter.csv",
                  "user_id,item_id,timestamp\nu1,i1,2024-01-02\nu1,i2,1700000000\nu1,i3,last tuesday\n")
    expect_error(tmp_path, good[0], inter, inter, 3, "timestamp", "cannot parse timestamp 'last tuesday'",
                 line=4)


def test_wrong_encoding(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "latin1.csv", "item_id,title\ni1,Alpha\ni2,Amélie\n".encode("latin-1"))
    err = expect_error(tmp_path, items, good[1], items, 2, None, "is not valid UTF-8", line=3)
    assert "re-encode the file as UTF-8" in str(err)


def test_invalid_jsonl_line(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "items.jsonl",
                  '{"item_id": "i1", "title": "Alpha"}\n\n{"item_id": "i2", "title": "Beta"\n')
    expect_error(tmp_path, items, good[1], items, 2, None, "invalid JSON", line=3)


def test_jsonl_line_not_an_object(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "items.jsonl", '{"item_id": "i1", "title": "Alpha"}\n["i2", "Beta"]\n')
    expect_error(tmp_path, items, good[1], items, 2, None, "must be a JSON object", line=2)


def test_unsupported_suffix(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "items.xlsx", "whatever")
    expect_error(tmp_path, items, good[1], items, None, None, "unsupported format '.xlsx'")


def test_bad_year(tmp_path: Path, good: tuple[Path, Path]) -> None:
    items = write(tmp_path / "items.csv", "item_id,title,year\ni1,Alpha,1990\ni2,Beta,soon\n")
    expect_error(tmp_path, items, good[1], items, 2, "year", "not a year: 'soon'", line=3)


# --- parsing ------------------------------------------------------------------------------------------------


def test_genres_as_jsonl_list_and_csv_pipes(tiny_catalog_files: TinyCatalogFiles) -> None:
    from_csv, _ = read_catalog("a", tiny_catalog_files.items_csv, tiny_catalog_files.interactions_csv)
    from_jsonl, _ = read_catalog("b", tiny_catalog_files.items_jsonl, tiny_catalog_files.interactions_csv)
    for catalog in (from_csv, from_jsonl):
        assert catalog.item("s1")["genres"] == ["Sci-Fi", "Adventure"]
        assert catalog.item("a1")["genres"] == ["Animation", "Children's", "Fantasy"]
        assert catalog.item("d4")["genres"] == ["Drama"]
        assert catalog.item("d4")["year"] is None and catalog.item("s1")["year"] == 1994
    assert from_csv.genres_by_pos == from_jsonl.genres_by_pos
    assert from_csv.histories() == from_jsonl.histories()


def test_genre_edge_cases(tmp_path: Path) -> None:
    items = write(tmp_path / "items.csv",
                  'item_id,title,genres\ni1,A," Drama | Crime |Drama"\ni2,B,\ni3,C,"[""War"", ""Drama""]"\n')
    catalog, _ = read_catalog("g", items, write(tmp_path / "i.csv", "user_id,item_id\nu,i1\n"))
    assert catalog.genres_by_pos == [["Drama", "Crime"], [], ["War", "Drama"]]


def test_iso_timestamps_are_parsed(tmp_path: Path, good: tuple[Path, Path]) -> None:
    inter = write(tmp_path / "inter.csv",
                  "user_id,item_id,timestamp\n"
                  "u1,i2,2024-01-02T03:04:05Z\n"
                  "u1,i1,2024-01-02\n"
                  "u1,i3,2024-01-02T05:04:05+02:00\n")
    catalog, _ = read_catalog("t", good[0], inter)
    stamps = dict(zip(catalog.interactions["item_id"], catalog.interactions["timestamp"], strict=True))
    assert stamps == {"i2": 1704164645, "i1": 1704153600, "i3": 1704164645}
    assert str(catalog.interactions["timestamp"].dtype) == "int64"
    assert catalog.histories(ties="id") == {"u1": ["i1", "i2", "i3"]}  # equal times: catalogue order
    assert catalog.histories()["u1"][0] == "i1"  # any rule keeps time order


def tied_catalog(interactions: pd.DataFrame) -> Catalog:
    items = sorted(set(interactions["item_id"]))
    return Catalog(name="tied", items=pd.DataFrame({"item_id": items}), interactions=interactions)


def test_tie_rules_order_equal_timestamps() -> None:
    """MovieLens stores ratings in batches sharing one timestamp: "id" orders a batch by catalogue position,
    "random" (the default) by a seeded key of (seed, user, item), independent of file order."""
    batch = [f"b{n:02d}" for n in range(20)]
    rows = ([("u", "a-first", 1)] + [("u", i, 5) for i in batch] + [("u", "z-last", 9)]
            + [("v", i, 5) for i in batch])
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    catalog = tied_catalog(frame)
    by_id = catalog.histories(ties="id")
    assert by_id["u"] == ["a-first", *batch, "z-last"] and by_id["v"] == batch

    seeded = catalog.histories(ties="random", seed=0)
    assert seeded["u"][0] == "a-first" and seeded["u"][-1] == "z-last"  # time order kept
    assert sorted(seeded["u"][1:-1]) == batch and seeded["u"] != by_id["u"]  # the batch is reordered
    assert seeded["u"][1:-1] != seeded["v"]  # the key depends on the user too
    assert catalog.histories() is seeded and catalog.user_history("u") == seeded["u"]  # the default, cached
    shuffled = tied_catalog(frame.sample(frac=1.0, random_state=3).reset_index(drop=True))
    assert shuffled.histories(ties="random", seed=0) == seeded  # reproducible, whatever the file order
    assert shuffled.histories(ties="id") == by_id
    other = catalog.histories(ties="random", seed=1)
    assert other["u"] != seeded["u"] and other["u"][0] == "a-first" and other["u"][-1] == "z-last"
    ordered = catalog.sorted_interactions(ties="random", seed=1)
    assert ordered.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
    for bad in ("alpha", "ID"):
        with pytest.raises(ValueError, match="unknown tie rule .*choose one of: id, random"):
            catalog.histories(ties=bad)


def test_jsonl_numbers_and_missing_timestamps(tmp_path: Path) -> None:
    items = write(tmp_path / "items.jsonl",
                  '{"item_id": 1, "title": "One"}\n{"item_id": 2, "title": "Two"}\n')
    inter = write(tmp_path / "inter.jsonl", '{"user_id": 7, "item_id": 2}\n{"user_id": 7, "item_id": 1}\n')
    catalog, _ = read_catalog("n", items, inter)
    assert catalog.item_ids == ["1", "2"]
    assert catalog.histories() == {"7": ["2", "1"]}  # no timestamps: file order


def test_extra_columns_are_kept_as_metadata(tiny_catalog_files: TinyCatalogFiles) -> None:
    catalog, _ = read_catalog("m", tiny_catalog_files.items_csv, tiny_catalog_files.interactions_csv)
    assert catalog.item("s1")["metadata"] == {"director": "Vera Lunde"}
    assert str(catalog.item("s1")["description"]).startswith("A starship crew")
    from_jsonl, _ = read_catalog("j", tiny_catalog_files.items_jsonl, tiny_catalog_files.interactions_csv)
    assert from_jsonl.item("d3")["metadata"] == {"director": "Sam Whitaker"}


def test_users_file(tiny_catalog_files: TinyCatalogFiles) -> None:
    catalog, _ = read_catalog("u", tiny_catalog_files.items_csv, tiny_catalog_files.interactions_csv,
                              tiny_catalog_files.users_csv)
    assert catalog.users is not None and len(catalog.users) == 8


# --- replacing a catalogue ----------------------------------------------------------------------------------


def retrieved(name: str, embedder: Embedder, history: list[str]) -> list[str]:
    index = load_index(load_catalog(name), embedder=embedder)
    return [c.item_id for c in index.retriever("fused").retrieve(history, k=3)]


def test_failed_ingest_keeps_previous_catalogue(tmp_path: Path, tiny_catalog_files: TinyCatalogFiles,
                                                embedder: Embedder, scratch_catalog_name: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    name = scratch_catalog_name
    files = tiny_catalog_files
    result = ingest_cli(name, files.items_csv, files.interactions_csv, "--users", str(files.users_csv))
    assert result.exit_code == 0, result.output
    old_ids = load_catalog(name).item_ids
    old_manifest = read_manifest(load_catalog(name).root / "index")  # type: ignore[operator]
    assert old_manifest is not None
    assert retrieved(name, embedder, ["s1", "s2"])[0] == "s3"

    # 1. invalid input under the same name: rejected before anything is written
    bad_items = write(tmp_path / "bad.csv", "item_id,title\nn1,New\nn1,New again\n")
    result = ingest_cli(name, bad_items, files.interactions_csv)
    assert result.exit_code == 2
    assert load_catalog(name).item_ids == old_ids
    assert retrieved(name, embedder, ["s1", "s2"])[0] == "s3"

    # 2. valid input whose index build fails half-way: the old catalogue, index and collection survive
    # (the tiny drama items under new ids: their texts are embedded already, so no model load is needed)
    drama = [json.loads(line) for line in files.items_jsonl.read_text().splitlines()][8:11]
    renamed = [json.dumps({**item, "item_id": f"n-{i}"}) + "\n" for i, item in enumerate(drama)]
    new_items = write(tmp_path / "new-items.jsonl", "".join(renamed))
    new_inter = write(tmp_path / "new-inter.csv", "user_id,item_id,timestamp\nv1,n-0,1\nv1,n-1,2\nv1,n-2,3\n")
    catalog, _ = read_catalog(name, new_items, new_inter)

    def broken_add(self: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated failure while filling Chroma")

    with monkeypatch.context() as mp:
        mp.setattr("retrieval.vector_store.ItemVectorStore.add", broken_add)
        with pytest.raises(RuntimeError, match="simulated failure"):
            save_and_index(catalog, embedder=embedder, progress=False)
    assert load_catalog(name).item_ids == old_ids
    assert read_manifest(load_catalog(name).root / "index") == old_manifest  # type: ignore[operator]
    assert retrieved(name, embedder, ["s1", "s2"])[0] == "s3"
    assert not [p.name for p in catalogs_dir().iterdir() if p.name.startswith(f".staging-{name}")]
    assert not [p.name for p in (catalogs_dir() / name).iterdir() if p.name.startswith(".")]

    # 3. valid new data replaces it; the old Chroma collection is retired (servers still on it keep working)
    # and dropped once its grace period has passed
    result = ingest_cli(name, new_items, new_inter)
    assert result.exit_code == 0, result.output
    assert load_catalog(name).item_ids == ["n-0", "n-1", "n-2"]
    assert set(retrieved(name, embedder, ["n-0"])) == {"n-1", "n-2"}
    new_manifest = read_manifest(load_catalog(name).root / "index")  # type: ignore[operator]
    assert new_manifest is not None and [r.name for r in new_manifest.retired] == [old_manifest.collection]
    assert make_client().get_collection(old_manifest.collection).count() == len(old_ids)
    assert purge_retired(new_manifest, make_client(), grace_s=0) == [old_manifest.collection]
    with pytest.raises(Exception):  # noqa: B017 - chromadb raises its own NotFoundError type
        make_client().get_collection(old_manifest.collection)
    assert make_client().get_collection(new_manifest.collection).count() == 3


def test_content_hash_is_the_same_fresh_and_read_back(tiny_catalog_files: TinyCatalogFiles) -> None:
    """A catalogue read from files holds genres as lists, one read back from parquet as numpy arrays; both are the same
    data and hash alike (they did not: an index built right after an ingest recorded another hash than a rebuild)."""
    import shutil

    from retrieval.catalog import catalog_root, write_catalog_tables

    fresh, _ = read_catalog("hash-check", tiny_catalog_files.items_csv, tiny_catalog_files.interactions_csv)
    stored = catalog_root("hash-check") / "catalog"
    try:
        write_catalog_tables(fresh, stored)
        back = load_catalog("hash-check")
        recorded = json.loads((stored / "manifest.json").read_text())["content_hash"]
    finally:
        shutil.rmtree(stored.parent, ignore_errors=True)  # the test session's home is shared
    assert not isinstance(back.items["genres"].iloc[0], list)  # the case this guards: another type, same values
    assert back.content_hash() == fresh.content_hash() == recorded
    changed = back.items.copy()
    changed["genres"] = [["Drama"]] + list(changed["genres"].iloc[1:])
    assert Catalog(name="a", items=changed, interactions=back.interactions).content_hash() != back.content_hash()


def test_stored_catalogue_round_trips(tiny_catalog: Catalog) -> None:
    assert tiny_catalog.n_items == 12
    assert tiny_catalog.histories()["u3"] == ["s1", "s2", "s3", "a1"]  # sorted by time, not file order
    assert tiny_catalog.item("s1")["metadata"] == {"director": "Vera Lunde"}
    assert tiny_catalog.users is not None
