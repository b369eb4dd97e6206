"""The health check: a small hourly DAG, one task per pipeline, that fails through the pipeline's
failure notifier (``notifiers``) when the newest scored date is older than the spec's
``monitoring.max_lag_days``, or when dates in the monitoring window reject more than
``thresholds.max_reject_rate`` of their inputs or drift more than ``monitoring.max_drift``; the
failure names the dates. It reads the store exactly as the ops page does
(``twocluster.ops.monitoring``).

Airflow's own deadline alerts are not used: `dags test` crashes after a run of a DAG that sets
``deadline=`` in Airflow 3.3.2 (apache/airflow#73428), and `make run` runs the pipeline DAG
that way.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from airflow.sdk import DAG, task

from twocluster.deployment import PIPELINES_DIR
from twocluster.orchestration.notifiers import task_defaults
from twocluster.spec import load_pipeline_spec


def build_health_dag(pipelines_dir: str | os.PathLike[str] = PIPELINES_DIR, dag_id: str = "twocluster_health") -> DAG:
    spec_paths = sorted(Path(pipelines_dir).glob("*.yaml"))
    with DAG(
        dag_id=dag_id,
        description="Freshness, reject rate and prediction drift of every pipeline, against its spec",
        schedule="@hourly",
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,
        tags=["twocluster", "ops", "health"],
        default_args=task_defaults(retries=1, retry_delay=dt.timedelta(minutes=2), execution_timeout=dt.timedelta(minutes=5)),
        doc_md=__doc__,
    ) as dag:
        for path in spec_paths:
            spec = load_pipeline_spec(path)

            @task(task_id=f"check_{spec.name}", doc_md=f"Health of `{spec.name}` ({path.name}): freshness, rejects, drift.")
            def check(spec_path: str) -> dict:
                from airflow.sdk.exceptions import AirflowFailException

                from twocluster.ops.monitoring import health_problems, pipeline_overview
                from twocluster.store_access import store_for

                checked = load_pipeline_spec(spec_path)
                overview = pipeline_overview(store_for(checked), checked)
                problems = health_problems(overview)
                for problem in problems:
                    print(f"UNHEALTHY {problem}")
                if problems:
                    # Not transient: fail now (the notifier reports it) rather than retry.
                    raise AirflowFailException("; ".join(problems))
                print(f"healthy: {checked.name}, newest scored date {overview.freshness.newest_scored_date}")
                return overview.freshness.model_dump(mode="json")

            check(str(path))
    return dag
