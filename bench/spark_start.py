"""spark_start (issue 37): the emptiest daily job, ``spark-submit`` cold, as a job's own Spark
application starts (:mod:`twocluster.spark.launch`: class-data sharing, C1 only, no UI on a local
master, no wait for PySpark's accumulator server) against PySpark's defaults, runs interleaved.

    .venv/bin/python bench/spark_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMPTY_JOB = HERE / "empty_job.py"


def spark_submit(master: str, conf: dict[str, str]) -> list[str]:
    """This environment's ``spark-submit`` on ``master`` with ``conf``."""
    return [str(Path(sys.executable).parent / "spark-submit"), "--master", master,
            *(arg for key, value in conf.items() for arg in ("--conf", f"{key}={value}"))]


def empty_job(project: bool, master: str = "local[2]", archives: Path | None = None) -> dict[str, float]:
    """Seconds of one cold empty job, from ``spark-submit`` to its exit (``total``), and its
    phases: ``launch`` (the launcher and the driver JVM until the Python driver runs), ``session``
    (PySpark's import and the SparkContext), ``job`` (the first query: its planning, the Python
    workers), ``stop``, ``exit`` (the JVM's shutdown after Python returns)."""
    from twocluster.spark.launch import quick_start

    with quick_start(master, archives) if project else contextlib.nullcontext({}) as conf:
        launched = time.time()
        out = subprocess.run([*spark_submit(master, conf), str(EMPTY_JOB), repr(launched), *([] if project else ["--pyspark-stop"])],
                             capture_output=True, text=True, env={**os.environ, "PYSPARK_PYTHON": sys.executable})
        total = time.time() - launched
        found = re.search(r"PHASES (.*)", out.stdout)
        if out.returncode or not found:
            raise RuntimeError(f"the empty job failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    phases = {k: float(v) for k, v in (item.split("=") for item in found.group(1).split())}
    phases["exit"] = total - sum(phases.values())
    phases["total"] = total
    return phases


def compare(runs: int, archives: Path | None = None) -> tuple[list[dict], list[dict]]:
    """(the project's starts, PySpark's defaults), interleaved after one of each to warm the page
    cache (and, the first time, to dump the class archive)."""
    empty_job(True, archives=archives), empty_job(False)
    project, default = [], []
    for _ in range(runs):
        project.append(empty_job(True, archives=archives))
        default.append(empty_job(False))
    return project, default


def phase_medians(runs: list[dict]) -> dict[str, float]:
    return {k: st.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    project, default = compare(args.runs)
    for name, runs in (("project", project), ("default", default)):
        print(name, " ".join(f"{k} {v:.2f}" for k, v in phase_medians(runs).items()))


if __name__ == "__main__":
    main()
