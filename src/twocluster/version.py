"""The code version recorded in every manifest's lineage."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@lru_cache(maxsize=1)
def code_version() -> str:
    """``$TWOCLUSTER_CODE_VERSION`` (set by image builds), else the package version plus the git
    commit of the checkout (``+dirty`` when it has uncommitted changes)."""
    if env := os.environ.get("TWOCLUSTER_CODE_VERSION"):
        return env
    try:
        base = version("twocluster")
    except PackageNotFoundError:
        base = "0+unknown"
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return base
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return f"{base}+g{sha.stdout.strip()}{'.dirty' if dirty.stdout.strip() else ''}"
    except (OSError, subprocess.SubprocessError):
        return base
