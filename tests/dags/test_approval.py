"""A person's approval through the real Airflow: API server, scheduler (LocalExecutor) and DAG
processor on 127.0.0.1, the pipeline's own approval operator (``ModelApprovalOperator``, the
``approve`` task of every pipeline DAG) waiting in Airflow 3.3's ``awaiting_input`` state, answered
once through the REST API and once by clicking in headless Chromium on Airflow's Required Actions
page. The alias moves (or not) accordingly and the answer is in the alias history.

The DAG here runs only that operator after a task that hands it the gate's decision, so the run
reaches the approval step in seconds; the pipeline DAG wires the same operator after its publish
task (tests/dags/test_dag_integrity.py checks that wiring).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from twocluster.store import layout, registry
from twocluster.store.storage import ObjectStore
from twocluster_devtools.airflow_local import REPO_ROOT, ApiServer, airflow_env

pytestmark = pytest.mark.slow
DAG_ID = "approval_roundtrip"
SCREENSHOT = REPO_ROOT / "docs" / "screenshots" / "approval-required-action.png"

DAG_FILE = '''
import datetime as dt
import json
import os

from airflow.sdk import DAG, task

from twocluster.orchestration.approval import ModelApprovalOperator
from twocluster.orchestration.notifiers import task_defaults
from twocluster.store_access import store_for
from twocluster.spec import default_spec_path, load_pipeline_spec

SPEC = load_pipeline_spec(default_spec_path("speech_commands"))

# The pipeline DAG's task defaults, with a short execution_timeout: the wait for a person must not
# count against it (apache/airflow#55866 was a timeout ending the task before it waited).
DEFAULTS = task_defaults(retries=1, retry_delay=dt.timedelta(seconds=5), execution_timeout=dt.timedelta(seconds=5))

with DAG("approval_roundtrip", schedule=None, start_date=dt.datetime(2026, 1, 1), catchup=False, tags=["test"],
         default_args=DEFAULTS):
    @task
    def gate_decision(**context) -> dict:
        """What the pipeline's publish task returns when the gate wants a person."""
        return json.loads(os.environ["APPROVAL_TEST_DECISION_" + context["dag_run"].conf["version"]])

    ModelApprovalOperator(task_id="approve", spec=SPEC, decision=gate_decision(), store_for=store_for)
'''


def _request(method: str, url: str, token: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url}: {e.code} {e.read()[:1000]!r}") from None


def _wait(what: str, check, timeout: float = 240, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def airflow_running(tmp_path_factory, speech_spec):
    """API server, scheduler and DAG processor over a store holding two versions the gate left
    waiting for approval."""
    from test_gc import MODEL, commit_model

    assert speech_spec.model.name == MODEL
    root = tmp_path_factory.mktemp("approval")
    store = ObjectStore((root / "store").as_uri())
    model = speech_spec.model.name
    decisions = {}
    for name in ("api", "browser"):
        version = commit_model(store, [], f"approval-{name}")
        numbers = {"test_accuracy": 0.95, "test_examples": 40, "per_class_accuracy": {"yes": 0.9, "no": 1.0},
                   "confusion_matrix": [[18, 2], [0, 20]], "champion_version": None}
        entry = registry.record_gate_decision(store, model, version, "production", "needs_approval",
                                              "test accuracy 0.950 >= floor 0.900 (first model); a person must approve", numbers=numbers)
        decisions[name] = {"outcome": "needs_approval", "model": model, "version": version, "alias": "production",
                           "reason": entry.reason, "gate_entry": entry.seq, **numbers}
    dags = root / "dags"
    dags.mkdir()
    (dags / "approval_roundtrip.py").write_text(DAG_FILE)
    env = airflow_env(root / "airflow", store.root_uri, dags_folder=dags)
    env.update({f"APPROVAL_TEST_DECISION_{d['version']}": json.dumps(d) for d in decisions.values()})
    env.update({"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32), "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5"})
    processes = []
    with ApiServer(env, root / "airflow") as server:
        env = {**server.env, "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{server.url}/execution/"}
        for component in ("scheduler", "dag-processor"):
            log = open(root / f"{component}.log", "w")  # noqa: SIM115 - closed with the process
            processes.append(subprocess.Popen([str(Path(sys.executable).parent / "airflow"), component], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        try:
            token = server.token()
            _wait("the DAG to be parsed", lambda: _dag_known(server, token), timeout=180)
            yield server, store, decisions, root
        finally:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _dag_known(server: ApiServer, token: str) -> bool:
    try:
        return _request("GET", f"{server.url}/api/v2/dags/{DAG_ID}", token).get("dag_id") == DAG_ID
    except AssertionError:
        return False


def _run_to_approval(server: ApiServer, token: str, version: str) -> str:
    run = _request("POST", f"{server.url}/api/v2/dags/{DAG_ID}/dagRuns", token, {"logical_date": None, "conf": {"version": version}})
    run_id = run["dag_run_id"]
    ti_url = f"{server.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve"
    _wait("the approve task to wait for input", lambda: _request("GET", ti_url, token).get("state") == "awaiting_input")
    return run_id


def _run_state(server: ApiServer, token: str, run_id: str) -> str | None:
    state = _request("GET", f"{server.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", token)["state"]
    return state if state in ("success", "failed") else None


def test_an_approval_answered_through_the_rest_api_moves_the_alias_with_the_answer_recorded(airflow_running):
    server, store, decisions, root = airflow_running
    token = server.token()
    decision = decisions["api"]
    run_id = _run_to_approval(server, token, decision["version"])
    # The request carries the evidence.
    detail = _request("GET", f"{server.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails", token)
    assert detail["options"] == ["publish", "staging", "reject"] and detail["defaults"] == ["reject"]
    assert decision["version"] in detail["subject"] and "| yes | 0.900 |" in detail["body"] and "Confusion matrix" in detail["body"]
    assert registry.resolve_alias(store, decision["model"], "production") is None  # nothing moved while waiting
    time.sleep(8)  # past the task's execution_timeout: still waiting
    ti = _request("GET", f"{server.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve", token)
    assert ti["state"] == "awaiting_input", ti
    logs = "".join(p.read_text(errors="replace") for p in (root / "airflow" / "logs").rglob("*") if p.is_file())
    assert "APPROVAL WAITING approval_roundtrip.approve" in logs and decision["version"] in logs  # the notifier was told

    _request("PATCH", f"{server.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails", token,
             {"chosen_options": ["publish"], "params_input": {"comment": "checked the confusion matrix"}})
    assert _wait("the run to finish", lambda: _run_state(server, token, run_id)) == "success", (root / "scheduler.log").read_text()[-3000:]
    state = registry.read_alias(store, decision["model"], "production")
    assert state.version == decision["version"]
    authority = registry.authority_of(state.current)
    assert (authority.kind, authority.who) == ("approval", f"airflow:{server.user}")
    standing = registry.gate_standing(store, decision["model"], decision["version"], "production")
    assert standing.outcome == "approved" and standing.reason == "checked the confusion matrix" and standing.run_id == run_id


def test_an_approval_rejected_by_clicking_on_the_required_actions_page_moves_nothing(airflow_running, airflow_page):
    server, store, decisions, root = airflow_running
    token = server.token()
    decision = decisions["browser"]
    before = registry.read_alias(store, decision["model"], "production").version
    run_id = _run_to_approval(server, token, decision["version"])
    with airflow_page(server.url, server.user, server.password) as page:
        page.goto(f"{server.url}/required_actions", wait_until="networkidle")
        page.get_by_text(f"Publish {decision['model']} {decision['version']} as production?").first.click()
        page.wait_for_load_state("networkidle")
        page.get_by_role("textbox").first.fill("wrong week to ship")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        page.get_by_role("button", name="reject").click()
        assert _wait("the run to finish", lambda: _run_state(server, token, run_id)) == "success"
    assert registry.read_alias(store, decision["model"], "production").version == before
    standing = registry.gate_standing(store, decision["model"], decision["version"], "production")
    assert (standing.outcome, standing.decided_by, standing.reason) == ("rejected", f"airflow:{server.user}", "wrong week to ship")
    assert layout.check_version(decision["version"])
