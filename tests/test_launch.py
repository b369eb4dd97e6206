"""A job's own Spark application starts the quick way (issue 37, spark_start): the first driver
dumps its classes, later ones map them, and the job's output is the same; the operator gives a
driver beside the task these options and leaves a cluster's driver alone; stopping a job's
session leaves no context behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twocluster.spark import launch

ROOT = Path(__file__).resolve().parents[1]

JOB = """
import sys
from twocluster.spark.session import get_spark, stop_spark

def double(batches):
    import pyarrow.compute as pc
    for batch in batches:
        yield batch.set_column(0, "id", pc.multiply(batch.column(0), 2))

spark = get_spark("launch-test")
print("ROWS", sorted(r.id for r in spark.range(6, numPartitions=2).mapInArrow(double, "id long").collect()))
stop_spark(spark)
"""


def _submit(tmp_path: Path, conf: dict[str, str]) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    command = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]"]
    for key, value in conf.items():
        command += ["--conf", f"{key}={value}"]
    return subprocess.run([*command, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYSPARK_PYTHON": sys.executable})


@pytest.mark.slow
def test_the_first_job_dumps_the_class_archive_and_the_next_maps_it(tmp_path):
    archives = tmp_path / "archives"
    first = launch.driver_start(archives)
    assert first.dumping_to is not None and "-XX:ArchiveClassesAtExit=" in first.java_options
    assert launch.C1_ONLY in first.java_options
    dumped = _submit(tmp_path, launch.submit_conf("local[2]", first))
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    assert not first.archive.exists()  # nobody maps it before its JVM has exited and it is renamed
    assert first.publish() and first.archive.exists() and not first.dumping_to.exists()

    second = launch.driver_start(archives)
    assert second.dumping_to is None and f"-XX:SharedArchiveFile={first.archive}" in second.java_options
    conf = launch.submit_conf("local[2]", second)
    # -Xshare:on: the JVM refuses to start unless it maps the archive (-Xshare:auto, the
    # default, would go on without it), so this run proves the archive is valid and used.
    conf["spark.driver.extraJavaOptions"] += " -Xshare:on"
    mapped = _submit(tmp_path, conf)
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    rows = [next(line for line in run.stdout.splitlines() if line.startswith("ROWS")) for run in (dumped, mapped)]
    assert rows[0] == rows[1] == "ROWS [0, 2, 4, 6, 8, 10]"  # what the job computes without any of this
    assert not second.publish()  # nothing to publish for a job that mapped the archive


def test_an_unfinished_dump_is_never_published(tmp_path):
    start = launch.driver_start(tmp_path)
    start.dumping_to.write_bytes(b"\0" * 1024)  # a JVM that stopped early in its dump
    assert not start.publish()
    assert not start.archive.exists() and not start.dumping_to.exists()
    assert not launch.driver_start(tmp_path).publish()  # a JVM that wrote nothing
    killed = launch.driver_start(tmp_path)
    killed.dumping_to.write_bytes(b"\0" * (2 << 20))  # a failed or killed job's dump, however large
    killed.discard()
    assert not killed.dumping_to.exists() and not killed.archive.exists()


def test_a_dump_left_by_a_killed_task_is_removed_once_stale(tmp_path):
    left = launch.driver_start(tmp_path).dumping_to
    left.write_bytes(b"\0" * 4096)
    fresh = launch.driver_start(tmp_path).dumping_to
    fresh.write_bytes(b"\0" * 4096)
    old = launch.time.time() - launch.STALE_DUMP_SECONDS - 60
    os.utime(left, (old, old))
    launch.driver_start(tmp_path)
    assert not left.exists() and fresh.exists()  # another job may still be dumping to the fresh one


def test_the_archive_is_named_for_the_jvm_and_the_class_path(tmp_path, monkeypatch):
    here = launch.archive_path(tmp_path)
    other_spark = tmp_path / "spark"
    (other_spark / "jars").mkdir(parents=True)
    (other_spark / "jars" / "spark-core.jar").write_bytes(b"PK")
    monkeypatch.setenv("SPARK_HOME", str(other_spark))
    assert launch.archive_path(tmp_path) != here
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    assert launch.archive_path(tmp_path) is None
    assert launch.driver_start(tmp_path).java_options == launch.C1_ONLY


def test_no_archive_where_the_class_path_holds_a_configuration_folder(tmp_path, monkeypatch):
    """The stack's Spark has its spark-defaults.conf in $SPARK_CONF_DIR, a folder on the driver's
    class path: JDK 17 refuses to archive such a class path, and a driver told to dump failed at
    its exit, after its job had committed (the task failed and retried)."""
    conf = tmp_path / "spark-conf"
    conf.mkdir()
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf))
    assert launch.archivable()  # an empty folder is allowed
    (conf / "spark-defaults.conf").write_text("spark.eventLog.enabled true\n")
    assert not launch.archivable()
    start = launch.driver_start(tmp_path / "archives")
    assert start.java_options == launch.C1_ONLY and start.dumping_to is None
    monkeypatch.delenv("SPARK_CONF_DIR")
    monkeypatch.setenv("HADOOP_CONF_DIR", str(conf))
    assert not launch.archivable()


def test_only_a_local_driver_loses_its_ui():
    start = launch.DriverStart(launch.C1_ONLY)
    assert launch.submit_conf("local[2]", start)["spark.ui.enabled"] == "false"
    assert launch.submit_conf("local", start)["spark.ui.enabled"] == "false"
    assert "spark.ui.enabled" not in launch.submit_conf("spark://127.0.0.1:7077", start)


@pytest.mark.parametrize(("master", "deploy_mode", "quick"), [
    ("local[2]", None, True), ("spark://127.0.0.1:7077", None, True), ("spark://127.0.0.1:7077", "cluster", False),
    ("yarn", None, False), ("k8s://https://kubernetes.default.svc:443", None, False)])
def test_the_operator_starts_only_a_driver_beside_the_task_the_quick_way(tmp_path, monkeypatch, master, deploy_mode, quick):
    from twocluster.orchestration.operators import PipelineSparkOperator

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("TWOCLUSTER_WORK_DIR", str(tmp_path))
    extra = {"deploy-mode": deploy_mode} if deploy_mode else {}
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": master, "extra": extra}))
    op = PipelineSparkOperator(task_id="preprocess", application="spark_jobs/preprocess.py", conn_id="spark_default",
                               conf={"spark.driver.extraJavaOptions": "-Dmine=1", "spark.ui.enabled": "true"})
    with pytest.raises(RuntimeError, match="the job failed"), op._quick_driver_start():
        dumps = list((tmp_path / "twocluster-jvm").glob("*.dumping"))
        if not quick:
            assert not dumps and op.conf == {"spark.driver.extraJavaOptions": "-Dmine=1", "spark.ui.enabled": "true"}
            raise RuntimeError("the job failed")
        options = op.conf["spark.driver.extraJavaOptions"]
        assert options.startswith(launch.C1_ONLY) and options.endswith(" -Dmine=1")  # the DAG's own come last: they win
        assert op.conf["spark.ui.enabled"] == "true"  # the DAG's conf wins
        command = " ".join(op._get_hook()._build_spark_submit_command(op.application))
        assert "-XX:ArchiveClassesAtExit=" in command and str(tmp_path / "twocluster-jvm") in command
        dumping = Path(command.split("-XX:ArchiveClassesAtExit=")[1].split()[0])
        dumping.write_bytes(b"\0" * (2 << 20))  # the JVM's dump, then the job fails
        raise RuntimeError("the job failed")
    assert not list((tmp_path / "twocluster-jvm").glob("*"))  # a failed job's dump is discarded, nothing published
