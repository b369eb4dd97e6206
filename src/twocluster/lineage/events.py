"""A Spark job's own run as OpenLineage RunEvents (START, then COMPLETE or FAIL), sent through the
OpenLineage client. Imports the client: a job process imports this module only when a transport
is configured (:func:`twocluster.lineage.spark_job_run`)."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
from openlineage.client.generated.error_message_run import ErrorMessageRunFacet
from openlineage.client.generated.job_type_job import JobTypeJobFacet
from openlineage.client.generated.parent_run import Job as ParentJob
from openlineage.client.generated.parent_run import ParentRunFacet, Root, RootJob, RootRun
from openlineage.client.generated.parent_run import Run as ParentRun
from openlineage.client.generated.processing_engine_run import ProcessingEngineRunFacet
from openlineage.client.uuid import generate_new_uuid

from twocluster.lineage import Parent
from twocluster.version import code_version

log = logging.getLogger(__name__)

PRODUCER = "https://github.com/twocluster/twocluster/tree/main/src/twocluster/lineage"


def parent_facet(parent: Parent) -> ParentRunFacet:
    return ParentRunFacet(run=ParentRun(runId=parent.run_id), job=ParentJob(namespace=parent.namespace, name=parent.name),
                          root=Root(run=RootRun(runId=parent.root_run_id),
                                    job=RootJob(namespace=parent.root_namespace, name=parent.root_name)))


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

    def emit(self, state: RunState, inputs: list | None = None, outputs: list | None = None, error: BaseException | None = None) -> None:
        run_facets: dict[str, Any] = {"processing_engine": self.engine}
        if self.parent is not None:
            run_facets["parent"] = parent_facet(self.parent)
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
