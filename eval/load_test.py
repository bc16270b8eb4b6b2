"""A bounded load test against a running ``recagent serve`` on loopback.

``clients`` concurrent clients send requests for ``seconds`` seconds, mixing routes by weight. Every request
is distinct (recommendations cycle through different users; reranks draw different candidate sets), so no
answer can come from a cache. Reports p50/p95/max latency, throughput and error counts per route, degraded
answers, and whether the server stayed healthy.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from eval.machine import machine_line

ROUTES = ("recommend", "rerank", "item", "search", "chat")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
QUERIES = [
    "space adventure",
    "romantic comedy",
    "crime thriller",
    "animated family film",
    "war drama",
    "science fiction classic",
    "horror",
    "musical",
    "film noir detective",
    "western",
]


class LoadTestError(RuntimeError):
    pass


def _id_range(spec: str) -> list[str]:
    """``1-943`` or ``a,b,c``."""
    if "-" in spec and "," not in spec:
        lo, hi = spec.split("-", 1)
        return [str(i) for i in range(int(lo), int(hi) + 1)]
    return [s.strip() for s in spec.split(",") if s.strip()]


@dataclass
class LoadConfig:
    url: str
    clients: int
    seconds: float
    weights: dict[str, float]
    mode: str = "score"
    explain: bool = False
    users: list[str] = field(default_factory=lambda: _id_range("1-943"))
    items: list[str] = field(default_factory=lambda: _id_range("1-1682"))
    api_key: str | None = None
    timeout_s: float = 120.0
    seed: int = 0

    @classmethod
    def parse(
        cls,
        url: str,
        clients: int,
        seconds: float,
        mix: str,
        mode: str = "score",
        explain: bool = False,
        users: str = "1-943",
        items: str = "1-1682",
        api_key: str | None = None,
    ) -> LoadConfig:
        host = urlparse(url).hostname or ""
        if host not in LOOPBACK:
            raise ValueError(f"--url must point at this machine (127.0.0.1 / localhost), not {host!r}")
        if mode not in ("score", "generate", "retrieval"):
            raise ValueError(f"--mode '{mode}': choose score, generate or retrieval")
        weights: dict[str, float] = {}
        for part in mix.split(","):
            if not part.strip():
                continue
            route, _, w = part.partition("=")
            route = route.strip()
            if route not in ROUTES:
                raise ValueError(f"--mix: unknown route '{route}' (choose from {', '.join(ROUTES)})")
            try:
                weights[route] = float(w or 1)
            except ValueError:
                raise ValueError(f"--mix: weight of '{route}' is not a number: {w!r}") from None
        if not weights or sum(weights.values()) <= 0:
            raise ValueError("--mix: give at least one route with a positive weight")
        return cls(
            url=url.rstrip("/"),
            clients=clients,
            seconds=seconds,
            weights=weights,
            mode=mode,
            explain=explain,
            users=_id_range(users),
            items=_id_range(items),
            api_key=api_key,
        )


@dataclass
class Sample:
    route: str
    start: float
    latency_s: float
    status: int
    degraded: bool = False
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class _Client:
    def __init__(self, config: LoadConfig, index: int) -> None:
        self.config = config
        self.index = index
        self.rng = random.Random(config.seed * 1000 + index)
        self.n = 0
        self.routes = list(config.weights)
        self.weights = [config.weights[r] for r in self.routes]

    def next_request(self) -> tuple[str, str, str, dict[str, Any] | None]:
        """(route, method, path, json body); distinct across clients and over time."""
        c = self.config
        route = self.rng.choices(self.routes, self.weights)[0]
        slot = self.index + c.clients * self.n
        self.n += 1
        if route == "recommend":
            body = {"user_id": c.users[slot % len(c.users)], "k": 10, "mode": c.mode, "explain": c.explain}
            return route, "POST", "/v1/recommendations", body
        if route == "rerank":
            picks = self.rng.sample(c.items, min(len(c.items), 25))
            body = {
                "history": picks[:5],
                "candidates": picks[5:],
                "k": 10,
                "mode": c.mode,
                "explain": c.explain,
            }
            return route, "POST", "/v1/rerank", body
        if route == "item":
            return route, "GET", f"/v1/items/{c.items[slot % len(c.items)]}", None
        if route == "search":
            return (
                route,
                "GET",
                f"/v1/items?query={QUERIES[slot % len(QUERIES)].replace(' ', '+')}&k=10",
                None,
            )
        body = {
            "message": f"recommend me a {QUERIES[slot % len(QUERIES)]} movie",
            "user_id": c.users[slot % len(c.users)],
        }
        return route, "POST", "/v1/chat", body


async def _client_loop(
    config: LoadConfig, index: int, until: float, client: Any, samples: list[Sample]
) -> None:
    gen = _Client(config, index)
    while time.monotonic() < until:
        route, method, path, body = gen.next_request()
        t0 = time.monotonic()
        try:
            response = await client.request(method, path, json=body)
            latency = time.monotonic() - t0
            degraded = False
            if response.status_code == 200 and route in ("recommend", "rerank", "chat"):
                degraded = bool(response.json().get("degraded"))
            samples.append(
                Sample(
                    route,
                    t0,
                    latency,
                    response.status_code,
                    degraded,
                    None if response.status_code < 400 else response.text[:200],
                )
            )
        except Exception as exc:  # a transport failure is an error of the run, not of the script
            samples.append(
                Sample(route, t0, time.monotonic() - t0, 0, error=f"{type(exc).__name__}: {exc}"[:200])
            )


async def _healthy(client: Any) -> bool:
    try:
        return bool((await client.get("/healthz")).status_code == 200)
    except Exception:
        return False


async def _run(config: LoadConfig) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.clients + 4, max_keepalive_connections=config.clients + 4)
    async with httpx.AsyncClient(
        base_url=config.url, headers=headers, timeout=config.timeout_s, limits=limits
    ) as client:
        if not await _healthy(client):
            raise LoadTestError(
                f"no healthy server at {config.url} (GET /healthz); start `recagent serve` first"
            )
        ready = await client.get("/readyz")
        readiness = (
            ready.json() if ready.headers.get("content-type", "").startswith("application/json") else {}
        )
        samples: list[Sample] = []
        load_before = os.getloadavg()
        t0 = time.monotonic()
        until = t0 + config.seconds
        await asyncio.gather(
            *[_client_loop(config, i, until, client, samples) for i in range(config.clients)]
        )
        wall = time.monotonic() - t0
        load_after = os.getloadavg()
        healthy_after = await _healthy(client) and (await client.get("/readyz")).status_code == 200
    return summarise(config, samples, wall, readiness, healthy_after, load_before, load_after)


def summarise(
    config: LoadConfig,
    samples: list[Sample],
    wall_s: float,
    readiness: dict[str, Any],
    healthy_after: bool,
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
) -> dict[str, Any]:
    def stats(group: list[Sample]) -> dict[str, Any]:
        ok = [s.latency_s for s in group if 200 <= s.status < 300]
        return {
            "requests": len(group),
            "ok": len(ok),
            "errors": len(group) - len(ok),
            "degraded": sum(s.degraded for s in group),
            "p50_s": round(percentile(ok, 0.5), 4) if ok else None,
            "p95_s": round(percentile(ok, 0.95), 4) if ok else None,
            "max_s": round(max(ok), 4) if ok else None,
            "mean_s": round(statistics.fmean(ok), 4) if ok else None,
            "throughput_rps": round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        }

    by_route = {
        r: stats([s for s in samples if s.route == r]) for r in ROUTES if any(s.route == r for s in samples)
    }
    overall = stats(samples)
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    errors = [s.error for s in samples if s.error][:10]
    result: dict[str, Any] = {
        "config": {
            **asdict(config),
            "users": f"{len(config.users)} ids",
            "items": f"{len(config.items)} ids",
            "api_key": "set" if config.api_key else None,
        },
        "wall_s": round(wall_s, 2),
        "overall": overall,
        "routes": by_route,
        "statuses": statuses,
        "error_examples": errors,
        "server": readiness,
        "healthy_after": healthy_after,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "machine": machine_line(),
    }
    result["summary_text"] = text_summary(result)
    return result


def text_summary(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"{cfg['clients']} client(s) x {cfg['seconds']:g}s, mode {cfg['mode']}, explain {cfg['explain']}, "
        f"wall {result['wall_s']}s; load average {result['load_average_before']} -> "
        f"{result['load_average_after']}",
        f"{'route':<10} {'requests':>8} {'errors':>6} {'degraded':>8} {'p50 s':>8} {'p95 s':>8} {'max s':>8} "
        f"{'req/s':>7}",
    ]
    rows = [*result["routes"].items(), ("ALL", result["overall"])]
    for route, s in rows:

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        lines.append(
            f"{route:<10} {s['requests']:>8} {s['errors']:>6} {s['degraded']:>8} {f(s['p50_s']):>8} "
            f"{f(s['p95_s']):>8} {f(s['max_s']):>8} {s['throughput_rps']:>7.2f}"
        )
    lines.append(f"statuses {result['statuses']}; healthy after: {result['healthy_after']}")
    return "\n".join(lines)


def run_load(config: LoadConfig) -> dict[str, Any]:
    return asyncio.run(_run(config))


def write_reports(result: dict[str, Any], name: str, folder: Path = Path("reports")) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / f"load-{name}.md", folder / f"load-{name}.json"
    cfg = result["config"]
    command = (
        f"recagent eval load --url {cfg['url']} --clients {cfg['clients']} --seconds {cfg['seconds']:g} "
        f"--mix {','.join(f'{k}={v:g}' for k, v in cfg['weights'].items())} --mode {cfg['mode']}"
        f"{' --explain' if cfg['explain'] else ''} --name {name}"
    )
    server = result.get("server") or {}
    settings = ", ".join(f"{k}={v}" for k, v in (server.get("serving") or {}).items())
    md.write_text(
        "\n".join(
            [
                f"# Load test: {name}",
                "",
                f"- command: `{command}`",
                f"- server: catalogue {server.get('catalog')}, model {server.get('model')}, "
                f"llm {server.get('llm')}",
                f"- server settings: {settings or 'n/a'}",
                f"- machine: {result['machine']}; load average before {result['load_average_before']}, "
                f"after {result['load_average_after']}",
                "- every request distinct (recommendations cycle through users; reranks draw random "
                "candidates)",
                "",
                "```",
                result["summary_text"],
                "```",
                "",
                *([f"- error example: {e}" for e in result["error_examples"]] or ["- no errors"]),
                "",
            ]
        ),
        encoding="utf-8",
    )
    js.write_text(
        json.dumps({k: v for k, v in result.items() if k != "summary_text"}, indent=2), encoding="utf-8"
    )
    return md, js
