"""What each job read and wrote, in OpenLineage's terms: the one module both sides report through.

Two reporters, one graph:

* **the Airflow tasks** (the OpenLineage provider emits a START and a COMPLETE or FAIL RunEvent
  for every DAG run and task once a transport is configured; ``[openlineage] transport``, the
  embedded default writes files to ``.local/lineage/``). It cannot see what a ``spark-submit``
  or a training container touched, so the pipeline's operators say so
  (``get_openlineage_facets_on_complete``, :mod:`twocluster.orchestration.lineage`) with the
  datasets built here from the committed manifests;
* **the Spark jobs themselves** (:class:`JobRun`, from ``spark_jobs/*.py``): a START when the
  job begins and a COMPLETE (or FAIL, with the error) when it ends, with the same datasets, the
  Spark version in ``processing_engine`` and, in ``parent``, the Airflow task run that launched
  it, as OpenLineage's Spark integration does with its JVM listener (a Maven jar, which cannot be
  assumed on a cluster and cannot be had here). The parent comes as the Spark properties the
  provider's ``spark_inject_parent_job_info`` sets (``spark.openlineage.parent*``), or, for a
  Spark Connect client, as ``OPENLINEAGE_CONTEXT`` (OpenLineage's standard variable for a child
  process). The job's client is configured the client's own way (``OPENLINEAGE__TRANSPORT``,
  ``OPENLINEAGE_URL``, ``OPENLINEAGE_CONFIG``); without any of them it reports nothing.

Datasets, per job:

* ``preprocess``: the date's raw folder → the dataset version it committed (version, rows and
  bytes, the feature schema, the rejects by reason in the ``twocluster_rejects`` facet);
* ``train``: the dataset versions of the job spec → the model version the trainer committed;
* ``score``: the date's raw folder and the model version → the predictions version.

Dataset names follow OpenLineage's naming for object stores: namespace ``s3://<bucket>`` and the
key as the name, or namespace ``file`` and the absolute path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated.base import DatasetFacet
from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet
from openlineage.client.generated.error_message_run import ErrorMessageRunFacet
from openlineage.client.generated.job_type_job import JobTypeJobFacet
from openlineage.client.generated.output_statistics_output_dataset import OutputStatisticsOutputDatasetFacet
from openlineage.client.generated.parent_run import Job as ParentJob
from openlineage.client.generated.parent_run import ParentRunFacet, Root, RootJob, RootRun
from openlineage.client.generated.parent_run import Run as ParentRun
from openlineage.client.generated.processing_engine_run import ProcessingEngineRunFacet
from openlineage.client.generated.schema_dataset import SchemaDatasetFacet, SchemaDatasetFacetFields
from openlineage.client.uuid import generate_new_uuid

from twocluster.store import layout
from twocluster.store.manifest import DatasetManifest, PredictionsManifest, scan_location
from twocluster.store.storage import ObjectStore
from twocluster.version import code_version

log = logging.getLogger(__name__)

REJECTS_FACET = "twocluster_rejects"
REJECTS_FACET_SCHEMA = "https://github.com/twocluster/twocluster/blob/main/docs/lineage/RejectsDatasetFacet.json#/$defs/RejectsDatasetFacet"


@attr.define
class RejectsDatasetFacet(DatasetFacet):
    """The inputs a dataset version turned away, by reason (``docs/lineage/RejectsDatasetFacet.json``)."""

    inputs: int
    accepted: int
    rejected: int
    rejectedByReason: dict[str, int] = attr.field(factory=dict)  # noqa: N815 - OpenLineage's spelling

    @staticmethod
    def _get_schema() -> str:
        return REJECTS_FACET_SCHEMA


def naming(uri: str) -> tuple[str, str]:
    """(namespace, name) of a store URI, per OpenLineage's naming spec."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return f"s3://{bucket}", key.strip("/")
    if uri.startswith("file://"):
        return "file", uri.removeprefix("file://").rstrip("/")
    raise ValueError(f"no OpenLineage naming for {uri!r}")


def _input(uri: str, **facets: Any) -> InputDataset:
    namespace, name = naming(uri)
    return InputDataset(namespace=namespace, name=name, facets=facets or None)


def _output(uri: str, statistics: OutputStatisticsOutputDatasetFacet | None = None, **facets: Any) -> OutputDataset:
    namespace, name = naming(uri)
    return OutputDataset(namespace=namespace, name=name, facets=facets or None,
                         outputFacets={"outputStatistics": statistics} if statistics else None)


def _version_folder(manifest_uri: str) -> str:
    return manifest_uri.rsplit("/", 1)[0]


def _schema(feature_spec) -> SchemaDatasetFacet:
    fields = [SchemaDatasetFacetFields(name=name, type=f"{t.dtype}[{','.join(map(str, t.shape))}]")
              for name, t in feature_spec.features.items()]
    return SchemaDatasetFacet(fields=[*fields, SchemaDatasetFacetFields(name="label", type="int64"),
                                      SchemaDatasetFacetFields(name="key", type="string"),
                                      SchemaDatasetFacetFields(name="split", type="string")])


def preprocess_lineage(store: ObjectStore, pipeline: str, date: str) -> tuple[list, list]:
    """(inputs, outputs) of the date's preprocessing: its raw folder → its newest dataset version."""
    raw = raw_input(store, pipeline, date)
    latest = scan_location(store, layout.dataset_date_prefix(pipeline, date), DatasetManifest, newest_only=True).latest
    if latest is None:
        return [raw], []
    manifest: DatasetManifest = latest.manifest
    counts = manifest.counts
    out = _output(_version_folder(latest.manifest_uri),
                  OutputStatisticsOutputDatasetFacet(rowCount=counts.accepted, size=sum(f.bytes for f in manifest.files),
                                                     fileCount=len(manifest.files)),
                  version=DatasetVersionDatasetFacet(datasetVersion=latest.version), schema=_schema(manifest.feature_spec),
                  **{REJECTS_FACET: RejectsDatasetFacet(inputs=counts.input, accepted=counts.accepted, rejected=counts.rejected,
                                                        rejectedByReason=dict(counts.rejected_by_reason))})
    return [raw], [out]


def scoring_lineage(store: ObjectStore, pipeline: str, date: str) -> tuple[list, list]:
    """(inputs, outputs) of the date's scoring: its raw folder and the model version that scored
    it → its newest predictions version."""
    raw = raw_input(store, pipeline, date)
    latest = scan_location(store, layout.predictions_date_prefix(pipeline, date), PredictionsManifest, newest_only=True).latest
    if latest is None:
        return [raw], []
    manifest: PredictionsManifest = latest.manifest
    model = _input(store.uri(layout.model_version_prefix(manifest.model, manifest.model_version)),
                   version=DatasetVersionDatasetFacet(datasetVersion=manifest.model_version))
    out = _output(_version_folder(latest.manifest_uri),
                  OutputStatisticsOutputDatasetFacet(rowCount=manifest.counts.accepted, size=sum(f.bytes for f in manifest.files),
                                                     fileCount=len(manifest.files)),
                  version=DatasetVersionDatasetFacet(datasetVersion=latest.version))
    return [raw, model], [out]


def training_lineage(dataset_manifest_uris: list[str], model_manifest_uri: str, model_version: str) -> tuple[list, list]:
    """(inputs, outputs) of a training job: the dataset versions of its spec → the model version."""
    inputs = []
    for uri in dataset_manifest_uris:
        dated = layout.dated_version(uri)
        facets = {"version": DatasetVersionDatasetFacet(datasetVersion=dated[1])} if dated else {}
        inputs.append(_input(_version_folder(uri), **facets))
    return inputs, [_output(_version_folder(model_manifest_uri), version=DatasetVersionDatasetFacet(datasetVersion=model_version))]


# -- the Spark jobs' own runs ----------------------------------------------------------------------

PRODUCER = "https://github.com/twocluster/twocluster/tree/main/src/twocluster/lineage.py"
CONTEXT_ENV = "OPENLINEAGE_CONTEXT"  # OpenLineage's variable for a parent run handed to a child process
# The provider's Spark properties (airflow.providers.openlineage.utils.spark), which its JVM listener reads too.
PARENT_PROPERTIES = {"namespace": "spark.openlineage.parentJobNamespace", "name": "spark.openlineage.parentJobName",
                     "run_id": "spark.openlineage.parentRunId", "root_namespace": "spark.openlineage.rootParentJobNamespace",
                     "root_name": "spark.openlineage.rootParentJobName", "root_run_id": "spark.openlineage.rootParentRunId"}


@dataclass(frozen=True)
class Parent:
    """The run that launched a job: the Airflow task run, and the DAG run at its root."""

    namespace: str
    name: str
    run_id: str
    root_namespace: str
    root_name: str
    root_run_id: str

    @classmethod
    def from_properties(cls, properties: Mapping[str, str]) -> Parent | None:
        """From the provider's ``spark.openlineage.parent*`` Spark properties (None without them)."""
        found = {field: properties.get(key) for field, key in PARENT_PROPERTIES.items()}
        if not all(found[f] for f in ("namespace", "name", "run_id")):
            return None
        return cls(found["namespace"], found["name"], found["run_id"], found["root_namespace"] or found["namespace"],
                   found["root_name"] or found["name"], found["root_run_id"] or found["run_id"])

    @classmethod
    def from_context(cls, context: str | None) -> Parent | None:
        """From ``OPENLINEAGE_CONTEXT``: ``{"parent": {"run": {"runId"}, "job": {"namespace", "name"},
        "root": {"run": ..., "job": ...}}}`` (None without it; a malformed one is logged and ignored)."""
        if not context:
            return None
        try:
            parent = json.loads(context)["parent"]
            run, job = parent["run"], parent["job"]
            root = parent.get("root") or {}
            root_run, root_job = root.get("run") or run, root.get("job") or job
            return cls(job["namespace"], job["name"], run["runId"], root_job["namespace"], root_job["name"], root_run["runId"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s is not an OpenLineage parent context; the job's run has no parent", CONTEXT_ENV)
            return None

    def to_context(self) -> str:
        """The ``OPENLINEAGE_CONTEXT`` value naming this run as a child's parent."""
        return json.dumps({"parent": {"run": {"runId": self.run_id}, "job": {"namespace": self.namespace, "name": self.name},
                                      "root": {"run": {"runId": self.root_run_id},
                                               "job": {"namespace": self.root_namespace, "name": self.root_name}}}})

    def facet(self) -> ParentRunFacet:
        return ParentRunFacet(run=ParentRun(runId=self.run_id), job=ParentJob(namespace=self.namespace, name=self.name),
                              root=Root(run=RootRun(runId=self.root_run_id),
                                        job=RootJob(namespace=self.root_namespace, name=self.root_name)))


def client_configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OpenLineage client has a transport from its own configuration: without one it
    would print every event to the console, so the job reports nothing instead."""
    return any(k in environ for k in ("OPENLINEAGE_URL", "OPENLINEAGE_CONFIG")) or any(
        k.startswith("OPENLINEAGE__TRANSPORT") for k in environ)


class JobRun:
    """One run of a Spark job, reported as OpenLineage RunEvents (START, then COMPLETE or FAIL).

    Reporting never fails the job: an event that cannot be sent is logged and dropped."""

    def __init__(self, name: str, parent: Parent | None, engine_version: str, client: Any = None,
                 namespace: str | None = None):
        self.name = name
        self.parent = parent
        self.namespace = namespace or os.environ.get("OPENLINEAGE_NAMESPACE") or (parent.namespace if parent else "default")
        self.run_id = str(generate_new_uuid())
        self.engine = ProcessingEngineRunFacet(version=engine_version, name="spark", openlineageAdapterVersion=code_version())
        self._client = client

    @classmethod
    def for_spark(cls, spark, name: str, environ: Mapping[str, str] = os.environ) -> JobRun | None:
        """The run of ``name`` on this Spark session, parented to whatever launched it; None when
        no OpenLineage transport is configured for the job's driver."""
        if not client_configured(environ):
            return None
        properties = {}
        with contextlib.suppress(Exception):  # a Spark Connect session has no per-job properties
            properties = {key: spark.conf.get(key, None) for key in PARENT_PROPERTIES.values()}
        parent = Parent.from_properties(properties) or Parent.from_context(environ.get(CONTEXT_ENV))
        return cls(name, parent, spark.version)

    def emit(self, state: RunState, inputs: list | None = None, outputs: list | None = None, error: BaseException | None = None) -> None:
        run_facets: dict[str, Any] = {"processing_engine": self.engine}
        if self.parent is not None:
            run_facets["parent"] = self.parent.facet()
        if error is not None:
            run_facets["errorMessage"] = ErrorMessageRunFacet(message=f"{type(error).__name__}: {error}", programmingLanguage="python")
        event = RunEvent(eventType=state, eventTime=datetime.now(UTC).isoformat(), producer=PRODUCER,
                         run=Run(runId=self.run_id, facets=run_facets),
                         job=Job(namespace=self.namespace, name=self.name,
                                 facets={"jobType": JobTypeJobFacet(processingType="BATCH", integration="SPARK", jobType="JOB")}),
                         inputs=inputs or [], outputs=outputs or [])
        try:
            if self._client is None:
                from openlineage.client import OpenLineageClient

                self._client = OpenLineageClient()
            self._client.emit(event)
        except Exception:  # noqa: BLE001 - lineage is a report on the job, never a reason to fail it
            log.warning("could not send the job's OpenLineage %s event", state.value, exc_info=True)


@contextlib.contextmanager
def spark_job_run(spark, name: str, inputs: list, completed: Callable[[], tuple[list, list]]) -> Iterator[JobRun | None]:
    """Report the block as one run of the Spark job ``name``: START with ``inputs``; COMPLETE with
    what ``completed()`` reads back from the store (inputs, outputs) once the block returns; FAIL
    with the error when it raises (re-raised). Nothing when no transport is configured."""
    run = JobRun.for_spark(spark, name)
    if run is None:
        yield None
        return
    run.emit(RunState.START, inputs=inputs)
    try:
        yield run
    except BaseException as e:
        run.emit(RunState.FAIL, inputs=inputs, error=e)
        raise
    try:
        read_inputs, outputs = completed()
    except Exception:  # noqa: BLE001 - as above: the job has committed, its report is best effort
        log.warning("could not read what the job committed for OpenLineage", exc_info=True)
        read_inputs, outputs = inputs, []
    run.emit(RunState.COMPLETE, inputs=read_inputs, outputs=outputs)


def raw_input(store: ObjectStore, pipeline: str, date: str) -> InputDataset:
    """The date's raw folder, as an input dataset."""
    return _input(store.uri(layout.raw_date_prefix(pipeline, date)))
