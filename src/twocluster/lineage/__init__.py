"""What each job read and wrote, in OpenLineage's terms: the one package both sides report through.

Two reporters, one graph:

* **the Airflow tasks** (the OpenLineage provider emits a START and a COMPLETE or FAIL RunEvent
  for every DAG run and task once a transport is configured; ``[openlineage] transport``, the
  embedded default writes files to ``.local/lineage/``). It cannot see what a ``spark-submit``
  or a training container touched, so the pipeline's operators say so
  (``get_openlineage_facets_on_complete``, :mod:`twocluster.orchestration.lineage`) with the
  datasets built from the committed manifests (:mod:`twocluster.lineage.datasets`);
* **the Spark jobs themselves** (:func:`spark_job_run`, from ``spark_jobs/*.py``): a START when the
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

This module is what a job process imports, and it imports nothing of OpenLineage's: the client
costs a job 0.3-0.5 s of imports, so :mod:`~twocluster.lineage.datasets` and
:mod:`~twocluster.lineage.events` load only once a transport is configured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twocluster.lineage.events import JobRun
    from twocluster.store.storage import ObjectStore

log = logging.getLogger(__name__)

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


def client_configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OpenLineage client has a transport from its own configuration: without one it
    would print every event to the console, so the job reports nothing instead."""
    return any(k in environ for k in ("OPENLINEAGE_URL", "OPENLINEAGE_CONFIG")) or any(
        k.startswith("OPENLINEAGE__TRANSPORT") for k in environ)


def _job_run(spark, name: str, environ: Mapping[str, str] = os.environ) -> JobRun | None:
    """The run of ``name`` on this Spark session, parented to whatever launched it; None when
    no OpenLineage transport is configured for the job's driver."""
    if not client_configured(environ):
        return None
    from twocluster.lineage.events import JobRun

    properties = {}
    with contextlib.suppress(Exception):  # a Spark Connect session has no per-job properties
        properties = {key: spark.conf.get(key, None) for key in PARENT_PROPERTIES.values()}
    parent = Parent.from_properties(properties) or Parent.from_context(environ.get(CONTEXT_ENV))
    return JobRun(name, parent, spark.version)


@contextlib.contextmanager
def spark_job_run(spark, name: str, started: Callable[[], list], completed: Callable[[], tuple[list, list]]) -> Iterator[JobRun | None]:
    """Report the block as one run of the Spark job ``name``: START with the inputs ``started()``
    names; COMPLETE with what ``completed()`` reads back from the store (inputs, outputs) once the
    block returns; FAIL with the error when it raises (re-raised). Nothing, and no OpenLineage
    import, when no transport is configured."""
    run = _job_run(spark, name)
    if run is None:
        yield None
        return
    from openlineage.client.event_v2 import RunState

    try:
        inputs = started()
    except Exception:  # noqa: BLE001 - lineage is a report on the job, never a reason to fail it
        log.warning("could not name the job's inputs for OpenLineage", exc_info=True)
        inputs = []
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


def _datasets():
    from twocluster.lineage import datasets  # called only once a transport is configured (spark_job_run)

    return datasets


def preprocess_run(spark, store: ObjectStore, pipeline: str, date: str):
    """:func:`spark_job_run` of the date's preprocessing: its raw folder → the dataset version."""
    return spark_job_run(spark, f"{pipeline}.preprocess.spark", lambda: [_datasets().raw_input(store, pipeline, date)],
                         lambda: _datasets().preprocess_lineage(store, pipeline, date))


def scoring_run(spark, store: ObjectStore, pipeline: str, date: str):
    """:func:`spark_job_run` of the date's scoring: its raw folder and model → the predictions."""
    return spark_job_run(spark, f"{pipeline}.score.spark", lambda: [_datasets().raw_input(store, pipeline, date)],
                         lambda: _datasets().scoring_lineage(store, pipeline, date))
