"""Garbage collection (issue 12, defect 8): what it deletes, and what it must never touch."""

from __future__ import annotations

import datetime as dt
import time

from test_manifest import FEATURES, LOCATION, PIPELINE, T0, _commit, _write_version

from twocluster.store import layout, registry
from twocluster.store.gc import apply_gc, plan_gc
from twocluster.store.manifest import InFlight, Lineage, ModelManifest, ModelMetrics, commit_version, resolve_latest, scan_location
from twocluster.store.storage import ObjectStore

MODEL = "kws_cnn"
GRACE = dt.timedelta(seconds=3)


def commit_model(store: ObjectStore, trained_on: list[str], run_id: str) -> str:
    version = layout.new_version_id()
    prefix = layout.model_version_prefix(MODEL, version)
    store.write_bytes(f"{prefix}/model.keras", b"weights")
    from twocluster.store.manifest import describe_files

    commit_version(store, layout.model_versions_prefix(MODEL), ModelManifest(
        version=version, created_at=T0, files=describe_files(store, prefix), model=MODEL, feature_spec=FEATURES,
        lineage=Lineage(inputs=trained_on, code_version="test", run_id=run_id),
        metrics=ModelMetrics(train_accuracy=1, validation_accuracy=1, test_accuracy=0.9, test_loss=0.1, test_examples=10)))
    return version


def publish(store: ObjectStore, version: str, alias: str = "production", model: str = MODEL, reason: str = "") -> int:
    """What a gate does when a version passes: its pass in the gate log, then the alias move."""
    registry.record_gate_decision(store, model, version, alias, "passed", reason or "test: passed", run_id="test")
    return registry.move_alias(store, model, alias, version, expected=registry.read_alias(store, model, alias), who="test",
                               reason=reason).seq


def _deleted(plan) -> dict[str, str]:
    return {d.prefix: d.reason for d in plan.deletions}


def test_gc_deletes_only_what_nobody_can_reach_or_is_writing(store: ObjectStore):
    # -- old things (older than the grace period by the time GC runs) --
    datasets = [layout.new_version_id(T0) for _ in range(5)]
    for v in datasets:
        _commit(store, v)
    dataset_uri = {v: store.uri(layout.manifest_key(layout.dataset_version_prefix(PIPELINE, "2026-11-20", v))) for v in datasets}
    published = commit_model(store, [dataset_uri[datasets[1]]], run_id="run-published")
    unpublished = [commit_model(store, [dataset_uri[datasets[2]]], run_id=f"run-{i}") for i in range(3)]
    publish(store, published)
    abandoned = layout.new_version_id(T0)
    _write_version(store, abandoned)  # a killed writer: files, no commit
    in_flight = layout.new_version_id(T0)
    _write_version(store, in_flight)  # a slow writer whose files are old but whose heartbeat is live
    stale_staging = f"{layout.staging_prefix(LOCATION, abandoned)}/p00000-a0-deadbeef/tfrecords/train/part-00000.tfrecord.gz"
    store.write_bytes(stale_staging, b"zombie attempt")
    newest = layout.dataset_version_prefix(PIPELINE, "2026-11-20", datasets[-1])
    store.write_bytes(f"{newest}/parquet/part-0-stray.parquet", b"a failed attempt's file")
    runs = layout.model_runs_prefix(MODEL)
    store.write_bytes(f"{runs}/run-published/epoch=0001/backup.weights.h5", b"ckpt")
    store.write_bytes(f"{runs}/run-still-training/epoch=0001/backup.weights.h5", b"ckpt")
    store.write_bytes(f"{layout.jobs_prefix(MODEL)}/run-0.json", b"{}")
    store.write_bytes(f"{layout.jobs_prefix(MODEL)}/run-still-training.json", b"{}")
    time.sleep(GRACE.total_seconds() + 1)

    # -- young things --
    young = layout.new_version_id(T0)
    _write_version(store, young)
    with InFlight(store, LOCATION, in_flight, run_id="slow-writer", interval=0.5):
        plan = plan_gc(store, keep_versions=2, grace=GRACE)
        deleted = _deleted(plan)
        ds = lambda v: layout.dataset_version_prefix(PIPELINE, "2026-11-20", v)  # noqa: E731
        expected = {
            ds(datasets[0]), ds(datasets[2]),  # beyond the newest 2, not referenced
            ds(abandoned), layout.staging_prefix(LOCATION, abandoned), f"{newest}/parquet/part-0-stray.parquet",
            layout.model_version_prefix(MODEL, unpublished[0]),  # the newest 2 models stay, and the published one
            f"{runs}/run-published", f"{layout.jobs_prefix(MODEL)}/run-0.json",
        }
        assert set(deleted) == expected, set(deleted) ^ expected
        assert "abandoned write" in deleted[ds(abandoned)]
        kept = {k["uri"]: k["reason"] for k in plan.kept}
        assert "heartbeat is live" in kept[store.uri(ds(in_flight))]
        assert "younger than the grace period" in kept[store.uri(ds(young))]
        assert "referenced by a published model" in kept[store.uri(ds(datasets[1]))]
        # A dry run deleted nothing.
        assert store.list(ds(datasets[0])) and store.list(ds(abandoned))
        apply_gc(store, plan)

    state = scan_location(store, LOCATION)
    assert [v.version for v in state.versions] == [datasets[1], datasets[3], datasets[4]]
    assert set(state.removed) == {datasets[0], datasets[2]} and state.skipped == []
    assert resolve_latest(store, LOCATION).version == datasets[4]
    for gone in (ds(datasets[0]), ds(datasets[2]), ds(abandoned), layout.staging_prefix(LOCATION, abandoned)):
        assert store.list(gone) == [], gone
    assert store.list(ds(in_flight)) and store.list(ds(young)) and store.list(f"{runs}/run-still-training")
    assert registry.read_alias(store, MODEL, "production").version == published
    assert [v.version for v in registry.model_versions(store, MODEL).versions] == [published, *unpublished[1:]]
    # Left to do: only the writes that have since stopped (the slow writer ended without a commit;
    # the young folder may have outgrown the grace period meanwhile).
    again = plan_gc(store, keep_versions=2, grace=GRACE)
    assert ds(in_flight) in _deleted(again) and set(_deleted(again)) <= {ds(in_flight), ds(young)}
    assert all("abandoned write" in reason for reason in _deleted(again).values())


# -- issue 32: gc checks again when it applies, and never races an alias move --------------------


NO_GRACE = dt.timedelta(0)  # these tests are about what changes between plan and apply, not about ages


def _old_models(store: ObjectStore, n: int) -> list[str]:
    return [commit_model(store, [], f"run-old-{i}") for i in range(n)]


def test_gc_apply_leaves_a_version_an_alias_moved_to_after_the_plan(store: ObjectStore):
    """Defect: gc planned to retire v0, an operator then pointed the alias at v0, and `gc --apply`
    deleted it anyway (the alias then resolved to another version). Apply re-checks."""
    v0, v1, v2 = _old_models(store, 3)
    plan = plan_gc(store, keep_versions=2, grace=NO_GRACE)
    assert layout.model_version_prefix(MODEL, v0) in _deleted(plan)
    publish(store, v0, reason="the operator's pick")
    apply_gc(store, plan)
    assert registry.require_alias(store, MODEL, "production").version == v0
    assert store.exists(f"{layout.model_version_prefix(MODEL, v0)}/model.keras")
    assert any(v0 in item["uri"] and "changed since the plan" in item["reason"] for item in plan.left_alone)
    assert "left_alone" in plan.as_dict()


def test_a_version_being_retired_cannot_become_an_alias_target(store: ObjectStore):
    v0, _, _ = _old_models(store, 3)
    registry.record_gate_decision(store, MODEL, v0, "production", "passed", "test")
    from twocluster.store.commitlog import CommitLog, VersionRemoved

    CommitLog(store, layout.model_versions_prefix(MODEL)).append(lambda seq: VersionRemoved(seq=seq, version=v0, reason="gc: test"))
    import pytest

    with pytest.raises(registry.RegistryError, match="was removed"):
        registry.move_alias(store, MODEL, "production", v0, expected=registry.read_alias(store, MODEL, "production"), who="test")


def test_an_alias_moving_while_gc_retires_the_version_restores_it(store: ObjectStore, monkeypatch):
    """The window between apply's fresh check and its tombstone: the alias moves there. The
    re-check after the tombstone sees it, restores the version (committed again, same manifest)
    and keeps its files; the alias resolves to it."""
    import twocluster.store.gc as gc

    v0, v1, v2 = _old_models(store, 3)
    plan = plan_gc(store, keep_versions=2, grace=NO_GRACE)
    fresh_plan = gc.plan_gc

    def plan_then_move(*args, **kwargs):
        fresh = fresh_plan(*args, **kwargs)
        publish(store, v0)  # lands after the fresh check, before the tombstone
        return fresh

    monkeypatch.setattr(gc, "plan_gc", plan_then_move)
    apply_gc(store, plan)
    assert registry.require_alias(store, MODEL, "production").version == v0
    versions = registry.model_versions(store, MODEL)
    assert [v.version for v in versions.versions] == [v0, v1, v2] and v0 not in versions.removed  # its place in the order kept
    assert any("restored" in item["reason"] for item in plan.left_alone)
