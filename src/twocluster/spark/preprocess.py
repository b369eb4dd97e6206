"""The Spark preprocessing job: one date's raw arrivals -> a committed, versioned dataset.

    list (driver) -> one pass per partition on the executors (mapInArrow; partitions sized to
    the target shard): fetch + featurize -> write the partition's shards where they are
    (TFRecords + Parquet per split, into staging) -> report files, rejects and counts
    -> reject-rate check -> promote -> rejects report -> manifest (driver, last)

The features never go back to the JVM and nothing is cached there: caching the featurized
DataFrame (to count, then write) ran the default 1 GB driver heap out of memory at 38,400 clips.

Object-store IO runs in Python on the executors through :mod:`twocluster.store.storage`, so the same
code path serves ``file://`` and ``s3://`` (Spark's S3A connector is not needed). The transforms
are functions of (DataFrame, spec); :func:`run_preprocess` wires them and is what the
``spark_jobs/preprocess.py`` entry point calls.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twocluster.features import Featurizer, featurizer_for
from twocluster.spark.datasource import encode_shard
from twocluster.spark.io import (
    attempt_folder,
    collect_outcomes,
    featurizing_function,
    job_fingerprint,
    list_inputs,
    map_listing,
    promote_staged,
    whole_waves,
    write_rejects,
)
from twocluster.spark.session import ARROW_BATCH_ROWS, parallelism
from twocluster.spec import PipelineSpec
from twocluster.store import arrowshard, layout, statistics
from twocluster.store.featurespec import TensorSpec, TFRecordSpec
from twocluster.store.manifest import (
    Counts,
    DataFormat,
    DatasetManifest,
    InFlight,
    Lineage,
    ManifestFile,
    commit_version,
    resolve_latest,
)
from twocluster.store.storage import ObjectStore
from twocluster.version import code_hashes, code_version

log = logging.getLogger(__name__)

DATASET_CODE = ("featurizer", "preprocess")  # the code components a dataset's fingerprint covers
# What one partition's pass reports to the driver: its files (kind tfrecord | parquet), each
# (split, label)'s accepted rows (kind "accepted"), each rejected input (kind "reject") and each
# split's feature statistics (kind "statistics": sums and histograms per channel, as JSON). Small:
# the features stay in the shards.
OUTCOME_SCHEMA = ("kind string, split string, path string, staged string, bytes long, checksum string, rows long, "
                  "label string, folder string, size long, reason string, detail string, statistics string")
_OUTCOME_FIELDS = ("kind", "split", "path", "staged", "bytes", "checksum", "rows", "label", "folder", "size", "reason", "detail",
                   "statistics")


class PreprocessError(RuntimeError):
    pass


class RejectRateExceeded(PreprocessError):
    pass


@dataclass
class PreprocessResult:
    status: str  # committed | unchanged
    pipeline: str
    date: str
    version: str
    manifest_uri: str
    counts: dict
    ignored: dict[str, int] = field(default_factory=dict)  # files that are not inputs, by reason
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# -- writing -------------------------------------------------------------------------------------


def partitions_for(rows: int, bytes_per_row: int, target_shard_mb: float, parallelism: int) -> int:
    """How many partitions to featurize ``rows`` inputs in: each writes one shard per split, of
    at most about ``target_shard_mb`` in all, in :func:`whole_waves` of the cluster's cores."""
    return whole_waves(math.ceil(rows * bytes_per_row / (target_shard_mb * 1e6)), parallelism)


def shard_writer(spec: PipelineSpec, store: ObjectStore, staging: str, feature_name: str, feature_shape: tuple[int, ...],
                 after_write=None) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function that writes one partition of featurized rows as shards and reports what it
    did (:data:`OUTCOME_SCHEMA`): each partition writes one TFRecord and one Parquet shard per
    split (``part-<partition>``), rows sorted by key, so the features are never shuffled between
    executors; rows with a ``reason`` are reported as rejects, not written.

    Each task attempt writes its files under its own folder in ``staging`` (one object-store
    PUT per file, its checksum taken from the encoded bytes in memory, never read back) and
    reports (path, staged key, bytes, checksum, rows) back; the driver promotes exactly the
    reported files. A file is written while the next one is encoded (one upload thread: the disk
    or the network works while the CPU does). ``after_write`` (tests: fault injection) is called
    in the task after each file is written."""
    tfrecord_compression, parquet_compression = spec.output.tfrecord_compression, spec.output.parquet_compression
    root_uri, s3_settings = store.root_uri, store.worker_settings
    suffix = ".tfrecord.gz" if tfrecord_compression == "GZIP" else ".tfrecord"

    def write_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        batch_list = list(batches)
        table = pa.Table.from_batches(batch_list) if batch_list else None
        if table is None or table.num_rows == 0:
            return
        outcomes: list[dict] = []
        if "reason" in table.column_names:
            rejected = pa.compute.is_valid(table["reason"])
            for row in table.filter(rejected).select(["path", "folder", "size", "reason", "detail"]).to_pylist():
                outcomes.append({"kind": "reject", **row})
            table = table.filter(pa.compute.invert(rejected))
        context = TaskContext.get()
        partition = context.partitionId() if context else 0
        worker_store = ObjectStore(root_uri, s3_settings)
        attempt = f"{staging}/{attempt_folder()}"

        def put(kind: str, split: str, rel: str, data: bytes, rows: int) -> dict:
            checksum = worker_store.write_bytes(f"{attempt}/{rel}", data)
            if after_write is not None:
                after_write(rel)
            return {"kind": kind, "split": split, "path": rel, "staged": f"{attempt}/{rel}", "bytes": len(data),
                    "checksum": checksum, "rows": rows}

        with ThreadPoolExecutor(1) as uploads:
            uploaded = _encode_and_upload(table, feature_name, feature_shape, tfrecord_compression, parquet_compression,
                                          f"part-{partition:05d}", suffix, lambda *args: uploads.submit(put, *args))
            # Every upload finishes (or raises) before the task reports anything.
            outcomes += [u.result() if isinstance(u, Future) else u for u in uploaded]
        yield pa.RecordBatch.from_pylist([{k: o.get(k) for k in _OUTCOME_FIELDS} for o in outcomes])

    return write_partition


def _encode_and_upload(table: pa.Table, feature_name: str, feature_shape: tuple[int, ...], tfrecord_compression: str,
                       parquet_compression: str, name: str, suffix: str, upload) -> list:
    """Encode each split of a partition's accepted rows as a TFRecord, a Parquet and an Arrow file, handing
    each to ``upload`` as soon as it is encoded; the uploads' futures and the per-label counts,
    in order."""
    reported: list = []
    for split in sorted(set(table["split"].to_pylist())):
        part = table.filter(pa.compute.equal(table["split"], split)).sort_by("key")
        features = part["features"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(part.num_rows, *feature_shape)
        # The TFRecord data source's encoder (twocluster.spark.datasource): the job writes its
        # shards in the same pass as the Parquet copy (featurizing is the cost; a second write
        # through df.write.format("tfrecord") would featurize again or read the features back).
        records = encode_shard(pa.table({feature_name: part["features"], "label": part["label"], "label_id": part["label_id"],
                                         "source_id": part["source_id"], "path": part["path"]}), tfrecord_compression)
        reported.append(upload("tfrecord", split, f"tfrecords/{split}/{name}{suffix}", records, part.num_rows))
        buf = io.BytesIO()
        columns = part.drop_columns([c for c in ("split", "key", "reason", "detail", "warning", "quality") if c in part.column_names])
        # No dictionary and no min/max statistics for the features: continuous floats never
        # repeat, and no reader filters on them (measured: the write 15-20% faster).
        others = [c for c in columns.column_names if c != "features"]
        pq.write_table(columns, buf, compression=parquet_compression, use_dictionary=others, write_statistics=others)
        reported.append(upload("parquet", split, f"parquet/split={split}/{name}.parquet", buf.getvalue(), part.num_rows))
        # The trainer's feed: the same rows as fixed-width float32 in an Arrow IPC file (twocluster.store.arrowshard).
        reported.append(upload("arrow", split, f"arrow/split={split}/{name}.arrow",
                               arrowshard.encode(features, part["label_id"].to_numpy(zero_copy_only=False)), part.num_rows))
        for label, rows in Counter(part["label"].to_pylist()).items():
            reported.append({"kind": "accepted", "split": split, "label": label, "rows": rows})
        # The split's feature statistics, from the array just encoded (no second pass).
        reported.append({"kind": "statistics", "split": split,
                         "statistics": statistics.partial(features, feature_name, feature_name).model_dump_json()})
        if "warning" in part.column_names:  # accepted inputs with a content problem (spec: warn)
            for reason, rows in Counter(w for w in part["warning"].to_pylist() if w).items():
                reported.append({"kind": "warning", "split": split, "reason": reason, "rows": rows})
        if "quality" in part.column_names:  # each input's quality measures, merged on the driver
            measured = [q for q in part["quality"].to_pylist() if q]
            if measured:
                reported.append({"kind": "quality", "split": split, "statistics": json.dumps(measured)})
    return reported


def version_statistics(outcomes) -> statistics.VersionStatistics | None:
    """The tasks' statistics parts merged: per split, and over the whole version."""
    parts: dict[str, list] = {}
    for o in outcomes:
        if o.kind == "statistics" and o.statistics:
            parts.setdefault(o.split, []).append(statistics.sums_from_json(o.statistics))
    if not parts:
        return None
    warnings = Counter()
    measured: list[list[float]] = []
    for o in outcomes:
        if o.kind == "warning":
            warnings[o.reason] += o.rows
        elif o.kind == "quality" and o.statistics:
            measured += json.loads(o.statistics)
    return statistics.VersionStatistics(overall=statistics.merge([p for ps in parts.values() for p in ps]),
                                        per_split={split: statistics.merge(ps) for split, ps in sorted(parts.items())},
                                        quality_warnings=dict(sorted(warnings.items())), clips=statistics.clip_quality(measured))


def written_files(outcomes) -> tuple[list[ManifestFile], dict[str, str]]:
    """The shards the :func:`shard_writer` tasks report: the manifest's files, and where each
    is staged."""
    written = [o for o in outcomes if o.kind in get_args(DataFormat)]
    files = [ManifestFile(path=r.path, bytes=r.bytes, checksum=r.checksum, rows=r.rows, kind=r.kind, split=r.split) for r in written]
    return files, {r.path: r.staged for r in written}


# -- the job -------------------------------------------------------------------------------------


def bytes_per_row(featurizer: Featurizer) -> int:
    """About what one featurized row takes in a shard (float32 features + label, ids, path)."""
    return 4 * int(np.prod(featurizer.shape)) + 128


def dataset_feature_spec(featurizer: Featurizer, spec: PipelineSpec):
    """The dataset's feature spec: the featurizer's, the label vocabulary, the TFRecord layout."""
    return featurizer.feature_spec(
        label_vocabulary=spec.labels.vocabulary,
        tfrecord=TFRecordSpec(
            compression=spec.output.tfrecord_compression,
            features={
                featurizer.feature_name: TensorSpec(dtype="float32", shape=list(featurizer.shape)),
                "label": TensorSpec(dtype="string"),
                "label_id": TensorSpec(dtype="int64"),
                "source_id": TensorSpec(dtype="string"),
                "path": TensorSpec(dtype="string"),
            },
        ),
    )


def run_preprocess(
    spark,
    spec: PipelineSpec,
    store: ObjectStore,
    date: str | dt.date,
    run_id: str,
    max_reject_rate: float | None = None,
    after_write=None,
    complete: bool = True,
) -> PreprocessResult:
    """Preprocess one date and commit the dataset; a no-op if the latest committed version was
    built from the same inputs, spec and code (and still verifies: a corrupt or incomplete latest
    version is superseded by a new one). ``after_write``: see :func:`shard_writer`. ``complete``:
    whether the arrivals were complete (see :mod:`twocluster.orchestration.arrivals`); recorded in the manifest
    and part of the fingerprint, so the rerun after the rest arrived commits a complete version."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    date = layout.check_date(date)
    max_reject_rate = spec.thresholds.max_reject_rate if max_reject_rate is None else max_reject_rate
    date_prefix = layout.dataset_date_prefix(spec.name, date)

    inputs, ignored, listed = list_inputs(store, spec, date)
    fingerprint = job_fingerprint(listed, spec.featurizer.model_dump_json(), spec.output.model_dump_json(), code=DATASET_CODE)
    if not complete:
        fingerprint += "+incomplete"
    timings["list"] = time.perf_counter() - started
    latest = resolve_latest(store, date_prefix, DatasetManifest, verify_checksums=True)
    if latest and latest.manifest.lineage.input_fingerprint == fingerprint:
        log.info("date %s: inputs, spec and code unchanged since version %s; nothing to do", date, latest.version)
        return PreprocessResult("unchanged", spec.name, date, latest.version, latest.manifest_uri,
                                latest.manifest.counts.model_dump(), ignored, time.perf_counter() - started, timings)

    version = layout.new_version_id()
    with InFlight(store, date_prefix, version, run_id):
        return _build_and_commit(spark, spec, store, date, version, run_id, inputs, ignored, fingerprint, max_reject_rate,
                                 started, timings, after_write, complete)


def _build_and_commit(spark, spec, store, date, version, run_id, inputs, ignored, fingerprint, max_reject_rate,
                      started, timings, after_write, complete=True) -> PreprocessResult:
    import pandas as pd

    date_prefix = layout.dataset_date_prefix(spec.name, date)
    version_prefix = layout.dataset_version_prefix(spec.name, date, version)
    staging = layout.staging_prefix(date_prefix, version)
    featurizer = featurizer_for(spec.featurizer)
    log.info("date %s: %d inputs (not inputs: %s; patterns %s) -> %s", date, len(inputs), ignored or "none",
             spec.inputs.patterns, store.uri(version_prefix))

    files: list[ManifestFile] = []
    staged: dict[str, str] = {}
    feature_statistics = None
    rejects = pd.DataFrame(columns=["path", "folder", "size", "reason", "detail"])
    summary: Counter[tuple[str, str]] = Counter()
    if len(inputs):
        n_partitions = partitions_for(len(inputs), bytes_per_row(featurizer), spec.output.target_shard_mb,
                                      parallelism(spark))
        featurize_batches = featurizing_function(spec, store)
        write_partition = shard_writer(spec, store, staging, featurizer.feature_name, featurizer.shape, after_write)
        t = time.perf_counter()
        # One pass: each task featurizes its partition and writes its shards into staging; only
        # file names, counts and rejects come back.
        outcomes = collect_outcomes(map_listing(spark, inputs, n_partitions,
                                                lambda batches: write_partition(featurize_batches(batches)), OUTCOME_SCHEMA,
                                                ARROW_BATCH_ROWS))
        timings["featurize"] = time.perf_counter() - t
        files, staged = written_files(outcomes)
        reject_rows = [o.asDict() for o in outcomes if o.kind == "reject"]
        if reject_rows:
            rejects = pd.DataFrame(reject_rows, columns=list(rejects.columns)).sort_values("path", ignore_index=True)
        for o in outcomes:
            if o.kind == "accepted":
                summary[(o.split, o.label)] += o.rows
        feature_statistics = version_statistics(outcomes)

    per_split: Counter[str] = Counter()
    per_label: Counter[str] = Counter()
    for (split, label), n in summary.items():
        per_split[split] += n
        per_label[label] += n
    counts = Counts(
        input=len(inputs),
        accepted=sum(summary.values()),
        rejected=len(rejects),
        per_split=dict(sorted(per_split.items())),
        per_label=dict(sorted(per_label.items())),
        rejected_by_reason=dict(sorted(Counter(rejects["reason"]).items())),
    )
    if counts.accepted + counts.rejected != counts.input:
        raise PreprocessError(f"date {date}: {counts.input} inputs but {counts.accepted} accepted and {counts.rejected} "
                              "rejected; not committing")
    reject_rate = counts.rejected / counts.input if counts.input else 0.0
    if reject_rate > max_reject_rate:
        # The shards stay in staging (never promoted; garbage collection drops them). The report
        # goes there too: it is for people, and the version never commits.
        report = f"{staging}/driver/rejects/rejects.parquet"
        write_rejects(rejects, store, report.rsplit("/rejects/", 1)[0])
        raise RejectRateExceeded(
            f"date {date}: {counts.rejected} of {counts.input} inputs rejected ({reject_rate:.1%}), above the "
            f"{max_reject_rate:.1%} allowed ({dict(counts.rejected_by_reason)}); rejects report: "
            f"{store.uri(report)}. The dataset was not committed."
        )

    if files:
        t = time.perf_counter()
        written_rows = sum(f.rows for f in files if f.kind == "tfrecord")
        if written_rows != counts.accepted:
            raise PreprocessError(f"wrote {written_rows} TFRecord rows but accepted {counts.accepted}; not committing")
        promote_staged(store, files, staged, version_prefix, staging)
        timings["write"] = time.perf_counter() - t
    if len(rejects):
        files.append(write_rejects(rejects, store, version_prefix))
    if feature_statistics is not None:
        files.append(statistics.write(feature_statistics, store, version_prefix))

    manifest = DatasetManifest(
        version=version,
        created_at=dt.datetime.now(dt.UTC),
        files=sorted(files, key=lambda f: f.path),
        counts=counts,
        feature_spec=dataset_feature_spec(featurizer, spec),
        lineage=Lineage(
            inputs=[store.uri(layout.raw_date_prefix(spec.name, date))],
            code_version=code_version(),
            code={c: code_hashes()[c] for c in (*DATASET_CODE, "package")},
            run_id=run_id,
            params={"max_reject_rate": max_reject_rate, "spec": spec.model_dump(mode="json", include={"featurizer", "splits", "output", "labels"})},
            input_fingerprint=fingerprint,
        ),
        pipeline=spec.name,
        date=date,
        ignored_files=sum(ignored.values()), ignored_by_reason=ignored, complete=complete,
        seconds={k: round(v, 3) for k, v in timings.items()},
    )
    manifest_uri = commit_version(store, date_prefix, manifest)
    seconds = time.perf_counter() - started
    log.info("date %s: committed %s (%s) in %.1fs", date, version, counts.model_dump(include={"input", "accepted", "rejected"}), seconds)
    return PreprocessResult("committed", spec.name, date, version, manifest_uri, counts.model_dump(), ignored, seconds, timings)
