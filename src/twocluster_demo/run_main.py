"""`make run` / `make run-images`: a pipeline on the embedded default (a local folder as the
store, local Spark, the local training backend, Airflow on SQLite under .local/).

1. Sample arrivals for the last few days (generated once; kept on later runs): speech spoken by
   espeak-ng for an audio pipeline, scikit-learn's scanned digits for an image pipeline.
2. The pipeline's real DAG (``speech_commands`` by default), run by ``airflow dags test`` for every arrived date, oldest
   first, as the scheduler's catch-up would: each run preprocesses its date on Spark; the
   retrain policy decides when the GPU job trains (the first model waits for enough data); the
   gate publishes; Spark scores the date with the published model. Spark is a local Spark
   Connect server that this command starts before the first run and stops after the last (or on
   Ctrl-C or SIGTERM): a long-lived Spark whose JVM and Python workers the runs share, as a
   deployment's would be (bench ``dag_run``: a daily run took half the time of one with a
   spark-submit per job). ``--spark submit``: a Spark application per job instead.
3. A summary read back from the store: what each run committed.

Each run's full Airflow log goes to .local/logs/make-run-<date>.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from twocluster.orchestration.results import SUMMARY_MARKER
from twocluster.spec import default_spec_path, load_pipeline_spec
from twocluster.store.storage import ObjectStore
from twocluster_demo import sample_data, sample_images
from twocluster_devtools.airflow_local import REPO_ROOT, airflow, airflow_env, prepare
from twocluster_devtools.spark_connect import LocalSparkConnect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(default_spec_path()))
    parser.add_argument("--store", default=None, help="store URI (default: $TWOCLUSTER_STORE_URI)")
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--clips-per-day", type=int, default=600, help="examples per day (clips or images)")
    parser.add_argument("--master", default="local[*]", help="Spark master with --spark submit (default: %(default)s)")
    parser.add_argument("--spark", choices=("connect", "submit"), default="connect",
                        help="a local Spark Connect server for all runs, or a spark-submit per job (default: %(default)s)")
    parser.add_argument("--local-dir", default=str(REPO_ROOT / ".local"))
    args = parser.parse_args(argv)

    spec = load_pipeline_spec(args.spec)
    store = ObjectStore(spec.resolve_store_uri(args.store))
    local = Path(args.local_dir)
    started = time.perf_counter()

    dates = sample_data.arrival_dates(args.days)
    if spec.featurizer.kind == "image":
        reports, what = sample_images.generate(store, spec, dates, args.clips_per_day, seed=0, bad_files_per_day=2), "images"
    else:
        reports, what = sample_data.generate(store, spec, dates, args.clips_per_day, seed=0, bad_files_per_day=2), "clips"
    print(f"== {spec.name}: sample arrivals in {store.root_uri}")
    for r in reports:
        state = "already there" if r.skipped else "generated"
        print(f"  {r.date}: {r.clips} {what} + {r.bad_files} broken files, {r.bytes / 1e6:.1f} MB ({state})")

    with contextlib.ExitStack() as spark:
        connection = None
        if args.spark == "connect":
            # Stopped on the way out, by Ctrl-C or SIGTERM too (as SystemExit): no orphan server.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            cores = os.cpu_count() or 2
            print(f"\n== Spark: a local Spark Connect server (local[{cores}]) for the runs; its log in {local / 'spark-connect'}")
            connection = spark.enter_context(LocalSparkConnect(local / "spark-connect", cores=cores)).connection
        env = airflow_env(local / "airflow", store.root_uri, spark_master=args.master, spark_connection=connection,
                          lineage_dir=local / "lineage")
        code = _run_dates(env, local, spec, reports)
    if code:
        return code
    print(f"\n== done in {time.perf_counter() - started:.0f}s. Everything is under {store.root_uri}:")
    for what in ("datasets", "models", "predictions"):
        print(f"  {store.uri(what)}/")
    print(f"What is committed and published: .venv/bin/twocluster status --store {store.root_uri}")
    return 0


def _run_dates(env: dict[str, str], local: Path, spec, reports) -> int:
    """``airflow dags test`` of the pipeline for each arrived date, oldest first; 1 at the first that fails."""
    prepare(env)
    logs = local / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"\n== Airflow: the {spec.name} DAG for each date (airflow dags test; logs in {logs})")
    for r in reports:
        date = str(r.date)
        log_path = logs / f"make-run-{date}.log"
        t0 = time.perf_counter()
        with log_path.open("w") as log:
            result = airflow(env, "dags", "test", spec.name, "-c", json.dumps({"date": date}), stdout=log, stderr=log)
        text = log_path.read_text(errors="replace")
        # Success needs the run's own summary too: a run whose tasks never started also ends "success".
        ok = result.returncode == 0 and "state=success" in _run_line(text) and SUMMARY_MARKER in text
        print(f"\n  {date}: DAG run {'succeeded' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f}s")
        if not ok:
            print(f"  see {log_path}", file=sys.stderr)
            return 1
        print("    " + _summary(text).replace("\n", "\n    "))
    return 0


def _run_line(log_text: str) -> str:
    lines = [line for line in log_text.splitlines() if "DagRun Finished" in line]
    return lines[-1] if lines else "failed: no DagRun Finished line"


def _summary(log_text: str) -> str:
    """The summary the DAG's ``summarize`` task printed (after its marker line)."""
    lines = log_text.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == SUMMARY_MARKER]
    if not marks:
        return "(no summary in the log)"
    block = []
    for line in lines[marks[-1] + 1:]:
        if block and not line.startswith("  "):
            break
        block.append(line)
    return "\n".join(block)


if __name__ == "__main__":
    sys.exit(main())
