"""`recagent chat` (a terminal conversation) and `recagent eval chat` (simulated users)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cli.main import app, catalog_name, console, eval_app, guarded, out, print_json, setup, split_spec, ties_option
from retrieval.catalog import DEFAULT_CATALOG

if TYPE_CHECKING:
    from agent.service import RecommenderService

REPORTS = Path("reports")
QUIT = {"quit", "exit", ":q", "/quit", "/exit"}


def turn_json(turn: Any) -> dict[str, Any]:
    return {
        "session_id": turn.session_id,
        "reply": turn.reply,
        "items": [i.model_dump(mode="json") for i in turn.items],
        "degraded": turn.degraded,
        "reason": turn.reason,
        "decided_by": turn.decided_by,
    }


def _show(turn: Any) -> None:
    from rich.table import Table

    out.print(f"[bold cyan]agent>[/] {turn.reply}", highlight=False)
    if turn.items:
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col in ("#", "title", "genres", "why"):
            table.add_column(col)
        for n, item in enumerate(turn.items, 1):
            table.add_row(str(n), item.title, ", ".join(item.genres), item.reason)
        out.print(table)
    if turn.degraded:
        console.print(f"[yellow]degraded:[/] {turn.reason}", highlight=False)


@app.command()
def chat(
    user: str | None = typer.Option(None, "--user", help="a known user's id (their recent items seed the likes)"),
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per turn, a line each"),
    session: str | None = typer.Option(None, "--session", help="continue a stored session"),
    no_llm: bool = typer.Option(False, "--no-llm", help="rules and retrieval only (no model is loaded)"),
) -> None:
    """Chat about what to watch. Piped input: one message per line."""
    setup()
    from agent.chat.agent import ChatAgent
    from agent.chat.config import ChatConfig
    from agent.chat.state import SessionNotFoundError, open_session_store
    from agent.service import build_service
    from agent.settings import Settings

    config = ChatConfig(use_llm=not no_llm)
    interactive = sys.stdin.isatty()
    if interactive and not as_json:
        with console.status("loading the catalogue and models"):
            service = guarded(lambda: build_service(catalog, use_llm=not no_llm))
    else:
        service = guarded(lambda: build_service(catalog, use_llm=not no_llm))
    settings = Settings()
    store = open_session_store(settings.sessions_url or settings.chat_sessions_path, ttl_s=config.session_ttl_s)
    agent = ChatAgent(service, store, config)
    session_id = session
    user_id = user
    if interactive and not as_json:
        console.print(
            "Tell me what you like (e.g. [italic]I loved Toy Story, nothing scary[/]); 'quit' to leave.",
            highlight=False,
        )
    while True:
        try:
            line = console.input("[bold green]you>[/] ") if interactive and not as_json else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and line == "":
            break  # end of piped input
        message = line.rstrip("\n")
        if message.strip().lower() in QUIT:
            break
        try:
            turn = agent.respond(session_id, message, user_id=user_id)
        except SessionNotFoundError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        session_id, user_id = turn.session_id, None
        if as_json:
            print_json(turn_json(turn))
        else:
            _show(turn)
    if session_id and not as_json:
        console.print(f"session: {session_id} (continue with --session {session_id})", highlight=False)


@eval_app.command("chat")
def eval_chat(
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name),
    users: int = typer.Option(30, "--users", min=1, help="simulated users (test cases sampled with --seed)"),
    turns: int = typer.Option(5, "--turns", min=1, max=20),
    k: int = typer.Option(5, "-k", "--k", min=1, max=20),
    seed: int = typer.Option(0, "--seed", help="seeds the user sample, their phrasing and the random tie order"),
    ties: str = ties_option(),
    no_llm: bool = typer.Option(False, "--no-llm", help="only the agents without the LLM (no model is loaded)"),
    heldout: bool = typer.Option(True, "--heldout/--no-heldout", help="run the held-out conversations too"),
    heldout_only: bool = typer.Option(
        False, "--heldout-only",
        help="only the held-out conversations; the report keeps the simulated-user results it already holds",
    ),
    heldout_file: Path | None = typer.Option(None, "--heldout-file", help="held-out set (default: the project's)"),
    part: str = typer.Option("test", "--part", help="whose targets the simulated users hold: test (the report) or "
                             "validation (for choosing settings; its report is chat-<catalog>-validation*, and the "
                             "held-out conversations are left out)"),
    together_weight: float | None = typer.Option(
        None, "--together-weight", min=0,
        help="ChatConfig.together_weight for both agents (default: the config's); the report name says it"),
    as_json: bool = typer.Option(False, "--json"),
    n_boot: int = typer.Option(1000, "--bootstrap"),
) -> None:
    """Simulated users with hidden targets (success@turns and turns to success, LLM agent vs retrieval only) and
    the held-out conversations (each turn checked against the catalogue; pass rate of the rules-only agent and
    the LLM agent, overall and by who decided the turn)."""
    setup()
    if part not in ("test", "validation"):
        raise typer.BadParameter(f"--part {part!r}: choose test or validation")
    heldout = heldout and part == "test"
    spec = split_spec(ties, seed)
    from agent.service import build_service
    from eval.chat_heldout import DATA, evaluate_heldout
    from eval.chat_heldout import markdown as heldout_markdown
    from eval.chat_sim import evaluate_chat, markdown
    from eval.machine import machine_line

    service = guarded(lambda: build_service(catalog, use_llm=not no_llm))
    t0 = time.perf_counter()

    def progress(name: str, done: int, total: int) -> None:
        if not as_json and (done % 5 == 0 or done == total):
            console.print(f"{name}: {done}/{total} users", highlight=False)

    def heldout_progress(name: str, done: int, total: int) -> None:
        if not as_json and (done % 10 == 0 or done == total):
            console.print(f"held-out, {name}: {done}/{total} conversations", highlight=False)

    settings: dict[str, Any] = {} if together_weight is None else {"together_weight": together_weight}
    name = f"chat-{catalog}" + ("" if part == "test" else f"-{part}") + (
        "" if together_weight is None else f"-together{together_weight:g}")
    json_path, md_path = REPORTS / f"{name}.json", REPORTS / f"{name}.md"
    payload: dict[str, Any] = {}
    retriever = service.retriever  # the simulated users swap in CF fitted without their targets
    if heldout_only:  # keep the simulated-user results of the last full run
        if json_path.exists():
            payload = {key: value for key, value in json.loads(json_path.read_text()).items() if key != "heldout"}
    else:
        payload = evaluate_chat(service, n_users=users, max_turns=turns, seed=seed, n_boot=n_boot, k=k,
                                progress=progress, spec=spec, part=part, settings=settings)  # type: ignore[arg-type]
    sim_seconds = time.perf_counter() - t0
    if heldout or heldout_only:
        t1 = time.perf_counter()
        # the held-out turns run on the service as built (CF fitted on all interactions): they check what the
        # answers satisfy against metadata, not hidden targets
        service.retriever = retriever
        payload["heldout"] = evaluate_heldout(service, k=k, path=heldout_file or DATA, n_boot=n_boot,
                                              progress=heldout_progress)
        payload["heldout"]["seconds"] = round(time.perf_counter() - t1, 1)
    seconds = time.perf_counter() - t0
    flags = f"{' --no-llm' if no_llm else ''}{' --heldout-only' if heldout_only else ''}"
    flags += f"{'' if part == 'test' else f' --part {part}'}"
    flags += "" if together_weight is None else f" --together-weight {together_weight:g}"
    notes = [n for n in payload.get("notes", []) if heldout_only and not n.startswith("held-out:")]
    if not heldout_only:
        notes = [
            f"command: recagent eval chat --catalog {catalog} --users {users} --turns {turns} -k {k} --seed {seed} "
            f"--ties {spec.ties}{flags}",
            "simulator: opens with two items of the user's visible history, then answers misses with the hidden "
            "target's genres (named, or for half of the users one genre described in words the lexicon mostly "
            "lacks, such as 'sheriffs and saloons'), decade and a description keyword (never its title or id), each "
            "message drawn (seeded per user) from the simulator's own templates with paraphrases and typos "
            "(eval/chat_sim.py)",
            f"protocol: {part} targets of the split ({spec.describe()}); CF models fitted without them; no user id is "
            "passed to the agent",
            f"LLM: {payload['model'] or 'none'}{_ranker_note(service)}; simulated users {sim_seconds:.0f}s; "
            f"machine: {machine_line()}",
        ]
    if "heldout" in payload:
        agents = ", ".join(payload["heldout"]["results"])
        notes.append(
            f"held-out: `recagent eval chat --catalog {catalog}{flags}`; agents {agents}; "
            f"{payload['heldout']['seconds']:.0f}s; {'no LLM was loaded (--no-llm)' if no_llm else ''}".rstrip("; ")
        )
    payload["notes"] = notes
    REPORTS.mkdir(exist_ok=True)
    text = report_markdown(payload, notes, markdown, heldout_markdown)
    md_path.write_text(text)
    json_path.write_text(json.dumps(payload, indent=2))
    if as_json:
        summary: dict[str, Any] = {
            name: {key: r[key] for key in (f"success@{payload['max_turns']}", "turns_to_success")}
            for name, r in payload.get("results", {}).items()
        }
        if "heldout" in payload:
            summary["heldout"] = {name: {key: r["summary"][key] for key in ("rate", "passed", "turns", "by_decided_by")}
                                  for name, r in payload["heldout"]["results"].items()}
        print_json(summary)
        return
    out.print(text)
    console.print(f"report: {md_path} ({seconds:.0f}s)")


def _ranker_note(service: RecommenderService) -> str:
    """Which ranker scored the LLM agent's candidates, with its alpha and window (alpha 0: the retrieval order)."""
    if service.reranker is None:
        return ""
    config = service.reranker.config
    return f", ranker {config.ranker} (score mode, alpha {config.alpha('score'):g}, window {config.window('score')})"


def report_markdown(payload: dict[str, Any], notes: list[str], sim_markdown: Any, heldout_markdown: Any) -> str:
    """The chat report: the simulated users' section (when the payload has one), then the held-out section."""
    extra = heldout_markdown(payload["heldout"]) if "heldout" in payload else []
    if "results" in payload:
        return str(sim_markdown(payload, notes, extra=extra))
    lines = [f"# Chat evaluation: {payload['heldout'].get('catalog', '')}".rstrip(": "), "", *extra]
    return "\n".join([*lines, "## Notes", "", *(f"- {n}" for n in notes)]) + "\n"
