from __future__ import annotations

import datetime as dt
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import cached_share, cached_within, evicted_from_page_cache

from twocluster.spark.preprocess import RejectRateExceeded, partitions_for, run_preprocess
from twocluster.store import layout
from twocluster.store.manifest import DatasetManifest, read_manifest, scan_location, unlisted_files, verify_files
from twocluster.store.storage import ObjectStore
from twocluster_demo import sample_data

ROOT = Path(__file__).resolve().parents[1]
DATE = dt.date(2026, 11, 18)
BAD_EXPECTED = {  # the generator's broken arrivals and the reason each must get
    "empty": "empty",
    "truncated": "truncated",
    "notaudio": "undecodable",
    "imageinaudio": "not_audio",
    "unknownlabel": "unknown_label",
    "toolong": "too_long",
}


def list_committed_versions(store: ObjectStore, location: str) -> list[str]:
    return [v.version for v in scan_location(store, location).versions]


def _arrive(store: ObjectStore, spec, date=DATE, clips=90, bad=6) -> None:
    sample_data.generate_day(store, spec, date, clips=clips, seed=11, bad_files=bad)


@pytest.fixture(scope="module")
def committed(spark, speech_spec, tmp_path_factory):
    """One date with good clips and one of each broken arrival, preprocessed once."""
    store = ObjectStore((tmp_path_factory.mktemp("pre") / "store").as_uri())
    _arrive(store, speech_spec)
    result = run_preprocess(spark, speech_spec, store, DATE, run_id="test-run", max_reject_rate=0.2)
    prefix = layout.dataset_version_prefix(speech_spec.name, DATE, result.version)
    return store, result, prefix, read_manifest(store, prefix)


def test_counts_reconcile_and_every_bad_input_is_rejected_with_its_reason(committed):
    store, result, prefix, manifest = committed
    c = manifest.counts
    assert result.status == "committed"
    assert c.input == 96 and c.accepted == 90 and c.rejected == 6
    assert sum(c.per_split.values()) == c.accepted == sum(c.per_label.values())
    rejects = pq.read_table(io.BytesIO(store.read_bytes(f"{prefix}/rejects/rejects.parquet"))).to_pylist()
    got = {r["path"].split("/")[-1].split("_")[0][5:]: r["reason"] for r in rejects}
    assert got == BAD_EXPECTED
    assert len(set(got.values())) == 6, "each kind of bad input gets its own reason"
    assert all(r["detail"] for r in rejects)
    assert c.rejected_by_reason == {reason: 1 for reason in BAD_EXPECTED.values()}
    verify_files(store, prefix, manifest)


def test_tfrecords_read_back_with_tf_data(committed, speech_spec):
    import tensorflow as tf

    store, _, prefix, manifest = committed
    shape = manifest.feature_spec.tfrecord.features["log_mel"].shape
    assert shape == [97, 40]
    parse_spec = manifest.feature_spec.tfrecord.parse_spec(["log_mel", "label", "label_id", "source_id"])
    vocabulary = manifest.feature_spec.label_vocabulary
    seen: dict[str, int] = {}
    for f in manifest.tfrecord_files():
        split = f.split
        assert f.path.split("/")[1] == split
        path = store.local_path(f"{prefix}/{f.path}")
        n = 0
        for record in tf.data.TFRecordDataset([str(path)], compression_type=manifest.feature_spec.tfrecord.compression_type):
            ex = tf.io.parse_single_example(record, parse_spec)
            assert ex["log_mel"].shape == tuple(shape)
            assert np.isfinite(ex["log_mel"].numpy()).all()
            assert vocabulary[int(ex["label_id"])] == ex["label"].numpy().decode()
            n += 1
        assert n == f.rows
        seen[split] = seen.get(split, 0) + n
    assert seen == manifest.counts.per_split


def test_parquet_holds_the_same_rows_and_prunes_by_split(committed):
    store, _, prefix, manifest = committed
    root = store.local_path(f"{prefix}/parquet")
    table = pq.read_table(root)  # hive partitioning restores the split column
    assert table.num_rows == manifest.counts.accepted
    assert {"path", "label", "label_id", "source_id", "features", "split"} <= set(table.column_names)
    test_only = pq.read_table(root, filters=[("split", "=", "test")])
    assert test_only.num_rows == manifest.counts.per_split.get("test", 0)
    # Speaker-disjoint: no source id in two splits.
    rows = table.select(["source_id", "split"]).to_pylist()
    splits_of: dict[str, set] = {}
    for r in rows:
        splits_of.setdefault(r["source_id"], set()).add(str(r["split"]))
    assert all(len(s) == 1 for s in splits_of.values())


def test_manifest_records_feature_spec_and_lineage(committed, speech_spec):
    _, result, _, manifest = committed
    assert isinstance(manifest, DatasetManifest)
    assert manifest.feature_spec.features["log_mel"].model_dump() == {"dtype": "float32", "shape": [97, 40]}
    assert manifest.feature_spec.params["sample_rate"] == 16000
    assert manifest.feature_spec.label_vocabulary == speech_spec.labels.vocabulary
    assert manifest.feature_spec.featurizer_code == manifest.lineage.code["featurizer"]
    assert set(manifest.lineage.code) == {"featurizer", "preprocess", "package"}
    assert manifest.lineage.run_id == "test-run"
    assert manifest.lineage.inputs[0].endswith("raw/speech_commands/date=2026-11-18")
    assert manifest.lineage.input_fingerprint.startswith("sha256:")
    assert manifest.ignored_files == 0 and manifest.ignored_by_reason == {}  # the _ARRIVED.json marker is not a file to ignore
    assert {"list", "featurize", "write"} <= set(manifest.seconds)


def test_the_version_describes_its_features_per_split_from_the_write_pass(committed):
    """Issue 35: statistics.json beside the manifest (listed and checksummed by it), per mel bin:
    count, mean, std, min, max, NaN/inf and a fixed-edge histogram, overall and per split,
    computed by the tasks as they wrote the shards and merged on the driver."""
    from twocluster.store.statistics import STATISTICS_FILE, VersionStatistics

    store, _, prefix, manifest = committed
    (listed,) = [f for f in manifest.files if f.path == STATISTICS_FILE]
    assert listed.kind is None, "readers that predate the file skip it"
    stats = VersionStatistics.model_validate_json(store.read_bytes(f"{prefix}/{STATISTICS_FILE}"))
    assert stats.overall.feature == "log_mel" and len(stats.overall.channels) == 40
    assert stats.overall.rows == manifest.counts.accepted
    assert {s: st.rows for s, st in stats.per_split.items()} == manifest.counts.per_split
    # The features as the trainer reads them back: the same means.
    from twocluster.store.statistics import SAMPLE_EVERY

    train = np.concatenate([np.stack(pq.read_table(io.BytesIO(store.read_bytes(f"{prefix}/{f.path}")))["features"]
                                     .to_numpy(zero_copy_only=False)).reshape(-1, 97, 40)[:, ::SAMPLE_EVERY].reshape(-1, 40)
                            for f in manifest.files if f.kind == "parquet" and f.split == "train"])
    assert np.allclose([c.mean for c in stats.per_split["train"].channels], train.mean(axis=0), atol=1e-3)
    assert all(c.nan == 0 and c.inf == 0 and sum(c.histogram) == c.count for c in stats.overall.channels)
    # Each accepted clip's quality, summarised: loudness, peak, clipping, DC offset, silence.
    loudness = stats.clips["rms_dbfs"]
    assert loudness.count == manifest.counts.accepted and -50 < loudness.p05 <= loudness.p50 <= loudness.p95 < 0
    assert set(stats.clips) == {"rms_dbfs", "peak", "clipped_share", "dc_offset", "silence_share"}


def test_the_version_folder_holds_exactly_the_manifests_files(committed):
    store, _, prefix, manifest = committed
    assert unlisted_files(store, prefix, manifest) == []
    date_prefix = prefix.rsplit("/", 1)[0]
    assert store.list(f"{date_prefix}/_staging") == [] and store.list(f"{date_prefix}/_inflight") == []


def test_rerun_with_unchanged_inputs_is_a_no_op_and_new_arrivals_make_a_new_version(committed, spark, speech_spec):
    store, first, _, _ = committed
    again = run_preprocess(spark, speech_spec, store, DATE, run_id="rerun", max_reject_rate=0.2)
    assert again.status == "unchanged" and again.version == first.version
    parent = layout.dataset_date_prefix(speech_spec.name, DATE)
    assert list_committed_versions(store, parent) == [first.version]

    late = layout.raw_date_prefix(speech_spec.name, DATE) + "/yes/late0000_nohash_0.wav"
    store.write_bytes(late, store.read_bytes(layout.raw_date_prefix(speech_spec.name, DATE) + "/" + _first_good_clip(store, speech_spec)))
    newer = run_preprocess(spark, speech_spec, store, DATE, run_id="late-arrival", max_reject_rate=0.2)
    assert newer.status == "committed" and newer.version != first.version
    assert newer.counts["input"] == first.counts["input"] + 1
    assert list_committed_versions(store, parent) == [first.version, newer.version]


def _first_good_clip(store, spec) -> str:
    prefix = layout.raw_date_prefix(spec.name, DATE)
    return next(o.key[len(prefix) + 1 :] for o in store.list(prefix + "/yes") if "bad" not in o.key)


def test_too_many_rejects_fails_after_writing_the_report_and_commits_nothing(spark, speech_spec, file_store):
    _arrive(file_store, speech_spec, clips=20, bad=6)  # 6 of 26 rejected: 23%
    with pytest.raises(RejectRateExceeded, match=r"6 of 26 inputs rejected \(23.1%\), above the 5.0% allowed.*rejects report: file://"):
        run_preprocess(spark, speech_spec, file_store, DATE, run_id="strict")
    parent = layout.dataset_date_prefix(speech_spec.name, DATE)
    assert list_committed_versions(file_store, parent) == []
    reports = file_store.list(parent, suffixes=("rejects.parquet",))
    assert len(reports) == 1 and "/_staging/" in reports[0].key  # for people; never inside a version folder
    assert pq.read_table(file_store.local_path(reports[0].key)).num_rows == 6


def test_features_make_one_pass_and_are_never_cached_in_the_jvm(spark, speech_spec, file_store, monkeypatch):
    """Caching the featurized DataFrame (to count it, then write it) ran the default 1 GB driver
    heap out of memory in Spark's columnar cache builder at 38,400 clips (bench scale figure):
    the job featurizes and writes in one pass and asks the JVM to hold nothing."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("run_preprocess cached a DataFrame in the JVM")

    frame_class = type(spark.range(1))  # PySpark 4's classic DataFrame, not the pyspark.sql.DataFrame interface
    monkeypatch.setattr(frame_class, "persist", refuse)
    monkeypatch.setattr(frame_class, "cache", refuse)
    # The listing is not parallelized by the driver JVM either (map_listing says why).
    monkeypatch.setattr(type(spark), "createDataFrame", refuse)
    _arrive(file_store, speech_spec, clips=24, bad=6)
    result = run_preprocess(spark, speech_spec, file_store, DATE, run_id="one-pass", max_reject_rate=0.5)
    assert (result.counts["input"], result.counts["accepted"], result.counts["rejected"]) == (30, 24, 6)
    assert spark.sparkContext._jsc.getPersistentRDDs().isEmpty()


def test_a_reused_python_worker_keeps_its_modules_and_featurizer_out_of_the_per_task_collection(spark, speech_spec, file_store):
    """PySpark's daemon runs a full ``gc.collect()`` after every task of a reused Python worker,
    after the result is sent: over the worker's modules and featurizer (~60,000 objects) it cost
    40-47 ms a task here, with TensorFlow imported ~490,000 objects and 335 ms, and took the core
    from whatever ran next. Each task now starts by freezing what survived the last collection:
    from a worker's second task on, the collection after a task walks only what it left, and
    the frozen set does not grow task after task (nothing a task drops is kept)."""
    import gc
    import os

    import pyarrow as pa

    from twocluster.spark.io import featurizing_function, list_inputs, map_listing

    # A featurizer no worker of the session has set up yet (workers outlive tests).
    spec = speech_spec.model_copy(update={"featurizer": speech_spec.featurizer.model_copy(update={"log_offset": 1.25e-6})})
    _arrive(file_store, spec, clips=48, bad=0)
    inputs, _, _ = list_inputs(file_store, spec, DATE)
    featurize_batches = featurizing_function(spec, file_store)

    def featurize_then_collect(batches):
        from pyspark import TaskContext

        accepted = sum(batch.column("reason").null_count for batch in featurize_batches(batches))
        gc.collect()  # as the daemon does once the task is done
        yield pa.RecordBatch.from_pydict({"task": [TaskContext.get().partitionId()], "pid": [os.getpid()], "accepted": [accepted],
                                          "frozen": [gc.get_freeze_count()], "tracked": [len(gc.get_objects())]})

    rows = map_listing(spark, inputs, 12, featurize_then_collect, "task long, pid long, accepted long, frozen long, tracked long", 4).collect()
    assert sum(r.accepted for r in rows) == 48
    by_worker: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: r.task):
        by_worker.setdefault(r.pid, []).append(r)
    for tasks in by_worker.values():
        if len(tasks) < 3:
            continue  # a worker that ran one or two of the tasks (Spark places them as cores free up)
        later = tasks[1:]  # the first task of the new featurizer set it up: the next froze it
        assert all(t.frozen > 4 * t.tracked for t in later), tasks  # before: nothing frozen, ~60,000 walked
        assert max(t.frozen for t in later) - min(t.frozen for t in later) < 2000, tasks


def test_while_a_task_featurizes_a_batch_the_kernel_reads_the_next_batch_and_no_further(speech_spec, file_store):
    """A local store's clips are read in turn. Where a day did not fit the page cache (the 4x
    scale figure: 259,200 clips, 8 GB, read again by scoring after preprocessing wrote its
    shards), each read waited on the disk: 0.12 ms a clip against ~0.5 ms of featurizing, and
    the scoring job took 4.7x the time of a quarter of the data. While a task featurizes a batch
    the kernel now reads the next batch's clips, and only those: a day is never pulled into
    memory at once."""
    from twocluster.spark.io import featurizing_function, list_inputs

    _arrive(file_store, speech_spec, clips=48, bad=0)
    inputs, _, _ = list_inputs(file_store, speech_spec, DATE)
    batches = inputs.combine_chunks().to_batches(max_chunksize=16)
    clips = [[file_store.local_path(key) for key in batch.column("key").to_pylist()] for batch in batches]
    assert [len(c) for c in clips] == [16, 16, 16]
    if not evicted_from_page_cache([p for batch in clips for p in batch]):
        pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to read ahead")

    featurized = featurizing_function(speech_spec, file_store)(iter(batches))
    assert next(featurized).column("reason").null_count == 16
    assert cached_within(clips[1])  # before: read only when its batch came, from the disk
    assert max(cached_share(p) for p in clips[2]) == 0.0
    assert next(featurized).column("reason").null_count == 16
    assert cached_within(clips[2])
    assert next(featurized).column("reason").null_count == 16
    assert next(featurized, None) is None


def test_the_listing_reaches_spark_in_its_partitions_without_a_shuffle(spark):
    """map_listing: exactly the partitions asked for, row i in partition i mod n (each shard
    mixes the listing's labels), in batches of Spark's Arrow batch size, nulls kept, no shuffle
    in the plan, and one Python stage (a Python data source added planner processes and a
    second Python worker per task)."""
    import pyarrow as pa
    from pyspark import TaskContext

    from twocluster.spark.io import LISTING_SCHEMA, map_listing

    inputs = pa.Table.from_pylist([{"key": f"k{i:02d}", "path": f"{'yes' if i % 2 else 'no'}/c{i}.wav", "size": 100 + i,
                                    "folder": "yes" if i % 2 else "no", "label": None if i == 7 else ("yes" if i % 2 else "no"),
                                    "label_id": -1 if i == 7 else i % 2, "source_id": f"s{i}", "split": "train", "reject": ""}
                                   for i in range(11)], schema=LISTING_SCHEMA)

    def tag(batches):
        for batch in batches:
            n = batch.num_rows
            yield pa.RecordBatch.from_arrays(
                [batch.column("key"), batch.column("size"), batch.column("label"), pa.array([TaskContext.get().partitionId()] * n, pa.int32()),
                 pa.array([n] * n, pa.int32())], names=["key", "size", "label", "partition", "batch_rows"])

    listed = map_listing(spark, inputs, 3, tag, "key string, size long, label string, partition int, batch_rows int", batch_rows=2)
    assert listed.rdd.getNumPartitions() == 3
    plan = listed._jdf.queryExecution().executedPlan().toString()
    assert "Exchange" not in plan and plan.count("MapInArrow") == 1 and "BatchScan" not in plan, plan
    rows = listed.collect()
    assert sorted(r.key for r in rows) == inputs["key"].to_pylist()
    for r in rows:
        i = int(r.key[1:])
        assert r.partition == i % 3 and r.size == 100 + i and r.batch_rows <= 2
    assert {r.partition for r in rows if r.label == "yes"} == {0, 1, 2}
    assert [r.label for r in rows if r.key == "k07"] == [None]


def test_the_listing_is_an_arrow_table_built_a_chunk_at_a_time(speech_spec, file_store, monkeypatch):
    """list_inputs holds a bounded number of rows as Python objects (a dict per row, then a
    pandas frame of strings cost the driver ~1 KB per input, and its peak memory grew 1.5x with
    4x the inputs): the listing comes back as Arrow, the same rows whatever the chunk size."""
    import pyarrow as pa

    from twocluster.spark import io

    _arrive(file_store, speech_spec, clips=20, bad=6)
    file_store.write_bytes(f"{layout.raw_date_prefix(speech_spec.name, DATE)}/yes/.DS_Store", b"\0")
    whole, ignored, fingerprint = io.list_inputs(file_store, speech_spec, DATE)
    monkeypatch.setattr(io, "_LISTING_CHUNK_ROWS", 3)
    chunked, ignored_chunked, fingerprint_chunked = io.list_inputs(file_store, speech_spec, DATE)
    assert isinstance(whole, pa.Table) and whole.schema == io.LISTING_SCHEMA and whole.num_rows == 26
    assert chunked.num_rows == 26 and len(chunked["key"].chunks) == 9  # 8 chunks of 3, the last of 2
    assert chunked.to_pylist() == whole.to_pylist()
    assert (ignored_chunked, fingerprint_chunked) == (ignored, fingerprint) and ignored == {"hidden": 1}
    assert whole["key"].to_pylist() == sorted(whole["key"].to_pylist())
    unknown = [r for r in whole.to_pylist() if r["label"] is None]
    assert len(unknown) == 1 and unknown[0]["label_id"] == -1 and unknown[0]["folder"] not in speech_spec.labels.vocabulary


def test_listing_a_date_never_holds_its_whole_listing_as_python_objects(spark, speech_spec, file_store):
    """list_inputs takes the store's listing an object at a time (``ObjectStore.walk``, a
    folder read when the walk reaches it) into its Arrow chunks: the Python heap's peak while
    listing grows by well under 100 bytes an input from 4,000 to 24,000 inputs. Holding the
    store's listing whole (its ObjectInfo and key strings) costs ~320 bytes an input; it did,
    beside the Arrow rows, until 2026-12-02."""
    import tracemalloc

    import pyarrow as pa

    from twocluster.spark import io

    folders = speech_spec.labels.vocabulary[:12]

    def arrive(date: dt.date, inputs: int) -> None:
        root = file_store.local_path(layout.raw_date_prefix(speech_spec.name, date))
        for folder in folders:
            (root / folder).mkdir(parents=True)
        for i in range(inputs):
            (root / folders[i % len(folders)] / f"{i:08x}_nohash_{i % 5}.wav").write_bytes(b"x")

    sizes = {DATE: 4_000, DATE + dt.timedelta(days=1): 24_000}
    for date, inputs in sizes.items():
        arrive(date, inputs)
    arrive(DATE - dt.timedelta(days=1), 10)
    io.list_inputs(file_store, speech_spec, DATE - dt.timedelta(days=1))  # imports and caches: not the listing's
    peaks = []
    for date, inputs in sizes.items():
        tracemalloc.start()
        try:
            listing, _, _ = io.list_inputs(file_store, speech_spec, date)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert listing.num_rows == inputs
    per_input = (peaks[1] - peaks[0]) / (24_000 - 4_000)
    assert per_input < 100, f"the listing's Python peak grew {per_input:.0f} bytes an input ({peaks})"

    # Its Arrow buffers, and the tasks' slices of it, come from the system allocator: pyarrow's
    # default pool (mimalloc) keeps what it frees, and the driver grew ~2x the listing's bytes.
    del listing
    default_pool, system_pool = pa.default_memory_pool(), pa.system_memory_pool()
    in_default, in_system = default_pool.bytes_allocated(), system_pool.bytes_allocated()
    listing, _, _ = io.list_inputs(file_store, speech_spec, DATE + dt.timedelta(days=1))
    io.map_listing(spark, listing, 8, lambda batches: batches, "id long", 64)
    assert default_pool.bytes_allocated() == in_default and pa.default_memory_pool().backend_name == default_pool.backend_name
    assert system_pool.bytes_allocated() - in_system >= listing.nbytes


@pytest.mark.parametrize(("rows", "parallelism", "expected"), [
    (0, 2, 2), (10, 2, 2),  # never fewer than the cores
    (9_600, 2, 6),  # 4.7 shards of 32 MB: six, three whole waves on two cores, not five
    (9_600, 8, 8), (100_000, 8, 56),  # 48.9 shards -> 7 waves of 8
])
def test_partitions_come_in_whole_waves_of_the_cores_and_shards_stay_under_the_target(rows, parallelism, expected):
    n = partitions_for(rows, 15_648, 32, parallelism)
    assert n == expected and n % parallelism == 0
    assert rows * 15_648 / n <= 32e6


def test_an_empty_date_commits_an_empty_dataset(spark, speech_spec, file_store):
    result = run_preprocess(spark, speech_spec, file_store, "2026-01-01", run_id="empty")
    assert result.status == "committed"
    assert result.counts["input"] == 0 and result.counts["accepted"] == 0
    manifest = read_manifest(file_store, layout.dataset_version_prefix(speech_spec.name, "2026-01-01", result.version))
    assert manifest.files == []


@pytest.mark.s3
def test_runs_against_the_s3_store(spark, speech_spec, s3_store):
    _arrive(s3_store, speech_spec, clips=40, bad=6)
    result = run_preprocess(spark, speech_spec, s3_store, DATE, run_id="s3", max_reject_rate=0.2)
    assert result.manifest_uri.startswith("s3://")
    prefix = layout.dataset_version_prefix(speech_spec.name, DATE, result.version)
    manifest = read_manifest(s3_store, prefix)
    assert (manifest.counts.input, manifest.counts.accepted, manifest.counts.rejected) == (46, 40, 6)
    verify_files(s3_store, prefix, manifest)
    assert unlisted_files(s3_store, prefix, manifest) == []


def _spark_submit_env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYSPARK_PYTHON": sys.executable}


def test_entry_point_help():
    out = subprocess.run([sys.executable, str(ROOT / "spark_jobs" / "preprocess.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--date" in out.stdout and "--store" in out.stdout


def _check_committed_versions(store: ObjectStore, parent: str) -> list[str]:
    """Every committed version verifies, and reading its folders gives exactly the manifest's rows."""
    versions = list_committed_versions(store, parent)
    for version in versions:
        prefix = f"{parent}/v={version}"
        manifest = read_manifest(store, prefix)
        verify_files(store, prefix, manifest)
        assert unlisted_files(store, prefix, manifest) == []
        if manifest.counts.accepted:
            assert pq.read_table(store.local_path(f"{prefix}/parquet")).num_rows == manifest.counts.accepted
    return versions


@pytest.mark.slow
def test_kills_at_random_moments_never_leave_a_partial_version(speech_spec, file_store):
    """spark-submit for real, SIGKILLed (the whole process group: driver JVM and Python workers)
    six times; after each kill no partial version is visible and every committed one reads back as
    its manifest says. Then a rerun commits and the next is a no-op. (Six, not more: each is a
    spark-submit of ~20 s; the kill moments alternate between the two kinds below.)

    Each attempt gets one more arrival, so every run has work to do. Kill moments are random: on
    even attempts a delay after the start, on odd ones a delay after the job's first data file
    appears (so some kills land mid-write however slow the machine is)."""
    import random

    _arrive(file_store, speech_spec, clips=60, bad=1)
    cmd = [
        "spark-submit", "--master", "local[2]", str(ROOT / "spark_jobs" / "preprocess.py"),
        "--spec", str(ROOT / "pipelines" / "speech_commands.yaml"), "--date", DATE.isoformat(),
        "--store", file_store.root_uri,
    ]
    parent = layout.dataset_date_prefix(speech_spec.name, DATE)
    raw = layout.raw_date_prefix(speech_spec.name, DATE)
    good = _first_good_clip(file_store, speech_spec)

    def data_files() -> set[str]:
        return {o.key for o in file_store.list(parent) if "/_staging/" in o.key or "/v=" in o.key}

    rng = random.Random(12)
    moments, mid_write = [], 0
    for attempt in range(6):
        file_store.write_bytes(f"{raw}/yes/late{attempt:04d}_nohash_0.wav", file_store.read_bytes(f"{raw}/{good}"))
        before = data_files()
        proc = subprocess.Popen(cmd, env=_spark_submit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            if attempt % 2 == 0:
                delay = rng.uniform(1.0, 20.0)
                proc.wait(timeout=delay)
                moments.append(f"finished before {delay:.1f}s")
            else:
                deadline = time.monotonic() + 300
                while not (data_files() - before) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                delay = rng.uniform(0.0, 2.0)
                proc.wait(timeout=delay)
                moments.append(f"finished within {delay:.1f}s of its first write")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            moments.append(f"killed after {delay:.1f}s" + (" past its first write" if attempt % 2 else ""))
            mid_write += bool(data_files() - before)
        _check_committed_versions(file_store, parent)
    assert mid_write >= 1, f"no kill landed after the job had written data: {moments}"

    rerun = subprocess.run(cmd, env=_spark_submit_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    versions = _check_committed_versions(file_store, parent)
    assert versions and read_manifest(file_store, f"{parent}/v={versions[-1]}").counts.input == 67
    again = subprocess.run(cmd, env=_spark_submit_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and '"status": "unchanged"' in again.stdout, again.stdout[-2000:]
    assert _check_committed_versions(file_store, parent) == versions


def _read_parquet_folder(store: ObjectStore, folder: str):
    if store.local_path() is not None:
        return pq.read_table(store.local_path(folder))
    return pq.read_table(store._path(folder), filesystem=store.fs)


def test_a_failed_first_task_attempt_leaves_no_stray_shards(spark, speech_spec, store, tmp_path):
    """Defect 3: every write task's first attempt fails right after its first file; Spark retries
    it. The version folder holds exactly the manifest's files, and reading the folder with
    pyarrow (and Spark) gives exactly the manifest's rows, no duplicates."""
    _arrive(store, speech_spec, clips=80, bad=0)
    failed = tmp_path / "failed-attempts"
    failed.mkdir()
    failed_dir = str(failed)

    def fail_first_attempt(rel: str) -> None:
        from pyspark import TaskContext

        context = TaskContext.get()
        if context.attemptNumber() == 0:
            Path(failed_dir, f"partition-{context.partitionId()}").write_text(rel)
            raise RuntimeError(f"injected: the first attempt dies after writing {rel}")

    result = run_preprocess(spark, speech_spec, store, DATE, run_id="flaky", max_reject_rate=0.2, after_write=fail_first_attempt)
    assert len(list(failed.iterdir())) >= 1, "no first attempt failed"
    prefix = layout.dataset_version_prefix(speech_spec.name, DATE, result.version)
    manifest = read_manifest(store, prefix)
    assert unlisted_files(store, prefix, manifest) == []
    verify_files(store, prefix, manifest)
    table = _read_parquet_folder(store, f"{prefix}/parquet")
    assert table.num_rows == manifest.counts.accepted == 80
    assert len(set(table["path"].to_pylist())) == 80
    if store.local_path() is not None:  # Spark reads s3:// only through S3A, which is not installed here
        assert spark.read.parquet(str(store.local_path(f"{prefix}/parquet"))).count() == 80
    tfrecord_rows = sum(f.rows for f in manifest.tfrecord_files())
    assert tfrecord_rows == 80


def test_a_featurizer_change_reprocesses_and_an_unrelated_change_does_not(spark, speech_spec, file_store, monkeypatch):
    """Defect 4: the dataset fingerprint covers the content of the code that shapes it."""
    import twocluster.spark.io as spark_io

    _arrive(file_store, speech_spec, clips=30, bad=0)
    first = run_preprocess(spark, speech_spec, file_store, DATE, run_id="code-1")
    real = spark_io.code_hashes()
    monkeypatch.setattr(spark_io, "code_hashes", lambda: {**real, "trainer": "sha256:" + "a" * 64, "scoring": "sha256:" + "b" * 64})
    assert run_preprocess(spark, speech_spec, file_store, DATE, run_id="code-2").status == "unchanged"
    monkeypatch.setattr(spark_io, "code_hashes", lambda: {**real, "featurizer": "sha256:" + "c" * 64})
    changed = run_preprocess(spark, speech_spec, file_store, DATE, run_id="code-3")
    assert changed.status == "committed" and changed.version != first.version


def test_content_warnings_are_counted_in_the_versions_statistics(spark, speech_spec, file_store):
    """Issue 35: with inputs.content.action = warn, a silent or clipped keyword clip is accepted
    and counted under its reason in statistics.json (the manifest's counts are unchanged)."""
    import soundfile as sf

    from twocluster.store.statistics import STATISTICS_FILE, VersionStatistics

    spec = speech_spec.model_copy(update={"inputs": speech_spec.inputs.model_copy(
        update={"content": speech_spec.inputs.content.model_copy(update={"action": "warn"})})})
    date = dt.date(2026, 11, 21)
    sample_data.generate_day(file_store, spec, date, clips=40, seed=13, bad_files=0)
    prefix = layout.raw_date_prefix(spec.name, date)
    t = np.arange(16000) / 16000
    for rel, x in (("yes/silent_nohash_0.wav", np.zeros(16000)), ("no/silent_nohash_1.wav", np.zeros(16000)),
                   ("go/clipped_nohash_0.wav", np.clip(4 * np.sin(2 * np.pi * 300 * t), -1, 1))):
        buf = io.BytesIO()
        sf.write(buf, x, 16000, subtype="PCM_16", format="WAV")
        file_store.write_bytes(f"{prefix}/{rel}", buf.getvalue())
    result = run_preprocess(spark, spec, file_store, date, run_id="warn", max_reject_rate=0.5)
    version_prefix = layout.dataset_version_prefix(spec.name, date, result.version)
    manifest = read_manifest(file_store, version_prefix)
    assert manifest.counts.rejected == 0 and manifest.counts.accepted == manifest.counts.input
    stats = VersionStatistics.model_validate_json(file_store.read_bytes(f"{version_prefix}/{STATISTICS_FILE}"))
    assert stats.quality_warnings == {"clipped": 1, "silent": 2}
    assert stats.clips["silence_share"].max == 1.0 and stats.clips["rms_dbfs"].min == -120.0  # the digital silence, accepted


def test_the_arrow_copy_holds_the_parquet_copys_rows_in_order_bit_for_bit(committed):
    """Issue 37: the trainer's feed (twocluster.store.arrowshard) is the same rows as the other
    copies, in the same order, with the same float32 features, and its shards are memory-mapped
    views: nothing is decoded to read them."""
    from twocluster.store import arrowshard

    store, _, prefix, manifest = committed
    arrow_files, parquet_files = manifest.data_files("arrow"), manifest.data_files("parquet")
    assert len(arrow_files) == len(parquet_files) and sum(f.rows for f in arrow_files) == manifest.counts.accepted
    for arrow_file, parquet_file in zip(sorted(arrow_files, key=lambda f: f.path), sorted(parquet_files, key=lambda f: f.path), strict=True):
        assert arrow_file.split == parquet_file.split and arrow_file.rows == parquet_file.rows
        table = pq.read_table(io.BytesIO(store.read_bytes(f"{prefix}/{parquet_file.path}")))
        parts = arrowshard.open_shard(store.local_path(f"{prefix}/{arrow_file.path}"), [97, 40])
        features = np.concatenate([x for x, _ in parts])
        assert not parts[0][0].flags.owndata and not parts[0][0].flags.writeable  # a view of the mapped file
        expected = np.stack(table["features"].to_numpy(zero_copy_only=False)).astype(np.float32).reshape(-1, 97, 40)
        assert features.tobytes() == expected.tobytes()
        assert np.concatenate([y for _, y in parts]).tolist() == table["label_id"].to_pylist()


def test_an_arrow_shard_that_is_not_the_feed_is_refused_by_name(tmp_path):
    from twocluster.store import arrowshard

    wrong = tmp_path / "wrong.arrow"
    wrong.write_bytes(arrowshard.encode(np.zeros((3, 5, 4), np.float32), np.arange(3)))
    with pytest.raises(arrowshard.ArrowShardError, match=r"wrong\.arrow: expected features: fixed_size_list<float>\[3880\]"):
        arrowshard.open_shard(wrong, [97, 40])
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"PAR1 not arrow")
    with pytest.raises(arrowshard.ArrowShardError, match=r"garbage\.arrow: not an Arrow IPC shard"):
        arrowshard.open_shard(garbage, [97, 40])
