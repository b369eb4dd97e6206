from __future__ import annotations

import os
import threading

import pytest
from conftest import cached_share, cached_within, evicted_from_page_cache

from twocluster.store.storage import (
    ObjectNotFound,
    ObjectStore,
    S3Settings,
    StorageError,
    checksum_bytes,
    checksum_local_file,
)


def test_write_read_list_and_checksums(store: ObjectStore):
    store.write_bytes("raw/a/one.wav", b"1" * 10)
    store.write_bytes("raw/a/two.WAV", b"2" * 20)
    store.write_bytes("raw/b/notes.txt", b"text")

    assert store.read_bytes("raw/a/one.wav") == b"1" * 10
    assert [(o.key, o.size) for o in store.list("raw")] == [
        ("raw/a/one.wav", 10), ("raw/a/two.WAV", 20), ("raw/b/notes.txt", 4)
    ]
    assert [o.key for o in store.list("raw", suffixes=(".wav",))] == ["raw/a/one.wav", "raw/a/two.WAV"]
    assert [o.key for o in store.list("raw", recursive=False)] == []
    assert store.list_folders("raw") == ["a", "b"]
    assert store.list("nothing/here") == []
    assert store.existing(["raw/a/one.wav", "raw/a/missing.wav"]) == {"raw/a/one.wav"}
    assert store.checksum("raw/a/one.wav") == checksum_bytes(b"1" * 10)


def test_missing_object_error_names_the_uri(store: ObjectStore):
    with pytest.raises(ObjectNotFound, match="no/such.bin"):
        store.read_bytes("no/such.bin")


def test_upload_download_delete(store: ObjectStore, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * 40_000)  # ~10 MB: more than one copy chunk
    assert store.upload_file(src, "x/big.bin") == checksum_local_file(src)
    dst = tmp_path / "out" / "big.bin"
    assert store.download_file("x/big.bin", dst) == checksum_local_file(src)
    assert dst.read_bytes() == src.read_bytes()
    assert not list(dst.parent.glob(".*.part")), "download leaves no temp files behind"

    store.delete_prefix("x")
    assert store.list("x") == []
    with pytest.raises(StorageError, match="whole store"):
        store.delete_prefix("")


def test_parallel_upload_and_download(store: ObjectStore, tmp_path):
    files = []
    for i in range(12):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(bytes([i]) * (1000 + i))
        files.append((p, f"shards/f{i}.bin"))
    sums = store.upload_many(files, max_workers=4)
    got = dict(store.download_many([(k, tmp_path / "dl" / k) for _, k in files], max_workers=4))
    assert got == sums
    assert len(sums) == 12


def test_create_only_write_concurrent_writers_one_wins(store: ObjectStore):
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def write(i: int) -> None:
        barrier.wait()
        results[i] = store.put_if_absent("commit/_MANIFEST.json", f"writer-{i}".encode())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert store.read_bytes("commit/_MANIFEST.json") == f"writer-{winners[0]}".encode()
    # The loser's content never appears, even partially, and no temp files are left.
    assert [o.key for o in store.list("commit")] == ["commit/_MANIFEST.json"]


def test_keys_cannot_escape_the_root(store: ObjectStore):
    for bad in ("../outside.txt", "a/../../b", "a/./b"):
        with pytest.raises(StorageError, match="'..'"):
            store.write_bytes(bad, b"x")


def test_keys_cannot_hold_control_characters(store: ObjectStore):
    for bad in ("a/b\nc.wav", "nul\x00.wav", "unit\x1fsep.wav", "del\x7f.wav", "tab\tname.wav", "next\x85line.wav",
                "line\u2028sep.wav", "para\u2029sep.wav", "evil\u202egnp.wav", "caf\udce9.wav"):
        with pytest.raises(StorageError, match="control characters"):
            store.write_bytes(bad, b"x")
        with pytest.raises(StorageError, match="control characters"):
            store.read_bytes(bad)
    # Anything printable is a key, spaces and non-ASCII letters included.
    store.write_bytes("yes/café 1 ~!.wav", b"x")
    assert store.read_bytes("yes/café 1 ~!.wav") == b"x"


def test_bad_uris_are_named():
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        ObjectStore("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        ObjectStore("s3:///x")
    with pytest.raises(StorageError, match="absolute"):
        ObjectStore("file://relative/path")


def test_a_store_rooted_below_another_and_pickling(store: ObjectStore):
    import pickle

    below = ObjectStore(store.uri("models/m"), store.s3_settings)
    below.write_bytes("w.bin", b"w")
    assert store.read_bytes("models/m/w.bin") == b"w"
    clone = pickle.loads(pickle.dumps(below))  # Spark ships stores to executors
    assert clone.uri("w.bin") == below.uri("w.bin")
    assert clone.read_bytes("w.bin") == b"w"


def test_s3_settings_from_env_and_connection():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk", "AWS_REGION": "eu-west-1"}
    s = S3Settings.from_env(env)
    assert (s.endpoint_url, s.access_key, s.secret_key, s.region) == ("http://127.0.0.1:9", "ak", "sk", "eu-west-1")
    assert S3Settings.from_env({**env, "AWS_ENDPOINT_URL_S3": "http://s3.local"}).endpoint_url == "http://s3.local"
    assert s.as_env()["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9"

    from airflow.sdk import Connection

    # The form an AIRFLOW_CONN_OBJECT_STORE variable takes.
    conn = Connection.from_json(
        '{"conn_type": "aws", "login": "ak2", "password": "sk2", '
        '"extra": {"endpoint_url": "http://rgw:7480", "region_name": "us-east-1"}}',
        conn_id="object_store",
    )
    c = S3Settings.from_airflow_connection(conn)
    assert (c.endpoint_url, c.access_key, c.secret_key, c.region) == ("http://rgw:7480", "ak2", "sk2", "us-east-1")


@pytest.mark.parametrize("name", ["shard.tfrecord.gz", "part.zst", "x.bz2"])
def test_bytes_are_stored_exactly_whatever_the_extension(store: ObjectStore, tmp_path, name):
    # pyarrow's streams would (de)compress by file extension unless told not to.
    data = b"\x1f\x8b not really gzip " * 100
    store.write_bytes(f"c/{name}", data)
    assert store.size(f"c/{name}") == len(data)
    assert store.read_bytes(f"c/{name}") == data
    assert store.download_file(f"c/{name}", tmp_path / name) == checksum_bytes(data)
    (tmp_path / "up").write_bytes(data)
    store.upload_file(tmp_path / "up", f"d/{name}")
    assert store.read_bytes(f"d/{name}") == data


def test_a_snapshot_answers_listings_like_the_store_and_caches_only_commit_records(store: ObjectStore, monkeypatch):
    """The ops page's view (one recursive listing per area): its listings equal the store's, it
    refuses writes, and a cached commit record is re-read when the listing shows it changed."""
    from twocluster.store import layout
    from twocluster.store.storage import StoreSnapshot

    keys = ["a/x/_log/00000000000000000001.json", "a/x/_log/00000000000000000002.json", "a/x/v=1/_MANIFEST.json",
            "a/x/v=1/data/part-0", "a/y/file", "a/yy/file", "b/outside"]
    for k in keys:
        store.write_bytes(k, k.encode())
    cache: dict = {}
    view = StoreSnapshot(store, ["a"], immutable_cache=cache, is_immutable=layout.is_commit_record)
    for prefix in ("a", "a/x", "a/x/_log", "a/y", "a/x/v=1", "a/none"):
        for recursive in (True, False):
            assert view.list(prefix, recursive=recursive) == store.list(prefix, recursive=recursive), (prefix, recursive)
        assert view.list_folders(prefix) == store.list_folders(prefix), prefix
    assert view.list("b") == store.list("b")  # outside the snapshot: live
    assert view.existing(["a/y/file", "a/nope", "b/outside"]) == {"a/y/file", "b/outside"}
    assert view.size("a/yy/file") == len(b"a/yy/file") and view.exists("a/x/v=1/_MANIFEST.json")
    with pytest.raises(StorageError, match="read-only"):
        view.write_bytes("a/z", b"no")
    view.prefetch(k for k in keys if layout.is_log_entry_key(k))
    assert len(cache) == 2
    reads: list[str] = []
    real = ObjectStore.read_bytes
    monkeypatch.setattr(ObjectStore, "read_bytes", lambda self, key: reads.append(key) or real(self, key))
    assert view.read_bytes(keys[0]) == keys[0].encode() and reads == []  # cached
    assert view.read_bytes("a/y/file") == b"a/y/file" and reads == ["a/y/file"]  # not a commit record: live
    store.write_bytes(keys[0], b"rewritten, longer than before")
    again = StoreSnapshot(store, ["a"], immutable_cache=cache, is_immutable=layout.is_commit_record)
    assert again.read_bytes(keys[0]) == b"rewritten, longer than before"


def test_a_local_store_has_the_kernel_read_ahead_what_it_will_read(file_store: ObjectStore, tmp_path):
    """will_read: the named objects come into the page cache in the background, and nothing
    else does (a task reading clips in turn finds them there where the day does not fit the
    cache); a symbolic link is not followed, a FIFO is not waited on, a missing key is no error."""
    keys = [f"raw/day/clip{i}.wav" for i in range(6)]
    for key in keys:
        file_store.write_bytes(key, os.urandom(96 * 1024))
    paths = [file_store.local_path(key) for key in keys]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(os.urandom(96 * 1024))
    if not evicted_from_page_cache([*paths, outside]):
        pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to read ahead")
    os.symlink(outside, file_store.local_path("raw/day/link.wav"))
    os.mkfifo(file_store.local_path("raw/day/fifo.wav"))

    file_store.will_read([*keys[:3], "raw/day/link.wav", "raw/day/fifo.wav", "raw/day/missing.wav"])

    assert cached_within(paths[:3])
    assert [cached_share(p) for p in paths[3:]] == [0.0, 0.0, 0.0]
    assert cached_share(outside) == 0.0


def test_a_walk_yields_the_listing_one_object_at_a_time_in_key_order(store: ObjectStore, tmp_path):
    """A walk is the listing made as it goes (a local store reads a folder when the walk reaches
    it, never the tree at once): the same objects in the same key order, with names that sort
    around the "/" a folder adds ('.' and '-' before it, '0' and letters after, upper case before
    lower, non-ASCII last) and folders nested in folders."""
    keys = ["raw/ab", "raw/a.wav", "raw/a-b/x.wav", "raw/a/x.wav", "raw/a/b/c.wav", "raw/a/b.wav", "raw/a0.wav",
            "raw/B.wav", "raw/a b/x.wav", "raw/\u00e9t\u00e9/x.wav", "raw/z/y/x/w.wav", "raw/_/x.wav"]
    for i, key in enumerate(keys):
        store.write_bytes(key, b"x" * (i + 1))
    store.write_bytes("rawer/not-under-the-prefix.wav", b"x")
    listed = store.listing("raw")
    walk = store.walk("raw")
    walked = list(walk)
    assert [o.key for o in walked] == sorted(keys) == [o.key for o in listed.objects]
    assert [(o.size, o.mtime_ns) for o in walked] == [(o.size, o.mtime_ns) for o in listed.objects]
    assert walk.links == listed.links == []
    assert [o.key for o in store.walk("raw", recursive=False)] == sorted(k for k in keys if k.count("/") == 1)
    assert list(store.walk("nothing/here")) == []
    if store.scheme == "file":  # links: skipped, never followed, named once the walk is done
        (tmp_path / "store" / "raw" / "a" / "loop").symlink_to("..")
        walk = store.walk("raw")
        assert [o.key for o in walk] == sorted(keys) and walk.links == ["raw/a/loop"]
