"""What every trained artifact records about how it was made."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def git_commit() -> str:
    """The short commit of the checkout this code runs from, with ``-dirty`` when tracked files differ from it (the
    code that ran is then not the commit's), or ``unknown``."""
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True, cwd=here).stdout.strip()
        return f"{commit}-dirty" if changed else commit
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """The ``recagent`` command being run, as the user typed it."""
    return " ".join(["recagent", *sys.argv[1:]])


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
