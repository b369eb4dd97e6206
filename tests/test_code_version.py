"""Code hashes (issue 12, defect 4): computed from the package's sources, the same under
spark-submit's --py-files zip as from the checkout, and changed only by the code they cover."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from twocluster.spark.packaging import package_zip
from twocluster.version import code_hashes

ROOT = Path(__file__).resolve().parents[1]
PRINT_HASHES = "import json, twocluster, twocluster.version as v; print(json.dumps([twocluster.__file__, v.code_hashes()]))"


def _hashes_from(path_entry: Path) -> tuple[str, dict]:
    out = subprocess.run([sys.executable, "-c", PRINT_HASHES], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(path_entry), "PATH": "/usr/bin:/bin"}, cwd="/")
    where, hashes = json.loads(out.stdout)
    assert where.startswith(str(path_entry)), f"imported {where}, not from {path_entry}"
    return where, hashes


def test_the_zip_spark_ships_hashes_like_the_checkout(tmp_path):
    """Under spark-submit the package comes from the --py-files zip, where git cannot run."""
    _, from_zip = _hashes_from(package_zip(tmp_path))
    assert from_zip == code_hashes()


def test_only_the_covered_code_changes_a_hash(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "twocluster", copy / "twocluster", ignore=shutil.ignore_patterns("__pycache__"))
    _, before = _hashes_from(copy)
    assert before == code_hashes()

    with open(copy / "twocluster" / "features" / "audio.py", "a") as f:
        f.write("\n# a featurizer fix\n")
    _, after_featurizer = _hashes_from(copy)
    assert after_featurizer["featurizer"] != before["featurizer"] and after_featurizer["package"] != before["package"]
    assert {k: after_featurizer[k] for k in ("preprocess", "scoring", "trainer")} == {k: before[k] for k in ("preprocess", "scoring", "trainer")}

    with open(copy / "twocluster" / "orchestration" / "dag_factory.py", "a") as f:
        f.write("\n# an orchestration change\n")
    _, after_other = _hashes_from(copy)
    assert {k: after_other[k] for k in ("featurizer", "preprocess", "scoring", "trainer")} == \
        {k: after_featurizer[k] for k in ("featurizer", "preprocess", "scoring", "trainer")}
    assert after_other["package"] != after_featurizer["package"]  # recorded in lineage; decides nothing
