"""The ops page in the real Airflow API server, driven by headless Chromium (issue 13).

The store is filled by the real jobs (Spark preprocessing of two dates, training, the gate,
Spark scoring); the API server runs with the repository's plugins and the simple auth manager;
Chromium (Debian's) signs in through Airflow's login form and opens the page. The README's
screenshot is taken over ``make run``'s own store (``make run && make screenshots``).
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.request

import pytest
import yaml

from twocluster.orchestration.runs import training_job
from twocluster.spark.preprocess import run_preprocess
from twocluster.spark.scoring import run_scoring
from twocluster.spec import load_pipeline_spec
from twocluster.store.storage import ObjectStore
from twocluster.training.gate import gate_and_publish
from twocluster.training.trainer import run_training
from twocluster_demo import sample_data
from twocluster_devtools.airflow_local import REPO_ROOT, ApiServer, airflow, airflow_env

pytestmark = pytest.mark.slow
DATES = [dt.date(2026, 10, 20), dt.date(2026, 10, 21)]
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
MAKE_RUN_STORE = REPO_ROOT / ".local" / "store"  # what `make run` leaves


@pytest.fixture(scope="module")
def served(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("ops-ui")
    data = yaml.safe_load((REPO_ROOT / "pipelines" / "speech_commands.yaml").read_text())
    data.update(start_date=DATES[0].isoformat(), end_date=DATES[-1].isoformat())
    data["model"].update(epochs=4)
    pipelines = root / "pipelines"
    pipelines.mkdir()
    (pipelines / "speech_commands.yaml").write_text(yaml.safe_dump(data))
    digits = yaml.safe_load((REPO_ROOT / "pipelines" / "digits.yaml").read_text())
    digits.update(start_date=DATES[0].isoformat(), end_date=DATES[-1].isoformat())
    (pipelines / "digits.yaml").write_text(yaml.safe_dump(digits))
    spec = load_pipeline_spec(pipelines / "speech_commands.yaml")
    store = ObjectStore((root / "store").as_uri())
    sample_data.generate(store, spec, DATES, clips_per_day=160, seed=41, bad_files_per_day=2)
    datasets = [run_preprocess(spark, spec, store, d, run_id=f"ui-{d}", max_reject_rate=0.2).manifest_uri for d in DATES]
    trained = run_training(training_job(spec, "ui-train", datasets, store.root_uri), root / "work")
    assert gate_and_publish(store, spec.model.name, trained.version, "production", 0.0, 1.0, run_id="ui-train").published
    for d in DATES:
        run_scoring(spark, spec, store, d, run_id=f"ui-score-{d}")
    env = airflow_env(root / "airflow", store.root_uri)
    env["TWOCLUSTER_PIPELINES_DIR"] = str(pipelines)
    with ApiServer(env, root / "airflow") as server:
        # A DAG run in Airflow's database with the id the training and the gate ran under, so its
        # run page has a "Store lineage" tab to open (no scheduler: it stays queued).
        for cmd in (["dags", "reserialize"], ["dags", "trigger", spec.name, "--run-id", "ui-train"]):
            result = airflow(env, *cmd, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-2000:]
        yield server, spec, trained.version


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_unauthenticated_requests_are_refused_and_the_plugin_is_registered(served):
    server, spec, _ = served
    for path in ("/twocluster/", f"/twocluster/pipelines/{spec.name}", f"/twocluster/api/pipelines/{spec.name}"):
        assert _get(server.url + path)[0] in (401, 403), path
    token = server.token()
    status, body = _get(f"{server.url}/api/v2/plugins", token)
    plugin = next(p for p in json.loads(body)["plugins"] if p["name"] == "twocluster_ops")
    assert plugin["external_views"][0]["href"] == "/twocluster/" and plugin["external_views"][0]["destination"] == "nav"
    assert plugin["external_views"][1]["destination"] == "dag_run" and "{RUN_ID}" in plugin["external_views"][1]["href"]
    status, body = _get(f"{server.url}/twocluster/api/pipelines/{spec.name}", token)
    overview = json.loads(body)
    assert status == 200 and [d["date"] for d in overview["dates"]] == [str(d) for d in DATES]
    assert all(d["predictions"]["predicted_labels"] for d in overview["dates"])


def test_an_operator_signs_in_and_sees_the_page(served, airflow_page, tmp_path):
    server, spec, model_version = served
    with airflow_page(server.url, server.user, server.password) as page:
        page.wait_for_function("document.cookie.includes('_token') || true")
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        response = page.goto(f"{server.url}/twocluster/pipelines/{spec.name}", wait_until="networkidle")
        assert response.status == 200, response.status
        assert page.title() == f"{spec.name}: operations"
        charts = page.locator("svg.chart")
        assert charts.count() == 4
        for i in range(charts.count()):
            assert charts.nth(i).locator(".mark").count() > 0, f"chart {i} drew nothing"
            box = charts.nth(i).bounding_box()
            assert box and box["width"] > 300 and box["height"] > 80
            # Legend labels as Chromium lays them out: none over another (the timings chart's were).
            legend = charts.nth(i).locator("text.legend")
            boxes = sorted((b for j in range(legend.count()) if (b := legend.nth(j).bounding_box())), key=lambda b: (round(b["y"]), b["x"]))
            for left, right in zip(boxes, boxes[1:], strict=False):
                if round(left["y"]) == round(right["y"]):
                    assert left["x"] + left["width"] + 8 <= right["x"], f"chart {i}: legend labels overlap: {left} {right}"
        assert page.locator(f"text={model_version}").count() >= 1
        page.screenshot(path=str(tmp_path / "ops-page.png"), full_page=True)
        # The lineage of a date, one click away.
        page.click(f"#freshness a:has-text('{DATES[-1]}')")
        page.wait_for_url(f"**/dates/{DATES[-1]}", timeout=30_000)
        assert "lineage" in page.title() and page.locator(f"a:has-text('{model_version}')").count() == 1
        # Its data quality (issue 35): the features per mel bin against the scored ones, and their skew.
        quality = page.locator("#quality")
        assert quality.locator("svg.chart").count() == 2 and "Skew per channel" in quality.inner_text()
        assert "rms_dbfs" in quality.locator("#clips").inner_text()
        quality.screenshot(path=str(SCREENSHOTS / "date-quality.png"))
        # The DAG run's "Store lineage" tab in Airflow's own UI: an iframe on the run's commits.
        page.goto(f"{server.url}/dags/{spec.name}/runs/ui-train/plugin/store-lineage", wait_until="networkidle")
        frame_element = page.wait_for_selector("iframe", timeout=30_000)
        assert "/twocluster/runs/" in frame_element.get_attribute("src")
        frame = frame_element.content_frame()
        frame.wait_for_selector("#run", timeout=30_000)
        assert frame.locator(f"a:has-text('{model_version}')").count() == 1
        assert frame.locator("text=published").count() >= 1
        page.screenshot(path=str(SCREENSHOTS / "run-lineage.png"))
        errors = [e for e in errors if "/api/v2/" not in e]  # the queued run's UI polls; not ours
        assert errors == [], errors
    assert (tmp_path / "ops-page.png").stat().st_size > 20_000


@pytest.mark.skipif(not (MAKE_RUN_STORE / "predictions").is_dir(), reason="needs make run's store (.local/store): make run && make screenshots")
def test_the_readme_screenshot_is_the_ops_page_over_make_runs_store(airflow_page, tmp_path):
    """The README shows what `make run` produces, not a test's store: its four dates, the model
    it published, the predictions of the date it scored."""
    from twocluster.ops.monitoring import pipeline_overview
    from twocluster.spec import default_spec_path

    spec = load_pipeline_spec(default_spec_path("speech_commands"))
    store = ObjectStore(MAKE_RUN_STORE.as_uri())
    overview = pipeline_overview(store, spec)
    published = overview.aliases.get(spec.scoring.alias)
    assert published, "make run published no model"
    accuracy = next(m.test_accuracy for m in overview.models if m.version == published)
    scored = [d.date for d in overview.dates if d.predictions]
    assert scored and accuracy >= spec.model.gate.min_test_accuracy
    env = airflow_env(tmp_path / "airflow", store.root_uri)
    with ApiServer(env, tmp_path / "airflow") as server, airflow_page(server.url, server.user, server.password,
                                                                         viewport={"width": 1280, "height": 900}) as page:
        first = min(d.date for d in overview.dates if d.dataset)
        days = (dt.datetime.now(dt.UTC).date() - first).days + 3  # make run's dates, and two before them
        response = page.goto(f"{server.url}/twocluster/pipelines/{spec.name}?days={days}", wait_until="networkidle")
        assert response.status == 200
        assert page.locator(f"text={published}").count() >= 1 and page.locator(f"text={accuracy:.3f}").count() >= 1
        page.screenshot(path=str(SCREENSHOTS / "ops-page.png"), full_page=True)
    assert (SCREENSHOTS / "ops-page.png").stat().st_size > 20_000


def test_an_operator_rolls_back_and_reruns_a_date_from_the_page(served, airflow_page):
    """Issue 32: acting where ops look. A second version goes out (the gate passed it); the
    operator rolls production back from the page, giving a reason, then re-runs a date: Airflow
    gets the run from the signed-in user through its own API, with the date and retrain params."""
    from twocluster.store import layout, registry
    from twocluster.store.manifest import commit_version, describe_files

    server, spec, model_version = served
    store = ObjectStore(f"file://{server.env['TWOCLUSTER_STORE_URI'].removeprefix('file://')}")
    model = spec.model.name
    second = layout.new_version_id()
    src, dst = layout.model_version_prefix(model, model_version), layout.model_version_prefix(model, second)
    for obj in store.list(src):
        if not obj.key.endswith(layout.MANIFEST_NAME):
            store.write_bytes(dst + obj.key[len(src):], store.read_bytes(obj.key))
    original = registry.read_model_manifest(store, model, model_version)
    commit_version(store, layout.model_versions_prefix(model), original.model_copy(update={"version": second, "files": describe_files(store, dst)}))
    registry.record_gate_decision(store, model, second, "production", "passed", "test: passed", run_id="ui-second")
    registry.move_alias(store, model, "production", second, expected=registry.read_alias(store, model, "production"), who="gate:ui-second")

    with airflow_page(server.url, server.user, server.password, viewport={"width": 1280, "height": 1000}) as page:
        page.goto(f"{server.url}/twocluster/pipelines/{spec.name}", wait_until="networkidle")
        rollback = page.locator("#actions form[action$='/production/rollback']")
        rollback.locator("input[name=reason]").fill("second version misfires on 'no' in the canary")
        rollback.locator("button").click()
        page.wait_for_selector("#notice", timeout=30_000)
        assert "rolled back from" in page.locator("#notice").inner_text()
        page.locator("#notice").scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "ops-rollback.png"))
        state = registry.read_alias(store, model, "production")
        assert state.version == model_version
        assert registry.authority_of(state.current).kind == "rollback" and registry.authority_of(state.current).who == f"airflow:{server.user}"

        rerun = page.locator("#actions form[action$='/rerun']")
        rerun.locator("input[name=date]").fill(DATES[-1].isoformat())
        rerun.locator("select[name=retrain]").select_option("force")
        rerun.locator("button").click()
        page.wait_for_selector("#notice", timeout=30_000)
        notice = page.locator("#notice").inner_text()
        assert notice.startswith(f"triggered {spec.name} for {DATES[-1]} (retrain force) as {server.user}: run "), notice
        page.screenshot(path=str(SCREENSHOTS / "ops-rerun.png"))
    run_id = notice.rsplit("run ", 1)[1]
    status, body = _get(f"{server.url}/api/v2/dags/{spec.name}/dagRuns/{run_id}", server.token())
    run = json.loads(body)
    assert status == 200 and run["conf"] == {"date": DATES[-1].isoformat(), "retrain": "force"}
    assert run.get("triggering_user_name") in (None, server.user)
