"""`recagent recommend` without the LLM on the tiny catalogue."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner, Result

from cli.main import app
from retrieval.catalog import Catalog


def recommend(catalog: Catalog, *args: str) -> Result:
    argv = ["recommend", "--no-llm", "--catalog", catalog.name, *args]
    return CliRunner(env={"COLUMNS": "4000"}).invoke(app, argv)


def json_document(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout  # one JSON document, nothing else on stdout
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload


def test_history_json(tiny_catalog: Catalog) -> None:
    payload = json_document(recommend(tiny_catalog, "--history", "s1,s2", "-k", "3", "--json"))
    assert payload["history"] == ["s1", "s2"]
    items = payload["items"]
    assert len(items) == 3
    for item in items:
        assert {"item_id", "title", "score", "sources"} <= set(item)
        assert item["title"] == tiny_catalog.item(item["item_id"])["title"]
        assert isinstance(item["score"], float)
        for hit in item["sources"]:
            assert {"source", "rank", "score"} <= set(hit)
    got = [item["item_id"] for item in items]
    assert "s3" in got
    assert not {"s1", "s2"} & set(got)


def test_known_user_json(tiny_catalog: Catalog) -> None:
    payload = json_document(recommend(tiny_catalog, "--user", "u2", "-k", "5", "--json"))
    assert payload["user_id"] == "u2"
    assert payload["history"] == ["s1", "s2", "s3"]
    got = [item["item_id"] for item in payload["items"]]
    assert len(got) == 5 and not {"s1", "s2", "s3"} & set(got)


def test_unknown_user_exits_2(tiny_catalog: Catalog) -> None:
    result = recommend(tiny_catalog, "--user", "nobody", "--json")
    assert result.exit_code == 2, result.output
    assert "nobody" in result.output


def test_unknown_history_item_exits_2(tiny_catalog: Catalog) -> None:
    result = recommend(tiny_catalog, "--history", "s1,zz9", "--json")
    assert result.exit_code == 2, result.output
    assert "zz9" in result.output


def test_user_and_history_together_exit_2(tiny_catalog: Catalog) -> None:
    result = recommend(tiny_catalog, "--user", "u1", "--history", "s1", "--json")
    assert result.exit_code == 2
    assert "exactly one" in result.output


def test_neither_user_nor_history_exits_2(tiny_catalog: Catalog) -> None:
    assert recommend(tiny_catalog, "--json").exit_code == 2


def test_unknown_catalogue_exits_2(tiny_catalog: Catalog) -> None:
    argv = ["recommend", "--no-llm", "--catalog", "no-such-catalogue", "--history", "1"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "no-such-catalogue" in result.output


def test_genre_filter(tiny_catalog: Catalog) -> None:
    result = recommend(tiny_catalog, "--history", "s1,s2", "--genre", "Drama", "-k", "3", "--json")
    payload = json_document(result)
    items = payload["items"]
    assert len(items) == 3
    for item in items:
        assert "Drama" in tiny_catalog.item(item["item_id"])["genres"]  # type: ignore[operator]


def test_table_output(tiny_catalog: Catalog) -> None:
    result = recommend(tiny_catalog, "--history", "a1,a2", "-k", "2")
    assert result.exit_code == 0, result.output
    assert "The Enchanted Forest" in result.stdout


def test_streamed_reasons_as_json_events(tiny_catalog: Catalog) -> None:
    result = recommend(tiny_catalog, "--user", "u2", "-k", "3", "--explain", "--stream", "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "ranked" and kinds[-1] == "done" and kinds.count("reason") == 3, kinds
    done = events[-1]
    assert all(i["reason"] and i["reason_source"] == "template" for i in done["items"])  # --no-llm: templates
    assert {e["item_id"] for e in events if e["event"] == "reason"} == {i["item_id"] for i in done["items"]}


def test_stream_needs_explain(tiny_catalog: Catalog) -> None:
    result = recommend(tiny_catalog, "--user", "u2", "--stream")
    assert result.exit_code == 2 and "--explain" in result.output


def test_catalogue_names_are_checked_wherever_they_reach_a_path(tmp_path: Any) -> None:
    """`--catalog` of every command, RECAGENT_CATALOG and the library's own path helper refuse names that would
    leave the catalogue folder (or the reports folder, where the name becomes a file name)."""
    import pytest
    from pydantic import ValidationError

    from agent.settings import Settings
    from retrieval.catalog import InvalidCatalogNameError, catalog_root

    runner = CliRunner(env={"COLUMNS": "4000"})
    for argv in (["recommend", "--no-llm", "--user", "1"], ["index"], ["eval", "retrieval"], ["eval", "chat"],
                 ["eval", "speed"], ["train", "embedder"], ["serve"]):
        result = runner.invoke(app, [*argv, "--catalog", "../../outside"])
        assert result.exit_code == 2, (argv, result.output)
        assert "--catalog" in result.output and "use letters" in result.output, (argv, result.output)
    assert not (tmp_path / "outside").exists()
    for bad in ("../x", "a/b", ".hidden", "", "x" * 61, "a..b"):
        with pytest.raises(InvalidCatalogNameError, match="use letters"):
            catalog_root(bad)
        with pytest.raises(ValidationError, match="RECAGENT_CATALOG"):
            Settings(catalog=bad)
    assert catalog_root("movielens-100k").name == "movielens-100k"


def test_eval_explain_names_the_prompt_versions_it_knows(tiny_catalog: Catalog) -> None:
    argv = ["eval", "explain", "--catalog", tiny_catalog.name, "--prompt", "v99"]
    result = CliRunner(env={"COLUMNS": "4000"}).invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "unknown prompt 'explain_item.v99'" in result.output and "explain_item.v3" in result.output
