"""The commit log under bad objects, lost responses and old stores (issue 12, items 2 and 7, and
the migration of pre-log stores)."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import socketserver
import threading
from urllib.parse import urlparse

import pytest
from conftest import TEST_BUCKET
from test_manifest import LOCATION, T0, _commit, _manifest, _write_version

from twocluster.store import layout
from twocluster.store.commitlog import CommitLog, VersionCommitted
from twocluster.store.manifest import LegacyLayoutError, resolve_latest, scan_location
from twocluster.store.migrate import migrate
from twocluster.store.storage import ObjectStore, S3Settings, checksum_bytes


def _bad_latest(store: ObjectStore, how: str) -> str:
    """Commit a good version, then a newer one spoiled in one way; returns the good version."""
    good = layout.new_version_id(T0)
    _commit(store, good)
    bad = layout.new_version_id(T0 + dt.timedelta(hours=1))
    prefix = _commit(store, bad)
    manifest_key = layout.manifest_key(prefix)
    if how == "schema":  # valid JSON, fails the schema (a hand edit)
        doc = json.loads(store.read_bytes(manifest_key))
        doc["counts"]["accepted"] += 1
        store.write_bytes(manifest_key, json.dumps(doc).encode())
    elif how == "wrong_folder":  # a manifest copied from another version
        other = layout.new_version_id(T0)
        store.write_bytes(manifest_key, _manifest(store, _write_version(store, other), other).to_json())
    elif how == "missing_file":
        store.delete(f"{prefix}/parquet/part-0.parquet")
    elif how == "truncated_file":
        store.write_bytes(f"{prefix}/parquet/part-0.parquet", b"ro")
    elif how == "corrupt_file":  # same size, other bytes: only a checksum sees it
        store.write_bytes(f"{prefix}/parquet/part-0.parquet", b"ROWS")
    elif how == "manifest_deleted":
        store.delete(manifest_key)
    elif how == "not_json":
        store.write_bytes(manifest_key, b"{ half a manifest")
    return good


@pytest.mark.parametrize("how", ["schema", "wrong_folder", "missing_file", "truncated_file", "manifest_deleted", "not_json"])
@pytest.mark.parametrize("verify", [False, True], ids=["listing", "checksums"])
def test_an_invalid_latest_version_is_skipped_and_reported(store: ObjectStore, how: str, verify: bool, caplog):
    """Defect 2: one bad object must not wedge a date; it is skipped with the object and the
    problem named, and a rerun commits past it. A manifest swapped for one of the same size
    (``wrong_folder``) is seen by the readers that compare checksums; the others read the
    committed manifest from the log, so they are not misled by it either."""
    good = _bad_latest(store, how)
    if how == "wrong_folder" and not verify:
        latest = resolve_latest(store, LOCATION)
        assert latest.version != good and latest.manifest.version == latest.version
        return
    latest = resolve_latest(store, LOCATION, verify_checksums=verify)
    assert latest is not None and latest.version == good
    state = scan_location(store, LOCATION, verify_checksums=verify)
    assert [v.version for v in state.versions] == [good]
    assert len(state.skipped) == 1 and "v=" in state.skipped[0].uri
    assert any("skipping version" in r.message for r in caplog.records)
    # A rerun commits a new version past the bad one; it becomes latest.
    rerun = layout.new_version_id(T0 + dt.timedelta(hours=2))
    _commit(store, rerun)
    assert resolve_latest(store, LOCATION, verify_checksums=verify).version == rerun


def test_a_commit_carries_its_manifest_and_readers_need_no_second_read(store: ObjectStore, monkeypatch):
    """The log entry holds the manifest's exact bytes (checksum-bound), so resolving a location
    reads one object per entry; entries written before that field are read the old way."""
    version = layout.new_version_id(T0)
    prefix = _commit(store, version)
    entry = CommitLog(store, LOCATION).read().entries[-1]
    assert entry.manifest.encode() == store.read_bytes(layout.manifest_key(prefix))
    reads: list[str] = []
    real_read = ObjectStore.read_bytes
    monkeypatch.setattr(ObjectStore, "read_bytes", lambda self, key: reads.append(key) or real_read(self, key))
    assert resolve_latest(store, LOCATION).version == version
    assert not any(k.endswith(layout.MANIFEST_NAME) for k in reads), reads
    # An entry without the copy (an older writer): the manifest object is read and checked.
    older = layout.new_version_id(T0 + dt.timedelta(hours=1))
    older_prefix = _write_version(store, older)
    data = _manifest(store, older_prefix, older).to_json()
    store.write_bytes(layout.manifest_key(older_prefix), data)
    log = CommitLog(store, LOCATION)
    assert log.append_at(log.head() + 1, VersionCommitted(seq=1, version=older, manifest_checksum=checksum_bytes(data)))
    reads.clear()
    assert resolve_latest(store, LOCATION).version == older
    assert layout.manifest_key(older_prefix) in reads


def test_a_corrupt_latest_version_is_skipped_where_data_is_read(store: ObjectStore):
    good = _bad_latest(store, "corrupt_file")
    assert resolve_latest(store, LOCATION).version != good  # sizes match: the cheap check passes
    checked = resolve_latest(store, LOCATION, verify_checksums=True)
    assert checked.version == good


@pytest.mark.parametrize("content", [b"not json", b'{"op": "commit", "seq": 2}', b'{"op": "delete-everything"}'])
def test_malformed_log_entries_are_skipped_and_appenders_go_past_them(store: ObjectStore, content: bytes):
    good = layout.new_version_id(T0)
    _commit(store, good)
    store.write_bytes(layout.log_entry_key(LOCATION, 2), content)
    state = scan_location(store, LOCATION)
    assert state.latest.version == good and state.head == 2
    assert [s.uri.rsplit("/", 1)[-1] for s in state.skipped] == [f"{2:020d}.json"]
    newer = layout.new_version_id(T0)
    _commit(store, newer)
    assert (resolve_latest(store, LOCATION).version, resolve_latest(store, LOCATION).seq) == (newer, 3)


def test_an_entry_stored_under_another_number_is_skipped(store: ObjectStore):
    """A log entry copied to another number (a replay) does not count."""
    first, second = layout.new_version_id(T0), layout.new_version_id(T0)
    _commit(store, first)
    _commit(store, second)
    store.write_bytes(layout.log_entry_key(LOCATION, 3), store.read_bytes(layout.log_entry_key(LOCATION, 1)))
    state = scan_location(store, LOCATION)
    assert state.latest.version == second
    assert "claims seq 1 but is stored as 3" in state.skipped[0].problem


# -- item 7: a conditional PUT whose response is lost ----------------------------------------------


class _DropFirstConditionalPutResponse(socketserver.ThreadingTCPServer):
    """An HTTP proxy to the S3 server that forwards every request but, for the first PUT carrying
    ``If-None-Match``, closes the connection instead of returning the server's response: the
    object was stored, the client never heard so, and botocore retries."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.dropped = 0
        self.conditional_puts = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: _DropFirstConditionalPutResponse = self.server
        while True:
            request_line = self.rfile.readline()
            if not request_line:
                return
            headers: list[tuple[str, str]] = []
            while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
            length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
            body = self.rfile.read(length) if length else b""
            method, path, _ = request_line.decode("latin-1").split(" ", 2)
            upstream = http.client.HTTPConnection(server.upstream.hostname, server.upstream.port, timeout=30)
            upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                upstream.putheader(name, value)
            upstream.endheaders(body)
            response = upstream.getresponse()
            payload = response.read()
            conditional = method == "PUT" and any(k.lower() == "if-none-match" for k, _ in headers)
            if conditional:
                server.conditional_puts += 1
                if server.dropped == 0:
                    server.dropped += 1
                    self.connection.shutdown(socket.SHUT_RDWR)  # stored upstream; the client never hears
                    return
            self.wfile.write(f"HTTP/1.1 {response.status} {response.reason}\r\n".encode("latin-1"))
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection"):
                    self.wfile.write(f"{name}: {value}\r\n".encode("latin-1"))
            self.wfile.write(f"Content-Length: {len(payload)}\r\n\r\n".encode("latin-1") if not response.getheader("Content-Length") else b"\r\n")
            self.wfile.write(payload)
            self.wfile.flush()


@pytest.mark.s3
def test_a_retried_conditional_put_is_not_a_false_conflict(rgw):
    """Defect 7: botocore retries a create-only PUT whose first response was lost; the retry is
    answered 412 for the writer's own object. The commit must succeed, exactly once."""
    proxy = _DropFirstConditionalPutResponse(rgw.s3_settings.endpoint_url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        settings = S3Settings(**{**rgw.s3_settings.__dict__, "endpoint_url": f"http://127.0.0.1:{proxy.server_address[1]}"})
        store = ObjectStore(f"s3://{TEST_BUCKET}/lost-response-{layout.new_version_id()}", settings)
        version = layout.new_version_id(T0)
        _commit(store, version)
        assert proxy.dropped == 1 and proxy.conditional_puts >= 3  # manifest (dropped + retried), log entry
        snapshot = CommitLog(store, LOCATION).read()
        assert [(e.seq, e.version) for e in snapshot.entries] == [(1, version)]
        assert resolve_latest(store, LOCATION).version == version
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.s3
def test_a_failed_multipart_upload_leaves_no_parts(s3_store: ObjectStore, tmp_path):
    """Defect 7: an upload that fails half-way is aborted, not left as invisible parts."""

    class Breaks:
        def __init__(self, size: int):
            self.sent, self.size = 0, size

        def read(self, n: int = -1) -> bytes:
            if self.sent >= self.size // 2:
                raise OSError("disk went away")
            n = min(n if n > 0 else 1 << 20, self.size - self.sent)
            self.sent += n
            return b"x" * n

    from twocluster.store.storage import StorageError

    with pytest.raises(StorageError, match="upload failed"):
        s3_store.upload_stream(Breaks(40 << 20), "big/object.bin")
    client = s3_store._s3_client
    uploads = client.list_multipart_uploads(Bucket=s3_store.bucket, Prefix=s3_store._s3_key("big/")).get("Uploads", [])
    assert uploads == [] and not s3_store.exists("big/object.bin")


# -- pre-log stores ------------------------------------------------------------------------------


def _legacy_manifest(version: str, created_at: dt.datetime, prefix_files) -> bytes:
    return json.dumps({
        "kind": "dataset", "version": version, "created_at": created_at.isoformat(),
        "files": [f.model_dump(exclude_none=True) for f in prefix_files],
        "counts": {"input": 10, "accepted": 8, "rejected": 2, "per_split": {"train": 8}, "rejected_by_reason": {"empty": 2}},
        "lineage": {"inputs": [], "code_version": "0.1.0", "run_id": "old", "input_fingerprint": "sha256:x"},
        "feature_spec": {"kind": "log_mel", "features": {"log_mel": {"dtype": "float32", "shape": [97, 40]}}, "params": {}},
        "pipeline": "speech_commands", "date": "2026-11-20", "ignored_files": 0,
    }).encode()


def test_a_pre_log_store_is_refused_clearly_then_migrated(store: ObjectStore):
    from twocluster.store.manifest import describe_files

    older, newer = layout.new_version_id(T0 + dt.timedelta(hours=3)), layout.new_version_id(T0)
    for version, created in ((older, T0), (newer, T0 + dt.timedelta(hours=1))):
        prefix = _write_version(store, version)
        store.write_bytes(layout.manifest_key(prefix), _legacy_manifest(version, created, describe_files(store, prefix)))
    with pytest.raises(LegacyLayoutError, match="twocluster migrate"):
        resolve_latest(store, LOCATION)
    dry = migrate(store)
    assert dry.locations[0]["versions"] == [older, newer] and CommitLog(store, LOCATION).head() == 0
    migrate(store, apply=True)
    # The old order (by created_at) is kept: "latest" does not change by migrating.
    assert [v.version for v in scan_location(store, LOCATION).versions] == [older, newer]
    assert resolve_latest(store, LOCATION).manifest.feature_spec.featurizer_code == "sha256:" + "0" * 64
    assert migrate(store, apply=True).locations == []  # idempotent
    assert all(isinstance(e, VersionCommitted) for e in CommitLog(store, LOCATION).read().entries)


# -- issue 32: names outside the valid range, gaps, and checkpoints ---------------------------------


class _CountingStore(ObjectStore):
    """The store, counting its object reads and listings (the figure the checkpoints exist for)."""

    def __init__(self, store: ObjectStore):
        super().__init__(store.root_uri, store.s3_settings)
        self.reads = self.listings = 0

    def read_bytes(self, key: str) -> bytes:
        self.reads += 1
        return super().read_bytes(key)

    def list(self, *args, **kwargs):
        self.listings += 1
        return super().list(*args, **kwargs)


@pytest.mark.parametrize("stray", ["99999999999999999999.json", "100000000000000000000.json", "00000000000000000000.json",
                                   "00000000000000000042.json"])
def test_a_stray_entry_name_neither_stalls_nor_hides_commits(store: ObjectStore, stray: str):
    """Defect: one object named 99999999999999999999.json made the next commit write a 21-digit
    name no reader accepts; the commit "succeeded", was invisible, and gc planned to delete it.
    Now the log is the unbroken run of entries from 1: the stray is reported and skipped, the
    next commit follows the largest valid entry, and it is the latest."""
    first = layout.new_version_id(T0)
    _commit(store, first)
    store.write_bytes(f"{layout.log_prefix(LOCATION)}/{stray}", json.dumps({"op": "commit", "seq": 1}).encode())
    second = layout.new_version_id(T0 + dt.timedelta(hours=1))
    _commit(store, second)
    log = CommitLog(store, LOCATION)
    assert log.head() == 2 and store.exists(layout.log_entry_key(LOCATION, 2))
    state = scan_location(store, LOCATION)
    assert [v.version for v in state.versions] == [first, second] and resolve_latest(store, LOCATION).version == second
    assert [s.uri.rsplit("/", 1)[-1] for s in state.skipped] == [stray]
    assert ("not a log entry name" if stray in ("100000000000000000000.json", "00000000000000000000.json")
            else "beyond a gap") in state.skipped[0].problem
    from twocluster.store.gc import plan_gc

    assert not any(second in d.prefix for d in plan_gc(store, keep_versions=5, grace=dt.timedelta(0)).deletions)


def test_the_largest_entry_number_is_refused_not_wrapped(file_store: ObjectStore):
    with pytest.raises(layout.LayoutError, match="from 1 to 99999999999999999999"):
        layout.log_entry_key(LOCATION, layout.MAX_LOG_SEQ + 1)
    from twocluster.store.commitlog import CommitLogError

    with pytest.raises(CommitLogError, match="past the largest number"):
        CommitLog(file_store, LOCATION).append_at(layout.MAX_LOG_SEQ + 1, VersionCommitted(seq=1, version=layout.new_version_id(T0),
                                                                                           manifest_checksum=checksum_bytes(b"")))


def _alias_entries(store: ObjectStore, location: str, versions: list[str], start: int = 1) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from twocluster.store.commitlog import AliasMoved

    def put(seq: int) -> None:
        entry = AliasMoved(seq=seq, model="kws_cnn", alias="production", version=versions[seq % len(versions)])
        assert store.put_if_absent(layout.log_entry_key(location, seq), entry.model_dump_json().encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(start, start + 200)))


def test_a_checkpoint_makes_reading_a_long_log_constant(store: ObjectStore):
    """Reading a log of N entries cost N object reads. With a checkpoint every 10 entries a read
    costs the hint, the checkpoint and the entries after it, and sees exactly the same entries."""
    location = "models/kws_cnn/aliases/production"
    versions = [layout.new_version_id(T0) for _ in range(3)]
    _alias_entries(store, location, versions)  # 200 entries written as-is: no checkpoint yet
    counting = _CountingStore(store)
    without = CommitLog(counting, location).read()
    assert without.head == 200 and without.checkpoint == 0 and counting.reads == 201  # the hint, then every entry
    assert CommitLog(store, location).write_checkpoint(200)
    counting.reads = counting.listings = 0
    with_checkpoint = CommitLog(counting, location).read()
    assert (counting.reads, counting.listings, with_checkpoint.checkpoint) == (2, 1, 200)
    assert [e.model_dump() for e in with_checkpoint.entries] == [e.model_dump() for e in without.entries]
    # Appends past it: the 210th writes the next checkpoint and moves the hint.
    from twocluster.store.commitlog import AliasMoved

    log = CommitLog(store, location)
    for _ in range(10):
        log.append(lambda seq: AliasMoved(seq=seq, model="kws_cnn", alias="production", version=versions[0]))
    counting.reads = 0
    after = CommitLog(counting, location).read()
    assert after.head == 210 and after.checkpoint == 210 and counting.reads == 2 and len(after.entries) == 210
    # A damaged checkpoint or hint costs reads, never entries.
    store.write_bytes(layout.log_checkpoint_key(location, 210), b"{not a checkpoint")
    damaged = CommitLog(store, location).read()
    assert damaged.checkpoint == 200 and len(damaged.entries) == 210 and "unreadable checkpoint" in damaged.skipped[0].problem
    store.write_bytes(layout.last_checkpoint_key(location), b"[]")
    assert len(CommitLog(store, location).read().entries) == 210
