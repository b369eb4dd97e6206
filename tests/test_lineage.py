"""Issue 35: the Spark jobs report their own OpenLineage runs (START, COMPLETE or FAIL) under the
Airflow task that launched them, with what they read and wrote, valid against OpenLineage's own
JSON schemas. The whole DAG's events are checked in tests/dags/test_pipeline_runs.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import openlineage_validator

from twocluster import lineage
from twocluster.spark.preprocess import RejectRateExceeded, run_preprocess
from twocluster.store import layout
from twocluster.store.manifest import read_manifest
from twocluster_demo import sample_data

DATE = dt.date(2026, 11, 18)
ROOT = Path(__file__).resolve().parents[1]
TASK = lineage.Parent("twocluster", "speech_pipeline.preprocess", "01a2dead-0000-7000-8000-000000000001",
                      "twocluster", "speech_pipeline", "01a2dead-0000-7000-8000-000000000002")


def _events(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("event*"))]


@pytest.fixture
def transport(tmp_path, monkeypatch):
    """The client's file transport, configured the client's own way (as the operator does for a
    driver beside the task), and the launching task's run in ``OPENLINEAGE_CONTEXT``."""
    folder = tmp_path / "lineage"
    folder.mkdir()
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT", json.dumps({"type": "file", "log_file_path": str(folder / "event")}))
    monkeypatch.setenv(lineage.CONTEXT_ENV, TASK.to_context())
    return folder


def test_the_parent_reads_back_from_either_carrier():
    assert lineage.Parent.from_context(TASK.to_context()) == TASK
    properties = {key: getattr(TASK, field) for field, key in lineage.PARENT_PROPERTIES.items()}
    assert lineage.Parent.from_properties(properties) == TASK
    assert lineage.Parent.from_properties({}) is None
    assert lineage.Parent.from_context("not json") is None and lineage.Parent.from_context(None) is None


def test_a_spark_job_reports_its_run_under_the_task_that_launched_it(spark, speech_spec, file_store, transport):
    store, name = file_store, speech_spec.name
    sample_data.generate_day(store, speech_spec, DATE, clips=16, seed=5, bad_files=2)
    with lineage.preprocess_run(spark, store, name, DATE) as run:
        result = run_preprocess(spark, speech_spec, store, DATE, run_id="lineage-test", max_reject_rate=0.5)
    events = _events(transport)
    validate = openlineage_validator()
    for event in events:
        validate(event)
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert {e["run"]["runId"] for e in events} == {run.run_id}
    for event in events:
        assert event["job"] == {**event["job"], "namespace": "twocluster", "name": f"{name}.preprocess.spark"}
        parent = event["run"]["facets"]["parent"]
        assert (parent["job"]["namespace"], parent["job"]["name"], parent["run"]["runId"]) == (TASK.namespace, TASK.name, TASK.run_id)
        assert parent["root"]["run"]["runId"] == TASK.root_run_id and parent["root"]["job"]["name"] == TASK.root_name
        assert event["run"]["facets"]["processing_engine"]["version"] == spark.version
    raw = ("file", store.uri(layout.raw_date_prefix(name, DATE)).removeprefix("file://").rstrip("/"))
    start, complete = events
    assert [(d["namespace"], d["name"]) for d in start["inputs"]] == [raw] and start["outputs"] == []
    (out,) = complete["outputs"]
    manifest = read_manifest(store, layout.dataset_version_prefix(name, DATE, result.version))
    assert out["name"] == store.uri(layout.dataset_version_prefix(name, DATE, result.version)).removeprefix("file://").rstrip("/")
    assert out["facets"]["version"]["datasetVersion"] == result.version
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == manifest.counts.accepted
    assert out["facets"]["twocluster_rejects"]["rejectedByReason"] == manifest.counts.rejected_by_reason


def test_a_failed_job_reports_fail_with_its_error_and_no_output(spark, speech_spec, file_store, transport):
    store, name = file_store, speech_spec.name
    sample_data.generate_day(store, speech_spec, DATE, clips=10, seed=6, bad_files=4)
    with pytest.raises(RejectRateExceeded), lineage.preprocess_run(spark, store, name, DATE):
        run_preprocess(spark, speech_spec, store, DATE, run_id="lineage-fail", max_reject_rate=0.01)
    events = _events(transport)
    for event in events:
        openlineage_validator()(event)
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    fail = events[1]
    assert fail["outputs"] == [] and fail["run"]["facets"]["errorMessage"]["message"].startswith("RejectRateExceeded: ")
    assert fail["run"]["facets"]["parent"]["run"]["runId"] == TASK.run_id


def test_without_a_transport_a_job_reports_nothing(spark, monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
        monkeypatch.delenv(key)
    with lineage.spark_job_run(spark, "p.preprocess", lambda: [], lambda: ([], [])) as run:
        pass
    assert run is None and not list(tmp_path.iterdir())


def test_a_job_without_a_transport_never_imports_the_openlineage_client():
    """The client's imports cost each job process 0.3-0.5 s (issue 37's daily DAG run); a job
    whose driver has no transport must not pay them. In a fresh interpreter, as a job starts."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENLINEAGE")}
    script = ("import sys, runpy\n"
              "for job in ('preprocess', 'score'):\n"
              "    runpy.run_path(f'spark_jobs/{job}.py', run_name='imported')\n"
              "from twocluster import lineage\n"
              "with lineage.preprocess_run(None, None, 'p', '2026-11-18') as run, lineage.scoring_run(None, None, 'p', '2026-11-18'):\n"
              "    assert run is None\n"
              "print(sorted(m for m in sys.modules if m.startswith('openlineage')))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_inputs_that_cannot_be_named_never_fail_the_job(spark, transport):
    """The job's START names what it will read; if that cannot be built, the job still runs and
    reports its run (no inputs), as a COMPLETE that cannot be read back is still reported."""
    def unnamed():
        raise ValueError("no OpenLineage naming for 'hdfs://x'")

    ran = []
    with lineage.spark_job_run(spark, "p.preprocess.spark", unnamed, lambda: ([], [])) as run:
        ran.append(run.run_id)
    events = _events(transport)
    assert ran and [(e["eventType"], e["inputs"]) for e in events] == [("START", []), ("COMPLETE", [])]
