"""The compose topology as processes (issue 16): PostgreSQL, Ceph RGW with per-component users, a
Spark standalone master with two workers, and Airflow's api-server, scheduler (LocalExecutor),
dag-processor and triggerer, started by the code behind `make stack-up`
(:mod:`twocluster_devtools.stack`). The pipeline is driven as an operator would: runs triggered
through the REST API, a backfill created in the Airflow UI (headless Chromium), and faults
injected while runs are in flight (a Spark worker killed, the S3 gateway stopped, the scheduler
restarted during training). Faults share runs where they hit different tasks: each DAG run costs
minutes on this stack.

One stack serves the module (it takes ~1.5 min to come up); the tests run in file order and each
processes its own dates.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from twocluster.deployment import ROOT as REPO_ROOT
from twocluster.orchestration.dag_factory import GPU_POOL, SPARK_POOL
from twocluster.spec import load_pipeline_spec
from twocluster.store import layout
from twocluster.store.manifest import DatasetManifest, PredictionsManifest, resolve_latest
from twocluster.store.storage import ObjectStore, S3Settings
from twocluster_demo import sample_data
from twocluster_devtools.airflow_api import AirflowApi
from twocluster_devtools.stack import STACK_OVERRIDES, LocalStack, compose_environment, compose_pools, loopback

D1, D2, D3, D4, D5, D6, D7 = (dt.date(2026, 10, d) for d in range(1, 8))
SCREENSHOT = REPO_ROOT / "docs" / "screenshots" / "backfill-runs.png"


# -- no stack needed ------------------------------------------------------------------------------


def test_each_airflow_process_gets_composes_environment_on_loopback():
    """The stack reads docker-compose.yml: every variable compose gives a service reaches the
    matching process (host names mapped to loopback), and only STACK_OVERRIDES differ."""
    stack = LocalStack("/nonexistent/stack")
    for component, service in (("api-server", "airflow-apiserver"), ("scheduler", "airflow-scheduler"),
                               ("dag-processor", "airflow-dag-processor"), ("triggerer", "airflow-triggerer")):
        compose = {k: loopback(v, stack.ports) for k, v in compose_environment(component, stack.variables).items()}
        env = stack.env_for(component)
        differ = {k for k, v in compose.items() if env.get(k) != v}
        assert differ == set(STACK_OVERRIDES) & set(compose), (component, differ)
        assert not any("postgres/" in v or "http://s3:" in v or "spark-master" in v for v in env.values()), component
        credentials = {k for k in env if k.startswith("AIRFLOW_CONN_TWOCLUSTER_STORE")}
        expected = {"api-server": {"AIRFLOW_CONN_TWOCLUSTER_STORE"},
                    "scheduler": {"AIRFLOW_CONN_TWOCLUSTER_STORE", "AIRFLOW_CONN_TWOCLUSTER_STORE_SPARK", "AIRFLOW_CONN_TWOCLUSTER_STORE_TRAINER"}}
        assert credentials == expected.get(component, set()), (component, service)
    # compose's airflow-init creates the pools the DAG's tasks run in, with compose's slot counts.
    assert {name: slots for name, (slots, _) in compose_pools(stack.variables).items()} == {SPARK_POOL: 2, GPU_POOL: 1}
    backend = json.loads(stack.env_for("scheduler")["AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND"])
    assert backend == {"kind": "local", "credentials_conn_id": "twocluster_store_trainer",
                       "env": {"AWS_ENDPOINT_URL_S3": stack.endpoints.s3_endpoint, "AWS_REGION": "us-east-1"}}


# -- the stack --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """The stack, a pipeline whose dates are all in the past (no scheduled runs appear), and the
    arrivals of every date the tests process."""
    root = tmp_path_factory.mktemp("stack")
    data = yaml.safe_load((REPO_ROOT / "pipelines" / "speech_commands.yaml").read_text())
    data.update(start_date=D1.isoformat(), end_date=D7.isoformat())
    # A small model on 150 clips a day, forced through the REST API; the gate (tested elsewhere)
    # lets it through: this module tests the topology, not the model.
    data["model"].update(epochs=3, gate={"min_test_accuracy": 0.0, "max_regression": 1.0})
    # The faults' retries come after 10 s instead of a minute (the policy is otherwise the spec's).
    data["retries"] = {"attempts": 2, "delay_seconds": 10, "max_delay_seconds": 60}
    pipelines = root / "pipelines"
    pipelines.mkdir()
    (pipelines / "speech_commands.yaml").write_text(yaml.safe_dump(data))
    digits = yaml.safe_load((REPO_ROOT / "pipelines" / "digits.yaml").read_text())
    digits.update(start_date=D1.isoformat(), end_date=D7.isoformat())  # parsed, never scheduled
    (pipelines / "digits.yaml").write_text(yaml.safe_dump(digits))
    spec = load_pipeline_spec(pipelines / "speech_commands.yaml")
    # The scheduler restart test: a task whose scheduler died is failed (and retried) after this
    # many seconds without a heartbeat (Airflow's default: 300).
    stack = LocalStack(root / "stack", pipelines_dir=pipelines,
                       extra_airflow_env={"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "45"})
    try:
        endpoints = stack.up()
        admin = S3Settings(endpoint_url=endpoints.s3_endpoint, region="us-east-1", access_key=stack.keys["admin"][0],
                           secret_key=stack.keys["admin"][1])
        store = ObjectStore(endpoints.store_uri, admin)  # the upstream that drops arrivals: the bucket owner
        sample_data.generate(store, spec, [D1, D2, D3, D6], clips_per_day=150, seed=5, bad_files_per_day=1)
        sample_data.generate(store, spec, [D5], clips_per_day=1500, seed=6)
        # Objects belong to the user who wrote them (the bucket owner cannot read Spark's or the
        # trainer's): the tests read the store as Airflow does, with its identity.
        store = ObjectStore(endpoints.store_uri, S3Settings(endpoint_url=endpoints.s3_endpoint, region="us-east-1",
                                                            access_key=stack.keys["airflow"][0], secret_key=stack.keys["airflow"][1]))
        api = AirflowApi(endpoints.airflow_url, endpoints.airflow_user, endpoints.airflow_password)
        _wait(lambda: api.call("GET", f"/dags/{spec.name}")[0] == 200, 180, "the DAG to be parsed")
        api.ok("PATCH", f"/dags/{spec.name}", {"is_paused": False})
        yield stack, spec, store, api
    finally:
        left = stack.down()
        assert left == [], f"still running after stack down: {left}"


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _owners(stack: LocalStack, prefix: str) -> Counter:
    pages = stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix, FetchOwner=True)
    return Counter(obj["Owner"]["ID"] for page in pages for obj in page.get("Contents", []))


def _tasks_per_worker(stack: LocalStack, app_name_prefix: str) -> dict[str, dict[str, int]]:
    """From the master's JSON and the applications' event logs: for each finished application
    whose name starts with the prefix, how many tasks executors on each worker (by web UI port) ran."""
    result = {}
    apps = [a for a in stack.spark_master_status()["completedapps"] if a["name"].startswith(app_name_prefix)]
    for app in apps:
        executor_worker, per_worker = {}, Counter()
        for line in (stack.root / "spark-events" / app["id"]).read_text().splitlines():
            event = json.loads(line)
            if event["Event"] == "SparkListenerExecutorAdded":
                stdout_url = event["Executor Info"]["Log Urls"]["stdout"]
                executor_worker[event["Executor ID"]] = stdout_url.split("//", 1)[1].split("/", 1)[0]
            elif event["Event"] == "SparkListenerTaskEnd":
                per_worker[executor_worker.get(event["Task Info"]["Executor ID"], "driver")] += 1
        result[app["id"]] = dict(per_worker)
    return result


def _trainers() -> list[int]:
    import glob

    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            args = Path(cmdline).read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"training_jobs/train.py") for a in args):
            found.append(int(cmdline.split("/")[2]))
    return found


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.stack
def test_a_run_triggered_through_the_rest_api_runs_on_the_cluster_and_survives_a_scheduler_restart(running):
    """Preprocessing and scoring run as applications on the standalone master, with executors on
    both workers; the trainer writes with its own identity; the gate publishes. The scheduler is
    restarted (stopped as compose stops a container: SIGTERM, SIGKILL after 10 s) while the
    trainer runs: the task is retried and no second trainer ever runs beside the first."""
    stack, spec, store, api = running
    run_id = api.trigger(spec.name, {"date": D1.isoformat(), "retrain": "force"})
    concurrent, stop = [], threading.Event()

    def watch_trainers():
        while not stop.is_set():
            concurrent.append(len(_trainers()))
            time.sleep(0.3)

    watcher = threading.Thread(target=watch_trainers, daemon=True)
    watcher.start()
    try:
        _wait(lambda: api.task_states(spec.name, run_id).get("train") == "running" and _trainers(), 600, "the trainer to start")
        time.sleep(3)
        stack.stop_process("scheduler", grace=10)
        _wait(lambda: not _trainers(), 15, "the trainer to die with its task")
        stack.restart("scheduler")
        run = api.wait_for_run(spec.name, run_id)
    finally:
        stop.set()
        watcher.join()
    states = api.task_states(spec.name, run_id)
    assert run["state"] == "success", states
    assert max(concurrent) == 1, "two trainers ran at once"
    assert api.task_instances(spec.name, run_id)["train"]["try_number"] >= 2

    for job in ("preprocess", "score"):
        apps = _tasks_per_worker(stack, f"{job}-{spec.name}-{D1}")
        assert apps, f"no {job} application on the standalone master"
        for app_id, per_worker in apps.items():
            assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), (job, app_id, per_worker)

    model_prefix = f"models/{spec.model.name}/versions/"
    assert set(_owners(stack, model_prefix)) == {"trainer"}, "the trainer wrote with another identity"
    assert set(_owners(stack, layout.dataset_date_prefix(spec.name, D1))) == {"spark"}
    assert set(_owners(stack, layout.predictions_date_prefix(spec.name, D1))) == {"spark"}
    aliases = _owners(stack, f"models/{spec.model.name}/aliases/")
    assert set(aliases) == {"airflow"} and aliases["airflow"] >= 1, "the gate did not publish"


# Files that hold a secret by design, each readable by its owner only: the endpoints and login
# (mode 600), the simple auth manager's password file, the Airflow config the processes share.
_SECRET_HOLDERS = ("endpoints.json", "simple_auth_manager_passwords.json", "processes.json")


def _stack_secrets(stack: LocalStack) -> dict[str, str]:
    found = {f"S3 {user} secret key": keys[1] for user, keys in stack.keys.items()}
    found.update({name: stack.variables[name] for name in ("POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY")})
    found["Airflow admin password"] = stack.admin_password
    return found


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.stack
def test_no_secret_of_the_stack_is_in_an_argument_a_log_a_manifest_an_xcom_or_the_ops_page(running):
    """The canary sweep, after the run above: every secret the stack generated (each S3 user's
    key, the database password, the JWT secret, the Fernet key, the admin password) is looked
    for in every process's arguments, every log and event log the stack's processes wrote, every
    commit record and job spec in the store, every XCom of the run, and the ops page and its API.
    (Pickled closures: tests/dags/test_secrets.py; the S3 image's output: test_compose.py.)"""
    stack, spec, store, api = running
    secrets_by_name = _stack_secrets(stack)

    def leaks(text: str) -> list[str]:
        return [name for name, value in secrets_by_name.items() if value in text]

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        assert not leaks(args), (cmdline, leaks(args), args[:300])
    scanned = 0
    for path in stack.root.rglob("*"):
        if not path.is_file() or path.name in _SECRET_HOLDERS or "postgres" in path.parts or path.suffix in (".cfg", ".db"):
            continue
        text = path.read_bytes().decode(errors="replace")
        scanned += 1
        assert not leaks(text), (path, leaks(text))
    assert scanned > 20, "no logs to scan"
    records = [o.key for o in store.list("") if o.key.endswith(".json")]
    assert any(k.endswith("_MANIFEST.json") for k in records) and any(k.startswith("jobs/") for k in records)
    for key in records:
        assert not leaks(store.read_bytes(key).decode()), key
    runs = api.ok("GET", f"/dags/{spec.name}/dagRuns?limit=50")["dag_runs"]
    xcoms = 0
    for run in runs:
        for task_id in api.task_instances(spec.name, run["dag_run_id"]):
            status, entries = api.call("GET", f"/dags/{spec.name}/dagRuns/{run['dag_run_id']}/taskInstances/{task_id}/xcomEntries")
            for entry in (entries.get("xcom_entries", []) if status == 200 else []):
                value = api.ok("GET", f"/dags/{spec.name}/dagRuns/{run['dag_run_id']}/taskInstances/{task_id}/xcomEntries/"
                                      f"{entry['key']}")
                xcoms += 1
                assert not leaks(json.dumps(value)), (task_id, entry["key"])
    assert xcoms >= 5, "the run left no XComs to check"
    for path in (f"/twocluster/api/pipelines/{spec.name}", "/twocluster/openapi.json", f"/twocluster/pipelines/{spec.name}"):
        request = urllib.request.Request(api.url + path, headers={"Authorization": f"Bearer {api.token}"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                page = response.read().decode()
        except urllib.error.HTTPError as e:
            server_log = (stack.root / "logs" / "api-server.log").read_text(errors="replace")[-6000:]
            raise AssertionError(f"{path}: {e.code} {e.read()[:1000]!r}\n{server_log}") from None
        assert not leaks(page), (path, leaks(page))


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.stack
@pytest.mark.timeout(1800)  # three DAG runs one after the other (the DAG's max_active_runs is 1)
def test_a_backfill_started_in_the_airflow_ui_runs_each_date_with_its_param(running, airflow_page):
    """Trigger -> Backfill in the UI: the date range, the ``retrain`` param set to ``never`` (the
    dialog sends its Run Parameters only with "Override parameters on existing runs" ticked),
    Run Backfill. One run per data interval (two: each run costs ~80 s of this suite on two cores),
    each with the param in its conf; every run's retrain decision obeys it (the champion from the
    first test scores both)."""
    stack, spec, store, api = running
    e = stack.endpoints
    with airflow_page(e.airflow_url, e.airflow_user, e.airflow_password, {"width": 1400, "height": 1000}) as page:
        page.goto(f"{e.airflow_url}/dags/{spec.name}", wait_until="networkidle")
        page.get_by_role("button", name="Trigger Dag").click()
        dialog = page.locator("[role=dialog][data-state=open]")
        dialog.get_by_text("Backfill", exact=True).click()
        for picker, day in zip(dialog.get_by_test_id("datetime-input").all(), (D2, D3), strict=True):
            picker.click()
            popover = page.locator("[data-scope=popover][data-part=content][data-state=open]").last
            popover.get_by_placeholder("YYYY/MM/DD").fill(day.strftime("%Y/%m/%d"))
            popover.get_by_placeholder("HH:mm").fill("00:00")
            page.keyboard.press("Escape")
        dialog.get_by_text("Override parameters on existing runs").click()
        retrain = dialog.locator("#element_retrain input[role=combobox]")  # a react-select
        retrain.click()
        retrain.fill("never")
        page.keyboard.press("Enter")
        assert dialog.locator("input[name=element_retrain]").input_value() == "never"
        _wait(lambda: "2 runs will be triggered" in dialog.inner_text() and dialog.get_by_role("button", name="Run Backfill").is_enabled(),
              60, "the dry run to count the runs")
        dialog.get_by_role("button", name="Run Backfill").click()
        _wait(lambda: len(_backfill_runs(api, spec.name)) == 2, 60, "the backfill's two runs")
    # The browser is closed while the runs run: the DAG page polls the API every few seconds,
    # and on two cores Chromium and the API server would take their share from the runs.
    for run in _backfill_runs(api, spec.name):
        api.wait_for_run(spec.name, run["dag_run_id"])
    with airflow_page(e.airflow_url, e.airflow_user, e.airflow_password, {"width": 1400, "height": 1000}) as page:
        page.goto(f"{e.airflow_url}/dags/{spec.name}/runs", wait_until="networkidle")
        page.wait_for_timeout(1500)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    runs = sorted(_backfill_runs(api, spec.name), key=lambda r: r["data_interval_start"])
    assert [r["data_interval_start"][:10] for r in runs] == [str(D2), str(D3)]
    for run in runs:
        assert run["conf"]["retrain"] == "never" and not run["conf"].get("date"), run["conf"]
        states = api.task_states(spec.name, run["dag_run_id"])
        assert run["state"] == "success", states
        assert states["training_skipped"] == "success" and states["train"] == "skipped", states
        assert "retrain=never" in api.log(spec.name, run["dag_run_id"], "decide_retrain")
    assert SCREENSHOT.stat().st_size > 20_000


def _backfill_runs(api: AirflowApi, dag_id: str, date_range: tuple[dt.date, dt.date] = (D2, D3)) -> list[dict]:
    answer = api.ok("GET", f"/dags/{dag_id}/dagRuns?limit=100&run_type=backfill")
    return [r for r in answer["dag_runs"] if str(date_range[0]) <= r["data_interval_start"][:10] <= str(date_range[1])]


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.stack
def test_a_backfill_that_sets_the_date_param_is_refused(running):
    stack, spec, store, api = running
    # One backfill per DAG at a time: the UI's must be marked complete first.
    _wait(lambda: all(b.get("completed_at") for b in api.ok("GET", f"/backfills?dag_id={spec.name}")["backfills"]), 300,
          "earlier backfills to complete")
    api.ok("POST", "/backfills", {"dag_id": spec.name, "from_date": f"{D6}T00:00:00Z", "to_date": f"{D7}T00:00:00Z",
                                  "dag_run_conf": {"date": str(D6)}, "max_active_runs": 2, "reprocess_behavior": "none"})
    _wait(lambda: len(_backfill_runs(api, spec.name, (D6, D7))) == 2, 60, "the backfill's runs")
    for run in _backfill_runs(api, spec.name, (D6, D7)):
        finished = api.wait_for_run(spec.name, run["dag_run_id"], timeout=300)
        states = api.task_states(spec.name, run["dag_run_id"])
        assert finished["state"] == "failed" and states["check_params"] == "failed" and states["preprocess"] != "success", states
        assert "sets the &#x27;date&#x27; parameter" in api.log(spec.name, run["dag_run_id"], "check_params") or \
            "sets the 'date' parameter" in api.log(spec.name, run["dag_run_id"], "check_params")
    assert resolve_latest(store, layout.dataset_date_prefix(spec.name, D6), DatasetManifest) is None


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.stack
def test_a_spark_worker_killed_and_an_s3_outage_in_one_run_leave_only_complete_versions(running):
    """Two faults in one run of 1,500 clips (each run costs minutes on this stack). A Spark worker
    is SIGKILLed (with its executor and Python workers) while preprocessing runs on it: the job
    finishes on the other worker (or its retry does) and the committed version holds every
    accepted row exactly once. Then the S3 gateway stops while scoring runs: the task fails or
    retries, no predictions are visible while it is down, and the retry commits them."""
    stack, spec, store, api = running
    run_id = api.trigger(spec.name, {"date": D5.isoformat(), "retrain": "never"})
    worker_url = stack.endpoints.spark_worker_web_urls[0]

    def preprocess_executor_running() -> bool:
        try:
            with urllib.request.urlopen(f"{worker_url}/json/", timeout=5) as r:
                worker = json.loads(r.read())
        except OSError:
            return False
        return any(x["appdesc"]["name"].startswith("preprocess") and x.get("state", "RUNNING") == "RUNNING"
                   for x in worker.get("executors", []))

    _wait(preprocess_executor_running, 600, "preprocessing's executor on worker 1")
    time.sleep(4)  # its Python workers are featurizing
    assert api.task_states(spec.name, run_id)["preprocess"] == "running"
    stack.kill_process("spark-worker-1")
    try:
        _wait(lambda: api.task_states(spec.name, run_id)["preprocess"] in ("success", "failed"), 600, "preprocessing to finish")
    finally:
        stack.restart("spark-worker-1")
    assert api.task_states(spec.name, run_id)["preprocess"] == "success"

    predictions_prefix = layout.predictions_date_prefix(spec.name, D5)
    _wait(lambda: api.task_states(spec.name, run_id).get("score") == "running", 600, "scoring to start")
    time.sleep(8)  # the Spark application is up and reading the model and the arrivals
    stack.rgw.stop_gateway()
    try:
        _wait(lambda: api.task_states(spec.name, run_id).get("score") in ("up_for_retry", "failed", "success"), 300,
              "the score task to notice the outage")
    finally:
        time.sleep(5)
        stack.restart("radosgw")
    outage_state = api.task_states(spec.name, run_id)["score"]
    if outage_state != "success":  # nothing partial: no predictions until the retry commits them
        assert resolve_latest(store, predictions_prefix, PredictionsManifest) is None
    run = api.wait_for_run(spec.name, run_id)
    assert run["state"] == "success", api.task_states(spec.name, run_id)

    latest = resolve_latest(store, layout.dataset_date_prefix(spec.name, D5), DatasetManifest, verify_checksums=True)
    manifest = latest.manifest
    assert manifest.counts.input == 1500 and manifest.counts.accepted + manifest.counts.rejected == 1500
    version_prefix = layout.dataset_version_prefix(spec.name, D5, latest.version)
    paths = []
    for f in manifest.files:
        if f.kind == "parquet":
            paths += pq.read_table(io.BytesIO(store.read_bytes(f"{version_prefix}/{f.path}")), columns=["path"])["path"].to_pylist()
    assert len(paths) == manifest.counts.accepted == len(set(paths)), "rows lost or duplicated"
    predictions = resolve_latest(store, predictions_prefix, PredictionsManifest, verify_checksums=True)
    assert predictions is not None and predictions.manifest.counts.input == 1500


def test_an_operator_reads_the_stack_with_its_read_only_key_and_ingest_writes_only_raw(running):
    """Issue 34: `make stack-up` ended in a stack nobody outside its processes could use (the keys
    lived in the launcher's memory). endpoints.json (mode 600) now holds an operator key, which
    `twocluster status` reads the store with and which writes nothing, and an ingest key, which
    writes under raw/ only; `stack env` prints the operator's shell settings."""
    import os
    import subprocess
    import sys

    from twocluster.store.storage import StorageError

    stack, spec, _, _ = running
    saved = json.loads((stack.root / "endpoints.json").read_text())
    assert saved["operator_access_key"] == stack.keys["operator"][0] and saved["ingest_access_key"] == stack.keys["ingest"][0]
    exported = subprocess.run([sys.executable, "-m", "twocluster_devtools.stack", "env", "--dir", str(stack.root), "--as", "operator"],
                              capture_output=True, text=True, check=True).stdout
    operator_env = dict(line.removeprefix("export ").split("=", 1) for line in exported.splitlines())
    assert operator_env["AWS_ACCESS_KEY_ID"] == stack.keys["operator"][0] and operator_env["TWOCLUSTER_STORE_URI"] == "s3://twocluster"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW_VAR_", "TWOCLUSTER_STORE"))}
    status = subprocess.run([sys.executable, "-m", "twocluster.ops.cli", "status", "--json"], env={**clean, **operator_env},
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    seen = json.loads(status.stdout)
    assert any(row["predictions"] for row in seen["pipelines"][spec.name]["dates"]), "the operator sees the scored dates"
    assert seen["models"][spec.model.name]["versions"], "and the models"

    endpoints = stack.endpoints

    def as_user(user: str) -> ObjectStore:
        return ObjectStore(endpoints.store_uri, S3Settings(endpoint_url=endpoints.s3_endpoint, region="us-east-1",
                                                           access_key=stack.keys[user][0], secret_key=stack.keys[user][1]))

    operator, ingest = as_user("operator"), as_user("ingest")
    for who, key in [(operator, "raw/_probe/x.wav"), (operator, f"models/{spec.model.name}/aliases/production/_log/x.json"),
                     (ingest, "datasets/_probe/x"), (ingest, f"models/{spec.model.name}/aliases/production/_log/x.json")]:
        with pytest.raises(StorageError, match="AccessDenied|403|Access Denied|ACCESS_DENIED"):
            who.write_bytes(key, b"x")
    ingest.write_bytes("raw/_probe/x.wav", b"RIFF")
    assert operator.read_bytes("raw/_probe/x.wav") == b"RIFF"
