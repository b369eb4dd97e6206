"""Hostile inputs, round 2 (issue 33): what a task reads is what the listing listed, bounded, and
no name or tree can stop a date. An attacker with write access to the raw folder swaps a listed
clip between the listing (on the driver) and its read (in a task) for a symbolic link, a FIFO or
a larger file; names a file in Latin-1, with a C1 line break or U+2028, or twice (NFC and NFD);
or nests folders 1,200 deep. Each ends in a counted outcome with a reason, on file:// and, where
an object is read, on the RGW S3 server.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from twocluster.spark.io import featurizing_function, list_inputs
from twocluster.spark.preprocess import run_preprocess
from twocluster.store import layout
from twocluster.store.manifest import read_manifest
from twocluster.store.storage import ObjectStore, ReadRefused, printable_name
from twocluster_demo import sample_data

DATE = dt.date(2026, 11, 4)
DEPTH = 1200


def _clip(store: ObjectStore, spec) -> bytes:
    sample_data.generate_day(store, spec, DATE, clips=4, seed=5, bad_files=0)
    first = store.list(layout.raw_date_prefix(spec.name, DATE), suffixes=(".wav",))[0]
    return store.read_bytes(first.key)


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """pytest's and shutil's ``rmtree`` recurse: a 1,200-deep tree left in a temporary folder
    would break the clean-up of every later session. GNU ``rm`` walks it without recursion."""
    yield
    subprocess.run(["rm", "-rf", str(tmp_path)], check=False)


def _deep_tree(top: Path, depth: int) -> None:
    """``top/d/d/.../d/clip.wav``, ``depth`` folders deep, made a level at a time through
    descriptors (``os.makedirs`` recurses, and the whole path outgrows what the kernel takes)."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(os.open("clip.wav", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.close(fd)


def _featurize(spec, store, inputs):
    batches = featurizing_function(spec, store)(iter(inputs.combine_chunks().to_batches()))
    return pd.concat([b.drop_columns(["features"]).to_pandas() for b in batches], ignore_index=True)


# -- read as listed --------------------------------------------------------------------------------


def test_a_clip_swapped_after_the_listing_is_refused_by_its_read_not_followed(file_store, speech_spec, tmp_path):
    """Listed as a 32 KB clip, then replaced: by a link to a 67 MB file, a link to /dev/zero, a
    FIFO (no writer: a blocking open would wait forever), a larger file, a same-size rewrite, and
    a parent folder swapped for a link. Each is refused with its reason; none is read past the
    spec's limit, followed or waited on."""
    spec = speech_spec.model_copy(update={"inputs": speech_spec.inputs.model_copy(update={"max_bytes": 1 << 20})})
    sample_data.generate_day(file_store, spec, DATE, clips=30, seed=3, bad_files=0)
    inputs, _, _ = list_inputs(file_store, spec, DATE)
    paths = {p: file_store.local_path(k) for p, k in zip(inputs.column("path").to_pylist(), inputs.column("key").to_pylist(), strict=True)}
    moved_folder = sorted(paths)[-1].split("/")[0]
    names = sorted(p for p in paths if not p.startswith(moved_folder + "/"))
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (67 << 20))
    swaps = {}
    for path, swap in zip(names, ["link_big", "link_zero", "fifo", "larger", "rewritten"], strict=False):
        target = paths[path]
        size = target.stat().st_size
        target.unlink()
        if swap == "link_big":
            target.symlink_to(big)
        elif swap == "link_zero":
            target.symlink_to("/dev/zero")
        elif swap == "fifo":
            os.mkfifo(target)
        elif swap == "larger":
            target.write_bytes(os.urandom(size * 3))
        else:
            target.write_bytes(os.urandom(size))
            os.utime(target, ns=(1, 1))  # the same size, another time: not what was listed
        swaps[path] = swap
    folder = file_store.local_path(layout.raw_date_prefix(spec.name, DATE)) / moved_folder
    folder.rename(folder.with_name(folder.name + "_moved"))
    folder.symlink_to(folder.with_name(folder.name + "_moved"))  # the same clips, reached through a link now

    done: dict = {}
    worker = threading.Thread(target=lambda: done.setdefault("rows", _featurize(spec, file_store, inputs)), daemon=True)
    worker.start()
    worker.join(120)
    assert "rows" in done, "a read blocked (a FIFO waited on, or /dev/zero read without end)"
    rows = done["rows"].set_index("path")
    expected = {"link_big": "not_a_file", "link_zero": "not_a_file", "fifo": "not_a_file", "larger": "changed_since_listing",
                "rewritten": "changed_since_listing"}
    assert {p: rows.at[p, "reason"] for p in swaps} == {p: expected[s] for p, s in swaps.items()}
    assert "symbolic link" in rows.at[names[0], "detail"] and "FIFO" in rows.at[names[2], "detail"]
    through_link = [p for p in paths if p.startswith(folder.name + "/")]
    assert through_link and all(rows.at[p, "reason"] == "not_a_file" for p in through_link)
    assert all("no longer a folder" in rows.at[p, "detail"] for p in through_link)
    untouched = [p for p in paths if p not in swaps and p not in through_link]
    assert untouched and rows.loc[untouched, "reason"].isna().all()


def test_a_folder_swapped_for_a_link_between_two_reads_in_it_is_still_never_followed(file_store, tmp_path):
    """The reader keeps the last folder it opened (a day's clips share a few folders): a swap of
    that folder for a link after its first read leaves the reader in the folder that was listed,
    never in the link's target; a reader that had not opened it yet refuses it."""
    for name in ("one.wav", "two.wav"):
        file_store.write_bytes(f"raw/yes/{name}", b"listed " + name.encode())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "two.wav").write_bytes(b"not the store's")
    listed = {o.key: o for o in file_store.list("raw")}
    assert file_store.read_listed(listed["raw/yes/one.wav"], 100) == b"listed one.wav"
    folder = file_store.local_path("raw/yes")
    folder.rename(folder.with_name("yes_moved"))
    folder.symlink_to(elsewhere)
    assert file_store.read_listed(listed["raw/yes/two.wav"], 100) == b"listed two.wav"
    with pytest.raises(ReadRefused) as refused:
        ObjectStore(file_store.root_uri).read_listed(listed["raw/yes/two.wav"], 100)
    assert refused.value.reason == "not_a_file"


@pytest.mark.s3
def test_an_object_replaced_by_a_larger_one_after_the_listing_is_not_read_whole(s3_store, speech_spec):
    """On the RGW S3 server: listed at 32 KB, overwritten with 3 MB (under the limit: its size
    and time no longer match, ``changed_since_listing``) or with 12 MB (over it: ``too_large``,
    or refused by ``If-Unmodified-Since``; at most ``max_bytes + 1`` bytes transferred by the
    ranged GET either way), or rewritten with the same size (its time no longer matches)."""
    spec = speech_spec.model_copy(update={"inputs": speech_spec.inputs.model_copy(update={"max_bytes": 8 << 20})})
    sample_data.generate_day(s3_store, spec, DATE, clips=6, seed=3, bad_files=0)
    inputs, _, _ = list_inputs(s3_store, spec, DATE)
    keys = dict(zip(inputs.column("path").to_pylist(), inputs.column("key").to_pylist(), strict=True))
    grown, huge, same_size = sorted(keys)[:3]
    time.sleep(1.1)  # a rewrite in a later second than the listed one (HTTP dates hold whole seconds)
    s3_store.write_bytes(keys[grown], os.urandom(3 << 20))
    s3_store.write_bytes(keys[huge], os.urandom(12 << 20))
    s3_store.write_bytes(keys[same_size], os.urandom(s3_store.size(keys[same_size])))
    rows = _featurize(spec, s3_store, inputs).set_index("path")
    assert rows.at[grown, "reason"] == "changed_since_listing" and "modified" in rows.at[grown, "detail"]
    assert rows.at[huge, "reason"] in ("too_large", "changed_since_listing")
    assert rows.at[same_size, "reason"] == "changed_since_listing"
    assert rows.drop(index=[grown, huge, same_size])["reason"].isna().all()
    listed = s3_store.list(layout.raw_date_prefix(spec.name, DATE))
    info = next(o for o in listed if o.key == keys[huge])
    assert s3_store.read_listed(info, 16 << 20) == s3_store.read_bytes(info.key)  # listed again: read as listed
    with pytest.raises(ReadRefused) as refused:
        s3_store.read_listed(info, 8 << 20)
    assert refused.value.reason == "too_large" and str(12 << 20) in str(refused.value)


def test_read_listed_refuses_what_the_listing_did_not_list(store):
    """The store's own contract, on both backends: the listed object reads back; a grown one and
    an empty one behave; a size over the limit is refused before any request."""
    store.write_bytes("raw/a.bin", b"x" * 100)
    store.write_bytes("raw/empty.bin", b"")
    listed = {o.key: o for o in store.list("raw")}
    assert store.read_listed(listed["raw/a.bin"], 100) == b"x" * 100
    assert store.read_listed(listed["raw/empty.bin"], 10) == b""
    with pytest.raises(ReadRefused) as refused:
        store.read_listed(listed["raw/a.bin"], 99)
    assert refused.value.reason == "too_large"
    store.write_bytes("raw/a.bin", b"y" * 150)
    with pytest.raises(ReadRefused) as refused:
        store.read_listed(listed["raw/a.bin"], 1000)
    assert refused.value.reason == "changed_since_listing"


# -- names and trees ------------------------------------------------------------------------------


NAMES = {  # file name (bytes, as an uploader's file system holds it) -> expected outcome
    b"yes/plain.wav": "accepted",
    b"yes/caf\xe9_latin1.wav": "bad_name",  # Latin-1, not UTF-8
    "yes/next\x85line.wav".encode(): "bad_name",  # C1 NEL
    "yes/line\u2028separator.wav".encode(): "bad_name",
    "yes/evil\u202egnp.wav".encode(): "bad_name",  # right-to-left override
    "no/cafe\u0301.wav".encode(): "accepted",  # NFD: first in key order ("e" sorts before "\xe9")
    "no/caf\u00e9.wav".encode(): "duplicate_name",  # the same name in NFC
}


@pytest.fixture
def named_day(file_store, speech_spec, tmp_path):
    clip = _clip(ObjectStore((tmp_path / "scratch").as_uri()), speech_spec)
    top = os.fsencode(file_store.local_path(layout.raw_date_prefix(speech_spec.name, DATE)))
    for name in NAMES:
        os.makedirs(os.path.join(top, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(top, name), "wb") as f:
            f.write(clip)
    _deep_tree(Path(os.fsdecode(top)) / "yes" / "deep", DEPTH)
    return file_store


def test_names_no_store_would_take_are_rejected_escaped_and_twins_once(named_day, speech_spec):
    """A Latin-1 name stopped every retry of the date (``UnicodeEncodeError`` in the listing);
    ``\\x85``, U+2028 and U+202E passed into logs and the rejects table; NFC and NFD spellings of
    ``café.wav`` were two accepted rows of one path; a tree 1,200 folders deep was a
    ``RecursionError``. Now each is one counted row (or one ignored folder), escaped."""
    inputs, ignored, _ = list_inputs(named_day, speech_spec, DATE)
    assert ignored == {"too_deep": 1}
    rows = inputs.to_pylist()
    assert len(rows) == len(NAMES)
    by_reason: dict[str, list[str]] = {}
    for row in rows:
        by_reason.setdefault(row["reject"] or "accepted", []).append(row["path"])
    assert sorted(by_reason["bad_name"]) == sorted(["yes/caf\\xe9_latin1.wav", "yes/next\\x85line.wav",
                                                    "yes/line\\u2028separator.wav", "yes/evil\\u202egnp.wav"])
    # Twins: the first in key order ("cafe" + U+0301 sorts before "caf" + U+00E9) is read, the other rejected.
    assert by_reason["duplicate_name"] == ["no/caf\u00e9.wav"] and by_reason["accepted"].count("no/caf\u00e9.wav") == 1
    assert next(r["key"] for r in rows if r["reject"] == "duplicate_name").endswith("caf\u00e9.wav")
    for row in rows:  # nothing a log line, the rejects table or a page would choke on
        row["path"].encode("utf-8")
        assert printable_name(row["path"]) == row["path"]


def test_the_date_with_hostile_names_and_a_deep_tree_commits_with_every_input_counted(spark, named_day, speech_spec):
    result = run_preprocess(spark, speech_spec, named_day, DATE, run_id="names", max_reject_rate=1.0)
    prefix = result.manifest_uri.split(named_day.root_uri + "/", 1)[1].rsplit("/", 1)[0]
    manifest = read_manifest(named_day, prefix)
    counts = manifest.counts
    assert counts.input == len(NAMES) == counts.accepted + counts.rejected
    assert counts.rejected_by_reason == {"bad_name": 4, "duplicate_name": 1}
    assert manifest.ignored_by_reason == {"too_deep": 1}
    report = pd.read_parquet(io.BytesIO(named_day.read_bytes(f"{prefix}/rejects/rejects.parquet")))
    assert "yes/next\\x85line.wav" in set(report["path"]) and all("\x85" not in p and "\u2028" not in p for p in report["path"])
    assert "NFC" in report.set_index("reason").at["duplicate_name", "detail"]


def test_the_store_walk_survives_a_tree_deeper_than_the_recursion_limit(file_store, tmp_path):
    """The arrivals sensor and the ops page walk the store too: the walk is iterative, stops at
    its depth limit and counts what it did not enter."""
    _deep_tree(file_store.local_path("raw/deep"), DEPTH)
    file_store.write_bytes("raw/top.wav", b"x")
    walk = file_store.walk("raw")
    assert [o.key for o in walk] == ["raw/top.wav"] and walk.skipped == {"too_deep": 1}
    walk = file_store.walk("raw", max_depth=DEPTH + 2)
    assert [o.key.count("/") for o in walk] == [DEPTH + 2, 1] and not walk.skipped


# -- memory -----------------------------------------------------------------------------------------

RSS_PROBE = """
import datetime as dt, json, os, resource, sys
from twocluster.spark.io import featurizing_function, list_inputs
from twocluster.spec import default_spec_path, load_pipeline_spec
from twocluster.store.storage import ObjectStore
spec = load_pipeline_spec(default_spec_path("speech_commands"))
store = ObjectStore(sys.argv[1])
inputs, ignored, _ = list_inputs(store, spec, dt.date.fromisoformat(sys.argv[2]))
if len(sys.argv) > 3:  # the swaps between the listing and the reads
    listed = [store.local_path(k) for k, r in zip(inputs.column("key").to_pylist(), inputs.column("reject").to_pylist()) if not r]
    linked, fifo, grown = listed[:3]
    os.unlink(linked); os.symlink(sys.argv[3], linked)
    os.unlink(fifo); os.mkfifo(fifo)
    grown.write_bytes(grown.read_bytes() * 3)
reasons = {}
for batch in featurizing_function(spec, store)(iter(inputs.combine_chunks().to_batches(max_chunksize=64))):
    for r in batch.column("reason").to_pylist():
        reasons[r or "accepted"] = reasons.get(r or "accepted", 0) + 1
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "reasons": reasons, "ignored": ignored}))
"""


def test_a_hostile_day_costs_the_job_no_more_memory_than_the_same_day_without_it(file_store, speech_spec, tmp_path):
    """The listing and a task's reads over one day, in a fresh process each, with and without
    the hostile entries: at listing time a 1,200-deep tree, links to a 67 MB file and to
    /dev/zero, a Latin-1 name; between listing and reads a clip swapped for a link to the 67 MB
    file, one for a FIFO, one grown to 3x. The peak RSS stays within 1.2x of the clean day's
    (before, the swapped link alone read 67 MB, and the FIFO blocked the task). A measurement of
    memory, not of time."""
    clean_date, hostile_date = DATE, DATE + dt.timedelta(days=1)
    for date in (clean_date, hostile_date):
        sample_data.generate_day(file_store, speech_spec, date, clips=300, seed=9, bad_files=0)
    top = file_store.local_path(layout.raw_date_prefix(speech_spec.name, hostile_date))
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (67 << 20))
    _deep_tree(top / "yes" / "deep", DEPTH)
    (top / "yes" / "to_big.wav").symlink_to(big)
    (top / "yes" / "to_zero.wav").symlink_to("/dev/zero")
    clip = next(p for p in sorted((top / "no").iterdir()) if p.suffix == ".wav")
    with open(os.path.join(os.fsencode(top / "no"), b"caf\xe9.wav"), "wb") as f:
        f.write(clip.read_bytes())
    peaks = {}
    for date, swap in ((clean_date, []), (hostile_date, [str(big)])):
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, file_store.root_uri, date.isoformat(), *swap], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[date] = json.loads(out.stdout.strip().splitlines()[-1])
    clean, hostile = peaks[clean_date], peaks[hostile_date]
    assert hostile["reasons"] == {"accepted": clean["reasons"]["accepted"] - 3, "not_a_file": 2, "changed_since_listing": 1,
                                  "bad_name": 1}, hostile
    assert hostile["ignored"] == {"symlink": 2, "too_deep": 1}, hostile
    ratio = hostile["peak_rss_mb"] / clean["peak_rss_mb"]
    print(f"peak RSS: clean day {clean['peak_rss_mb']:.0f} MiB, hostile day {hostile['peak_rss_mb']:.0f} MiB ({ratio:.2f}x)")
    assert ratio <= 1.2, (clean, hostile)


@pytest.mark.s3
def test_s3_keys_with_separators_and_twin_spellings_are_rejected_not_read(s3_store, speech_spec, tmp_path):
    """S3 keys are UTF-8, so a Latin-1 name cannot arrive there, but a C1 line break, U+2028, a
    right-to-left override and NFC/NFD twins can (uploaded by any S3 client): on RGW, the same
    outcomes as on a local folder, and the listing never reads them."""
    clip = _clip(ObjectStore((tmp_path / "scratch").as_uri()), speech_spec)
    prefix = s3_store._s3_key(layout.raw_date_prefix(speech_spec.name, DATE))
    client = s3_store._s3_client
    for name in NAMES:
        if b"\xe9_latin1" not in name:
            client.put_object(Bucket=s3_store.bucket, Key=f"{prefix}/{name.decode()}", Body=clip)
    inputs, _, _ = list_inputs(s3_store, speech_spec, DATE)
    outcomes = sorted((row["path"], row["reject"] or "accepted") for row in inputs.to_pylist())
    assert outcomes == sorted([("no/caf\u00e9.wav", "accepted"), ("no/caf\u00e9.wav", "duplicate_name"),
                               ("yes/evil\\u202egnp.wav", "bad_name"), ("yes/line\\u2028separator.wav", "bad_name"),
                               ("yes/next\\x85line.wav", "bad_name"), ("yes/plain.wav", "accepted")])
    rows = _featurize(speech_spec, s3_store, inputs)
    assert sorted(rows["reason"].fillna("accepted")) == ["accepted", "accepted", "bad_name", "bad_name", "bad_name", "duplicate_name"]


def test_the_arrivals_sensor_and_the_ops_page_read_a_hostile_day(named_day, speech_spec):
    """The same day (Latin-1, C1 and U+2028 names, twins, a 1,200-level tree) stopped the
    arrivals sensor and the ops page too (``RecursionError`` in the walk)."""
    from twocluster.ops.monitoring import pipeline_overview
    from twocluster.orchestration.arrivals import arrived, decide

    named_day.write_bytes(f"{layout.raw_date_prefix(speech_spec.name, DATE)}/{layout.ARRIVED_MARKER}", b"{}")
    listed = arrived(named_day, speech_spec.name, DATE)
    assert listed.files == len(NAMES) and listed.marker
    assert decide(named_day, speech_spec, DATE).proceed
    overview = pipeline_overview(named_day, speech_spec, today=DATE, window_days=1)
    assert overview.dates[0].raw.files == len(NAMES) and overview.dates[0].raw.complete
