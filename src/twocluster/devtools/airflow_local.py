"""The embedded Airflow: a metadata database (SQLite) and configuration under one folder, the
repository's plugins, and the connections the pipeline DAGs need, for `make run`, the tests and
local development. Nothing here is used by a deployed Airflow (the compose stack sets the same
variables itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
POOLS = {"spark_cluster": (1, "Spark jobs in flight (the Spark cluster's capacity)"),
         "gpu_training": (1, "training jobs in flight (the GPU backend's capacity)")}


def airflow_env(airflow_home: Path, store_uri: str, *, dags_folder: Path | None = None, spark_master: str = "local[*]",
                base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `airflow` commands against the embedded installation."""
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": spark_master}),
        "TWOCLUSTER_STORE_URI": store_uri,
        # spark-submit (run bare by the Spark provider) and the executors' Python come from the venv.
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
        "PYSPARK_PYTHON": sys.executable,
    })
    return env


def airflow(env: dict[str, str], *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=env, **kwargs)


def prepare(env: dict[str, str]) -> None:
    """Create or migrate the metadata database and the pools (both idempotent)."""
    for cmd in (["db", "migrate"], *(["pools", "set", name, str(slots), doc] for name, (slots, doc) in POOLS.items())):
        result = airflow(env, *cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
