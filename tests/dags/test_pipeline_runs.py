"""The pipeline DAG run for real: `airflow dags test` end to end, refused parameters, and a
backfill of three dates executed by Airflow's own scheduler (`airflow standalone` on loopback).

Everything is real: Airflow 3 on SQLite, spark-submit on local Spark (and, in one test, a Spark
Connect server), the local training backend
(a child process running the trainer), the gate, and a local folder as the store. The DAG is
built by the project's factory from a small variant of the speech_commands spec (fewer epochs,
a gate floor of 0, a two-day cadence) so the suite stays quick; the integrity tests cover the
shipped DAG file itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import openlineage_validator

from twocluster.spec import load_pipeline_spec
from twocluster.store import layout, registry
from twocluster.store.manifest import read_manifest, scan_location
from twocluster.store.storage import ObjectStore
from twocluster_demo import sample_data
from twocluster_devtools.airflow_local import REPO_ROOT, airflow, airflow_env, prepare

pytestmark = pytest.mark.slow
D0, D1, D2, D3 = (dt.date(2026, 10, 5) + dt.timedelta(days=d) for d in range(4))
DAG_ID = "kws_e2e"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return _make_pipeline(tmp_path_factory.mktemp("pipeline"))


def _make_pipeline(root: Path, dates=(D0, D1, D2, D3)) -> SimpleNamespace:
    data = yaml.safe_load((REPO_ROOT / "pipelines" / "speech_commands.yaml").read_text())
    data.update(name=DAG_ID, start_date=D0.isoformat(), end_date=D3.isoformat())
    data["model"].update(epochs=3, gate={"min_test_accuracy": 0.0, "max_regression": 1.0})
    data["retrain"] = {"every_days": 2, "min_new_examples": 1000, "window_days": 28}
    # Retries after 10 s instead of a minute, as in the stack's tests. On SQLite, Airflow's
    # processes starting together with the backfill's first tasks have stalled the API server
    # for ~60 s (requests waiting out the database's lock timeout); a task whose start timed out
    # then waited a further minute for its retry (measured: the backfill 374 s with two such
    # retries, ~210 s without).
    data["retries"] = {"attempts": 2, "delay_seconds": 10, "max_delay_seconds": 60}
    spec_path = root / f"{DAG_ID}.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    dags = root / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text(
        '"""Airflow DAG for the tests."""\nfrom twocluster.orchestration.dag_factory import build_pipeline_dag\n\n'
        f"dag = build_pipeline_dag({str(spec_path)!r})\n"
    )
    spec = load_pipeline_spec(spec_path)
    store = ObjectStore((root / "store").as_uri())
    sample_data.generate(store, spec, list(dates), clips_per_day=100, seed=5, bad_files_per_day=1)
    env = airflow_env(root / "airflow", store.root_uri, dags_folder=dags, spark_master="local[2]", lineage_dir=root / "lineage")
    env["TWOCLUSTER_WORK_DIR"] = str(root / "work")
    # A secret canary (issue 14, item 7): store credentials in the deployment's connection, which
    # must reach no log, XCom, rendered field, manifest, job spec, zip or command line.
    env["AIRFLOW_CONN_TWOCLUSTER_STORE"] = json.dumps({"conn_type": "aws", "login": CANARY[0], "password": CANARY[1]})
    prepare(env)
    return SimpleNamespace(root=root, spec=spec, store=store, env=env)


CANARY = ("AKIACANARY" + os.urandom(5).hex().upper(), "canary-secret-" + os.urandom(12).hex())


class _CommandLines:
    """Every process's command line, sampled while a run goes (what `ps` shows anyone)."""

    def __init__(self):
        import threading

        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            out = subprocess.run(["ps", "-e", "-ww", "-o", "args", "--no-headers"], capture_output=True, text=True).stdout
            self.seen.update(out.splitlines())
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def _dags_test(pipeline, conf: dict, log_name: str, logical_date: dt.date) -> tuple[int, str]:
    # An explicit logical date inside the DAG's [start_date, end_date]: a run after end_date
    # would run no task at all.
    log = pipeline.root / f"{log_name}.log"
    with log.open("w") as out:
        result = airflow(pipeline.env, "dags", "test", DAG_ID, logical_date.isoformat(), "-c", json.dumps(conf),
                         stdout=out, stderr=out, timeout=900)
    return result.returncode, log.read_text(errors="replace")


def _versions(store: ObjectStore, parent: str) -> list[str]:
    return [v.version for v in scan_location(store, parent).versions]


def _asset_events(pipeline) -> list[tuple[str, dict]]:
    db = sqlite3.connect(pipeline.root / "airflow" / "airflow.db")
    rows = db.execute("SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id ORDER BY e.id").fetchall()
    db.close()
    return [(name, json.loads(extra) if isinstance(extra, str) else extra) for name, extra in rows]


def test_dag_test_runs_the_whole_pipeline(pipeline):
    spec, store = pipeline.spec, pipeline.store
    with _CommandLines() as processes:
        code, log = _dags_test(pipeline, {"date": D0.isoformat(), "retrain": "force"}, "dags-test-d0", D0)
    assert code == 0 and "state=success" in [line for line in log.splitlines() if "DagRun Finished" in line][-1], log[-5000:]
    # The canary: in no command line any process had, no log, no XCom or rendered field (the
    # metadata database), no manifest or job spec (the store), not in the --py-files zip.
    assert any("spark-submit" in p or "SparkSubmit" in p for p in processes.seen), "the sampler saw the run"
    for secret in CANARY:
        assert not [p for p in processes.seen if secret in p]
        assert secret not in log
        assert _files_holding(pipeline.root, secret.encode()) == [], secret

    (dataset_version,) = _versions(store, layout.dataset_date_prefix(spec.name, D0))
    dataset = read_manifest(store, layout.dataset_version_prefix(spec.name, D0, dataset_version))
    assert dataset.counts.input == 101 and dataset.counts.accepted + dataset.counts.rejected == 101

    (model_version,) = _versions(store, layout.model_versions_prefix(spec.model.name))
    model = registry.read_model_manifest(store, spec.model.name, model_version)
    assert model.lineage.run_id.startswith(f"{DAG_ID}.{D0}.manual__")
    assert model.lineage.inputs == [store.uri(layout.manifest_key(layout.dataset_version_prefix(spec.name, D0, dataset_version)))]
    assert registry.resolve_alias(store, spec.model.name, "production").version == model_version

    (pred_version,) = _versions(store, layout.predictions_date_prefix(spec.name, D0))
    predictions = read_manifest(store, layout.predictions_version_prefix(spec.name, D0, pred_version))
    assert predictions.model_version == model_version
    # Scoring needs no label: the clip in an unknown label folder, rejected for training, is scored.
    assert predictions.counts.input == 101 and predictions.counts.accepted >= dataset.counts.accepted

    assert "== run summary ==" in log and "retrain   yes: forced by the run's parameters" in log
    events = dict(_asset_events(pipeline))
    assert events[f"{DAG_ID}.dataset"]["version"] == dataset_version
    assert events[f"{spec.model.name}.production"]["version"] == model_version
    assert events[f"{DAG_ID}.predictions"]["model_version"] == model_version

    # What an operator sees afterwards.
    cli = Path(sys.executable).parent / "twocluster"
    status = json.loads(subprocess.run([str(cli), "status", "--store", store.root_uri, "--json"], capture_output=True,
                                       text=True, check=True).stdout)
    (row,) = status["pipelines"][DAG_ID]["dates"]
    assert row["dataset"]["version"] == dataset_version and row["predictions"]["model_version"] == model_version
    assert status["models"][spec.model.name]["aliases"]["production"]["version"] == model_version
    assert status["skipped"] == []


def test_openlineage_events_describe_every_task_and_the_graph_matches_the_store(pipeline):
    """Issue 35: the DAG run of test_dag_test_runs_the_whole_pipeline left OpenLineage events
    (the provider's file transport) for the run and each task, each valid against OpenLineage's
    own JSON schemas (the event, every facet); the pipeline's operators name
    what their jobs read and wrote, so the events' graph is the store's: raw date folder ->
    dataset version -> model version -> predictions version, with versions, row counts, the
    feature schema and the rejects by reason (a facet with its own JSON schema). The Spark jobs
    report their own runs, parented to their tasks."""
    spec, store = pipeline.spec, pipeline.store
    events = [json.loads(p.read_text()) for p in sorted((pipeline.root / "lineage").glob("event*"))]
    assert events, "no OpenLineage event was written"
    validate = openlineage_validator()
    for event in events:
        validate(event)
    completed = {e["job"]["name"].removeprefix(f"{DAG_ID}."): e for e in events if e.get("eventType") == "COMPLETE"}
    started = {e["job"]["name"].removeprefix(f"{DAG_ID}.") for e in events if e.get("eventType") == "START"}
    for task in ("check_params", "wait_for_arrivals", "preprocess", "validate_dataset", "decide_retrain", "write_training_job",
                 "train", "publish", "score", "validate_predictions", "summarize"):
        assert task in started and task in completed, f"{task}: no START/COMPLETE event"
    assert DAG_ID in completed, "no event for the DAG run itself"

    def folder(uri: str) -> tuple[str, str]:
        return "file", uri.removeprefix("file://").rstrip("/")

    (dataset_version,) = _versions(store, layout.dataset_date_prefix(spec.name, D0))
    (model_version,) = _versions(store, layout.model_versions_prefix(spec.model.name))
    (pred_version,) = _versions(store, layout.predictions_date_prefix(spec.name, D0))
    raw = folder(store.uri(layout.raw_date_prefix(spec.name, D0)))
    dataset = folder(store.uri(layout.dataset_version_prefix(spec.name, D0, dataset_version)))
    model = folder(store.uri(layout.model_version_prefix(spec.model.name, model_version)))
    predictions = folder(store.uri(layout.predictions_version_prefix(spec.name, D0, pred_version)))

    def named(datasets: list[dict]) -> list[tuple[str, str]]:
        return [(d["namespace"], d["name"]) for d in datasets]

    preprocess, train, score = completed["preprocess"], completed["train"], completed["score"]
    assert named(preprocess["inputs"]) == [raw] and named(preprocess["outputs"]) == [dataset]
    assert named(train["inputs"]) == [dataset] and named(train["outputs"]) == [model]
    assert named(score["inputs"]) == [raw, model] and named(score["outputs"]) == [predictions]
    manifest = read_manifest(store, layout.dataset_version_prefix(spec.name, D0, dataset_version))
    out = preprocess["outputs"][0]
    assert out["facets"]["version"]["datasetVersion"] == dataset_version
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == manifest.counts.accepted
    assert {f["name"] for f in out["facets"]["schema"]["fields"]} >= {"log_mel", "label"}
    rejects = out["facets"]["twocluster_rejects"]
    assert rejects["rejectedByReason"] == manifest.counts.rejected_by_reason and rejects["inputs"] == manifest.counts.input
    assert train["outputs"][0]["facets"]["version"]["datasetVersion"] == model_version
    assert score["outputs"][0]["facets"]["version"]["datasetVersion"] == pred_version

    # The Spark jobs' own runs (not the provider's task events): each under the task run that
    # launched it, the DAG run at its root, with the same datasets as the task reports.
    dag_run = completed[DAG_ID]["run"]["runId"]
    for job, task in (("preprocess", preprocess), ("score", score)):
        own = [e for e in events if e["job"]["name"] == f"{spec.name}.{job}.spark"
               and e["run"]["facets"]["parent"]["run"]["runId"] == task["run"]["runId"]]
        assert [e["eventType"] for e in own] == ["START", "COMPLETE"], f"{job}: {[e['eventType'] for e in own]}"
        parent = own[-1]["run"]["facets"]["parent"]
        assert parent["job"]["name"] == f"{DAG_ID}.{job}" and len({e["run"]["runId"] for e in own}) == 1
        assert (parent["root"]["job"]["name"], parent["root"]["run"]["runId"]) == (DAG_ID, dag_run)
        assert own[-1]["run"]["facets"]["processing_engine"]["name"] == "spark"
        assert named(own[-1]["inputs"]) == named(task["inputs"]) and named(own[-1]["outputs"]) == named(task["outputs"])


@pytest.mark.parametrize("conf", [
    {"date": f"{D1}; touch /tmp/pwned"},
    {"date": D1.isoformat(), "model_alias": "../production"},
    {"date": D1.isoformat(), "model_version": "../../models"},
])
def test_bad_params_are_refused_before_any_job_runs(pipeline, conf):
    before = pipeline.store.list("datasets") + pipeline.store.list("models")
    code, log = _dags_test(pipeline, conf, "dags-test-bad", D1)
    assert code != 0 or "state=failed" in log
    assert "spark-submit" not in log.lower().replace("spark_submit", "")
    assert "ParamValidationError" in log or "invalid run parameters" in log, log[-3000:]
    assert pipeline.store.list("datasets") + pipeline.store.list("models") == before


def test_a_date_without_its_arrival_marker_fails_at_the_deadline_naming_it(tmp_path_factory):
    """Issue 14, item 4, through the DAG: D2's marker is missing and its deadline (6 h after the
    date) long past; the spec says fail, so the run fails at the sensor, names the folder, and
    commits nothing. (Its own Airflow home: a failed run for D2 would make the backfill below
    skip that date.)"""
    pipeline = _make_pipeline(tmp_path_factory.mktemp("no-marker"), dates=(D2,))
    spec, store = pipeline.spec, pipeline.store
    store.delete(f"{layout.raw_date_prefix(spec.name, D2)}/{layout.ARRIVED_MARKER}")
    code, log = _dags_test(pipeline, {"date": D2.isoformat()}, "dags-test-no-marker", D2)
    assert code != 0 or "state=failed" in log
    assert f"{D2}: arrivals incomplete at the deadline" in log and "no _ARRIVED.json in" in log, log[-3000:]
    assert "spark-submit" not in log.lower().replace("spark_submit", "")
    assert not store.list(layout.dataset_date_prefix(spec.name, D2))


def test_a_daily_run_on_a_spark_connect_server(tmp_path_factory, spark_connect_server):
    """The same DAG with ``spark_default`` pointing at a long-lived Spark Connect server (type
    ``spark_connect``): no Spark application is submitted; both jobs run as Spark Connect clients
    in child processes of their tasks, on the server's warm JVM and Python workers, and commit
    what a submitted job commits. The server's URL and the store's credentials reach no command
    line and no log. (Its own Airflow home and store.)"""
    pipeline = _make_pipeline(tmp_path_factory.mktemp("spark-connect"), dates=(D0,))
    pipeline.env["AIRFLOW_CONN_SPARK_DEFAULT"] = spark_connect_server.connection
    spec, store = pipeline.spec, pipeline.store
    with _CommandLines() as processes:
        code, log = _dags_test(pipeline, {"date": D0.isoformat(), "retrain": "force"}, "dags-test-connect", D0)
    assert code == 0 and "state=success" in [line for line in log.splitlines() if "DagRun Finished" in line][-1], log[-5000:]
    assert log.count(f"Spark Connect job (server {spark_connect_server.url}/)") == 2, log[-5000:]
    # Both jobs join one session (and its Python workers): their batch sizes are no session setting.
    sessions = re.findall(r"Spark Connect session ([0-9a-f-]{36}) \(shared", log)
    assert len(sessions) == 2 and len(set(sessions)) == 1, sessions
    assert "Spark-Submit cmd" not in log
    jobs = [p for p in processes.seen if "spark_jobs/" in p and store.root_uri in p]  # this run's, not another test's
    assert [p for p in jobs if "spark_jobs/preprocess.py" in p], "the sampler saw the job's client"
    assert not [p for p in jobs if "spark-submit" in p or "SparkSubmit" in p]
    assert not [p for p in jobs if "sc://" in p], "the server's URL went on a command line"
    for secret in CANARY:
        assert not [p for p in processes.seen if secret in p]
        assert secret not in log

    (dataset_version,) = _versions(store, layout.dataset_date_prefix(spec.name, D0))
    dataset = read_manifest(store, layout.dataset_version_prefix(spec.name, D0, dataset_version))
    assert dataset.counts.input == 101 and dataset.counts.accepted + dataset.counts.rejected == 101
    (model_version,) = _versions(store, layout.model_versions_prefix(spec.model.name))
    (pred_version,) = _versions(store, layout.predictions_date_prefix(spec.name, D0))
    predictions = read_manifest(store, layout.predictions_version_prefix(spec.name, D0, pred_version))
    assert predictions.model_version == model_version and predictions.counts.input == 101
    # A Spark Connect client has no Spark properties of its own: it is told its parent in
    # OPENLINEAGE_CONTEXT, and reports its run under its task all the same.
    events = [json.loads(p.read_text()) for p in (pipeline.root / "lineage").glob("event*")]
    tasks = {e["job"]["name"]: e["run"]["runId"] for e in events if e["eventType"] == "COMPLETE"}
    for job in ("preprocess", "score"):
        (own,) = [e for e in events if e["job"]["name"] == f"{spec.name}.{job}.spark" and e["eventType"] == "COMPLETE"]
        assert own["run"]["facets"]["parent"]["run"]["runId"] == tasks[f"{DAG_ID}.{job}"]
        assert own["outputs"], f"{job}: the job's run names no output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(request: str | urllib.request.Request, *, within: float = 180) -> dict:
    """One API call, asked again while the server is too busy to answer (on 2 cores a scheduler
    starting up, its DAG processor and the API server share the machine: a 10 s read timed out in
    CI). An HTTP error is the server's answer and is raised at once; a refused request (4xx)
    creates nothing, so asking again after a timeout is safe."""
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_backfill_of_three_dates_through_the_scheduler(pipeline):
    """D1..D3 after the forced D0 model: D1 keeps the champion (1 day old, 100 new examples),
    D2 retrains (2 days: the cadence), D3 keeps the new champion."""
    spec, store = pipeline.spec, pipeline.store
    port = _free_port()
    env = {**pipeline.env, "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True", "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5"}
    # The DAG was registered (paused, the default) by the `dags test` runs above. The backfill
    # is created through the REST API once the server is up, as the UI does: a CLI write racing
    # the scheduler's transactions can fail at once on SQLite ("database is locked"), and runs
    # queued while the API server still starts make their first tasks' Execution API calls time
    # out (retries, SIGKILLed attempts: a minute or more of this test).
    unpaused = airflow(env, "dags", "unpause", DAG_ID, capture_output=True, text=True, timeout=120)
    assert unpaused.returncode == 0, unpaused.stderr[-3000:]
    log = (pipeline.root / "standalone.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/v2"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if _call(f"{api}/dags/{DAG_ID}", within=0).get("dag_id") == DAG_ID:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # not up, or 404 until the DAG is parsed
                pass
            assert server.poll() is None, (pipeline.root / "standalone.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the API server or the DAG never came up"
            time.sleep(2)

        # The REST API applies the params' schema: a shell metacharacter never reaches a task.
        bad = urllib.request.Request(f"{api}/dags/{DAG_ID}/dagRuns", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"logical_date": None, "conf": {"date": "2026-10-06;id"}}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            _call(bad)
        assert refused.value.code == 400 and "date" in refused.value.read().decode()

        backfill = urllib.request.Request(f"{api}/backfills", method="POST", headers={"Content-Type": "application/json"},
                                          data=json.dumps({"dag_id": DAG_ID, "from_date": f"{D1}T00:00:00Z",
                                                           "to_date": f"{D3}T00:00:00Z"}).encode())
        try:
            assert _call(backfill)["dag_id"] == DAG_ID
        except urllib.error.HTTPError as e:  # 409: a first try that timed out created it
            assert e.code == 409, e.read().decode()
        deadline = time.monotonic() + 1200
        while True:
            runs = _call(f"{api}/dags/{DAG_ID}/dagRuns?run_type=backfill&limit=10")["dag_runs"]
            states = sorted((r["logical_date"][:10], r["state"]) for r in runs)
            if len(runs) == 3 and all(s in ("success", "failed") for _, s in states):
                break
            assert time.monotonic() < deadline, f"backfill did not finish: {states}"
            time.sleep(5)
        assert states == [(D1.isoformat(), "success"), (D2.isoformat(), "success"), (D3.isoformat(), "success")]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        # What standalone started may outlive it (a scheduler waiting on its executor's workers
        # kept running for an hour after a failed run): nothing of the group survives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()

    for day in (D1, D2, D3):
        assert len(_versions(store, layout.predictions_date_prefix(spec.name, day))) == 1, day
    models = [registry.read_model_manifest(store, spec.model.name, v) for v in _versions(store, layout.model_versions_prefix(spec.model.name))]
    assert [m.lineage.run_id.split(".")[1] for m in models] == [D0.isoformat(), D2.isoformat()], "exactly the retrains the policy allows"
    assert "backfill__" in models[1].lineage.run_id and len(models[1].lineage.inputs) == 3
    d3 = read_manifest(store, layout.predictions_version_prefix(spec.name, D3, _versions(store, layout.predictions_date_prefix(spec.name, D3))[0]))
    assert d3.model_version == models[1].version
