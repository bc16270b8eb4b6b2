"""`recagent serve` (the HTTP API and web chat page) and `recagent eval load` (a bounded load test)."""

from __future__ import annotations

import typer

from cli.main import app, catalog_name, console, eval_app, fail, out, print_json


@app.command()
def serve(
    host: str | None = typer.Option(None, "--host", help="interface (default 127.0.0.1, RECAGENT_HOST)"),
    port: int | None = typer.Option(None, "--port", help="port (default 8000, RECAGENT_PORT)"),
    catalog: str | None = typer.Option(None, "--catalog", callback=catalog_name,
                                          help="catalogue to serve (RECAGENT_CATALOG)"),
) -> None:
    """Serve the HTTP API (OpenAPI at /docs) and the web chat page at /."""
    from pydantic import ValidationError

    import serve as server
    from agent.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port, "catalog": catalog}.items() if v is not None}
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        fail(f"invalid settings: {exc}")
        return
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    out.print(
        f"recagent: serving on [bold]http://{shown}:{settings.port}/[/] "
        f"(chat page at /, API docs at /docs; LLM: {settings.llm}; Ctrl-C stops)"
    )
    server.run(settings)


@eval_app.command("load")
def eval_load(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="a running server on loopback"),
    clients: int = typer.Option(16, "--clients", "-n", min=1, max=256, help="concurrent clients"),
    seconds: float = typer.Option(30.0, "--seconds", "-s", min=1, max=3600, help="how long to send requests"),
    mix: str = typer.Option(
        "recommend=1", "--mix", help="route weights, e.g. recommend=6,rerank=2,item=1,search=1,chat=0"
    ),
    mode: str = typer.Option("score", "--mode", help="score | generate | retrieval (recommend and rerank)"),
    explain: bool = typer.Option(False, "--explain", help="ask for LLM reasons too"),
    users: str = typer.Option("1-943", "--users", help="user ids to cycle through: a range 1-943 or a,b,c"),
    items: str = typer.Option(
        "1-1682", "--items", help="item ids for rerank/item requests: a range or a,b,c"
    ),
    name: str = typer.Option("local", "--name", help="reports/load-<name>.md and .json"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="RECAGENT_API_KEY", help="bearer key"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """N concurrent clients for M seconds against a local server: p50/p95, throughput and errors."""
    from eval.load_test import LoadConfig, LoadTestError, run_load, write_reports

    try:
        config = LoadConfig.parse(
            url=url,
            clients=clients,
            seconds=seconds,
            mix=mix,
            mode=mode,
            explain=explain,
            users=users,
            items=items,
            api_key=api_key,
        )
    except ValueError as exc:
        fail(str(exc))
        return
    console.print(f"load: {clients} client(s) x {seconds:g}s against {config.url} (mix {mix}, mode {mode})")
    try:
        result = run_load(config)
    except LoadTestError as exc:
        fail(str(exc), code=1)
        return
    md, js = write_reports(result, name)
    if as_json:
        print_json(result)
    else:
        out.print(result["summary_text"])
    console.print(f"reports: {md}, {js}")
    if not result["healthy_after"]:
        fail("the server was not healthy after the run", code=1)
