"""Credentials never travel (issue 14, item 5): not on spark-submit's command line for any
cluster manager, not in a pickled closure shipped to executors, not in a repr.

The YARN and Kubernetes masters cannot run here: the test builds the exact command the Spark
provider would run for them (its own ``_build_spark_submit_command``) and greps it."""

from __future__ import annotations

import json
import pickle
import secrets
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CANARY_ACCESS = "AKIACANARY" + secrets.token_hex(5).upper()
CANARY_SECRET = "canary-" + secrets.token_urlsafe(24)


@pytest.fixture
def airflow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.setenv("AIRFLOW_CONN_TWOCLUSTER_STORE", json.dumps({
        "conn_type": "aws", "login": CANARY_ACCESS, "password": CANARY_SECRET,
        "extra": {"endpoint_url": "http://s3.internal:7480", "region_name": "eu-west-1"}}))
    yield


@pytest.mark.parametrize("master", ["yarn", "k8s://https://kubernetes.default.svc:443", "spark://127.0.0.1:7077", "local[2]"])
def test_the_store_secret_is_never_on_the_spark_submit_command_line(airflow_env, monkeypatch, master):
    from twocluster.orchestration.operators import PipelineSparkOperator

    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": master}))
    op = PipelineSparkOperator(task_id="preprocess", application="spark_jobs/preprocess.py", conn_id="spark_default",
                                     application_args=["--date", "2026-11-20"])
    env = op.driver_environment()
    hook = op._get_hook()
    hook._env_vars = {**(op.env_vars or {}), **env}
    command = " ".join(hook._build_spark_submit_command(op.application))
    assert CANARY_SECRET not in command and CANARY_ACCESS not in command, command
    assert env["AWS_ENDPOINT_URL_S3"] == "http://s3.internal:7480"
    if hook._is_yarn or hook._is_kubernetes:
        # Driver and executors there use their own identity; they learn only where the store is.
        assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
        assert "spark.kubernetes.driverEnv.AWS_ENDPOINT_URL_S3" in command or "spark.yarn.appMasterEnv.AWS_ENDPOINT_URL_S3" in command
    else:
        # Local / standalone client mode: spark-submit's process environment (not argv).
        assert env["AWS_SECRET_ACCESS_KEY"] == CANARY_SECRET


def test_no_secret_in_a_pickled_store_or_a_settings_repr():
    from twocluster.store.storage import ObjectStore, S3Settings

    settings = S3Settings(endpoint_url="http://s3.internal:7480", region="eu-west-1", access_key=CANARY_ACCESS,
                          secret_key=CANARY_SECRET, session_token="token-" + CANARY_SECRET)
    store = ObjectStore("s3://bucket/prefix", settings)
    assert CANARY_SECRET not in repr(settings) and CANARY_SECRET not in repr(store)
    shipped = pickle.dumps(store)
    assert CANARY_SECRET.encode() not in shipped and CANARY_ACCESS.encode() not in shipped
    rebuilt = pickle.loads(shipped)
    assert rebuilt.s3_settings.endpoint_url == "http://s3.internal:7480" and rebuilt.s3_settings.secret_key is None


def test_the_featurizing_udf_closure_carries_no_secret(spark, speech_spec):
    """The function Spark pickles for the executors (with cloudpickle, as PySpark does)."""
    from pyspark import cloudpickle

    from twocluster.spark.io import featurizing_function
    from twocluster.store.storage import ObjectStore, S3Settings

    store = ObjectStore("s3://bucket/prefix", S3Settings(endpoint_url="http://s3.internal:7480", access_key=CANARY_ACCESS,
                                                         secret_key=CANARY_SECRET))
    shipped = cloudpickle.dumps(featurizing_function(speech_spec, store))
    assert b"s3.internal" in shipped  # the closure was really serialized
    assert CANARY_SECRET.encode() not in shipped and CANARY_ACCESS.encode() not in shipped


def test_a_standalone_cluster_mode_driver_gets_no_credentials(airflow_env, monkeypatch):
    """A driver the standalone master launches on a worker (deploy-mode cluster) is not beside
    the task: like YARN's and Kubernetes', it learns where the store is, never its keys."""
    from twocluster.orchestration.operators import PipelineSparkOperator

    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps(
        {"conn_type": "spark", "host": "spark://127.0.0.1:7077", "extra": {"deploy-mode": "cluster"}}))
    op = PipelineSparkOperator(task_id="preprocess", application="spark_jobs/preprocess.py", conn_id="spark_default")
    env = op.driver_environment()
    assert env["AWS_ENDPOINT_URL_S3"] == "http://s3.internal:7480"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
