"""DAG integrity, per DAG file: it imports cleanly and fast (no Spark or TensorFlow at parse
time), and every DAG follows the project's operating policy (tags, owner, retries, timeouts,
failure notifications, docs, pools, validated params)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(p for p in (ROOT / "dags").glob("*.py") if not p.name.startswith("_"))
# kubernetes: the Spark provider's hook imports the Kubernetes client at module level (~5 s of
# every task's parse); twocluster.orchestration defers it (see its _import_lazily).
HEAVY = ("pyspark", "tensorflow", "keras", "torch", "kubernetes", "kubernetes_asyncio")


@pytest.fixture(scope="module", autouse=True)
def _airflow_config(tmp_path_factory):
    # Parsing needs no connection, variable or secret; keep Airflow's files out of the home dir.
    home = tmp_path_factory.mktemp("airflow-home")
    saved = dict(os.environ)
    os.environ.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                       "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    yield
    os.environ.clear()
    os.environ.update(saved)


def _dagbag(path: Path):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(path), safe_mode=False)


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=[p.name for p in DAG_FILES])
def test_dag_file_imports_cleanly(dag_file):
    bag = _dagbag(dag_file)
    assert not bag.import_errors, bag.import_errors
    assert bag.dags, f"{dag_file.name} defines no DAG"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=[p.name for p in DAG_FILES])
def test_dag_file_imports_no_heavy_library(dag_file, tmp_path):
    """Parsed in a fresh interpreter, as the DAG processor does."""
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(dag_file)!r}, safe_mode=False)\n"
        f"print(json.dumps({{'errors': list(bag.import_errors), 'heavy': sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))}}))\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"errors": [], "heavy": []}


def test_the_deferred_kubernetes_client_still_loads_for_a_k8s_master(tmp_path):
    """The Spark hook's ``kube_client`` is there, unloaded, and loads on first use."""
    code = (
        "import sys\n"
        "import twocluster.orchestration\n"
        "from airflow.providers.apache.spark.hooks import spark_submit\n"
        "assert 'kubernetes_asyncio' not in sys.modules and 'kubernetes' not in sys.modules\n"
        "assert callable(spark_submit.kube_client.get_kube_client)\n"
        "assert 'kubernetes' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "AIRFLOW_HOME": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def _all_dags():
    bag = _dagbag(ROOT / "dags")
    assert bag.dags and not bag.import_errors
    return list(bag.dags.values())


def test_every_dag_follows_the_operating_policy():
    for dag in _all_dags():
        assert dag.tags and "twocluster" in dag.tags, dag.dag_id
        assert dag.doc_md and dag.max_active_runs == 1, dag.dag_id
        for t in dag.tasks:
            where = f"{dag.dag_id}.{t.task_id}"
            assert t.owner == "ml-platform", where
            assert t.retries >= 1, f"{where} has no retries"
            assert t.retry_exponential_backoff, where
            assert t.execution_timeout is not None, f"{where} has no execution_timeout"
            assert t.on_failure_callback, f"{where} reports no failure"
            assert t.doc_md, f"{where} has no doc_md"


def test_retries_follow_the_pipeline_spec(tmp_path):
    """The spec's ``retries`` reach the DAG's tasks (the default: 2 retries, 1 min, then doubling)."""
    import datetime as dt

    import yaml

    from twocluster.orchestration.dag_factory import build_pipeline_dag

    data = yaml.safe_load((ROOT / "pipelines" / "speech_commands.yaml").read_text())
    data["retries"] = {"attempts": 4, "delay_seconds": 5, "max_delay_seconds": 40}
    (tmp_path / "speech_commands.yaml").write_text(yaml.safe_dump(data))
    dag = build_pipeline_dag(tmp_path / "speech_commands.yaml")
    for task_id in ("preprocess", "train", "score", "wait_for_arrivals"):
        task = dag.get_task(task_id)
        assert (task.retries, task.retry_delay, task.max_retry_delay) == (4, dt.timedelta(seconds=5), dt.timedelta(seconds=40)), task_id
        assert task.retry_exponential_backoff, task_id


def test_pipeline_dag_shape_pools_and_operators():
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    (dag,) = [d for d in _all_dags() if d.dag_id == "speech_commands"]
    assert {t.task_id for t in dag.tasks} == {
        "check_params", "wait_for_arrivals", "preprocess", "validate_dataset", "wait_for_earlier_dates", "decide_retrain", "write_training_job", "train", "publish",
        "approve", "training_skipped", "no_model_yet", "model_ready", "score", "validate_predictions", "summarize",
    }
    for task_id in ("preprocess", "score"):
        task = dag.get_task(task_id)
        assert isinstance(task, SparkSubmitOperator) and task.pool == "spark_cluster"
        assert task.application.endswith(f"spark_jobs/{task_id}.py")
    from twocluster.orchestration.operators import TrainingJobOperator

    assert isinstance(dag.get_task("train"), TrainingJobOperator)  # the backend is picked when it runs
    assert dag.get_task("train").pool == "gpu_training"
    # Complete days only: preprocessing starts when the arrivals policy says so, freeing its slot between pokes.
    assert dag.get_task("preprocess").upstream_task_ids == {"check_params", "wait_for_arrivals"}  # the run settings, the arrivals
    assert dag.get_task("wait_for_arrivals").upstream_task_ids == {"check_params"}
    assert dag.get_task("wait_for_arrivals").mode == "reschedule"
    assert dag.get_task("model_ready").upstream_task_ids == {"publish", "approve", "training_skipped"}
    from airflow.providers.standard.operators.hitl import HITLOperator

    # A person's approval waits in Airflow's human-in-the-loop step, after the gate, before scoring.
    approve = dag.get_task("approve")
    assert isinstance(approve, HITLOperator) and approve.upstream_task_ids == {"publish"} and approve.defaults == ["reject"]
    assert dag.get_task("score").upstream_task_ids == {"check_params", "model_ready"}
    assert dag.get_task("decide_retrain").downstream_task_ids == {"write_training_job", "training_skipped", "no_model_yet"}
    # Model decisions go in date order even when a backfill runs several dates at once.
    assert dag.get_task("decide_retrain").upstream_task_ids == {"check_params", "wait_for_earlier_dates"}
    assert dag.get_task("wait_for_earlier_dates").mode == "reschedule"
    assert dag.timetable.expression == "0 0 * * *"  # @daily, with data intervals (a run processes its interval's date)


@pytest.mark.parametrize(("param", "value"), [
    ("date", "../../etc/passwd"),
    ("date", "2026-11-20; rm -rf /"),
    ("model_alias", "../production"),
    ("model_alias", "production; reboot"),
    ("model_alias", "shadow"),
    ("model_version", "20261120T000000Z-deadbeef && id"),
    ("retrain", "sometimes"),
    ("max_reject_rate", 2),
])
def test_params_schema_rejects_bad_values_at_trigger_time(param, value):
    """The UI form, the REST API and `dags test -c` validate against these schemas before a run
    is created (orchestration.RunParams checks the values again when the run starts)."""
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    (dag,) = [d for d in _all_dags() if d.dag_id == "speech_commands"]
    ok = copy.deepcopy(dag.params)
    ok.update({"date": "2026-11-20", "model_alias": "staging", "model_version": "20261120T000000Z-deadbeef", "max_reject_rate": 0.2})
    ok.validate()
    bad = copy.deepcopy(dag.params)
    with pytest.raises(ParamValidationError, match=param):
        bad.update({param: value})
        bad.validate()
