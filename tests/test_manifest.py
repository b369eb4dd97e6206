from __future__ import annotations

import datetime as dt
import threading

import pytest

from twocluster import layout
from twocluster.manifest import (
    CommitConflict,
    Counts,
    Lineage,
    Manifest,
    ManifestError,
    ManifestNotFound,
    commit_manifest,
    describe_files,
    list_committed_versions,
    parse_manifest,
    read_manifest,
    resolve_latest,
    verify_files,
)
from twocluster.storage import ObjectStore

PIPELINE, DATE = "speech_commands", "2026-11-20"
T0 = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def _write_version(store: ObjectStore, version: str, payload: bytes = b"rows") -> str:
    prefix = layout.dataset_version_prefix(PIPELINE, DATE, version)
    store.write_bytes(f"{prefix}/parquet/part-0.parquet", payload)
    store.write_bytes(f"{prefix}/tfrecords/train/shard-0.tfrecord.gz", payload * 2)
    return prefix


def _manifest(store: ObjectStore, prefix: str, version: str, created_at: dt.datetime = T0) -> Manifest:
    return Manifest(
        kind="dataset",
        version=version,
        created_at=created_at,
        files=describe_files(store, prefix),
        counts=Counts(input=10, accepted=8, rejected=2, per_split={"train": 8}, rejected_by_reason={"empty": 2}),
        lineage=Lineage(inputs=["raw/speech_commands/date=2026-11-20"], code_version="test", run_id="run-1"),
        feature_spec={"log_mel": {"shape": [98, 40], "dtype": "float32"}},
    )


def test_version_without_manifest_is_invisible(store: ObjectStore):
    parent = layout.dataset_date_prefix(PIPELINE, DATE)
    committed = layout.new_version_id(T0)
    prefix = _write_version(store, committed)
    commit_manifest(store, prefix, _manifest(store, prefix, committed))

    # A newer attempt that wrote all its data but died before the manifest.
    in_flight = layout.new_version_id(T0 + dt.timedelta(hours=1))
    _write_version(store, in_flight, b"partial")

    assert list_committed_versions(store, parent) == [committed]
    version, manifest = resolve_latest(store, parent)
    assert version == committed and manifest.counts.accepted == 8
    with pytest.raises(ManifestNotFound, match="not committed"):
        read_manifest(store, layout.dataset_version_prefix(PIPELINE, DATE, in_flight))


def test_nothing_committed_resolves_to_none(store: ObjectStore):
    assert resolve_latest(store, layout.dataset_date_prefix(PIPELINE, DATE)) is None
    _write_version(store, layout.new_version_id(T0))
    assert resolve_latest(store, layout.dataset_date_prefix(PIPELINE, DATE)) is None


def test_latest_is_resolved_from_manifests(store: ObjectStore):
    parent = layout.dataset_date_prefix(PIPELINE, DATE)
    # The version id sorts earlier but its manifest says it was committed later.
    early_id, late_id = "20261121T100000Z-00000001", "20261121T110000Z-00000002"
    for version, created in ((early_id, T0 + dt.timedelta(hours=5)), (late_id, T0)):
        prefix = _write_version(store, version)
        commit_manifest(store, prefix, _manifest(store, prefix, version, created))
    assert resolve_latest(store, parent)[0] == early_id


def test_concurrent_commits_of_one_version_exactly_one_wins(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _write_version(store, version)
    manifests = [_manifest(store, prefix, version).model_copy(update={"lineage": Lineage(code_version="t", run_id=f"attempt-{i}")}) for i in range(6)]
    barrier = threading.Barrier(len(manifests))
    outcomes: list[str] = [""] * len(manifests)

    def commit(i: int) -> None:
        barrier.wait()
        try:
            commit_manifest(store, prefix, manifests[i])
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


def test_commit_refuses_missing_or_resized_files(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _write_version(store, version)
    manifest = _manifest(store, prefix, version)
    store.delete(f"{prefix}/parquet/part-0.parquet")
    with pytest.raises(ManifestError, match="part-0.parquet', which is not there"):
        commit_manifest(store, prefix, manifest)
    store.write_bytes(f"{prefix}/parquet/part-0.parquet", b"different length")
    with pytest.raises(ManifestError, match="bytes, manifest says"):
        commit_manifest(store, prefix, manifest)
    assert list_committed_versions(store, layout.dataset_date_prefix(PIPELINE, DATE)) == []


def test_verify_files_catches_corruption(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _write_version(store, version)
    commit_manifest(store, prefix, _manifest(store, prefix, version))
    manifest = read_manifest(store, prefix)
    verify_files(store, prefix, manifest)
    store.write_bytes(f"{prefix}/parquet/part-0.parquet", b"ROWS")  # same size, other bytes
    with pytest.raises(ManifestError, match="checksum .* does not match"):
        verify_files(store, prefix, manifest)


def test_manifest_round_trip_and_required_keys(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _write_version(store, version)
    manifest = _manifest(store, prefix, version)
    commit_manifest(store, prefix, manifest)
    again = read_manifest(store, prefix)
    assert again == manifest
    assert {f.path for f in again.files} == {"parquet/part-0.parquet", "tfrecords/train/shard-0.tfrecord.gz"}
    assert again.file("parquet/part-0.parquet").bytes == 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"counts": {"input": 10, "accepted": 8, "rejected": 1}}, "input=10 != accepted=8 \\+ rejected=1"),
        ({"counts": {"input": 2, "accepted": 2, "rejected": 0, "per_split": {"train": 1}}}, "per_split sums to 1, expected 2"),
        ({"counts": None}, "a dataset manifest needs counts"),
        ({"kind": "table"}, "kind"),
        ({"version": "latest"}, "not a version id"),
        ({"created_at": "2026-11-21T12:00:00"}, "timezone"),
        ({"files": [{"path": "../x", "bytes": 1, "checksum": "sha256:" + "0" * 64}]}, "must be relative"),
        ({"files": [{"path": "x", "bytes": 1, "checksum": "md5:abc"}]}, "files.0.checksum"),
        ({"lineage": {"run_id": "r"}}, "lineage.code_version: Field required"),
    ],
)
def test_invalid_manifests_are_rejected_with_the_field_named(change, message):
    doc = {
        "kind": "dataset",
        "version": "20261121T120000Z-0000abcd",
        "created_at": "2026-11-21T12:00:00Z",
        "files": [],
        "counts": {"input": 1, "accepted": 1, "rejected": 0},
        "lineage": {"code_version": "c", "run_id": "r"},
    }
    doc = {k: v for k, v in {**doc, **change}.items() if v is not None}
    import json

    with pytest.raises(ManifestError, match=message):
        parse_manifest(json.dumps(doc).encode(), "s3://b/_MANIFEST.json")


def test_manifest_in_the_wrong_folder_is_refused(store: ObjectStore):
    version, other = layout.new_version_id(T0), layout.new_version_id(T0)
    prefix = _write_version(store, version)
    manifest = _manifest(store, prefix, version)
    store.write_bytes(layout.manifest_key(layout.dataset_version_prefix(PIPELINE, DATE, other)), manifest.to_json())
    with pytest.raises(ManifestError, match=f"sits in v={other}"):
        read_manifest(store, layout.dataset_version_prefix(PIPELINE, DATE, other))
