"""Jobs on a Spark Connect server share a session per code version and settings, so they run on
warm Python workers; a closed session is stepped over; a terminated client stops its work on
the server. Run against the real server (pyspark's SparkConnectServer, local[2])."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from twocluster.spark.session import (
    CONNECT_MODE_ENV,
    SESSION_SETTINGS,
    connect_mark_left_as_it_was,
    connect_session,
    release_shared_session,
    shared_session_id,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_shared_session_follows_the_code_and_the_settings():
    one = shared_session_id("twocluster-aaaa.zip", SESSION_SETTINGS)
    assert one == shared_session_id("twocluster-aaaa.zip", dict(reversed(SESSION_SETTINGS.items())))
    assert uuid.UUID(one).version == 4  # what PySpark's client checks a session_id against
    others = {shared_session_id("twocluster-bbbb.zip", SESSION_SETTINGS),
              shared_session_id("twocluster-aaaa.zip", {**SESSION_SETTINGS, "spark.sql.execution.arrow.maxRecordsPerBatch": "256"}),
              shared_session_id("twocluster-aaaa.zip", SESSION_SETTINGS, generation=1)}
    assert one not in others and len(others) == 3


def _worker_pids(spark) -> set[int]:
    import pyarrow as pa

    def pid(batches):
        import os

        for _ in batches:
            yield pa.RecordBatch.from_pylist([{"pid": os.getpid()}])

    return {row.pid for row in spark.range(0, 4, 1, 2).mapInArrow(pid, "pid long").collect()}


@pytest.fixture
def connect_client_here():
    """This test process opens Spark Connect sessions; the mark PySpark leaves goes when the test ends."""
    with connect_mark_left_as_it_was():
        yield


@pytest.mark.slow
def test_jobs_of_the_same_code_share_a_session_and_its_python_workers(spark_connect_server, tmp_path, connect_client_here):
    """A session per job started fresh Python workers for every job (Spark keys its workers by
    the session), ~3-4 s of a daily job's ~5 on two cores: the second job now runs on the first
    one's workers. A session the server has closed (its idle timeout) is stepped over. (The
    session is the one every job of this code joins on this server: the other tests' jobs
    there step over its release as a daily run does.)"""
    url = spark_connect_server.url
    first = connect_session(url, "first", package_cache=tmp_path)
    pids, session = _worker_pids(first), first.client._session_id
    first.stop()
    second = connect_session(url, "second", package_cache=tmp_path)
    assert second.client._session_id == session
    assert _worker_pids(second) == pids, "the second job started Python workers of its own"

    second.stop()
    os.environ.pop(CONNECT_MODE_ENV)
    assert release_shared_session(url, package_cache=tmp_path) == session  # as the server's idle timeout would
    assert CONNECT_MODE_ENV not in os.environ, "a spark-submit started from this process would refuse to start"
    third = connect_session(url, "third", package_cache=tmp_path)
    try:
        assert third.client._session_id != session
        assert _worker_pids(third)
    finally:
        third.stop()


SLEEPER = """
import pathlib, sys, time
from twocluster.spark.session import get_spark

marks = pathlib.Path(sys.argv[1])
spark = get_spark("sleeper")  # on $SPARK_REMOTE, as the jobs' entry points

def sleep_then_mark(batches):
    from pyspark import TaskContext
    import time
    part = TaskContext.get().partitionId()
    (marks / f"started-{part}").touch()
    time.sleep(12)
    (marks / f"finished-{part}").touch()
    yield from batches

spark.range(0, 2, 1, 2).mapInArrow(sleep_then_mark, "id long").collect()
"""


@pytest.mark.slow
def test_a_terminated_client_stops_its_work_on_the_server(spark_connect_server, tmp_path):
    """A task's ``on_kill`` terminates its Spark Connect client. The session outlives the client
    (it is shared), so the client's operation must be interrupted, not left to run: SIGTERM
    raises KeyboardInterrupt, and PySpark's client interrupts its operation. Without that the
    tasks ran to the end (measured: a job started after the kill waited ~19 s for the cores)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SPARK_REMOTE": spark_connect_server.url}
    client = subprocess.Popen([sys.executable, "-c", SLEEPER, str(marks)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(list(marks.glob("started-*"))) < 2:
        assert client.poll() is None, client.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the tasks never started"
        time.sleep(0.1)
    started = time.monotonic()
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) != 0
    time.sleep(max(0.0, 12 + 5 - (time.monotonic() - started)))  # past when the tasks would have finished
    assert not list(marks.glob("finished-*")), "the terminated client's tasks ran to their end on the server"


@pytest.mark.slow
def test_the_connect_tests_leave_this_process_a_classic_spark_one(spark):
    """Runs after the tests above in this module (and before the suite's later ones, which
    parse DDL strings and call spark-submit): in CI the mark left behind turned 20 later tests'
    schema strings into Connect calls (NO_ACTIVE_OR_DEFAULT_SESSION)."""
    from pyspark.sql.types import _parse_datatype_string

    assert CONNECT_MODE_ENV not in os.environ
    assert _parse_datatype_string("pid long").simpleString() == "struct<pid:bigint>"
