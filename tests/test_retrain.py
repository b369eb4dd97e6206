"""The retrain policy and the run-parameter checks, on real stores (a local folder and the RGW S3
server) holding committed dataset and model manifests and alias records."""

from __future__ import annotations

import datetime as dt

import pytest
from test_manifest import FEATURES

from twocluster.orchestration.retrain import RetrainDecision, committed_datasets, decide_retrain
from twocluster.orchestration.runs import CheckFailed, RunParamsError, check_dataset, resolve_run, training_run_id, write_training_job
from twocluster.store import layout, registry
from twocluster.store.manifest import Counts, DatasetManifest, Lineage, ModelManifest, ModelMetrics, commit_version
from twocluster.store.storage import ObjectStore

D = dt.date(2026, 11, 10)


def _dataset(store: ObjectStore, spec, day: dt.date, accepted: int, rejected: int = 0, commit: bool = True) -> str:
    version = layout.new_version_id()
    prefix = layout.dataset_version_prefix(spec.name, day, version)
    store.write_bytes(f"{prefix}/parquet/part-0.parquet", b"x" * 10)
    if commit:
        manifest = DatasetManifest(
            version=version, created_at=dt.datetime.now(dt.UTC),
            files=[{"path": "parquet/part-0.parquet", "bytes": 10, "checksum": "sha256:" + "0" * 64}],
            counts=Counts(input=accepted + rejected, accepted=accepted, rejected=rejected),
            lineage=Lineage(code_version="test", run_id="test"), feature_spec=FEATURES, pipeline=spec.name, date=day,
        )
        commit_version(store, layout.dataset_date_prefix(spec.name, day), manifest)
    return store.uri(layout.manifest_key(prefix))


def _champion(store: ObjectStore, spec, trained_on: list[str], alias: str = "production") -> str:
    version = layout.new_version_id()
    manifest = ModelManifest(version=version, created_at=dt.datetime.now(dt.UTC), files=[], model=spec.model.name,
                             lineage=Lineage(inputs=trained_on, code_version="test", run_id=f"run-{version}"), feature_spec=FEATURES,
                             metrics=ModelMetrics(train_accuracy=1, validation_accuracy=1, test_accuracy=1, test_loss=0, test_examples=1))
    commit_version(store, layout.model_versions_prefix(spec.model.name), manifest)
    registry.record_gate_decision(store, spec.model.name, version, alias, "passed", "test", run_id="test")
    state = registry.read_alias(store, spec.model.name, alias)
    registry.move_alias(store, spec.model.name, alias, version, expected=state, who="test")
    return version


def test_first_run_trains_on_the_window(store, speech_spec):
    old = _dataset(store, speech_spec, D - dt.timedelta(days=speech_spec.retrain.window_days), 100)
    inside = [_dataset(store, speech_spec, D - dt.timedelta(days=d), 900) for d in (2, 1)]
    _dataset(store, speech_spec, D, 900, commit=False)  # an in-flight write: invisible
    _dataset(store, speech_spec, D + dt.timedelta(days=1), 900)  # the future is not training data
    waiting = decide_retrain(store, speech_spec, D)
    assert not waiting.retrain and not waiting.can_score and waiting.new_examples == 1800
    assert "the first model waits for 2000 accepted examples (committed so far: 1800)" in waiting.reason

    inside.append(_dataset(store, speech_spec, D, 200))
    decision = decide_retrain(store, speech_spec, D)
    assert decision.retrain and decision.can_score and "nothing is published" in decision.reason
    assert decision.training_datasets == inside and old not in decision.training_datasets


def test_cadence_and_new_examples_decide(store, speech_spec):
    policy = speech_spec.retrain  # every 7 days, or 2000 new examples
    first = _dataset(store, speech_spec, D, 600)
    champion = _champion(store, speech_spec, [first])

    same = decide_retrain(store, speech_spec, D)
    assert not same.retrain and "covers" in same.reason and same.champion_version == champion

    for d in range(1, 4):
        _dataset(store, speech_spec, D + dt.timedelta(days=d), 600)
    three_days = decide_retrain(store, speech_spec, D + dt.timedelta(days=3))
    assert not three_days.retrain and three_days.new_examples == 1800, three_days
    assert three_days.training_datasets == []

    _dataset(store, speech_spec, D + dt.timedelta(days=4), 600)
    enough = decide_retrain(store, speech_spec, D + dt.timedelta(days=4))
    assert enough.retrain and enough.new_examples == 2400 >= policy.min_new_examples
    assert len(enough.training_datasets) == 5

    week = decide_retrain(store, speech_spec, D + dt.timedelta(days=policy.every_days))
    assert week.retrain and "7 days old" in week.reason

    # Backfilling history the champion has seen never retrains; the run's mode overrides the policy.
    assert not decide_retrain(store, speech_spec, D - dt.timedelta(days=3)).retrain
    assert decide_retrain(store, speech_spec, D, mode="force").retrain
    assert not decide_retrain(store, speech_spec, D + dt.timedelta(days=4), mode="never").retrain


def test_a_thirty_day_backfill_trains_only_what_the_policy_allows(file_store, speech_spec):
    """Simulate the DAG over 30 days (600 accepted clips a day), publishing whenever it trains."""
    trained_on: list[str] = []
    for d in range(30):
        day = D + dt.timedelta(days=d)
        _dataset(file_store, speech_spec, day, 600)
        decision = decide_retrain(file_store, speech_spec, day)
        if decision.retrain:
            _champion(file_store, speech_spec, decision.training_datasets)
            trained_on.append(day.isoformat())
    # Day 3 (the first 2400 examples), then every 4th day (2400 >= 2000 new examples before 7 days pass).
    assert trained_on == [(D + dt.timedelta(days=d)).isoformat() for d in (3, 7, 11, 15, 19, 23, 27)]


def test_committed_datasets_takes_the_newest_version_per_date(file_store, speech_spec):
    _dataset(file_store, speech_spec, D, 100)
    newest = _dataset(file_store, speech_spec, D, 120)
    found = committed_datasets(file_store, speech_spec.name, D, D)
    assert list(found) == [D.isoformat()] and found[D.isoformat()].counts.accepted == 120
    assert newest.endswith(f"v={found[D.isoformat()].version}/_MANIFEST.json")


# -- run parameters ------------------------------------------------------------------------------

INTERVAL = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)


@pytest.mark.parametrize(("params", "message"), [
    ({"date": "../../etc"}, "date '../../etc' is not a date"),
    ({"date": "2026-11-20; rm -rf /"}, "is not a date"),
    ({"model_alias": "../production"}, "model_alias '../production' is not allowed"),
    ({"model_alias": "prod;reboot"}, "is not allowed"),
    ({"model_alias": "shadow"}, "model_alias 'shadow' is not one of the pipeline's aliases"),
    ({"model_version": "20261120T000000Z-0000000$(id)"}, "is not a version id"),
    ({"model_version": "20261120T000000Z-deadbeef"}, "is not a committed kws_cnn version"),
    ({"retrain": "sometimes"}, "retrain"),
    ({"max_reject_rate": 1.5}, "max_reject_rate"),
    ({"unexpected": 1}, "unexpected"),
    ({"date": "2020-01-01"}, "date 2020-01-01 is outside the dates this pipeline processes: from its start_date 2026-"),
    ({"date": "2099-12-31"}, "date 2099-12-31 is outside the dates"),  # its sensor held the DAG's only run slot for 48 h
])
def test_bad_run_params_are_refused_with_the_reason(file_store, speech_spec, params, message):
    with pytest.raises(RunParamsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        resolve_run(speech_spec, file_store, params, INTERVAL)


def test_run_params_resolve_to_the_run_settings(file_store, speech_spec):
    run = resolve_run(speech_spec, file_store, {"date": None, "model_alias": None, "max_reject_rate": None}, INTERVAL)
    assert run.date == "2026-11-20" and run.model_alias == "production" and run.retrain == "auto"
    assert run.max_reject_rate == speech_spec.thresholds.max_reject_rate
    manual = resolve_run(speech_spec, file_store, {"date": "2026-11-18", "model_alias": "staging", "max_reject_rate": 0.2}, None)
    assert (manual.date, manual.model_alias, manual.max_reject_rate) == ("2026-11-18", "staging", 0.2)
    with pytest.raises(RunParamsError, match="no data interval"):
        resolve_run(speech_spec, file_store, {}, None)
    # A backfill's runs all get the same params: a date among them would process one date N times.
    with pytest.raises(RunParamsError, match=r"this backfill sets the 'date' parameter \(2026-11-18\) for every one of its runs"):
        resolve_run(speech_spec, file_store, {"date": "2026-11-18"}, INTERVAL, run_type="backfill")
    assert resolve_run(speech_spec, file_store, {"date": None}, INTERVAL, run_type="backfill").date == "2026-11-20"
    assert resolve_run(speech_spec, file_store, {"date": "2026-11-18"}, INTERVAL, run_type="manual").date == "2026-11-18"
    # Up to arrivals.days_ahead past today (UTC), not a day more.
    assert resolve_run(speech_spec, file_store, {"date": "2026-11-21"}, None, today=dt.date(2026, 11, 20)).date == "2026-11-21"
    with pytest.raises(RunParamsError, match=r"to 2026-11-21 \(today, UTC, plus arrivals.days_ahead = 1\)"):
        resolve_run(speech_spec, file_store, {"date": "2026-11-22"}, None, today=dt.date(2026, 11, 20))
    assert training_run_id("p", "2026-11-20", "manual__2026-11-22T10:46:53.78+00:00") == "p.2026-11-20.manual__2026-11-22T10:46:53.78+00:00"
    assert training_run_id("p", "2026-11-20", "my run/../x").startswith("p.2026-11-20.my-run-..-x-")


def test_check_dataset_enforces_presence_examples_and_reject_rate(file_store, speech_spec):
    with pytest.raises(CheckFailed, match="no committed dataset for 2026-11-10"):
        check_dataset(speech_spec, file_store, D.isoformat(), 0.05)
    _dataset(file_store, speech_spec, D, 90, rejected=10)
    with pytest.raises(CheckFailed, match=r"rejects 10.0% of its inputs, above the threshold 5.0%"):
        check_dataset(speech_spec, file_store, D.isoformat(), 0.05)
    assert check_dataset(speech_spec, file_store, D.isoformat(), 0.2).reject_rate == 0.1
    file_store.delete(f"{layout.dataset_date_prefix(speech_spec.name, D)}/v={committed_datasets(file_store, speech_spec.name, D, D)[D.isoformat()].version}/parquet/part-0.parquet")
    with pytest.raises(Exception, match="not there"):
        check_dataset(speech_spec, file_store, D.isoformat(), 0.2)


def test_a_training_runs_identity_is_its_inputs(store, speech_spec):
    """Defect: a train task cleared after its dates were reprocessed returned `already_trained` with
    the version trained on the old dataset (the key was the run id only). The run id now ends with
    the job's fingerprint, and the trainer and the gate look a run's version up by both."""
    from twocluster.store.jobspec import load_job_spec

    old = _dataset(store, speech_spec, D, 900)
    training_run = training_run_id(speech_spec.name, str(D), "manual__1")
    decision = RetrainDecision(retrain=True, reason="test", date=str(D), training_datasets=[old])
    first = load_job_spec(write_training_job(speech_spec, store, decision, training_run, 0), store)
    assert load_job_spec(write_training_job(speech_spec, store, decision, training_run, 0), store).run_id == first.run_id  # a retry: same run
    reprocessed = _dataset(store, speech_spec, D, 900)  # the date again: a new dataset version
    second = load_job_spec(write_training_job(speech_spec, store, decision.model_copy(update={"training_datasets": [reprocessed]}), training_run, 0), store)
    assert second.run_id != first.run_id and second.run_id.startswith(training_run) and second.fingerprint() != first.fingerprint()

    # The version the first inputs trained is not the second run's result, even under one run id.
    version = layout.new_version_id()
    commit_version(store, layout.model_versions_prefix(speech_spec.model.name), ModelManifest(
        version=version, created_at=dt.datetime.now(dt.UTC), files=[], model=speech_spec.model.name, feature_spec=FEATURES,
        lineage=Lineage(inputs=[old], code_version="test", run_id=second.run_id, input_fingerprint=first.fingerprint()),
        metrics=ModelMetrics(train_accuracy=1, validation_accuracy=1, test_accuracy=1, test_loss=0, test_examples=1)))
    assert registry.find_version_of_run(store, speech_spec.model.name, second.run_id, second.fingerprint()) is None
    assert registry.find_version_of_run(store, speech_spec.model.name, second.run_id, first.fingerprint()).version == version
