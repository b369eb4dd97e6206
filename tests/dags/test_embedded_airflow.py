"""The embedded Airflow (SQLite) used by `make run` and the tests."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from twocluster_devtools.airflow_local import airflow, airflow_env, prepare


@pytest.mark.slow
def test_a_cli_write_waits_for_a_writer_holding_the_database_instead_of_failing(tmp_path):
    """CI failed with "database is locked" when `airflow backfill create` ran next to the
    scheduler, the DAG processor and the API server: SQLite's default busy timeout is 5 s. Hold
    the write lock for 8 s, as a busy scheduler can, and a CLI write must still succeed."""
    env = airflow_env(tmp_path / "airflow", (tmp_path / "store").as_uri())
    prepare(env)
    holder = sqlite3.connect(tmp_path / "airflow" / "airflow.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE slot_pool SET description = description")
    committed = threading.Event()

    def commit() -> None:
        holder.execute("COMMIT")
        committed.set()

    released = threading.Timer(8, commit)
    released.start()
    try:
        result = airflow(env, "pools", "set", "spark_cluster", "2", "resized while the database was busy",
                         capture_output=True, text=True, timeout=120)
        # The write finished only once the holder let go: it waited, it did not fail or skip.
        finished_after_the_commit = committed.is_set()
    finally:
        released.join()
        holder.close()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert finished_after_the_commit
    listed = airflow(env, "pools", "get", "spark_cluster", "-o", "plain", capture_output=True, text=True, timeout=120)
    assert "resized while the database was busy" in listed.stdout
