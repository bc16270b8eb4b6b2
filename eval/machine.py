"""What every benchmark report records about the machine it ran on."""

from __future__ import annotations

import os
import platform
from typing import Any


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (floating-point results, and so trained weights, can differ between models)."""
    model = platform.processor() or platform.machine()
    try:
        with open(cpuinfo) as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        return model


def machine_line() -> str:
    """One line for report headers, e.g. ``x86_64 2 cores (AMD EPYC), Python 3.11.7``."""
    return f"{platform.machine()} {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}"


def machine_info() -> dict[str, Any]:
    """The same facts as a record, with torch's version and thread count and the memory size when known."""
    info: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
                            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["mem_gb"] = round(int(fh.readline().split()[1]) / 1e6, 1)
    except OSError:
        pass
    return info
