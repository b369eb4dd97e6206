from __future__ import annotations

import datetime as dt
import json
import threading

import pytest

from twocluster.store import layout
from twocluster.store.commitlog import CommitLog
from twocluster.store.featurespec import FeatureSpec, TensorSpec
from twocluster.store.manifest import (
    CommitConflict,
    Counts,
    DatasetManifest,
    Lineage,
    ManifestError,
    ManifestNotFound,
    commit_version,
    describe_files,
    parse_manifest,
    read_manifest,
    resolve_latest,
    scan_location,
    verify_files,
)
from twocluster.store.storage import ObjectStore

PIPELINE, DATE = "speech_commands", "2026-11-20"
T0 = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
LOCATION = layout.dataset_date_prefix(PIPELINE, DATE)
FEATURES = FeatureSpec(kind="log_mel", features={"log_mel": TensorSpec(dtype="float32", shape=[97, 40])}, params={},
                       featurizer_code="sha256:" + "1" * 64)


def _write_version(store: ObjectStore, version: str, payload: bytes = b"rows") -> str:
    prefix = layout.dataset_version_prefix(PIPELINE, DATE, version)
    store.write_bytes(f"{prefix}/parquet/part-0.parquet", payload)
    store.write_bytes(f"{prefix}/tfrecords/train/shard-0.tfrecord.gz", payload * 2)
    return prefix


def _manifest(store: ObjectStore, prefix: str, version: str, created_at: dt.datetime = T0, run_id: str = "run-1") -> DatasetManifest:
    return DatasetManifest(
        version=version,
        created_at=created_at,
        files=describe_files(store, prefix),
        counts=Counts(input=10, accepted=8, rejected=2, per_split={"train": 8}, rejected_by_reason={"empty": 2}),
        lineage=Lineage(inputs=["raw/speech_commands/date=2026-11-20"], code_version="test", run_id=run_id),
        feature_spec=FEATURES,
        pipeline=PIPELINE,
        date=DATE,
    )


def _commit(store: ObjectStore, version: str, created_at: dt.datetime = T0, payload: bytes = b"rows") -> str:
    prefix = _write_version(store, version, payload)
    commit_version(store, LOCATION, _manifest(store, prefix, version, created_at))
    return prefix


def _committed(store: ObjectStore) -> list[str]:
    return [v.version for v in scan_location(store, LOCATION).versions]


def test_version_without_manifest_is_invisible(store: ObjectStore):
    committed = layout.new_version_id(T0)
    _commit(store, committed)

    # A newer attempt that wrote all its data but died before the manifest, and one that died
    # after writing its manifest but before its commit log entry.
    in_flight = layout.new_version_id(T0 + dt.timedelta(hours=1))
    _write_version(store, in_flight, b"partial")
    unlogged = layout.new_version_id(T0 + dt.timedelta(hours=2))
    prefix = _write_version(store, unlogged)
    store.put_if_absent(layout.manifest_key(prefix), _manifest(store, prefix, unlogged).to_json())

    assert _committed(store) == [committed]
    latest = resolve_latest(store, LOCATION)
    assert latest.version == committed and latest.manifest.counts.accepted == 8 and latest.seq == 1
    with pytest.raises(ManifestNotFound, match="not committed"):
        read_manifest(store, layout.dataset_version_prefix(PIPELINE, DATE, in_flight))


def test_nothing_committed_resolves_to_none(store: ObjectStore):
    assert resolve_latest(store, LOCATION) is None
    _write_version(store, layout.new_version_id(T0))
    assert resolve_latest(store, LOCATION) is None


def test_latest_follows_the_commit_log_not_any_clock(store: ObjectStore):
    """Defect 1: a version written by a host whose clock runs a year ahead (in its version id and
    its manifest's created_at) must not stay "latest" over later commits."""
    skewed = layout.new_version_id(T0 + dt.timedelta(days=365))
    _commit(store, skewed, created_at=T0 + dt.timedelta(days=365))
    assert resolve_latest(store, LOCATION).version == skewed
    # A later rerun on a host with a correct (earlier) clock commits after it: it is latest.
    rerun = layout.new_version_id(T0)
    _commit(store, rerun, created_at=T0)
    latest = resolve_latest(store, LOCATION)
    assert (latest.version, latest.seq) == (rerun, 2)
    # ... and one with a clock a year behind, later still.
    behind = layout.new_version_id(T0 - dt.timedelta(days=365))
    _commit(store, behind, created_at=T0 - dt.timedelta(days=365))
    assert resolve_latest(store, LOCATION).version == behind
    assert _committed(store) == [skewed, rerun, behind]


def test_concurrent_commits_of_one_version_exactly_one_wins(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _write_version(store, version)
    manifests = [_manifest(store, prefix, version, run_id=f"attempt-{i}") for i in range(6)]
    barrier = threading.Barrier(len(manifests))
    outcomes: list[str] = [""] * len(manifests)

    def commit(i: int) -> None:
        barrier.wait()
        try:
            commit_version(store, LOCATION, manifests[i])
            outcomes[i] = "won"
        except CommitConflict:
            outcomes[i] = "lost"

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(len(manifests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("won") == 1 and outcomes.count("lost") == len(manifests) - 1
    winner = outcomes.index("won")
    assert read_manifest(store, prefix).lineage.run_id == f"attempt-{winner}"
    assert CommitLog(store, LOCATION).head() == 1 and resolve_latest(store, LOCATION).manifest.lineage.run_id == f"attempt-{winner}"


def test_concurrent_commits_of_different_versions_all_land_in_order(store: ObjectStore):
    """Writers racing for the next log number: every commit lands, each under its own number."""
    versions = [layout.new_version_id(T0) for _ in range(6)]
    manifests = [_manifest(store, _write_version(store, v), v) for v in versions]
    barrier = threading.Barrier(len(versions))

    def commit(i: int) -> None:
        barrier.wait()
        commit_version(store, LOCATION, manifests[i])

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(len(versions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snapshot = CommitLog(store, LOCATION).read()
    assert [e.seq for e in snapshot.entries] == [1, 2, 3, 4, 5, 6]
    assert sorted(e.version for e in snapshot.entries) == sorted(versions)


def test_commit_refuses_missing_or_resized_files(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _write_version(store, version)
    manifest = _manifest(store, prefix, version)
    store.delete(f"{prefix}/parquet/part-0.parquet")
    with pytest.raises(ManifestError, match="part-0.parquet', which is not there"):
        commit_version(store, LOCATION, manifest)
    store.write_bytes(f"{prefix}/parquet/part-0.parquet", b"different length")
    with pytest.raises(ManifestError, match="bytes, manifest says"):
        commit_version(store, LOCATION, manifest)
    assert _committed(store) == [] and CommitLog(store, LOCATION).head() == 0


def test_verify_files_catches_corruption(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _commit(store, version)
    manifest = read_manifest(store, prefix)
    verify_files(store, prefix, manifest)
    store.write_bytes(f"{prefix}/parquet/part-0.parquet", b"ROWS")  # same size, other bytes
    with pytest.raises(ManifestError, match="checksum .* does not match"):
        verify_files(store, prefix, manifest)


def test_manifest_round_trip_and_required_keys(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _write_version(store, version)
    manifest = _manifest(store, prefix, version)
    commit_version(store, LOCATION, manifest)
    again = read_manifest(store, prefix, DatasetManifest)
    assert again == manifest
    assert {f.path for f in again.files} == {"parquet/part-0.parquet", "tfrecords/train/shard-0.tfrecord.gz"}
    assert again.file("parquet/part-0.parquet").bytes == 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"counts": {"input": 10, "accepted": 8, "rejected": 1}}, "input=10 != accepted=8 \\+ rejected=1"),
        ({"counts": {"input": 2, "accepted": 2, "rejected": 0, "per_split": {"train": 1}}}, "per_split sums to 1, expected 2"),
        ({"counts": None}, "counts: Field required"),
        ({"kind": "table"}, "does not match any of the expected tags"),
        ({"version": "latest"}, "version: String should match pattern"),
        ({"feature_spec": {**FEATURES.model_dump(), "featurizer_code": "v1"}}, "feature_spec.featurizer_code"),
        ({"countz": {}}, "countz: Extra inputs are not permitted"),
        ({"created_at": "2026-11-21T12:00:00"}, "timezone"),
        ({"files": [{"path": "../x", "bytes": 1, "checksum": "sha256:" + "0" * 64}]}, "must be relative"),
        ({"files": [{"path": "x", "bytes": 1, "checksum": "md5:abc"}]}, "files.0.checksum"),
        ({"lineage": {"run_id": "r"}}, "lineage.code_version: Field required"),
    ],
)
def test_invalid_manifests_are_rejected_with_the_field_named(change, message):
    doc = {
        "format_version": 2,
        "kind": "dataset",
        "version": "20261121T120000Z-0000abcd",
        "created_at": "2026-11-21T12:00:00Z",
        "files": [],
        "counts": {"input": 1, "accepted": 1, "rejected": 0},
        "lineage": {"code_version": "c", "run_id": "r"},
        "feature_spec": FEATURES.model_dump(),
        "pipeline": PIPELINE,
        "date": DATE,
    }
    doc = {k: v for k, v in {**doc, **change}.items() if v is not None}

    with pytest.raises(ManifestError, match=message):
        parse_manifest(json.dumps(doc).encode(), "s3://b/_MANIFEST.json")


def test_manifest_in_the_wrong_folder_is_refused(store: ObjectStore):
    version, other = layout.new_version_id(T0), layout.new_version_id(T0)
    prefix = _write_version(store, version)
    manifest = _manifest(store, prefix, version)
    store.write_bytes(layout.manifest_key(layout.dataset_version_prefix(PIPELINE, DATE, other)), manifest.to_json())
    with pytest.raises(ManifestError, match=f"sits in v={other}"):
        read_manifest(store, layout.dataset_version_prefix(PIPELINE, DATE, other))
