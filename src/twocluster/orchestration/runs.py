"""What each task of a pipeline DAG does, as plain functions of (spec, store, run parameters).

The Airflow DAG (:mod:`twocluster.orchestration.dag_factory`) only wires these together; tests call them
directly. Nothing here imports Airflow, Spark or TensorFlow.

Every function is idempotent per date: it reads committed manifests and alias records, and the
only things it writes (a training job spec keyed by the run, an alias record through the gate)
are no-ops or create-only on a rerun.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from twocluster.orchestration.results import DatasetCheck, GateResult, PredictionsCheck, RunSettings
from twocluster.orchestration.retrain import RetrainDecision, RetrainMode
from twocluster.spec import PipelineSpec
from twocluster.store import layout, registry
from twocluster.store.jobspec import Hyperparameters, Resources, TrainingJobSpec
from twocluster.store.manifest import DatasetManifest, ManifestError, PredictionsManifest, scan_location
from twocluster.store.storage import ObjectStore


class RunParamsError(ValueError):
    """A run parameter is invalid; raised before any job starts."""


class CheckFailed(RuntimeError):
    """A committed output does not pass the pipeline's checks."""


class RunParams(BaseModel):
    """A DAG run's parameters (Airflow ``Param``s, from the UI, the API or ``dags test -c``).

    The DAG's JSON schema already rejects most bad values at trigger time; this is the second
    line, with the layout's own checks, since every value ends up in a store key or on a
    ``spark-submit`` command line."""

    model_config = ConfigDict(extra="forbid")

    date: str | None = Field(None, description="process this date instead of the run's data interval")
    retrain: RetrainMode = "auto"
    model_alias: str | None = None
    model_version: str | None = None
    max_reject_rate: float | None = Field(None, ge=0, le=1)

    @field_validator("date")
    @classmethod
    def _date(cls, v: str | None) -> str | None:
        return None if v in (None, "") else layout.check_date(v)

    @field_validator("model_alias")
    @classmethod
    def _alias(cls, v: str | None) -> str | None:
        return None if v in (None, "") else layout.check_name(v, "model_alias")

    @field_validator("model_version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        return None if v in (None, "") else layout.check_version(v, "model_version")


def resolve_run(spec: PipelineSpec, store: ObjectStore, params: dict[str, Any], interval_start: dt.datetime | None,
                run_type: str | None = None, today: dt.date | None = None) -> RunSettings:
    """Validate a run's parameters against the spec and the store and return the run's settings
    (date, alias, pinned model version, retrain mode, reject threshold). ``run_type``: the DAG
    run's (``backfill`` runs must take their date from their data interval); ``today``: UTC's,
    unless a test says."""
    try:
        p = RunParams.model_validate(params)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        raise RunParamsError(f"invalid run parameters for {spec.name}: {problems}") from None
    if run_type == "backfill" and p.date is not None:
        # Every run of a backfill gets the same parameters: an explicit date would make all of
        # them process that one date.
        raise RunParamsError(f"{spec.name}: this backfill sets the 'date' parameter ({p.date}) for every one of its runs, so "
                             "each would process that one date instead of its own data interval; clear 'date' and start "
                             "the backfill again")
    if p.date is not None:
        date = p.date
    elif interval_start is not None:
        date = layout.check_date(interval_start.date())
    else:
        raise RunParamsError(f"{spec.name}: this run has no data interval; pass the date to process as the 'date' parameter")
    latest = (today or dt.datetime.now(dt.UTC).date()) + dt.timedelta(days=spec.arrivals.days_ahead)
    if not spec.start_date <= dt.date.fromisoformat(date) <= latest:
        raise RunParamsError(f"date {date} is outside the dates this pipeline processes: from its start_date {spec.start_date} "
                             f"to {latest} (today, UTC, plus arrivals.days_ahead = {spec.arrivals.days_ahead})")
    alias = p.model_alias or spec.scoring.alias
    if alias not in spec.scoring.allowed_aliases:
        raise RunParamsError(f"model_alias {alias!r} is not one of the pipeline's aliases {spec.scoring.allowed_aliases}")
    if p.model_version is not None:
        try:
            registry.read_model_manifest(store, spec.model.name, p.model_version)
        except ManifestError as e:
            raise RunParamsError(f"model_version {p.model_version!r} is not a committed {spec.model.name} version: {e}") from None
    return RunSettings(pipeline=spec.name, date=date, store_uri=store.root_uri, model_alias=alias, model_version=p.model_version,
                       retrain=p.retrain,
                       max_reject_rate=spec.thresholds.max_reject_rate if p.max_reject_rate is None else p.max_reject_rate)


def _committed(store: ObjectStore, location: str, kind, what: str):
    # Validated: manifest checksum, kind, files present; invalid newer versions are skipped.
    state = scan_location(store, location, kind, newest_only=True)
    if state.latest is None:
        skipped = "".join(f"; skipped {s.uri}: {s.problem}" for s in state.skipped)
        raise CheckFailed(f"no committed {what} under {store.uri(location)}{skipped}")
    return state.latest


def _committed_fields(latest) -> dict:
    manifest = latest.manifest
    counts = manifest.counts
    return dict(version=manifest.version, manifest_uri=latest.manifest_uri, log_entry=latest.seq, input=counts.input,
                accepted=counts.accepted, rejected=counts.rejected, rejected_by_reason=counts.rejected_by_reason,
                per_split=counts.per_split, bytes=sum(f.bytes for f in manifest.files),
                created_at=manifest.created_at.isoformat(), seconds=manifest.seconds)


def check_dataset(spec: PipelineSpec, store: ObjectStore, date: str, max_reject_rate: float) -> DatasetCheck:
    """The date's committed dataset: its files are all there with their recorded sizes, its counts
    reconcile (the manifest model checks ``input = accepted + rejected``), it has examples, and
    its reject rate is within the threshold."""
    latest = _committed(store, layout.dataset_date_prefix(spec.name, date), DatasetManifest, f"dataset for {date}")
    counts = latest.manifest.counts
    if counts.accepted == 0:
        raise CheckFailed(f"the dataset for {date} ({latest.version}) has no accepted examples (input {counts.input})")
    rate = counts.rejected / counts.input
    if rate > max_reject_rate:
        raise CheckFailed(f"the dataset for {date} rejects {rate:.1%} of its inputs, above the threshold {max_reject_rate:.1%}")
    return DatasetCheck(**_committed_fields(latest), reject_rate=round(rate, 4))


def training_run_id(pipeline: str, date: str, airflow_run_id: str) -> str:
    """The DAG run's part of its training run's id (:func:`write_training_job` adds the inputs')."""
    return layout.safe_id(f"{pipeline}.{date}.{airflow_run_id}")


def training_job(spec: PipelineSpec, training_run: str, datasets: list[str], store_uri: str, gpus: int = 0) -> TrainingJobSpec:
    """The training job spec for the pipeline's model (hyper-parameters and seed from the spec)."""
    m = spec.model
    return TrainingJobSpec(
        run_id=training_run, pipeline=spec.name, datasets=datasets, model_name=m.name, architecture=m.architecture, store_uri=store_uri,
        hyperparameters=Hyperparameters(epochs=m.epochs, batch_size=m.batch_size, learning_rate=m.learning_rate,
                                        learning_rate_schedule=m.learning_rate_schedule, augment=m.augment),
        seed=m.seed, resources=Resources(gpus=gpus),
    )


def write_training_job(spec: PipelineSpec, store: ObjectStore, decision: RetrainDecision, training_run: str, gpus: int) -> str:
    """Write the training job spec (the only thing besides the store that the GPU side gets) and
    return its URI. A training run's identity is the DAG run *and its inputs*: the run id ends
    with the job's fingerprint (datasets, code, hyper-parameters), so a train task cleared after
    its dates were reprocessed trains a new version (and does not resume the old inputs'
    checkpoints), while a retry with the same inputs resumes or returns the same run."""
    if not decision.training_datasets:
        raise CheckFailed(f"no committed datasets to train on for {decision.date}")
    draft = training_job(spec, "draft", decision.training_datasets, store.root_uri, gpus)
    run_id = layout.safe_id(f"{training_run}.{draft.fingerprint().removeprefix('sha256:')[:12]}")
    job = draft.model_copy(update={"run_id": run_id})
    key = f"{layout.jobs_prefix(spec.model.name)}/{layout.run_key(run_id)}.json"
    store.write_bytes(key, job.model_dump_json(indent=2).encode())
    return store.uri(key)


def publish(spec: PipelineSpec, store: ObjectStore, job_spec_uri: str, alias: str, run_id: str = "") -> GateResult:
    """Gate the model version the training job (its spec at ``job_spec_uri``) produced and publish
    it under ``alias`` if it passes, or mark it for a person's approval (``gate.approval``). A
    refusal is an outcome, not a failure: the champion stays and scoring uses it. The decision and
    the alias move record ``run_id`` (the DAG run that decided; default: the training run), so the
    run's page in the UI finds them."""
    from twocluster.store.jobspec import load_job_spec
    from twocluster.training.gate import gate_and_publish  # loads the model with Keras: not at DAG parse time

    job = load_job_spec(job_spec_uri, store)
    committed = registry.find_version_of_run(store, spec.model.name, job.run_id, job.fingerprint())
    if committed is None:
        raise CheckFailed(f"training run {job.run_id} committed no {spec.model.name} version from its inputs ({job_spec_uri})")
    gate = spec.model.gate
    decision = gate_and_publish(store, spec.model.name, committed.version, alias, gate.min_test_accuracy, gate.max_regression,
                                run_id=run_id or job.run_id, approval=gate.approval, max_split_skew=spec.monitoring.max_feature_skew)
    return GateResult(**decision.model_dump(exclude={"published"}), metrics=committed.manifest.metrics.model_dump(mode="json"))


def check_predictions(spec: PipelineSpec, store: ObjectStore, date: str) -> PredictionsCheck:
    """The date's committed predictions: files present, counts reconcile, the model version
    recorded, and one prediction row per accepted input."""
    latest = _committed(store, layout.predictions_date_prefix(spec.name, date), PredictionsManifest, f"predictions for {date}")
    manifest = latest.manifest
    rows = sum(f.rows or 0 for f in manifest.files if f.kind == "predictions")
    if rows != manifest.counts.accepted:
        raise CheckFailed(f"predictions {manifest.version} hold {rows} rows for {manifest.counts.accepted} scored inputs")
    return PredictionsCheck(**_committed_fields(latest), model=manifest.model, model_version=manifest.model_version, rows=rows,
                            model_loads=manifest.model_loads, python_workers=manifest.python_workers)
