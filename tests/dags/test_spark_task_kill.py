"""Killing the Airflow task kills its Spark job: the DAG's Spark operator, run for real on local
Spark (spark-submit) and on a Spark Connect server, is killed (its ``on_kill``, what Airflow calls
on a killed or timed-out task) while the job writes; nothing is committed then or later, and no
job process is left behind."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from twocluster.store import layout
from twocluster.store.manifest import scan_location
from twocluster_demo import sample_data

ROOT = Path(__file__).resolve().parents[2]
DATE = dt.date(2026, 11, 3)


def _job_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eww" not in line]


@pytest.mark.slow
@pytest.mark.parametrize("spark_at", ["spark-submit", "spark-connect"])
def test_killing_the_task_stops_the_spark_job_before_it_commits(spark_at, speech_spec, file_store, monkeypatch, request):
    from twocluster.orchestration.operators import PipelineSparkOperator

    connection = (request.getfixturevalue("spark_connect_server").connection if spark_at == "spark-connect"
                  else json.dumps({"conn_type": "spark", "host": "local[2]"}))
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", connection)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    sample_data.generate_day(file_store, speech_spec, DATE, clips=400, seed=9)
    op = PipelineSparkOperator(
        task_id="preprocess", application=str(ROOT / "spark_jobs" / "preprocess.py"), conn_id="spark_default",
        application_args=["--spec", str(ROOT / "pipelines" / "speech_commands.yaml"), "--date", DATE.isoformat(),
                          "--store", file_store.root_uri, "--run-id", "kill-test"],
    )
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: _capture(errors, op.execute, {}), daemon=True)
    runner.start()
    parent = layout.dataset_date_prefix(speech_spec.name, DATE)
    deadline = time.monotonic() + 300
    while not _data_files(file_store, parent):
        assert runner.is_alive(), f"the job ended before it could be killed: {errors}"
        assert time.monotonic() < deadline, "the job never started writing"
        time.sleep(0.05)
    assert _job_processes(file_store.root_uri), "the job is not running"

    op.on_kill()
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert errors and "Cannot execute" in str(errors[0]), "the task fails when its job is killed"

    # The Python driver notices its spark-submit JVM is gone (within a second) and exits; give a
    # surviving process ample time to show itself by committing.
    deadline = time.monotonic() + 20
    while _job_processes(file_store.root_uri) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _job_processes(file_store.root_uri) == []
    time.sleep(3)
    assert _data_files(file_store, parent), "the killed job had written data files"
    assert scan_location(file_store, parent).versions == [], "nothing is committed by a killed job"


def _data_files(store, parent: str) -> list:
    """What the job wrote besides its heartbeat (task attempts' shards, version files)."""
    return [o for o in store.list(parent) if "/_inflight/" not in o.key]


def _capture(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - handed to the test thread
        errors.append(e)
