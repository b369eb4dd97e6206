"""The pipeline DAG, built from a pipeline spec (``pipelines/<name>.yaml``).

    check_params -> wait_for_arrivals -> preprocess (Spark) -> validate_dataset -> wait_for_earlier_dates -> decide_retrain -+
      +-> write_training_job -> train -> publish -+-> approve (a person, only when the gate asks: HITL) -+
      |                                           +-----------------------------------------------------+-> model_ready
      +-> training_skipped ----------------------------------------------------------------------------+       |
      +-> no_model_yet (nothing to score with)    summarize <- validate_predictions <- score (Spark) <----------+

Parsing this file imports no Spark and no TensorFlow: the Spark jobs run through the provider's
``SparkSubmitOperator`` or on a Spark Connect server, training through the configured backend
(both in :mod:`twocluster.orchestration.operators`), and the remaining tasks call
:mod:`twocluster.orchestration.runs`, which imports the heavy libraries only inside the task that
needs them. Tasks hand each other typed results (:mod:`twocluster.orchestration.results`)
through XCom.

Deployment configuration, never in code:

* ``spark_default`` connection: the Spark master (type ``spark``: ``local[2]``,
  ``spark://spark-master:7077``, ...; a Spark application per job), or a long-lived Spark Connect
  server (type ``spark_connect``: host ``sc://spark-connect``, port 15002);
* ``twocluster_store_uri`` variable (else ``$TWOCLUSTER_STORE_URI``, else the spec's
  ``store_uri``) and the optional ``twocluster_store`` connection (an ``aws`` connection:
  login/password, extra ``endpoint_url``/``region_name``; else the worker's ``AWS_*`` variables),
  and ``twocluster_store_spark`` for the Spark drivers where they get credentials of their own;
* ``twocluster_training_backend`` variable: the training backend as JSON
  (:class:`twocluster.orchestration.backends.TrainingBackendConfig`; the local process when unset),
  read when the train task runs (the DAG's shape does not depend on it);
* pools ``spark_cluster`` and ``gpu_training``: how many Spark jobs / training jobs all runs and
  backfills may have in flight together;
* ``TWOCLUSTER_FAILURE_NOTIFIER``: where failures are reported (``notifiers``).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Asset, AssetAlias, CronDataIntervalTimetable, Param, PokeReturnValue, TriggerRule, get_current_context, task

from twocluster.deployment import ROOT as REPO_ROOT
from twocluster.orchestration import runs
from twocluster.orchestration.approval import ModelApprovalOperator
from twocluster.orchestration.notifiers import task_defaults
from twocluster.orchestration.operators import PipelineSparkOperator, TrainingJobOperator
from twocluster.orchestration.results import (
    SUMMARY_MARKER,
    ApprovalAnswer,
    DatasetCheck,
    GateResult,
    PredictionsCheck,
    RunSettings,
    RunSummary,
    SparkJob,
)
from twocluster.orchestration.retrain import RetrainDecision
from twocluster.orchestration.retrain import decide_retrain as decide_retrain_policy
from twocluster.spec import load_pipeline_spec
from twocluster.store import layout
from twocluster.store_access import store_for

SPARK_POOL = "spark_cluster"
GPU_POOL = "gpu_training"


# -- run-time helpers (called inside tasks, never at parse time) ----------------------------------


def _no_retry(fn):
    """Bad parameters and failed data checks are not transient: fail the task at once instead of
    retrying it with backoff (what Airflow does for any other error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        try:
            return fn(*args, **kwargs)
        except (runs.RunParamsError, runs.CheckFailed) as e:
            raise AirflowFailException(str(e)) from e

    return wrapper


def _value(enum_or_str) -> str | None:
    """An enum's value (the Task SDK's ``DagRunType``), or the string itself."""
    return None if enum_or_str is None else str(getattr(enum_or_str, "value", enum_or_str))


def _record_metrics(prefix: str, values: dict[str, Any]) -> None:
    """Stage figures through Airflow's metrics (StatsD or OpenTelemetry; a no-op when off): numbers
    as gauges, ``rejected_by_reason`` as counters per reason, and the stage timings the manifest
    recorded (``seconds``) as timers."""
    from airflow.sdk.observability import stats

    for name, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            stats.gauge(f"{prefix}.{name}", value)
    for reason, count in (values.get("rejected_by_reason") or {}).items():
        stats.incr(f"{prefix}.rejected.{reason}", count)
    for stage, seconds in (values.get("seconds") or {}).items():
        stats.timing(f"{prefix}.seconds.{stage}", dt.timedelta(seconds=seconds))


# -- the DAG --------------------------------------------------------------------------------------


def build_pipeline_dag(spec_path: str | os.PathLike[str]) -> DAG:
    spec_path = Path(spec_path).resolve()
    spec = load_pipeline_spec(spec_path)
    dataset_asset = Asset(name=f"{spec.name}.dataset", uri=f"twocluster://datasets/{spec.name}", group="twocluster")
    predictions_asset = Asset(name=f"{spec.name}.predictions", uri=f"twocluster://predictions/{spec.name}", group="twocluster")
    model_alias = AssetAlias(name=f"{spec.model.name}.published")

    def model_asset(alias: str) -> Asset:
        return Asset(name=f"{spec.model.name}.{alias}", uri=f"twocluster://models/{spec.model.name}/{alias}", group="twocluster")

    default_args = task_defaults(retries=spec.retries.attempts, retry_delay=dt.timedelta(seconds=spec.retries.delay_seconds),
                                 execution_timeout=dt.timedelta(minutes=10),
                                 max_retry_delay=dt.timedelta(seconds=spec.retries.max_delay_seconds))

    with DAG(
        dag_id=spec.name,
        description=f"{spec.name}: Spark preprocessing -> GPU training (when due) -> gate -> Spark batch scoring",
        schedule=CronDataIntervalTimetable(spec.schedule, timezone="UTC") if spec.schedule else None,
        start_date=dt.datetime.combine(spec.start_date, dt.time(), tzinfo=dt.UTC),
        end_date=dt.datetime.combine(spec.end_date, dt.time(), tzinfo=dt.UTC) if spec.end_date else None,
        catchup=False,
        # One scheduled run at a time: each run's retrain decision depends on what the previous
        # date published. Backfills bring their own max_active_runs; wait_for_earlier_dates keeps
        # their model decisions in date order, so a backfill of N days trains only what the
        # policy allows.
        max_active_runs=1,
        default_args=default_args,
        tags=["twocluster", spec.name, "spark", "training", "scoring"],
        params={
            "date": Param(None, type=["null", "string"], pattern=layout.DATE_PATTERN, title="Date to process",
                          description="YYYY-MM-DD; empty: the run's data interval (scheduled runs and backfills)"),
            "retrain": Param("auto", type="string", enum=["auto", "force", "never"], title="Retrain",
                             description="auto: the retrain policy decides; force: always train; never: score with the champion"),
            "model_alias": Param(spec.scoring.alias, type="string", enum=list(spec.scoring.allowed_aliases), title="Model alias",
                                 description="the alias a new model is published to and scoring loads"),
            "model_version": Param(None, type=["null", "string"], pattern=layout.VERSION_PATTERN, title="Pin a model version",
                                   description="score with this committed model version instead of the alias"),
            "max_reject_rate": Param(None, type=["null", "number"], minimum=0, maximum=1, title="Reject threshold override",
                                     description=f"fail preprocessing above this reject rate (spec: {spec.thresholds.max_reject_rate})"),
        },
        doc_md=__doc__.split("Deployment configuration")[0] + f"\n\nSpec: `{spec_path.relative_to(REPO_ROOT) if spec_path.is_relative_to(REPO_ROOT) else spec_path}`.",
    ) as dag:

        @task(doc_md="Validate the run's parameters against the spec and the store before any job starts.")
        @_no_retry
        def check_params() -> dict:
            context = get_current_context()
            store = store_for(spec)
            run = runs.resolve_run(spec, store, dict(context["params"]), context.get("data_interval_start"),
                                   run_type=_value(getattr(context["dag_run"], "run_type", None)))
            run_id = context["run_id"]
            return run.model_copy(update={"run_id": run_id, "training_run": runs.training_run_id(spec.name, run.date, run_id)}).to_xcom()

        run = check_params()

        arrival_policy = spec.arrivals

        @task.sensor(mode="reschedule", poke_interval=60, timeout=dt.timedelta(hours=48).total_seconds(),
                     doc_md=f"Wait until the date's raw folder is complete (policy: {arrival_policy.completeness}; deadline "
                            f"{arrival_policy.deadline_hours:g} h after the date, then {arrival_policy.on_deadline}). Frees its "
                            "worker slot between pokes.")
        def wait_for_arrivals(run: dict) -> PokeReturnValue:
            from airflow.sdk.exceptions import AirflowFailException

            from twocluster.orchestration.arrivals import ArrivalsIncomplete, decide

            try:
                decision = decide(store_for(spec), spec, RunSettings.from_xcom(run).date)
            except ArrivalsIncomplete as e:
                raise AirflowFailException(str(e)) from None  # no retry: only new arrivals and a rerun help
            print(f"arrivals: {decision.reason} ({decision.files} files, {decision.bytes} bytes)")
            # The value (an ArrivalDecision) tells preprocessing whether the date goes in incomplete.
            return PokeReturnValue(is_done=decision.proceed, xcom_value=decision.model_dump(mode="json"))

        arrivals = wait_for_arrivals(run)

        def spark_job(job: SparkJob, doc_md: str) -> PipelineSparkOperator:
            return PipelineSparkOperator(
                task_id=job,
                job=job,
                spec_path=str(spec_path),
                run_settings=run,
                arrivals=arrivals if job == "preprocess" else None,
                name=f"{job}-{spec.name}",
                conn_id="spark_default",
                pool=SPARK_POOL,
                execution_timeout=dt.timedelta(hours=spec.timeouts.spark_job_hours),
                doc_md=doc_md,
            )

        preprocess = spark_job("preprocess", "Raw arrivals of the date -> features (pandas UDFs) -> TFRecords + Parquet + "
                                             "rejects, committed as a dataset version (a no-op when the inputs are unchanged).")

        @task(outlets=[dataset_asset], doc_md="Check the committed dataset (files, counts, reject rate) and announce it.")
        @_no_retry
        def validate_dataset(run: dict) -> dict:
            settings = RunSettings.from_xcom(run)
            summary = runs.check_dataset(spec, store_for(spec), settings.date, settings.max_reject_rate).to_xcom()
            get_current_context()["outlet_events"][dataset_asset].extra = {"date": settings.date, **summary}
            _record_metrics(f"twocluster.{spec.name}.dataset", summary)
            return summary

        @task.sensor(mode="reschedule", poke_interval=15, timeout=dt.timedelta(hours=12).total_seconds(),
                     doc_md="Wait while a run for an earlier date of the window is still queued or running: each "
                            "retrain decision needs the previous dates' models published. A backfill may run "
                            "several dates at once (its own max_active_runs); their preprocessing overlaps, "
                            "their model decisions go in date order.")
        def wait_for_earlier_dates(run: dict) -> PokeReturnValue:
            ti = get_current_context()["ti"]
            day = dt.date.fromisoformat(RunSettings.from_xcom(run).date)
            earlier = [dt.datetime.combine(day - dt.timedelta(days=d), dt.time(), tzinfo=dt.UTC)
                       for d in range(1, spec.retrain.window_days + 1)]
            active = ti.get_dr_count(dag_id=ti.dag_id, logical_dates=earlier, states=["queued", "running"])
            if active:
                print(f"{active} run(s) for earlier dates still active; waiting")
            return PokeReturnValue(is_done=active == 0)

        @task.branch(doc_md="Apply the retrain policy (twocluster.orchestration.retrain): train a new model or score with the champion.")
        def decide_retrain(run: dict) -> str:
            settings = RunSettings.from_xcom(run)
            decision = decide_retrain_policy(store_for(spec), spec, settings.date, settings.retrain, settings.model_alias)
            get_current_context()["ti"].xcom_push(key="decision", value=decision.model_dump(mode="json"))
            print(f"retrain: {decision.retrain}: {decision.reason}")
            if decision.retrain:
                return "write_training_job"
            # A pinned version can score even before anything is published.
            return "training_skipped" if decision.can_score or settings.model_version else "no_model_yet"

        @task(doc_md="Write the training job spec (datasets, hyper-parameters, resources) to the store.")
        @_no_retry
        def write_training_job(run: dict) -> str:
            decision = RetrainDecision.model_validate(get_current_context()["ti"].xcom_pull(task_ids="decide_retrain", key="decision"))
            backend = TrainingJobOperator.backend_config()
            return runs.write_training_job(spec, store_for(spec), decision, RunSettings.from_xcom(run).training_run,
                                           backend.gpus if backend.kind != "local" else 0)

        job_spec_uri = write_training_job(run)
        train = TrainingJobOperator(
            task_id="train", job_spec_uri=job_spec_uri, pool=GPU_POOL, execution_timeout=dt.timedelta(hours=spec.timeouts.training_job_hours),
            doc_md="Train on the GPU cluster (the backend the `twocluster_training_backend` variable names); "
                   "a retry resumes the run from its last checkpoint.",
        )
        skipped = EmptyOperator(task_id="training_skipped", doc_md="The policy kept the champion.")
        no_model_yet = EmptyOperator(
            task_id="no_model_yet",
            doc_md="Nothing is published and the first model is still waiting for data: this run only preprocesses "
                   "(scoring and its checks are skipped, and the summary says why).",
        )

        @task(outlets=[model_alias], execution_timeout=dt.timedelta(minutes=30),
              doc_md="Gate the new version (load test; it and the champion measured on the same test data; floor; "
                     "champion) and move the alias only if it passes, as a compare-and-set on the alias's commit log.")
        @_no_retry
        def publish(run: dict, job_spec_uri: str) -> dict:
            settings = RunSettings.from_xcom(run)
            decision = runs.publish(spec, store_for(spec), job_spec_uri, settings.model_alias, settings.run_id)
            if decision.published:
                get_current_context()["outlet_events"][model_alias].add(
                    model_asset(settings.model_alias), extra={"version": decision.version, "test_accuracy": decision.test_accuracy})
            print(f"gate: {decision.outcome}: {decision.reason}")
            _record_metrics(f"twocluster.{spec.model.name}", {"test_accuracy": decision.test_accuracy})
            return decision.to_xcom()

        published = publish(run, job_spec_uri)
        approve = ModelApprovalOperator(
            task_id="approve", spec=spec, decision=published, store_for=store_for,
            doc_md=f"When the gate's decision is needs_approval (model.gate.approval: {spec.model.gate.approval}): wait, in "
                   "Airflow's human-in-the-loop step (Required Actions), for a person to publish, publish to staging, or "
                   f"reject, with the candidate-vs-champion evidence; no answer in {spec.model.gate.approval_timeout_hours:g} h "
                   "rejects. Skipped for any other decision.")
        # Joins the two branches that leave a model to score with (score itself also reads
        # check_params' output, which would satisfy a min-one-success rule on its own).
        model_ready = EmptyOperator(task_id="model_ready", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
                                    doc_md="A model is published (or pinned): scoring can run.")

        score = spark_job("score", "Score the date's raw inputs with the published model; predictions committed as a version.")

        @task(outlets=[predictions_asset], doc_md="Check the committed predictions and announce them.")
        @_no_retry
        def validate_predictions(run: dict) -> dict:
            date = RunSettings.from_xcom(run).date
            summary = runs.check_predictions(spec, store_for(spec), date).to_xcom()
            get_current_context()["outlet_events"][predictions_asset].extra = {"date": date, **summary}
            _record_metrics(f"twocluster.{spec.name}.predictions", summary)
            return summary

        @task(trigger_rule=TriggerRule.NONE_FAILED, doc_md="One summary of the run in the log and in XCom.")
        def summarize(run: dict, dataset: dict) -> dict:
            ti = get_current_context()["ti"]

            def pulled(model, task_id: str):  # None where the task was skipped (or never ran)
                value = ti.xcom_pull(task_ids=task_id)
                return model.from_xcom(value) if value else None

            retrain = RetrainDecision.model_validate(ti.xcom_pull(task_ids="decide_retrain", key="decision"))
            gate = pulled(GateResult, "publish") if retrain.retrain else None
            summary = RunSummary(run=RunSettings.from_xcom(run), dataset=DatasetCheck.from_xcom(dataset), retrain=retrain, gate=gate,
                                 approval=pulled(ApprovalAnswer, "approve") if gate else None,  # None unless a person was asked
                                 predictions=pulled(PredictionsCheck, "validate_predictions"))
            print(SUMMARY_MARKER)
            print(summary.format())
            return summary.to_xcom()

        dataset = validate_dataset(run)
        predictions = validate_predictions(run)
        branch = decide_retrain(run)
        run >> arrivals >> preprocess >> dataset >> wait_for_earlier_dates(run) >> branch
        branch >> job_spec_uri >> train >> published >> model_ready
        published >> approve >> model_ready
        branch >> skipped >> model_ready
        branch >> no_model_yet
        model_ready >> score
        score >> predictions >> summarize(run, dataset)
    return dag
