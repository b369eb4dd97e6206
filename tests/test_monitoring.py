"""The ops page's data and JSON endpoints (issue 13) against stores with missing dates, a
rejected-heavy date, two model versions with an alias move, and an invalid manifest."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from test_gc import commit_model
from test_manifest import FEATURES

from twocluster.ops.monitoring import health_problems, pipeline_overview, tvd
from twocluster.ops.opsview import create_app
from twocluster.store import layout, registry
from twocluster.store.commitlog import CommitLog, GateDecided
from twocluster.store.manifest import (
    Counts,
    DatasetManifest,
    Lineage,
    PredictionsManifest,
    PredictionSummary,
    commit_version,
    describe_files,
)
from twocluster.store.storage import ObjectStore

D = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(5)]
LABELS = {"yes": 50, "no": 48}


@pytest.fixture
def spec(speech_spec):
    return speech_spec.model_copy(update={"start_date": D[0], "end_date": D[-1]})


def _raw(store: ObjectStore, spec, day: dt.date, files: int = 3, complete: bool = True) -> None:
    prefix = layout.raw_date_prefix(spec.name, day)
    for i in range(files):
        store.write_bytes(f"{prefix}/yes/s{i}_nohash_0.wav", b"RIFF....")
    if complete:
        store.write_bytes(f"{prefix}/_ARRIVED.json", b"{}")


def _dataset(store: ObjectStore, spec, day: dt.date, rejected: int = 2) -> str:
    version = layout.new_version_id()
    prefix = layout.dataset_version_prefix(spec.name, day, version)
    store.write_bytes(f"{prefix}/parquet/split=train/part-00000.parquet", b"rows")
    accepted = 98
    commit_version(store, layout.dataset_date_prefix(spec.name, day), DatasetManifest(
        version=version, created_at=dt.datetime.now(dt.UTC), files=describe_files(store, prefix),
        counts=Counts(input=accepted + rejected, accepted=accepted, rejected=rejected, per_label=LABELS,
                      rejected_by_reason={"truncated": rejected} if rejected else {}),
        lineage=Lineage(code_version="t", run_id="r"), feature_spec=FEATURES, pipeline=spec.name, date=day,
        seconds={"featurize": 3.5, "write": 1.25}))
    return store.uri(layout.manifest_key(prefix))


def _predictions(store: ObjectStore, spec, day: dt.date, model_version: str, predicted: dict[str, int]) -> str:
    version = layout.new_version_id()
    prefix = layout.predictions_version_prefix(spec.name, day, version)
    store.write_bytes(f"{prefix}/predictions/part-00000.parquet", b"rows")
    n = sum(predicted.values())
    commit_version(store, layout.predictions_date_prefix(spec.name, day), PredictionsManifest(
        version=version, created_at=dt.datetime.now(dt.UTC), files=describe_files(store, prefix),
        counts=Counts(input=n, accepted=n, rejected=0), lineage=Lineage(code_version="t", run_id="r"), feature_spec=FEATURES,
        pipeline=spec.name, date=day, model=spec.model.name, model_version=model_version, seconds={"total": 7.0},
        summary=PredictionSummary(predicted_labels=predicted, mean_confidence=0.8, confidence_floor=0.5, below_confidence_floor=n // 10)))
    return version


@pytest.fixture
def filled(store: ObjectStore, spec):
    for day in D:
        _raw(store, spec, day, complete=day != D[1])
    first = _dataset(store, spec, D[0])
    v1 = commit_model(store, [first], "run-1")
    _predictions(store, spec, D[0], v1, {"yes": 50, "no": 48})
    # D[1]: arrivals only, incomplete: nothing committed
    _dataset(store, spec, D[2], rejected=30)  # rejected-heavy, not scored
    fourth = _dataset(store, spec, D[3])
    v2 = commit_model(store, [first, fourth], "run-2")
    for version in (v1, v2):
        registry.record_gate_decision(store, spec.model.name, version, "production", "passed", "test", run_id="test")
        state = registry.read_alias(store, spec.model.name, "production")
        registry.move_alias(store, spec.model.name, "production", version, expected=state, who="test", reason=f"published {version}")
    CommitLog(store, layout.model_gate_prefix(spec.model.name)).append(lambda seq: GateDecided(
        seq=seq, model=spec.model.name, alias="production", version=v2, outcome="published", reason="better",
        numbers={"test_accuracy": 0.9, "champion_version": v1, "champion_test_accuracy": 0.9}))
    _predictions(store, spec, D[3], v2, {"yes": 90, "no": 8})  # drifted
    bad = _dataset(store, spec, D[4])
    manifest_key = bad.split(store.root_uri + "/", 1)[1]
    doc = json.loads(store.read_bytes(manifest_key))
    doc["counts"]["accepted"] += 1  # a hand edit
    store.write_bytes(manifest_key, json.dumps(doc).encode())
    return store, v1, v2


def test_overview_shows_missing_rejected_moved_and_invalid(filled, spec):
    store, v1, v2 = filled
    o = pipeline_overview(store, spec, today=D[-1] + dt.timedelta(days=1))
    assert o.window == D
    rows = {r.date: r for r in o.dates}
    assert rows[D[0]].predictions.model_version == v1 and rows[D[0]].predictions.drift == 0.0
    assert rows[D[1]].dataset is None and "no dataset committed" in rows[D[1]].problems
    assert "arrivals incomplete (no arrival marker)" in rows[D[1]].problems
    assert rows[D[2]].dataset.reject_rate == pytest.approx(30 / 128, abs=1e-4)
    assert any("reject rate" in p for p in rows[D[2]].problems) and "not scored" in rows[D[2]].problems
    drift = rows[D[3]].predictions.drift
    assert drift == tvd({"yes": 90, "no": 8}, {"yes": 100, "no": 96}) and drift > spec.monitoring.max_drift
    assert rows[D[4]].dataset is None and any(D[4].isoformat() in s.uri for s in o.skipped)
    assert [m.version for m in o.models] == [v1, v2] and o.models[1].aliases == ["production"]
    assert o.models[1].gate[-1].champion_version == v1 and o.models[1].trained_on == [str(D[0]), str(D[3])]
    assert [(mv.version, mv.previous_version) for mv in o.alias_moves] == [(v1, None), (v2, v1)]
    assert o.freshness.newest_scored_date == D[3] and o.freshness.lag_days == 1 and not o.freshness.late
    problems = health_problems(o)
    assert any(str(D[2]) in p and "reject rate" in p for p in problems) and any(str(D[3]) in p and "drift" in p for p in problems)
    # Late: two days later nothing new was scored.
    assert pipeline_overview(store, spec.model_copy(update={"end_date": None}), today=D[3] + dt.timedelta(days=4)).freshness.late


def test_json_endpoints_and_the_page(filled, spec):
    store, v1, v2 = filled
    client = TestClient(create_app(lambda s: store, lambda: {spec.name: spec}))
    overview = client.get(f"/api/pipelines/{spec.name}").json()
    assert [d["date"] for d in overview["dates"]] == [str(d) for d in D]
    assert overview["aliases"]["production"] == v2 and len(overview["skipped"]) == 1
    lineage = client.get(f"/api/pipelines/{spec.name}/dates/{D[3]}").json()
    assert lineage["model_version"] == v2 and lineage["dataset"]["version"] and lineage["predictions"]["rows"] == 98
    assert client.get(f"/api/pipelines/{spec.name}/dates/2030-01-01").status_code == 404
    assert client.get("/api/pipelines/nope").status_code == 404
    health = client.get(f"/api/pipelines/{spec.name}/health").json()
    assert not health["healthy"] and len(health["problems"]) >= 2
    page = client.get(f"/pipelines/{spec.name}")
    assert page.status_code == 200 and page.text.count("<svg") == 4 and "Skipped as invalid (1)" in page.text
    assert f"/models/{spec.model.name}/versions/{v2}" in page.text
    assert client.get("/").status_code == 200
    assert v2 in client.get(f"/pipelines/{spec.name}/dates/{D[3]}").text
    assert client.get(f"/models/{spec.model.name}/versions/{v2}").status_code == 200
    assert client.get(f"/models/{spec.model.name}/versions/{v2}/files/../../x").status_code == 404
    assert client.get(f"/models/{spec.model.name}/versions/{v2}/files/metrics.json").status_code == 404  # not in this manifest


def test_every_route_requires_the_auth_dependency(filled, spec):
    store, _, _ = filled

    def deny():
        raise HTTPException(401, "not authenticated")

    client = TestClient(create_app(lambda s: store, lambda: {spec.name: spec}, auth=deny))
    for path in ("/", f"/pipelines/{spec.name}", f"/api/pipelines/{spec.name}", "/api/pipelines"):
        assert client.get(path).status_code == 401, path


def test_a_dag_runs_view_shows_what_that_run_committed(filled, spec):
    """The per-run tab (``dag_run`` external view): the dates the run committed, and the model
    its gate decided on, found by the run id recorded in the commits."""
    from urllib.parse import quote

    store, v1, v2 = filled
    run_id = "manual__2026-11-05T10:00:00+00:00"
    CommitLog(store, layout.model_gate_prefix(spec.model.name)).append(lambda seq: GateDecided(
        seq=seq, model=spec.model.name, alias="production", version=v2, outcome="already_published", reason="same version",
        run_id=run_id))
    client = TestClient(create_app(lambda s: store, lambda: {spec.name: spec}))
    view = client.get(f"/api/runs/{spec.name}/{quote(run_id, safe='')}").json()
    assert view["run_id"] == run_id and view["dates"] == [] and [m["version"] for m in view["models"]] == [v2]
    assert [g["outcome"] for g in view["gate"]] == ["already_published"]
    by_r = client.get(f"/api/runs/{spec.name}/r").json()  # the fixture's jobs ran as run "r"
    assert [d["date"] for d in by_r["dates"]] == [str(D[0]), str(D[2]), str(D[3])]
    page = client.get(f"/runs/{spec.name}/{quote(run_id, safe='')}")
    assert page.status_code == 200 and v2 in page.text and "already_published" in page.text
    assert "committed nothing" in client.get(f"/runs/{spec.name}/scheduled__1999-01-01").text
    assert client.get("/runs/nope/r").status_code == 404


def test_the_page_shows_a_broken_alias_and_a_gate_override_in_red(filled, spec):
    """Issue 32: an override is visible where ops look, and a broken champion is a health problem
    (the page and the health DAG say so) rather than a silent fallback."""
    store, v1, v2 = filled
    v3 = commit_model(store, [], "run-3")
    registry.move_alias(store, spec.model.name, "production", v3, expected=registry.read_alias(store, spec.model.name, "production"),
                        who="os:oncall", override=True, reason="incident 7")
    store.delete(f"{layout.model_version_prefix(spec.model.name, v3)}/model.keras")
    overview = pipeline_overview(store, spec, today=D[-1])
    assert "model.keras" in overview.broken_aliases["production"]
    assert overview.alias_moves[-1].authority == "override" and overview.alias_moves[-1].who == "os:oncall"
    assert overview.models[1].gate[0].outcome == "published"  # its pass, which an alias move names
    assert any("production is broken" in p for p in health_problems(overview))
    page = TestClient(create_app(lambda s: store, lambda: {spec.name: spec})).get(f"/pipelines/{spec.name}").text
    assert "BROKEN:" in page and "<tr class=override>" in page and "GATE OVERRIDDEN" in page and "incident 7" in page


def _acting_client(store, spec, triggered: list):
    import hashlib

    def trigger(request, dag_id, conf):
        triggered.append((dag_id, conf))
        return "manual__from-the-page"

    app = create_app(lambda s: store, lambda: {spec.name: spec}, user=lambda: "alice", csrf_key=hashlib.sha256(b"k").digest(),
                     trigger_run=trigger)
    client = TestClient(app)
    page = client.get(f"/pipelines/{spec.name}").text
    import re

    return client, re.search(r"name=csrf value='([0-9a-f]+)'", page).group(1), page


def test_operators_act_from_the_page_through_the_registry(filled, spec):
    """Issue 32: rollback (reason required), moving an alias to a gate-passed version and
    re-running a date are POSTs carrying the page's form token; the registry decides and the
    alias history records airflow:<user>. A version the gate never passed cannot be chosen."""
    store, v1, v2 = filled
    triggered: list = []
    client, csrf, page = _acting_client(store, spec, triggered)
    assert f"/actions/aliases/{spec.model.name}/production/rollback" in page and f"<option>{v1}</option>" in page
    rollback = f"/actions/aliases/{spec.model.name}/production/rollback"
    assert client.post(rollback, data={"reason": "x"}).status_code == 403  # no form token
    assert client.post(rollback, data={"csrf": csrf, "reason": "x"}, headers={"origin": "https://evil.example"}).status_code == 403
    assert client.post(rollback, data={"csrf": csrf, "reason": " "}).status_code == 400
    done = client.post(rollback, data={"csrf": csrf, "reason": "v2 misfires on 'no'"}, follow_redirects=False)
    assert done.status_code == 303 and "rolled%20back" in done.headers["location"]
    state = registry.read_alias(store, spec.model.name, "production")
    assert state.version == v1 and registry.authority_of(state.current).who == "airflow:alice"
    assert "rolled back from" in client.get(done.headers["location"]).text

    unjudged = commit_model(store, [], "run-unjudged")
    refused = client.post(f"/actions/aliases/{spec.model.name}/production/set", data={"csrf": csrf, "version": unjudged, "reason": "try"})
    assert "refused" in refused.text and "has no gate decision" in refused.text
    moved = client.post(f"/actions/aliases/{spec.model.name}/production/set", data={"csrf": csrf, "version": v2, "reason": "fixed upstream"})
    assert moved.status_code == 200 and registry.read_alias(store, spec.model.name, "production").version == v2

    rerun = client.post(f"/actions/pipelines/{spec.name}/rerun", data={"csrf": csrf, "date": str(D[2]), "retrain": "force"})
    assert "triggered" in rerun.text and triggered == [(spec.name, {"date": str(D[2]), "retrain": "force"})]
    assert client.post(f"/actions/pipelines/{spec.name}/rerun", data={"csrf": csrf, "date": "2026-13-01"}).status_code == 400
    version_page = client.get(f"/models/{spec.model.name}/versions/{v2}").text
    assert "airflow:alice" in version_page and "fixed upstream" in version_page and "Gate decisions and approvals" in version_page


def test_the_approval_request_carries_the_evidence(filled, spec):
    """What a person sees in Airflow's Required Actions: both models per class on the same test
    set, the confusion matrix, what each was trained on, and how the newest scored date's
    predictions differ from the test split's labels."""
    from twocluster.orchestration.approval import approval_body
    from twocluster.training.decision import GateDecision

    store, v1, v2 = filled
    decision = GateDecision(outcome="needs_approval", **{"model": spec.model.name, "version": v2, "alias": "production", "reason": "worse than the champion on no",
                "test_accuracy": 0.95, "test_examples": 40, "champion_version": v1, "champion_test_accuracy": 0.97,
                "per_class_accuracy": {"no": 0.9, "yes": 1.0}, "champion_per_class_accuracy": {"no": 0.95, "yes": 0.99},
                "confusion_matrix": [[18, 2], [0, 20]]})
    subject, body = approval_body(store, spec, decision, "http://airflow.example")
    assert subject == f"Publish {spec.model.name} {v2} as production?"
    assert "| no ⚠ | 0.900 | 0.950 |" in body and "| yes | 1.000 | 0.990 |" in body and "| no | 18 | 2 |" in body
    assert f"Newest scored date {D[3]} (by {v2})" in body and "by 0.418 (total variation" in body
    assert f"http://airflow.example/twocluster/models/{spec.model.name}/versions/{v1}" in body
    assert f"candidate {D[0]} .. {D[3]} (2 dates)" in body


def _strays(store: ObjectStore, spec) -> list[str]:
    """A stray object in every place the page reads: folders and names no writer of this
    project makes (an alias spelled in capitals, a date folder that is no date, a version folder
    that is no version, a name with a C1 line break), as a hand upload or another tool leaves."""
    model, name = spec.model.name, spec.name
    keys = [f"{layout.model_aliases_prefix(model)}/Production/_log/00000000000000000001.json",
            f"{layout.model_aliases_prefix(model)}/production/_log/stray.txt",
            f"{layout.model_versions_prefix(model)}/Not A Version/_MANIFEST.json",
            f"{layout.model_versions_prefix(model)}/stray.txt",
            f"{layout.model_gate_prefix(model)}/stray/x.json",
            f"{layout.datasets_prefix(name)}/date=bogus/v=1/_MANIFEST.json",
            f"{layout.datasets_prefix(name)}/stray/x",
            f"{layout.dataset_date_prefix(name, D[0])}/v=junk/_MANIFEST.json",
            f"{layout.dataset_date_prefix(name, D[0])}/_log/not-a-number.json",
            f"{layout.predictions_prefix(name)}/date=2026-13-45/x",
            f"{layout.predictions_date_prefix(name, D[0])}/weird folder/x",
            f"{layout.raw_date_prefix(name, D[0])}/Stray Folder/notes.txt",
            f"raw/{name}/date=yesterday/x.wav",
            f"raw/{name}/stray.txt"]
    for key in keys:
        store.write_bytes(key, b"{not json")
    if store.scheme == "file":  # names no S3 server takes: written as a local uploader would
        (store.local_path(layout.model_aliases_prefix(model)) / "odd\x85alias").mkdir()
        (store.local_path(layout.datasets_prefix(name)) / "date=2026-11-01\u2028").mkdir()
    return keys


def test_stray_folders_everywhere_the_page_reads_degrade_it_never_fail_it(filled, spec):
    """One stray folder such as ``aliases/Production`` made the pipeline view, its API and the
    health check answer 500. Every route still answers; what could not be read is listed as
    skipped, with its reason; the health check names problems, it does not crash."""
    store, _, v2 = filled
    _strays(store, spec)
    overview = pipeline_overview(store, spec, today=D[-1])
    assert overview.aliases["production"] == v2
    skipped = {s.uri.rsplit("/", 1)[-1] if s.uri.endswith("Production") else s.uri: s.problem for s in overview.skipped}
    assert any("Production" in uri for uri in skipped), skipped
    assert all("\x85" not in s.uri and "\u2028" not in s.uri for s in overview.skipped)
    assert health_problems(overview)  # the problems it had, and no exception
    client = TestClient(create_app(lambda s: store, lambda: {spec.name: spec}), raise_server_exceptions=False)
    for path in ("/", f"/pipelines/{spec.name}", f"/api/pipelines/{spec.name}", "/api/pipelines", f"/api/pipelines/{spec.name}/health",
                 f"/pipelines/{spec.name}/dates/{D[0]}", f"/api/pipelines/{spec.name}/dates/{D[0]}",
                 f"/models/{spec.model.name}/versions/{v2}", "/runs/speech_commands/run-2"):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[-2000:])
    page = client.get(f"/pipelines/{spec.name}").text
    assert "Skipped as invalid" in page and "Production" in page


def test_the_api_docs_need_the_same_sign_in_as_the_pages_and_describe_every_route(filled, spec):
    """``/docs`` and ``/redoc`` were public, and ``/openapi.json`` answered 500 to anyone."""
    store, _, _ = filled
    signed_in = {"yes": False}

    def auth():
        if not signed_in["yes"]:
            raise HTTPException(401, "not authenticated")

    client = TestClient(create_app(lambda s: store, lambda: {spec.name: spec}, auth=auth), raise_server_exceptions=False)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert client.get(path).status_code in (401, 404), path
    signed_in["yes"] = True
    described = client.get("/openapi.json")
    assert described.status_code == 200, described.text[-2000:]
    assert "/api/pipelines/{name}/health" in described.json()["paths"]
    assert client.get("/docs").status_code == 200 and client.get("/redoc").status_code == 404
