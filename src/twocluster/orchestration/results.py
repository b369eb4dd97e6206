"""What the tasks of a pipeline DAG hand each other: one pydantic model per task result.

A result crosses XCom as JSON (:meth:`TaskResult.to_xcom`, ``model_dump(mode="json")``) and is
read back with :meth:`TaskResult.from_xcom` (``model_validate``), so a renamed or missing field
fails where the value is made or read, with the field's name, instead of as a ``KeyError`` in a
later task of a later run. Results made elsewhere keep their own model and module:
:class:`~twocluster.orchestration.arrivals.ArrivalDecision` (the arrivals sensor),
:class:`~twocluster.orchestration.retrain.RetrainDecision` (the retrain branch) and
:class:`~twocluster.training.gate.GateDecision` (the gate, extended here with the model's
metrics).

Nothing here imports Airflow, Spark or TensorFlow.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from twocluster.orchestration.retrain import RetrainDecision, RetrainMode
from twocluster.training.decision import GateDecision

SparkJob = Literal["preprocess", "score"]
SUMMARY_MARKER = "== run summary =="  # the run's summary follows this line in the summarize task's log


class XComValue:
    """How a task's result travels through XCom (a mixin for pydantic models)."""

    def to_xcom(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_xcom(cls, value: Any) -> Self:
        """The result a task pushed (its JSON, or the model itself in tests)."""
        return value if isinstance(value, cls) else cls.model_validate(value)


class TaskResult(XComValue, BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSettings(TaskResult):
    """check_params: the run's validated settings, which every later task starts from."""

    pipeline: str
    date: str
    store_uri: str
    model_alias: str
    model_version: str | None = None  # a pinned version scores instead of the alias
    retrain: RetrainMode = "auto"
    max_reject_rate: float = Field(ge=0, le=1)
    run_id: str = ""  # the DAG run's
    training_run: str = ""  # the DAG run's part of its training run's id

    def spark_args(self, job: SparkJob, spec_path: str, *, incomplete: bool = False) -> list[str]:
        """The command-line arguments of ``spark_jobs/<job>.py`` for this run."""
        args = ["--spec", spec_path, "--date", self.date, "--store", self.store_uri, "--run-id", self.run_id]
        if job == "preprocess":
            return [*args, "--max-reject-rate", str(self.max_reject_rate), *(["--incomplete"] if incomplete else [])]
        if self.model_version:
            return [*args, "--model-version", self.model_version]
        return [*args, "--alias", self.model_alias]


class TrainingOutcome(TaskResult):
    """train: what the trainer returned (its last line of JSON), where it ran, under which name."""

    model_config = ConfigDict(extra="ignore")  # a newer trainer may say more

    backend: str
    job: str  # the job's external id on its cluster (process / container / pod name)
    status: str  # trained | already_trained | worker_done
    model: str
    version: str
    manifest_uri: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    resumed_from_epoch: int = 0
    seconds: float = 0.0


class CommittedCheck(TaskResult):
    """A committed version (dataset or predictions) that passed its checks: what it holds."""

    version: str
    manifest_uri: str
    log_entry: int
    input: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)
    per_split: dict[str, int] = Field(default_factory=dict)
    bytes: int
    created_at: str
    seconds: dict[str, float] = Field(default_factory=dict)


class DatasetCheck(CommittedCheck):
    """validate_dataset: the date's committed dataset, its counts reconciled and within the threshold."""

    reject_rate: float


class PredictionsCheck(CommittedCheck):
    """validate_predictions: the date's committed predictions, one row per scored input."""

    model: str
    model_version: str
    rows: int
    model_loads: int
    python_workers: int


class GateResult(XComValue, GateDecision):
    """publish: the gate's decision for the new version, with the metrics its trainer recorded.
    (Extra fields are ignored rather than refused here: ``published`` is computed, and dumped.)"""

    metrics: dict[str, Any] = Field(default_factory=dict)


class ApprovalAnswer(TaskResult):
    """approve: a person's answer to a version waiting for approval, as the registry applied it."""

    outcome: str
    gate_entry: int
    alias_moved: str | None = None
    already_decided: bool = False
    decided_by: str | None = None  # an earlier answer's, when this one came too late
    option: str
    comment: str = ""
    who: str


class RunSummary(TaskResult):
    """summarize: the run in one value (and, formatted, in the log after :data:`SUMMARY_MARKER`)."""

    run: RunSettings
    dataset: DatasetCheck
    retrain: RetrainDecision
    gate: GateResult | None = None
    approval: ApprovalAnswer | None = None
    predictions: PredictionsCheck | None = None  # None when scoring was skipped

    def format(self) -> str:
        run, dataset, retrain = self.run, self.dataset, self.retrain
        lines = [
            f"{run.pipeline} {run.date}",
            f"  inputs {dataset.input}: accepted {dataset.accepted}, rejected {dataset.rejected} "
            f"{dataset.rejected_by_reason or ''}".rstrip(),
            f"  dataset   v={dataset.version}  {dataset.manifest_uri}",
            f"  retrain   {'yes' if retrain.retrain else 'no'}: {retrain.reason}",
        ]
        if gate := self.gate:
            acc = gate.test_accuracy
            verdict = {"published": "published", "already_published": "already published",
                       "needs_approval": "NOT published yet, waiting for a person's approval"}.get(gate.outcome, "NOT published")
            lines.append(f"  model     {gate.model} v={gate.version} test accuracy {'n/a' if acc is None else f'{acc:.3f}'}: "
                         f"{verdict} as {gate.alias} ({gate.reason})")
        if answer := self.approval:
            lines.append(f"  approval  {answer.option} by {answer.who}: {answer.comment}"
                         + (f" ({answer.alias_moved} moved)" if answer.alias_moved else ""))
        if (predictions := self.predictions) is None:
            lines.append("  scoring   skipped: no model is published yet")
        else:
            lines += [
                f"  scored by {predictions.model} v={predictions.model_version} ({predictions.model_loads} model load(s), "
                f"{predictions.python_workers} Python worker(s))",
                f"  predictions {predictions.rows} rows, v={predictions.version}  {predictions.manifest_uri}",
            ]
        return "\n".join(lines)
