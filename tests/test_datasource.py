"""Issue 36: TFRecord as a Spark 4 data source in pure Python. Round trips with TensorFlow's own
reader and writer on file:// and on RGW; task attempts killed mid-write and retried leave one copy
of each row; an aborted write leaves nothing; two writers to one folder cannot both win; corrupt
records are named (file, offset) or skipped and recorded."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from twocluster.spark.datasource import (
    COMMIT_RECORD,
    STAGING,
    TFRecordError,
    TFRecordWriter,
    encode_shard,
    iter_records,
    register,
)
from twocluster.store.tfrecord import tfrecord_file

SHAPE = (97, 40)


@pytest.fixture(scope="module")
def tf_spark(spark):
    register(spark)
    return spark


def _rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    features = rng.normal(-5, 3, (n, SHAPE[0] * SHAPE[1])).astype(np.float32)
    return pa.table({
        "log_mel": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), SHAPE[0] * SHAPE[1]).cast(pa.list_(pa.float32())),
        "label": pa.array([["yes", "no", "up"][i % 3] for i in range(n)]),
        "label_id": pa.array(np.arange(n) % 3, pa.int64()),
        "path": pa.array([f"raw/2026-11-20/{i:05d}.wav" for i in range(n)]),
    })


def _frame(spark, table: pa.Table, partitions: int = 2):
    return spark.createDataFrame(table.to_pandas(), "log_mel array<float>, label string, label_id long, path string").repartition(partitions, "path")


def _tf_read(files: list[str], compression: str) -> list[dict]:
    import tensorflow as tf

    spec = {"log_mel": tf.io.FixedLenFeature([SHAPE[0] * SHAPE[1]], tf.float32), "label": tf.io.FixedLenFeature([], tf.string),
            "label_id": tf.io.FixedLenFeature([], tf.int64), "path": tf.io.FixedLenFeature([], tf.string)}
    out = []
    for record in tf.data.TFRecordDataset(files, compression_type=compression):
        example = tf.io.parse_single_example(record, spec)
        out.append({"log_mel": example["log_mel"].numpy(), "label": example["label"].numpy().decode(),
                    "label_id": int(example["label_id"].numpy()), "path": example["path"].numpy().decode()})
    return out


def _by_path(rows: list[dict]) -> dict[str, dict]:
    found = {r["path"]: r for r in rows}
    assert len(found) == len(rows), "a row came back twice"
    return found


def _same(expected: pa.Table, rows: list[dict]) -> None:
    got = _by_path(rows)
    want = expected.to_pylist()
    assert sorted(got) == sorted(r["path"] for r in want)
    for row in want:
        back = got[row["path"]]
        assert (back["label"], back["label_id"]) == (row["label"], row["label_id"])
        np.testing.assert_array_equal(np.asarray(back["log_mel"], np.float32), np.asarray(row["log_mel"], np.float32))


@pytest.mark.parametrize("where", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_spark_writes_what_tf_data_reads_and_reads_back_what_it_wrote(tf_spark, where, tmp_path, request):
    table = _rows(300)
    if where == "s3":
        store = request.getfixturevalue("s3_store")
        endpoint = {"endpoint": store.s3_settings.endpoint_url}  # the keys: the processes' own environment
        target = store.uri("tfrecord-round-trip")
    else:
        store, endpoint = None, {}
        target = str(tmp_path / "out")
    _frame(tf_spark, table).write.format("tfrecord").mode("overwrite").option("compression", "GZIP") \
        .option("recordsPerShard", "64").options(**endpoint).save(target)

    if store is None:
        files = sorted(str(p) for p in (tmp_path / "out").glob("part-*"))
        record = json.loads((tmp_path / "out" / COMMIT_RECORD).read_text())
        assert not (tmp_path / "out" / STAGING).exists()
    else:
        prefix = "tfrecord-round-trip"
        record = json.loads(store.read_bytes(f"{prefix}/{COMMIT_RECORD}"))
        files = []
        for f in record["files"]:  # tf.data has no S3 filesystem here: read the listed files through the store
            local = tmp_path / f["name"]
            local.write_bytes(store.read_bytes(f"{prefix}/{f['name']}"))
            files.append(str(local))
        assert not store.list(f"{prefix}/{STAGING}")
    assert [f["name"] for f in record["files"]] == sorted(Path(f).name for f in files) and record["rows"] == 300
    assert all(f["rows"] <= 64 for f in record["files"]) and len(files) >= 5
    _same(table, _tf_read(files, "GZIP"))

    back = tf_spark.read.format("tfrecord").options(**endpoint).load(target)
    assert back.schema.simpleString() == "struct<label:string,label_id:bigint,log_mel:array<float>,path:string>"
    _same(table, [r.asDict() for r in back.collect()])


@pytest.mark.parametrize("where", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_spark_reads_what_tensorflow_writes(tf_spark, tmp_path, where, request):
    import tensorflow as tf

    table = _rows(120, seed=1)
    folder = tmp_path / "from-tf"
    folder.mkdir()
    for shard, rows in enumerate((table.slice(0, 70), table.slice(70))):
        with tf.io.TFRecordWriter(str(folder / f"train-{shard:05d}-of-00002"), options="ZLIB") as writer:
            for row in rows.to_pylist():
                example = tf.train.Example(features=tf.train.Features(feature={
                    "log_mel": tf.train.Feature(float_list=tf.train.FloatList(value=row["log_mel"])),
                    "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["label"].encode()])),
                    "label_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[row["label_id"]])),
                    "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["path"].encode()])),
                }))
                writer.write(example.SerializeToString())
    (folder / ".hidden").write_bytes(b"not a record")
    target, endpoint = str(folder), {}
    if where == "s3":  # TensorFlow here has no S3 filesystem: its files are uploaded as written
        store = request.getfixturevalue("s3_store")
        for path in folder.iterdir():
            store.write_bytes(f"from-tf/{path.name}", path.read_bytes())
        target, endpoint = store.uri("from-tf"), {"endpoint": store.s3_settings.endpoint_url}
    inferred = tf_spark.read.format("tfrecord").option("compression", "ZLIB").options(**endpoint).load(target)
    assert inferred.rdd.getNumPartitions() == 2  # one partition per file
    _same(table, [r.asDict() for r in inferred.collect()])
    declared = tf_spark.read.format("tfrecord").option("compression", "ZLIB").options(**endpoint) \
        .schema("path string, label_id int, log_mel array<double>, missing string").load(target)
    rows = declared.collect()
    assert {r.missing for r in rows} == {None} and {type(r.label_id) for r in rows} == {int}
    _same(table, [{**r.asDict(), "label": table["label"][int(r.path[-9:-4])].as_py()} for r in rows])


def test_the_job_and_the_source_write_the_same_bytes():
    table = _rows(40, seed=2)
    features = table["log_mel"].combine_chunks().flatten().to_numpy().reshape(40, *SHAPE)
    job = tfrecord_file({"log_mel": features, "label": table["label"].to_pylist(),
                         "label_id": table["label_id"].to_numpy().astype(np.int64), "path": table["path"].to_pylist()}, "GZIP")
    assert encode_shard(table, "GZIP") == job


def _killing_upstream(note: Path, kill: bool, fail_every_attempt: bool = False):
    def upstream(batches):
        from pyspark import TaskContext

        context = TaskContext.get()
        doomed = context.partitionId() == 1 and (fail_every_attempt or context.attemptNumber() == 0)
        for batch in batches:
            for start in range(0, batch.num_rows, 20):
                yield batch.slice(start, 20)
                if doomed and start >= 60:
                    import time

                    time.sleep(1.5)  # the writer stages the shards it has
                    note.write_text(json.dumps({"attempt": context.attemptNumber()}))
                    if kill:
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError("this partition's every attempt fails")

    return upstream


def test_a_task_killed_mid_write_and_retried_leaves_exactly_one_copy_of_each_row(tf_spark, tmp_path):
    table = _rows(400, seed=3)
    target = tmp_path / "retried"
    frame = _frame(tf_spark, table).mapInArrow(_killing_upstream(tmp_path / "killed.json", kill=True),
                                               "log_mel array<float>, label string, label_id long, path string")
    frame.write.format("tfrecord").mode("overwrite").option("recordsPerShard", "20").save(str(target))
    assert json.loads((tmp_path / "killed.json").read_text())["attempt"] == 0, "the first attempt of partition 1 was killed"
    record = json.loads((target / COMMIT_RECORD).read_text())
    assert sorted(p.name for p in target.iterdir()) == sorted([COMMIT_RECORD, *(f["name"] for f in record["files"])])
    assert record["rows"] == 400
    _same(table, _tf_read([str(target / f["name"]) for f in record["files"]], ""))


def test_an_aborted_write_leaves_nothing(tf_spark, tmp_path):
    target = tmp_path / "aborted"
    frame = _frame(tf_spark, _rows(200, seed=4)).mapInArrow(_killing_upstream(tmp_path / "failed.json", kill=False, fail_every_attempt=True),
                                                           "log_mel array<float>, label string, label_id long, path string")
    with pytest.raises(Exception, match="every attempt fails"):
        frame.write.format("tfrecord").mode("overwrite").option("recordsPerShard", "20").save(str(target))
    assert (tmp_path / "failed.json").exists()
    assert not target.exists() or not [p for p in target.rglob("*") if p.is_file()], sorted(target.rglob("*"))
    with pytest.raises(Exception, match="no TFRecord files|nothing committed"):
        tf_spark.read.format("tfrecord").load(str(target)).count()


def test_two_writers_to_one_new_folder_cannot_both_win(tmp_path):
    """Two writes (the driver's side of each, with a task's output) race for one folder: the
    create-only commit record lets exactly one publish; the other removes its files and fails."""
    schema = None
    first = TFRecordWriter(schema, {"path": str(tmp_path / "race")}, overwrite=False)
    second = TFRecordWriter(schema, {"path": str(tmp_path / "race")}, overwrite=False)
    first_message = first.write(iter(_rows(30, seed=5).to_batches()))
    second_message = second.write(iter(_rows(30, seed=6).to_batches()))
    first.commit([first_message])
    with pytest.raises(TFRecordError, match="another write committed to this folder first"):
        second.commit([second_message])
    record = json.loads((tmp_path / "race" / COMMIT_RECORD).read_text())
    assert record["write_id"] == first.write_id
    assert sorted(p.name for p in (tmp_path / "race").iterdir()) == sorted([COMMIT_RECORD, *(f["name"] for f in record["files"])])
    with pytest.raises(TFRecordError, match="already holds a committed TFRecord output"):
        TFRecordWriter(schema, {"path": str(tmp_path / "race")}, overwrite=False)


def test_a_corrupt_record_is_named_by_file_and_offset_or_skipped_and_recorded(tf_spark, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    good = encode_shard(_rows(10, seed=7), "NONE")
    fifth = [offset for offset, _ in iter_records(good, "good")][4]
    broken = bytearray(good)
    broken[fifth + 100] ^= 0xFF  # inside the fifth record's data
    (folder / "part-0.tfrecord").write_bytes(bytes(broken))
    with pytest.raises(Exception, match=rf"part-0.tfrecord: a corrupt record \(data CRC mismatch\) at byte offset {fifth}"):
        tf_spark.read.format("tfrecord").schema("path string").load(str(folder)).collect()
    bad = tmp_path / "bad-records"
    rows = tf_spark.read.format("tfrecord").schema("path string").option("corruptRecords", "skip") \
        .option("badRecordsPath", str(bad)).load(str(folder)).collect()
    assert sorted(r.path for r in rows) == [f"raw/2026-11-20/{i:05d}.wav" for i in range(4)]
    (report,) = [json.loads(line) for p in bad.glob("*.json") for line in p.read_text().splitlines()]
    assert report["offset"] == fifth and report["path"].endswith("part-0.tfrecord")


def test_a_dataset_versions_tfrecords_read_with_the_schema_of_its_manifest(tf_spark, speech_spec, file_store):
    from twocluster.spark.preprocess import run_preprocess
    from twocluster.store import layout
    from twocluster_demo import sample_data

    date = dt.date(2026, 11, 21)
    sample_data.generate_day(file_store, speech_spec, date, clips=24, seed=8, bad_files=0)
    result = run_preprocess(tf_spark, speech_spec, file_store, date, run_id="datasource", max_reject_rate=0.5)
    version = file_store.uri(layout.dataset_version_prefix(speech_spec.name, date, result.version))
    frame = tf_spark.read.format("tfrecord").option("manifest", version).load(f"{version}/tfrecords/train")
    assert [f.name for f in frame.schema.fields] == ["log_mel", "label", "label_id", "source_id", "path"]
    assert frame.schema["log_mel"].dataType.simpleString() == "array<float>"
    parquet = tf_spark.read.parquet(f"{version}/parquet/split=train")
    assert frame.count() == parquet.count() > 0
    a = {r.path: r for r in frame.collect()}
    for row in parquet.collect():
        np.testing.assert_array_equal(np.asarray(a[row.path].log_mel, np.float32), np.asarray(row.features, np.float32).ravel())
        assert a[row.path].label_id == row.label_id


def test_the_flat_parser_reads_what_the_general_one_does():
    """parse_example's one-loop path against the field-by-field parser, on every kind of value
    (and a record the flat path declines: an unpacked float list)."""
    from twocluster.spark.datasource import _parse_flat, _parse_general, parse_example
    from twocluster.store.tfrecord import _field, encode_example

    record = encode_example({"f": np.arange(5, dtype=np.float32), "i": np.array([-3, 0, 1 << 40]), "b": [b"x", b""], "s": "yes",
                             "empty": np.zeros(0, np.float32), "one": np.float32(2.5)})
    flat, general = _parse_flat(record), _parse_general(memoryview(record))
    assert flat.keys() == general.keys() == {"f", "i", "b", "s", "empty", "one"}
    for name in flat:
        assert flat[name][0] == general[name][0]
        assert [np.asarray(v).tolist() for v in flat[name][1]] == [np.asarray(v).tolist() for v in general[name][1]], name
    # Example { features { feature { key: "u" value { float_list { value: 1.0 value: 2.0 } } } } }, unpacked (wire type 5)
    unpacked_list = b"\x0d" + np.float32(1).tobytes() + b"\x0d" + np.float32(2).tobytes()
    unpacked = _field(1, _field(1, _field(1, b"u") + _field(2, _field(2, unpacked_list))))
    assert parse_example(unpacked)["u"][1].tolist() == [1.0, 2.0]
