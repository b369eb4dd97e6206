"""What code made an output: a human-readable version and content hashes of the code that shapes
each kind of output.

``code_version()`` (package version + git commit) is for people: under spark-submit the package is
imported from the ``--py-files`` zip where git cannot run, and images hard-set it. What decides
whether an output is stale is :func:`code_hashes`: a SHA-256 of the source files of each
*component*, read through the import system (so it is the same from a checkout, an installed
wheel, or the zip Spark ships). A fix in the featurizer changes ``featurizer`` and so the
fingerprint of every dataset and every prediction; a change to the DAG factory (not in the
package) or to the trainer changes neither.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

# Which sources shape which output. Paths are relative to the package; a folder means every
# .py file under it.
COMPONENTS: dict[str, tuple[str, ...]] = {
    # The features themselves: datasets, predictions, and the models trained on them.
    "featurizer": ("features/",),
    # How a dataset is listed, labelled, split and written (besides the features).
    "preprocess": ("spark/preprocess.py", "spark/io.py", "spark/splits.py", "spark/datasource.py", "store/tfrecord.py", "store/arrowshard.py"),
    # How predictions are computed from features and a model.
    "scoring": ("spark/scoring.py", "spark/io.py", "serving.py"),
    # How a model is trained from staged datasets.
    "trainer": ("training/trainer.py", "training/data.py", "training/models/", "training/distribute.py", "training/checkpoints.py", "store/jobspec.py", "store/arrowshard.py", "serving.py"),
    # Everything in the package (recorded in lineage; decides nothing).
    "package": ("",),
}


@lru_cache(maxsize=1)
def code_version() -> str:
    """``$TWOCLUSTER_CODE_VERSION`` (set by image builds), else the package version plus the git
    commit of the checkout (``+dirty`` when it has uncommitted changes). For people only."""
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


def _python_sources(node: Traversable, rel: str) -> list[tuple[str, Traversable]]:
    if node.is_file():
        return [(rel, node)] if rel.endswith(".py") else []
    found = []
    for child in node.iterdir():
        if child.name == "__pycache__":
            continue
        found += _python_sources(child, f"{rel}/{child.name}" if rel else child.name)
    return found


def source_hash(paths: tuple[str, ...]) -> str:
    """SHA-256 over (relative path, bytes) of the package's .py files under ``paths``."""
    root = files("twocluster")
    sources: dict[str, Traversable] = {}
    for path in paths:
        node = root.joinpath(path.rstrip("/")) if path else root
        sources.update(_python_sources(node, path.rstrip("/")))
    digest = hashlib.sha256()
    for rel in sorted(sources):
        digest.update(rel.encode() + b"\0" + sources[rel].read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


@lru_cache(maxsize=1)
def code_hashes() -> dict[str, str]:
    """``{component: hash}`` for every component in :data:`COMPONENTS`."""
    return {name: source_hash(paths) for name, paths in COMPONENTS.items()}
