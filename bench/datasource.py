"""The TFRecord data source (issue 36) against what it replaces, on the same rows, same run:

* write: ``df.write.format("tfrecord")`` vs the job's in-pass writer (a ``mapInArrow`` task that
  encodes its partition with ``tfrecord_file``, stages it with ``store.write_bytes``, and the driver
  promotes the staged files), both reading the same Parquet rows in Spark (local[2]);
* read: ``spark.read.format("tfrecord")`` decoding every column on two cores vs one tf.data reader
  (``TFRecordDataset`` → ``batch`` → ``parse_example``) in one process; the read's ceiling is
  Spark's own (JVM, vectorized) Parquet reader running the same query over the same rows.

    .venv/bin/python bench/datasource.py [--rows 4800] [--read-rows 19200]
"""

from __future__ import annotations

import argparse
import os
import statistics as st
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHAPE = (97, 40)
FILES = 8


def make_rows(folder: Path, rows: int) -> tuple[Path, Path]:
    """The same rows as Parquet (the writers' input) and as TFRecords (the readers'), in
    :data:`FILES` files each."""
    from twocluster.spark.datasource import encode_shard

    parquet, tfrecords = folder / "parquet", folder / "tfrecords"
    parquet.mkdir(parents=True, exist_ok=True)
    tfrecords.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_file = rows // FILES
    for i in range(FILES):
        features = rng.normal(-5, 3, (per_file, SHAPE[0] * SHAPE[1])).astype(np.float32)
        table = pa.table({
            "log_mel": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), SHAPE[0] * SHAPE[1]).cast(pa.list_(pa.float32())),
            "label": pa.array([["yes", "no", "up", "down"][j % 4] for j in range(per_file)]),
            "label_id": pa.array(np.arange(per_file) % 4, pa.int64()),
            "path": pa.array([f"raw/2026-11-20/{i:02d}-{j:05d}.wav" for j in range(per_file)]),
        })
        pq.write_table(table, parquet / f"part-{i}.parquet", compression="NONE")
        (tfrecords / f"part-{i}.tfrecord").write_bytes(encode_shard(table, "NONE"))
    return parquet, tfrecords


def job_writer(root_uri: str, staging: str):
    """The job's writer before the source (the TFRecord half of ``shard_writer``): encode the
    partition with ``tfrecord_file`` and stage it; the driver promotes what the tasks report."""
    from twocluster.store.storage import ObjectStore
    from twocluster.store.tfrecord import tfrecord_file

    def write(batches):
        from pyspark import TaskContext

        table = pa.Table.from_batches(list(batches))
        if table.num_rows == 0:
            return
        features = table["log_mel"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, *SHAPE)
        data = tfrecord_file({"log_mel": features, "label": table["label"].to_pylist(),
                              "label_id": table["label_id"].to_numpy(zero_copy_only=False).astype(np.int64),
                              "path": table["path"].to_pylist()}, "NONE")
        context = TaskContext.get()
        key = f"{staging}/p{context.partitionId():05d}-a{context.attemptNumber()}/part-{context.partitionId():05d}.tfrecord"
        ObjectStore(root_uri).write_bytes(key, data)
        yield pa.RecordBatch.from_pylist([{"staged": key, "rows": table.num_rows}])

    return write


def write_cost(spark, parquet: Path, out: Path, runs: int) -> tuple[list[float], list[float]]:
    """(seconds of the job's writer, seconds of the source's write), runs interleaved."""
    from twocluster.store.storage import ObjectStore

    store = ObjectStore(out.as_uri())
    frame = spark.read.parquet(str(parquet)).repartition(FILES)

    def job() -> float:
        run = uuid.uuid4().hex[:8]
        os.sync()
        started = time.perf_counter()
        staged = frame.mapInArrow(job_writer(store.root_uri, f"job-{run}/_staging"), "staged string, rows long").collect()
        for row in staged:
            store.promote(row.staged, f"job-{run}/{row.staged.rsplit('/', 1)[-1]}")
        store.delete_prefix(f"job-{run}/_staging")
        return time.perf_counter() - started

    def source() -> float:
        run = uuid.uuid4().hex[:8]
        os.sync()
        started = time.perf_counter()
        frame.write.format("tfrecord").mode("overwrite").save(str(out / f"source-{run}"))
        return time.perf_counter() - started

    job(), source()  # warm-up: workers, imports
    jobs, sources = [], []
    for _ in range(runs):
        jobs.append(job())
        sources.append(source())
    return jobs, sources


def read_cost(spark, tfrecords: Path, parquet: Path, runs: int) -> tuple[list[float], list[float]]:
    """(seconds for Spark to read and decode every row and column of the TFRecord files, seconds
    for Spark's built-in Parquet reader to run the same query over the same rows), interleaved."""
    from pyspark.sql import functions as F

    def query(frame) -> float:
        started = time.perf_counter()
        frame.agg(F.sum(F.size("log_mel")), F.count("label"), F.sum("label_id"), F.count("path")).collect()
        return time.perf_counter() - started

    def source() -> float:
        return query(spark.read.format("tfrecord").schema("log_mel array<float>, label string, label_id long, path string")
                     .load(str(tfrecords)))

    def native() -> float:
        return query(spark.read.parquet(str(parquet)))

    # A vectorized batch holds its rows' every float: Spark's 4,096 rows are 64 MB of log-mel a
    # task, which ran the full bench's long-lived driver out of heap (2026-12-07); 1,024 rows
    # is half what the TFRecord source hands Spark in an Arrow batch (its batchRows, 2,048).
    batch_rows = spark.conf.get("spark.sql.parquet.columnarReaderBatchSize")
    spark.conf.set("spark.sql.parquet.columnarReaderBatchSize", "1024")
    try:
        source(), native()
        sources, natives = [], []
        for _ in range(runs):
            sources.append(source())
            natives.append(native())
    finally:
        spark.conf.set("spark.sql.parquet.columnarReaderBatchSize", batch_rows)
    return sources, natives


TF_READER = """
import sys, time
import tensorflow as tf
files, runs = sys.argv[1].split(","), int(sys.argv[2])
spec = {"log_mel": tf.io.FixedLenFeature([WIDTH], tf.float32), "label": tf.io.FixedLenFeature([], tf.string),
        "label_id": tf.io.FixedLenFeature([], tf.int64), "path": tf.io.FixedLenFeature([], tf.string)}
def once():
    started = time.perf_counter()
    rows = 0
    for batch in tf.data.TFRecordDataset(files).batch(256).map(lambda r: tf.io.parse_example(r, spec)):
        rows += int(batch["label_id"].shape[0])
    return time.perf_counter() - started
once()
print(" ".join(str(once()) for _ in range(runs)))
""".replace("WIDTH", str(SHAPE[0] * SHAPE[1]))


def tf_read_cost(tfrecords: Path, runs: int) -> list[float]:
    """Seconds for one tf.data reader (one process, batched parsing) to read the same files."""
    files = ",".join(str(p) for p in sorted(tfrecords.glob("part-*")))
    out = subprocess.run([sys.executable, "-c", TF_READER, files, str(runs)], capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4800)
    parser.add_argument("--read-rows", type=int, default=19200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import tempfile

    from twocluster.spark.datasource import register
    from twocluster.spark.session import get_spark

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers run this venv
    with tempfile.TemporaryDirectory(prefix="bench-datasource-") as tmp:
        parquet, tfrecords = make_rows(Path(tmp) / "write", args.rows)
        read_parquet, read_tfrecords = make_rows(Path(tmp) / "read", args.read_rows)
        spark = get_spark("bench-datasource", master="local[2]")
        register(spark)
        jobs, sources = write_cost(spark, parquet, Path(tmp) / "out", args.runs)
        reads, natives = read_cost(spark, read_tfrecords, read_parquet, args.runs)
        spark.stop()
        tf_reads = tf_read_cost(read_tfrecords, args.runs)
    j, s, r, n, t = map(st.median, (jobs, sources, reads, natives, tf_reads))
    print(f"write {args.rows} rows: job's writer {j:.2f} s, source {s:.2f} s ({j / s:.2f}x)")
    print(f"read {args.read_rows} rows: source on 2 cores {r:.2f} s, Spark's Parquet reader {n:.2f} s, "
          f"one tf.data reader {t:.2f} s ({t / r:.2f}x; Parquet {t / n:.2f}x)")


if __name__ == "__main__":
    main()
