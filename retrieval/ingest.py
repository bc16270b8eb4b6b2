"""Read and validate a catalogue from CSV, JSONL or Parquet files.

Every problem is reported as a :class:`CatalogInputError` naming the file, the row (1-based data row; for
text files the physical line too) and the column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.catalog import Catalog

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
ITEM_REQUIRED = ("item_id", "title")
ITEM_KNOWN = ("item_id", "title", "description", "genres", "year")
INTERACTION_REQUIRED = ("user_id", "item_id")
EXAMPLES_SHOWN = 5


class CatalogInputError(ValueError):
    """Bad input, located by file, row and column."""

    def __init__(self, file: Path | str, message: str, row: int | None = None, column: str | None = None,
                 line: int | None = None) -> None:
        self.file = str(file)
        self.row = row
        self.column = column
        self.line = line
        where = [self.file]
        if row is not None:
            where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
        elif line is not None:  # e.g. a decoding error: no row is known, but the line is
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(": ".join([", ".join(where), message]))


@dataclass
class Table:
    """A read file: the frame plus how to turn a 0-based frame index into a physical line number."""

    path: Path
    frame: pd.DataFrame
    line_offset: int | None  # physical line = index + line_offset; None for binary formats
    lines: list[int] | None = None  # explicit line numbers (JSONL skips blank lines)

    def where(self, index: int) -> tuple[int, int | None]:
        if self.lines is not None:
            return index + 1, self.lines[index]
        return index + 1, None if self.line_offset is None else index + self.line_offset

    def error(self, index: int, column: str | None, message: str) -> CatalogInputError:
        row, line = self.where(index)
        return CatalogInputError(self.path, message, row=row, column=column, line=line)


def _check_utf8(path: Path, header_lines: int) -> None:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CatalogInputError(
            path, f"is not valid UTF-8 (byte {exc.start}: {exc.reason}); re-encode the file as UTF-8",
            line=line, row=line - header_lines if line > header_lines else None,
        ) from None


def read_table(path: Path) -> Table:
    """Read one input file by its suffix. Raises CatalogInputError for missing, empty or unreadable files."""
    path = Path(path)
    if not path.exists():
        raise CatalogInputError(path, "file not found")
    if not path.is_file():
        raise CatalogInputError(path, "is not a file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise CatalogInputError(path, f"unsupported format '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise CatalogInputError(path, "file is empty")
    if suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types
            raise CatalogInputError(path, f"cannot be read as Parquet: {exc}") from None
        table = Table(path, frame.reset_index(drop=True), None)
    elif suffix == ".csv":
        _check_utf8(path, header_lines=1)
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        except pd.errors.EmptyDataError:
            raise CatalogInputError(path, "file is empty") from None
        except pd.errors.ParserError as exc:
            raise CatalogInputError(path, f"malformed CSV: {exc}") from None
        frame.columns = [str(c).strip() for c in frame.columns]
        table = Table(path, frame, line_offset=2)
    else:
        _check_utf8(path, header_lines=0)
        records: list[dict[str, Any]] = []
        lines: list[int] = []
        for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CatalogInputError(path, f"invalid JSON: {exc.msg}", row=len(records) + 1, line=lineno) from None
            if not isinstance(record, dict):
                raise CatalogInputError(path, "each line must be a JSON object", row=len(records) + 1, line=lineno)
            records.append(record)
            lines.append(lineno)
        frame = pd.DataFrame.from_records(records)
        table = Table(path, frame, line_offset=None, lines=lines)
    if len(table.frame) == 0:
        raise CatalogInputError(path, "file has a header but no rows" if suffix == ".csv" else "file has no rows")
    return table


def _require(table: Table, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.frame.columns]
    if missing:
        have = ", ".join(map(str, table.frame.columns))
        raise CatalogInputError(table.path, f"missing required column(s) {', '.join(missing)} (found: {have})",
                                column=missing[0])


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _as_id(table: Table, index: int, column: str, value: Any) -> str:
    if _blank(value):
        raise table.error(index, column, "empty value")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _parse_genres(table: Table, index: int, value: Any) -> list[str]:
    if _blank(value) if not isinstance(value, list | tuple | np.ndarray) else False:
        return []
    if isinstance(value, list | tuple | np.ndarray):
        parts = [str(v).strip() for v in value]
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise table.error(index, "genres", f"not a JSON list nor '|'-separated: {text[:60]!r}") from None
            parts = [str(v).strip() for v in parsed]
        else:
            parts = [p.strip() for p in text.split("|")]
    else:
        raise table.error(index, "genres", f"expected a list or a '|'-separated string, got {type(value).__name__}")
    seen: list[str] = []
    for p in parts:
        if p and p not in seen:
            seen.append(p)
    return seen


def _parse_year(table: Table, index: int, value: Any) -> int | None:
    if _blank(value):
        return None
    try:
        year = int(float(str(value).strip()))
    except ValueError:
        raise table.error(index, "year", f"not a year: {str(value)[:40]!r}") from None
    if not 1000 <= year <= 3000:
        raise table.error(index, "year", f"year {year} is out of range 1000..3000")
    return year


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def parse_items(table: Table) -> pd.DataFrame:
    _require(table, ITEM_REQUIRED)
    frame = table.frame
    extra = [c for c in frame.columns if c not in ITEM_KNOWN]
    rows = []
    first_seen: dict[str, int] = {}
    for index, rec in enumerate(frame.to_dict("records")):
        item_id = _as_id(table, index, "item_id", rec["item_id"])
        if item_id in first_seen:
            raise table.error(index, "item_id",
                              f"duplicate item id '{item_id}' (first seen at row {first_seen[item_id] + 1})")
        first_seen[item_id] = index
        title = rec["title"]
        if _blank(title):
            raise table.error(index, "title", "empty title")
        description = rec.get("description")
        rows.append({
            "item_id": item_id,
            "title": str(title).strip(),
            "description": "" if _blank(description) else str(description).strip(),
            "genres": _parse_genres(table, index, rec.get("genres")),
            "year": _parse_year(table, index, rec.get("year")),
            "metadata": json.dumps({c: _jsonable(rec[c]) for c in extra}, sort_keys=True),
        })
    items = pd.DataFrame(rows, columns=["item_id", "title", "description", "genres", "year", "metadata"])
    items["year"] = items["year"].astype("Int64")
    return items


def _parse_timestamps(table: Table, values: pd.Series) -> pd.Series:
    """Epoch seconds (int64). Numbers are taken as epoch seconds; strings may be ISO dates."""
    out = np.empty(len(values), dtype=np.int64)
    for index, value in enumerate(values.tolist()):
        if _blank(value):
            raise table.error(index, "timestamp", "empty timestamp")
        if isinstance(value, int | np.integer) and not isinstance(value, bool):
            out[index] = int(value)
            continue
        if isinstance(value, float | np.floating):
            out[index] = int(value)
            continue
        if isinstance(value, pd.Timestamp):
            out[index] = int(value.timestamp())
            continue
        text = str(value).strip()
        try:
            out[index] = int(float(text))
            continue
        except ValueError:
            pass
        try:
            stamp: pd.Timestamp | None = pd.Timestamp(text)
        except (ValueError, TypeError):
            stamp = None
        if stamp is None or pd.isna(stamp):
            raise table.error(index, "timestamp", f"cannot parse timestamp {text[:40]!r} "
                                                  "(use epoch seconds or an ISO 8601 date)")
        if stamp.tzinfo is None:
            stamp = stamp.tz_localize("UTC")
        out[index] = int(stamp.timestamp())
    return pd.Series(out, dtype="int64")


def parse_interactions(table: Table, known_items: set[str], drop_unknown: bool = False) -> pd.DataFrame:
    _require(table, INTERACTION_REQUIRED)
    frame = table.frame
    user_ids = [_as_id(table, i, "user_id", v) for i, v in enumerate(frame["user_id"].tolist())]
    item_ids = [_as_id(table, i, "item_id", v) for i, v in enumerate(frame["item_id"].tolist())]
    if "timestamp" in frame.columns:
        timestamps = _parse_timestamps(table, frame["timestamp"])
    else:  # no time given: file order is the order
        timestamps = pd.Series(np.arange(len(frame), dtype=np.int64))
    ratings = pd.Series(np.full(len(frame), np.nan))
    if "rating" in frame.columns:
        for index, value in enumerate(frame["rating"].tolist()):
            if _blank(value):
                continue
            try:
                ratings.iloc[index] = float(value)
            except (TypeError, ValueError):
                raise table.error(index, "rating", f"not a number: {str(value)[:40]!r}") from None
    out = pd.DataFrame({"user_id": user_ids, "item_id": item_ids, "timestamp": timestamps, "rating": ratings})
    unknown = ~out["item_id"].isin(known_items)
    if unknown.any():
        idx = np.flatnonzero(unknown.to_numpy())
        examples = []
        for i in idx[:EXAMPLES_SHOWN]:
            row, line = table.where(int(i))
            examples.append(f"row {row}{f' (line {line})' if line else ''}: '{out['item_id'].iloc[i]}'")
        if not drop_unknown:
            first_row, first_line = table.where(int(idx[0]))
            raise CatalogInputError(
                table.path,
                f"{len(idx)} interaction(s) name unknown items, e.g. {'; '.join(examples)}. "
                "Pass --drop-unknown to skip them.",
                row=first_row, column="item_id", line=first_line,
            )
        out = out[~unknown].reset_index(drop=True)
        if out.empty:
            raise CatalogInputError(table.path, "no interactions left after dropping unknown items")
    return out


def parse_users(table: Table) -> pd.DataFrame:
    _require(table, ("user_id",))
    frame = table.frame.copy()
    frame["user_id"] = [_as_id(table, i, "user_id", v) for i, v in enumerate(frame["user_id"].tolist())]
    dup = frame["user_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise table.error(i, "user_id", f"duplicate user id '{frame['user_id'].iloc[i]}'")
    return frame.astype({c: str for c in frame.columns if frame[c].dtype == object})


def read_catalog(name: str, items_path: Path, interactions_path: Path, users_path: Path | None = None,
                 drop_unknown: bool = False) -> tuple[Catalog, int]:
    """Read and validate all files. Returns the catalogue and the number of interactions dropped."""
    items = parse_items(read_table(items_path))
    itable = read_table(interactions_path)
    interactions = parse_interactions(itable, set(items["item_id"]), drop_unknown=drop_unknown)
    dropped = len(itable.frame) - len(interactions)
    users = parse_users(read_table(users_path)) if users_path is not None else None
    return Catalog(name=name, items=items, interactions=interactions, users=users), dropped
