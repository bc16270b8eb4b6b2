"""Real servers the tests start beside themselves (never assumed to be running): Debian's ``redis-server``,
chromadb's ``chroma run`` and ``recagent serve`` replicas. Each is a context manager that yields its URL once the
server answers, and stops it afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running(argv: list[str], log_path: Path, ready: Callable[[], bool], what: str, startup_s: float,
            env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` (output to ``log_path``), wait until ``ready()``, stop it on exit."""
    log = log_path.open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(env) if env is not None else None)
    try:
        deadline = time.monotonic() + startup_s
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}: {log_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not answer within {startup_s:g}s: "
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """Debian's redis-server on a free loopback port, persistence off; yields ``redis://127.0.0.1:PORT/0``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: install Debian's 'redis-server' package (make test runs "
                    "scripts/ensure-redis.sh)")
    import redis

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def ping() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    folder.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(folder), "--protected-mode", "yes"]
    with running(argv, folder / "redis.log", ping, "redis-server", 30):
        yield url


@contextlib.contextmanager
def chroma_server(folder: Path) -> Iterator[str]:
    """chromadb's ``chroma run`` on a free loopback port; yields its URL."""
    chroma = Path(sys.executable).parent / "chroma"
    if not chroma.exists():
        pytest.fail(f"{chroma} not found: chromadb's CLI belongs in the test environment")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    folder.mkdir(parents=True, exist_ok=True)
    argv = [str(chroma), "run", "--path", str(folder / "data"), "--host", "127.0.0.1", "--port", str(port)]
    with running(argv, folder / "server.log", lambda: http_ok(f"{url}/api/v2/heartbeat"), "chroma run", 60):
        yield url


@contextlib.contextmanager
def recagent_server(folder: Path, env: Mapping[str, str], startup_s: float = 240) -> Iterator[str]:
    """One ``recagent serve`` process (settings from ``env``, ``RECAGENT_*``) on a free port; yields its URL
    once ``/readyz`` answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full = {**os.environ, **env, "RECAGENT_HOST": "127.0.0.1", "RECAGENT_PORT": str(port)}
    argv = [str(Path(sys.executable).parent / "recagent"), "serve"]
    folder.mkdir(parents=True, exist_ok=True)
    with running(argv, folder / f"serve-{port}.log", lambda: http_ok(f"{url}/readyz"), "recagent serve",
                 startup_s, env=full):
        yield url
