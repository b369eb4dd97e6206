"""The shared package as a zip for ``spark-submit --py-files``: the driver and every executor
import the same code as the Airflow side, whatever is installed on the Spark cluster.

The zip is named by a hash of its contents and built once per code change (a rebuild of the
same sources is a no-op, and two tasks building at once each rename a complete file into place).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the whole twocluster package
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # reproducible archives: same sources, same bytes


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*") if p.is_file() and p.suffix in (".py", ".typed") and "__pycache__" not in p.parts)


def default_cache_dir() -> Path:
    """Where the zips are kept: ``$TWOCLUSTER_WORK_DIR`` (a deployment's scratch space), else the
    system's temporary folder."""
    return Path(os.environ.get("TWOCLUSTER_WORK_DIR") or tempfile.gettempdir()) / "twocluster-pyfiles"


def package_zip(cache_dir: str | os.PathLike[str]) -> Path:
    """Build (or reuse) ``twocluster-<hash>.zip`` in ``cache_dir`` and return its path."""
    sources = _sources()
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(PACKAGE_DIR.parent).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    cache = Path(cache_dir)
    target = cache / f"twocluster-{digest.hexdigest()[:16]}.zip"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".twocluster-", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sources:
                info = zipfile.ZipInfo(path.relative_to(PACKAGE_DIR.parent).as_posix(), _FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
