"""`recagent`: the command line (typer + rich). The only place that prints and that imports `eval`."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from retrieval.catalog import DEFAULT_CATALOG, TIE_RULES, check_catalog_name

if TYPE_CHECKING:
    from retrieval.splits import SplitSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generative LLM recommender agent.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch built-in data sets.")
eval_app = typer.Typer(no_args_is_help=True, help="Offline evaluation (writes reports/).")
llm_app = typer.Typer(no_args_is_help=True, help="LLM model files and serving.")
train_app = typer.Typer(no_args_is_help=True, help="Train models on a catalogue's behaviour data.")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(llm_app, name="llm")
app.add_typer(train_app, name="train")

console = Console(stderr=True)
out = Console(soft_wrap=True)
T = TypeVar("T")


def setup(verbose: bool = False) -> None:
    from retrieval.home import configure_offline_environment

    configure_offline_environment()
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("RECAGENT_LOG_LEVEL", "WARNING").upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "chromadb", "sentence_transformers", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def catalog_name(value: str | None) -> str | None:
    """Typer callback of every ``--catalog``: the name becomes a folder and report file names, so check it first."""
    if value is None:
        return None
    try:
        return check_catalog_name(value, "--catalog")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def guarded(fn: Callable[[], T]) -> T:
    """Turn known input errors into exit code 2 with their message."""
    from retrieval.candidates import UnknownItemsError
    from retrieval.catalog import CatalogNotFoundError
    from retrieval.index import IndexNotBuiltError
    from retrieval.ingest import CatalogInputError
    from retrieval.wheels import WheelError

    try:
        return fn()
    except (CatalogInputError, CatalogNotFoundError, IndexNotBuiltError, UnknownItemsError, LookupError,
            ValueError) as exc:
        fail(str(exc))
    except WheelError as exc:
        fail(str(exc), code=1)
    raise AssertionError("unreachable")


def ties_option() -> Any:
    """The ``--ties`` option of every eval command that builds a split (the seed is the command's ``--seed``)."""
    return typer.Option("random", "--ties", help=f"how a user's events with equal timestamps are ordered: "
                        f"{' | '.join(TIE_RULES)} (random: seeded by --seed; id: catalogue order)")


def split_spec(ties: str, seed: int) -> SplitSpec:
    """The split an eval command makes; an unknown ``--ties`` exits with code 2 naming the choices."""
    from retrieval.splits import SplitSpec

    if ties not in TIE_RULES:
        fail(f"--ties '{ties}': choose one of {', '.join(TIE_RULES)}")
    return SplitSpec(ties=ties, seed=seed)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@data_app.command("fetch")
def data_fetch(name: str = typer.Argument(..., help="data set: movielens-100k"),
               force: bool = typer.Option(False, help="re-convert and re-index even if present")) -> None:
    """Download a built-in data set, verify it, convert it to a catalogue and build its index."""
    setup()
    from retrieval import movielens
    from retrieval.catalog_store import fetch_movielens

    if name != movielens.NAME:
        fail(f"unknown data set '{name}'; choose one of: {movielens.NAME}")
    catalog = guarded(lambda: fetch_movielens(force=force))
    console.print(f"[green]catalogue[/] {catalog.name}: {catalog.n_items} items, "
                  f"{len(catalog.interactions)} interactions, {catalog.interactions['user_id'].nunique()} users")


@data_app.command("synth")
def data_synth(
    items: int = typer.Option(..., "--items", min=10, max=5_000_000, help="catalogue size"),
    users: int = typer.Option(..., "--users", min=10, max=5_000_000, help="users with a history"),
    name: str | None = typer.Option(None, "--name", help="catalogue name (default synth-ITEMSxUSERS)"),
    seed: int = typer.Option(0, "--seed"),
    mean_history: float = typer.Option(20.0, "--mean-history", min=3, help="mean events per user"),
    index: bool = typer.Option(True, "--index/--no-index", help="build its index too (embeds every item)"),
) -> None:
    """A synthetic catalogue with realistic popularity (Zipf) and sequential structure (topic chains), for scale
    tests; stored like an ingested one."""
    setup()
    from retrieval.catalog import load_catalog, swap_in, write_catalog_tables
    from retrieval.catalog_store import save_and_index
    from retrieval.synth import SynthConfig, synth_catalog

    name = guarded(lambda: check_catalog_name(name or f"synth-{items}x{users}", "--name"))
    with console.status(f"generating {items} items and {users} users"):
        catalog = synth_catalog(name, SynthConfig(items=items, users=users, seed=seed, mean_history=mean_history))
    if index:
        manifest = guarded(lambda: save_and_index(catalog))
        built = f"; index built in {manifest.build_seconds:.1f}s"
    else:
        import tempfile

        from retrieval.catalog import catalog_root
        from retrieval.home import catalogs_dir

        staging = Path(tempfile.mkdtemp(dir=catalogs_dir(), prefix=f".staging-{name}-"))
        write_catalog_tables(catalog, staging / "catalog")
        swap_in(staging, catalog_root(name))
        built = " (no index: `recagent index --catalog NAME` builds it)"
    stored = load_catalog(name)
    console.print(f"[green]catalogue[/] {name}: {stored.n_items} items, {len(stored.interactions)} interactions, "
                  f"{users} users{built}")


@app.command()
def ingest(
    name: str = typer.Option(..., "--name", help="catalogue name (replaces an existing one once valid)"),
    items: Path = typer.Option(..., "--items", help="items file (.csv, .jsonl, .parquet)"),
    interactions: Path = typer.Option(..., "--interactions", help="interactions file"),
    users: Path | None = typer.Option(None, "--users", help="optional users file"),
    drop_unknown: bool = typer.Option(False, "--drop-unknown", help="skip interactions naming unknown items"),
) -> None:
    """Validate and store a catalogue from files, then build its index."""
    setup()
    from retrieval.catalog_store import save_and_index
    from retrieval.ingest import read_catalog

    guarded(lambda: check_catalog_name(name, "--name"))
    catalog, dropped = guarded(lambda: read_catalog(name, items, interactions, users, drop_unknown=drop_unknown))
    if dropped:
        console.print(f"[yellow]dropped[/] {dropped} interaction(s) naming unknown items")
    manifest = guarded(lambda: save_and_index(catalog))
    console.print(f"[green]ingested[/] {name}: {catalog.n_items} items, {len(catalog.interactions)} interactions; "
                  f"index built in {manifest.build_seconds:.1f}s")


@app.command()
def index(catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name)) -> None:
    """(Re)build a catalogue's index; only changed items are re-embedded. The encoder is the catalogue's tuned one
    when it has one (`recagent train embedder`), else frozen MiniLM; RECAGENT_ENCODER=auto|frozen|tuned|FOLDER."""
    setup()
    from retrieval.catalog_store import fetch_movielens, reindex

    if catalog == DEFAULT_CATALOG:
        guarded(lambda: fetch_movielens())
    manifest = guarded(lambda: reindex(catalog))
    console.print(f"[green]indexed[/] {catalog} in {manifest.build_seconds:.1f}s (collection {manifest.collection}, "
                  f"encoder {manifest.encoder.name})")


def parse_history(history: str | None) -> list[str]:
    if history is None:
        return []
    ids = [h.strip() for h in history.split(",") if h.strip()]
    if not ids:
        fail("--history: give comma-separated item ids, e.g. --history 1,50,181")
    return ids


@app.command()
def recommend(
    user: str | None = typer.Option(None, "--user", help="a known user's id"),
    history: str | None = typer.Option(None, "--history", help="comma-separated item ids (cold user)"),
    k: int = typer.Option(10, "-k", "--k", min=1, max=100),
    genre: list[str] = typer.Option([], "--genre", help="keep items of this genre (repeatable)"),
    query: str | None = typer.Option(None, "--query", help="free text describing what you want"),
    no_llm: bool = typer.Option(False, "--no-llm", help="retrieval only"),
    explain: bool = typer.Option(False, "--explain", help="LLM reasons and evidence for each pick"),
    stream: bool = typer.Option(False, "--stream", help="with --explain: print the ranked list first, then "
                                "each reason as it is written (with --json: one JSON event per line)"),
    mode: str = typer.Option("score", "--mode", help="score | generate"),
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document"),
) -> None:
    """Recommend items for a user or a given history."""
    setup()
    if (user is None) == (history is None):
        fail("give exactly one of --user ID or --history ID,ID,...")
    if stream and not explain:
        fail("--stream streams the reasons: use it with --explain")
    if mode not in ("score", "generate"):
        fail(f"--mode '{mode}': choose score or generate")
    from agent.service import build_service
    from retrieval.filters import Filters

    service = guarded(lambda: build_service(catalog, use_llm=not no_llm))
    hist = parse_history(history) if history is not None else guarded(lambda: service.user_history(str(user)))
    filters = Filters(genres=genre) if genre else None
    if stream:
        ranked = guarded(lambda: service.rank(hist, k=k, filters=filters, query=query, use_llm=not no_llm,
                                              mode=mode))  # type: ignore[arg-type]
        stream_reasons(service, ranked, as_json)
        return
    answer = guarded(lambda: service.recommend(hist, k=k, filters=filters, query=query, use_llm=not no_llm,
                                               explain=explain, mode=mode))  # type: ignore[arg-type]
    if as_json:
        payload = {"catalog": catalog, "user_id": user, "history": hist, **answer.model_dump(mode="json")}
        print_json(payload)
        return
    table = Table(title=f"Recommendations for {'user ' + str(user) if user else 'the given history'}"
                        f" ({answer.mode}{', degraded: ' + str(answer.reason) if answer.degraded else ''})")
    for col in ("#", "item", "title", "genres", "score", "sources"):
        table.add_column(col)
    if explain:
        table.add_column("reason")
    for item in answer.items:
        row = [str(item.rank), item.item_id, item.title, ", ".join(item.genres), f"{item.score:.3f}",
               ", ".join(s.source for s in item.sources)]
        if explain:
            row.append(item.reason or "")
        table.add_row(*row)
    out.print(table)


def stream_reasons(service: Any, ranked: Any, as_json: bool) -> None:
    """Print a ranked list, then each reason as the explainer writes it, then the timings."""
    import time

    t0 = time.perf_counter()
    answer = ranked.answer
    if as_json:
        print(json.dumps({"event": "ranked", **answer.model_dump(mode="json")}, ensure_ascii=False), flush=True)
    else:
        for item in answer.items:
            out.print(f"{item.rank:>2}. {item.title} [dim]({item.item_id})[/dim]")
    ranks = {i.item_id: i for i in answer.items}
    reasons = {}
    for reason in service.reasons(ranked):
        reasons[reason.item_id] = reason
        ms = (time.perf_counter() - t0) * 1000
        if as_json:
            print(json.dumps({"event": "reason", "item_id": reason.item_id, "rank": ranks[reason.item_id].rank,
                              "reason": reason.reason, "evidence": reason.evidence,
                              "reason_source": reason.source, "ms": round(ms, 1)}, ensure_ascii=False), flush=True)
        else:
            out.print(f"  #{ranks[reason.item_id].rank} {reason.reason} [dim]({reason.source}, {ms:.0f} ms)[/dim]")
    service.explainer.fill(answer, ranked.history, ranked.candidates, reasons)
    answer.timings.explain_ms = round((time.perf_counter() - t0) * 1000, 2)
    if as_json:
        print(json.dumps({"event": "done", **answer.model_dump(mode="json")}, ensure_ascii=False), flush=True)
    else:
        out.print(f"{answer.reasons_llm} of {len(answer.items)} reasons written by the LLM; explained in "
                  f"{answer.timings.explain_ms / 1000:.2f} s after the ranking")


@app.command()
def demo(
    user: str = typer.Option("1", "--user", help="sample user"),
    k: int = typer.Option(10, "-k", "--k", min=1, max=50),
    no_llm: bool = typer.Option(False, "--no-llm", help="retrieval only (skips loading the LLM)"),
) -> None:
    """Fetch MovieLens-100k and the models, build the index, and recommend for a sample user."""
    setup()
    from agent.service import build_service

    with console.status("fetching data and models, building the index (first run: about a minute)"):
        service = guarded(lambda: build_service(DEFAULT_CATALOG, use_llm=not no_llm))
    history = guarded(lambda: service.user_history(user))
    recent = ", ".join(str(service.catalog.item(i)["title"]) for i in history[-5:])
    console.print(f"user {user} recently watched: {recent}")
    answer = guarded(lambda: service.recommend(history, k=k, use_llm=not no_llm))
    table = Table(title=f"Top {k} for user {user} ({answer.mode}"
                        f"{', LLM ' + str(answer.model) if answer.model else ''})")
    for col in ("#", "title", "genres", "score", "found by"):
        table.add_column(col)
    for item in answer.items:
        table.add_row(str(item.rank), item.title, ", ".join(item.genres), f"{item.score:.3f}",
                      ", ".join(s.source for s in item.sources))
    out.print(table)


@app.command()
def schema(output: Path | None = typer.Option(None, "--output", help="write to this file instead of stdout")) -> None:
    """Print the JSON schema of a recommendation answer (the contract of `recommend --json` and the API)."""
    from agent.schemas import RecommendationAnswer

    text = json.dumps(RecommendationAnswer.model_json_schema(), indent=2)
    if output is None:
        sys.stdout.write(text + "\n")
    else:
        output.write_text(text + "\n")
        console.print(f"wrote {output}")


def main() -> None:  # pragma: no cover
    app()


# Subcommands defined in sibling modules register themselves on import.
from cli import chat_cmds, eval_cmds, llm_cmds, serve_cmds, suite_cmds, train_cmds  # noqa: E402,F401
