"""What the two Spark jobs share: listing one date's raw arrivals on the driver, fetching and
featurizing them on the executors (``mapInArrow`` over the one featurizer), staging each task
attempt's files and promoting the winners', and the rejects report. The preprocessing and the
scoring job (:mod:`twocluster.spark.preprocess`, :mod:`twocluster.spark.scoring`) are built from
these; neither imports the other.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import gc
import hashlib
import io
import math
import posixpath
import unicodedata
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twocluster.features import BAD_NAME, DUPLICATE_NAME, TOO_LARGE, UNKNOWN_LABEL, Featurizer, featurizer_for
from twocluster.spark import splits
from twocluster.spec import PipelineSpec
from twocluster.store import layout
from twocluster.store.manifest import ManifestFile
from twocluster.store.storage import UNSAFE_NAME_CHARACTERS, ObjectInfo, ObjectStore, ReadRefused, StorageError, printable_name
from twocluster.version import code_hashes

if TYPE_CHECKING:  # imported where used: Spark's Python workers never need pandas (2+ s of import each)
    import pandas as pd

UNREADABLE = "unreadable"  # listed, but could not be fetched
T = TypeVar("T")
_FETCH_THREADS = 8  # remote object-store reads are IO-bound; overlap them within a task

# ``reject``: a reason decided on the driver from the listing alone ("" for none): the object is
# never read. ``size`` and ``mtime_ns`` are what the read must find (the object as
# listed: :meth:`ObjectStore.read_listed`).
LISTING_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                            ("folder", pa.string()), ("label", pa.string()), ("label_id", pa.int32()), ("source_id", pa.string()),
                            ("split", pa.string()),
                            ("reject", pa.string())])  # label: null for an unknown folder
# Why the listing alone condemned an input, as the rejects table says it.
LISTING_VERDICTS = {
    BAD_NAME: "the name holds a control, line-separator or bidirectional character, or bytes that are not UTF-8 "
              "(shown escaped)",
    DUPLICATE_NAME: "another input has the same name once both are in Unicode NFC form (one spelled NFC, one NFD); "
                    "the first in key order was read",
}
_LISTING_CHUNK_ROWS = 4096  # rows held as Python objects at a time while listing (~150 B each)


def job_fingerprint(listing_fingerprint: str, *parts: str, code: tuple[str, ...]) -> str:
    """What a job's output depends on: the listing's fingerprint, the spec sections and other
    inputs the job reads (``parts``), and the content of the code components that shape it (not
    the package version: it does not change when the code does, and it changes when unrelated
    code does)."""
    digest = hashlib.sha256(listing_fingerprint.encode())
    for part in parts:
        digest.update(b"\0" + part.encode())
    for component in code:
        digest.update(f"\0{component}={code_hashes()[component]}".encode())
    return "sha256:" + digest.hexdigest()


# -- reading -------------------------------------------------------------------------------------


@contextmanager
def driver_arrow_memory() -> Iterator[None]:
    """Arrow buffers made in this block come from the system allocator, not pyarrow's default
    pool (mimalloc, which keeps what it frees for reuse): for the driver's work on a job's
    listing, which grows with the inputs and is done once. Measured on 120,000 inputs: building
    the listing grew the driver's RSS 29.6 MiB for a 17.4 MiB table under mimalloc, 18.7 MiB
    under the system allocator; cutting it into 40 compressed task slices 55 MiB, 20 MiB. The
    default pool is process-wide: a driver runs no other Arrow work meanwhile."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


@driver_arrow_memory()
def list_inputs(store: ObjectStore, spec: PipelineSpec, date: str | dt.date) -> tuple[pa.Table, dict[str, int], str]:
    """List one date's raw inputs on the driver (one recursive listing, no data read).

    Returns (inputs: an Arrow table of :data:`LISTING_SCHEMA`, files ignored by reason, input
    fingerprint). Ignored, never read: names the spec's patterns do not match (``pattern``),
    hidden files and anything under a hidden folder (``hidden``: ``.DS_Store``, ``._clip.wav``
    resource forks, editors' temp files), the arrival marker, and symbolic links (``symlink``:
    never followed, on a local store). Each input gets its label from its parent folder (``None``
    for an unknown folder), its source id, its split, and a ``reject`` reason where the listing
    alone condemns it (``too_large``; ``bad_name``, the name then shown escaped; ``duplicate_name``,
    a second spelling of a name in another Unicode normal form). Folders deeper than the spec's
    ``max_depth`` are not entered (``too_deep``), nor folders the listing may not read
    (``unreadable_folder``).

    The listing is built in Arrow, a chunk of rows at a time, from the store's :class:`Walk` (an
    object at a time, in key order): as Python objects (a dict per row, then a pandas frame of
    strings) it cost the driver ~1 KB per input, and the driver's peak memory grew 1.5x with 4x
    the inputs (measured at 38,400 and 153,600 clips); with the store's listing held whole
    beside the Arrow rows, ~620 B; now ~200 B, about its Arrow rows' size (the growth of the
    process's peak RSS from 20,000 to 120,000 inputs: 61.6 MiB before, 20 now)."""
    prefix = layout.raw_date_prefix(spec.name, date)
    patterns = [p.lower() for p in spec.inputs.patterns]
    chunks: list[pa.Table] = []
    columns: dict[str, list] = {field.name: [] for field in LISTING_SCHEMA}
    ignored, fingerprint = Counter(), hashlib.sha256()
    vocabulary = {label: i for i, label in enumerate(spec.labels.vocabulary)}
    respelled = False  # whether any name changed in NFC form (only then can two names collide)
    walk = store.walk(prefix, max_depth=spec.inputs.max_depth)  # one object at a time: never whole in Python objects
    for obj in walk:
        rel = obj.key[len(prefix) + 1 :]
        name = posixpath.basename(rel)
        if rel == layout.ARRIVED_MARKER:
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            ignored["hidden"] += 1
            continue
        if not any(fnmatch.fnmatchcase(name.lower(), p) for p in patterns):
            ignored["pattern"] += 1
            continue
        key, reject = obj.key, ""
        if UNSAFE_NAME_CHARACTERS.search(rel):  # a name the store itself would refuse as a key: never read,
            reject = BAD_NAME  # and shown escaped wherever it goes (logs, the rejects table, the page)
            key, rel = printable_name(key), printable_name(rel)
        elif obj.size > spec.inputs.max_bytes:
            reject = TOO_LARGE
        # Identities derived from the name (label folder, speaker, split) use its NFC form: the
        # same clip uploaded from macOS (NFD names) and from Linux lands in the same split. The
        # key itself stays as listed: it is what reads the object.
        if not rel.isascii():
            normal = unicodedata.normalize("NFC", rel)
            respelled |= normal != rel
            rel = normal
        folder = posixpath.basename(posixpath.dirname(rel))
        label = spec.labels.label_for_folder(folder)
        row = {
            "key": key,
            "path": rel,
            "size": obj.size,
            "mtime_ns": obj.mtime_ns,
            "folder": folder,
            "label": label,
            "label_id": vocabulary[label] if label is not None else -1,
            "source_id": splits.source_id(rel),
            "split": splits.split_for_path(rel, spec.splits.validation_percent, spec.splits.testing_percent),
            "reject": reject,
        }
        for column, value in row.items():
            columns[column].append(value)
        fingerprint.update(f"{obj.key}\0{obj.size}\0{obj.mtime_ns}\n".encode("utf-8", "surrogateescape"))
        if len(columns["key"]) == _LISTING_CHUNK_ROWS:
            chunks.append(_listing_chunk(columns))
    chunks.append(_listing_chunk(columns))
    if walk.links:
        ignored["symlink"] = len(walk.links)
    ignored.update(walk.skipped)
    # What the listing depends on besides the files: the spec sections it reads. Each job adds
    # what its own output depends on (:func:`job_fingerprint`).
    for part in (spec.inputs, spec.labels, spec.splits):
        fingerprint.update(part.model_dump_json().encode())
    listing = pa.concat_tables(chunks)
    if respelled:
        listing = _reject_name_twins(listing)
    return listing, dict(sorted(ignored.items())), "sha256:" + fingerprint.hexdigest()


def _reject_name_twins(listing: pa.Table) -> pa.Table:
    """Reject (``duplicate_name``) every input whose NFC name an input before it in key order
    already has: ``café.wav`` uploaded from macOS (NFD) and from Linux (NFC) are two objects but
    one path, one source and one split; two rows of it would count one clip twice."""
    counts = listing.group_by("path").aggregate([("path", "count")])
    twins = set(counts.filter(pa.compute.greater(counts.column("path_count"), 1)).column("path").to_pylist())
    if not twins:
        return listing
    seen: set[str] = set()
    rejects = listing.column("reject").to_pylist()
    for i, path in enumerate(listing.column("path").to_pylist()):
        if path in twins:
            if path in seen and not rejects[i]:
                rejects[i] = DUPLICATE_NAME
            seen.add(path)
    return listing.set_column(listing.schema.get_field_index("reject"), "reject", pa.array(rejects, pa.string()))


def _listing_chunk(columns: dict[str, list]) -> pa.Table:
    """The listed rows in ``columns`` as one Arrow chunk (``columns`` emptied)."""
    chunk = pa.Table.from_arrays([pa.array(columns[f.name], f.type) for f in LISTING_SCHEMA], schema=LISTING_SCHEMA)
    for values in columns.values():
        values.clear()
    return chunk


def whole_waves(tasks: int, parallelism: int) -> int:
    """``tasks`` rounded up to whole waves of the cluster's ``parallelism`` (at least one wave):
    with 5 tasks on 2 cores the fifth runs alone while a core idles (measured: featurizing
    9,600 clips on local[2] ran at ~2,600 clips/s in 5 partitions and ~2,900 in 6)."""
    return max(1, math.ceil(tasks / parallelism)) * parallelism


def map_listing(spark, inputs: pa.Table, partitions: int, function, schema, batch_rows: int):
    """``function`` (Arrow batches in, Arrow batches out, as ``mapInArrow`` takes it) over the
    listing ``inputs`` (:func:`list_inputs`) in exactly ``partitions`` partitions, row ``i`` in
    partition ``i mod partitions`` (every shard gets every label): a DataFrame of ``schema``.

    The listing travels inside the task closure, one zstd-compressed Arrow slice per partition,
    and the tasks run over ``spark.range(partitions)``: each task decodes its own slice and hands
    it to ``function`` in Arrow batches of ``batch_rows`` rows (the job's, not a session
    setting: jobs with different batch sizes share one Spark Connect session).
    Why not ``createDataFrame(inputs).repartition(n)``: the listing then sat in the driver's JVM
    three times over (the parallelized Arrow batches, tasks of tens of MB, the shuffle's blocks),
    so the driver's heap grew with the number of inputs. Why not a Python data source (the
    previous way): planning its scan started two more Python processes on the driver and its
    read a second Python worker per task, ~10 s of a 600-clip job's ~20 s on two cores
    (measured: first use of the data source 17 s, of this 4.6 s). PySpark broadcasts a closure
    over 1 MB, so a large listing is not copied into every task."""
    table = inputs.select(LISTING_SCHEMA.names)
    rows = np.arange(table.num_rows)
    with driver_arrow_memory():
        slices = [_ipc_bytes(table.take(rows[k::partitions])) for k in range(partitions)]

    def over_slices(ids: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in ids:
            for k in batch.column(0).to_pylist():
                listed = pa.ipc.open_stream(slices[k]).read_all()
                yield from function(iter(listed.to_batches(max_chunksize=batch_rows)))

    return spark.range(0, partitions, 1, partitions).mapInArrow(over_slices, schema)


def collect_outcomes(frame) -> list:
    """The rows of a job's outcome DataFrame (file names, counts, rejects: small) on the driver,
    as ``pyspark.sql.Row`` objects, collected through Arrow. Spark's row ``collect`` buffers each
    task's result in a 1 MB chunk, twice (the rows, then the task result): on the driver's G1
    heap, with 1 MB regions, each is a "humongous" object, and at 80 tasks their churn had G1
    grow the heap (the driver JVM peaked at 433-518 MB for the same job)."""
    from pyspark.sql import Row

    return [Row(**row) for row in frame.toArrow().to_pylist()]


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def freeze_worker_heap() -> None:
    """At the start of a task's work in a Spark Python worker: freeze what the worker holds out
    of the cyclic garbage collector's walks. PySpark's daemon runs a full ``gc.collect()`` after
    every task of a reused worker, after the result is sent: over the modules and caches of a
    worker with the featurizer or ONNX Runtime (~60,000 objects) it cost 40-47 ms a task here,
    with TensorFlow imported (~490,000) 335 ms, and it took the core from whatever ran next.
    What is tracked when a task starts has survived the collection after the worker's previous
    task (modules, the featurizer, a loaded model), and ``gc.freeze()`` only moves lists, so
    calling it every task costs nothing and each collection walks only what the tasks since
    left. A model evicted from the worker's cache is handed back first (:func:`thaw_worker_heap`).
    Outside a Spark task (a driver, a test process) it does nothing."""
    if _in_spark_task():
        gc.freeze()


def thaw_worker_heap() -> None:
    """Return the frozen objects to the collector (before dropping a cached model, which holds
    reference cycles): the daemon's next collection frees it, the next task freezes again."""
    if _in_spark_task():
        gc.unfreeze()


def _in_spark_task() -> bool:
    try:
        from pyspark import TaskContext
    except ImportError:  # not a Spark image
        return False
    return TaskContext.get() is not None


@lru_cache(maxsize=4)
def worker_featurizer(featurizer_spec_json: str, kind: str) -> Featurizer:
    """One featurizer per Python worker and spec (workers are reused across tasks)."""
    from twocluster.spec import ImageFeaturizer, LogMelFeaturizer

    model = {"log_mel": LogMelFeaturizer, "image": ImageFeaturizer}[kind]
    return featurizer_for(model.model_validate_json(featurizer_spec_json))


def featurize(inputs, spec: PipelineSpec, store: ObjectStore, require_label: bool = True):
    """Add ``features`` (flattened float32), ``reason`` and ``detail`` to an inputs DataFrame.

    With ``require_label`` (preprocessing), inputs from an unknown label folder are rejected;
    scoring featurizes everything, whatever folder it arrived in.

    ``mapInArrow`` over :func:`featurizing_function`: Arrow batches in, Arrow batches out, no
    pandas in between. The featurizer is set up once per Python worker and the store client once
    per task; each batch's objects are fetched concurrently and featurized in one vectorised
    call, and the features leave as one Arrow list column over a single contiguous float32
    buffer (a pandas Series of 3,880-float arrays cost a third of the workers' time)."""
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

    schema = StructType([*inputs.schema.fields, StructField("features", ArrayType(FloatType())),
                         StructField("reason", StringType()), StructField("detail", StringType()),
                         StructField("warning", StringType()), StructField("quality", ArrayType(FloatType()))])
    return inputs.mapInArrow(featurizing_function(spec, store, require_label), schema)


def featurizing_function(spec: PipelineSpec, store: ObjectStore, require_label: bool = True):
    """The function :func:`featurize` maps over Arrow batches; its closure is what Spark ships
    to executors (the spec's sections and where the store is; never credentials)."""
    featurizer_json, kind = spec.featurizer.model_dump_json(), spec.featurizer.kind
    input_limits = spec.inputs
    # Content checks apply to labelled data (preprocessing); the silence folders may be quiet.
    quiet_folders = frozenset(spec.labels.silence_folders) if require_label else frozenset()
    root_uri, s3_settings = store.root_uri, store.worker_settings
    max_bytes = spec.inputs.max_bytes

    def featurize_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        freeze_worker_heap()
        featurizer = worker_featurizer(featurizer_json, kind)
        worker_store = ObjectStore(root_uri, s3_settings)
        row_size = int(np.prod(featurizer.shape))

        def fetch(listed: ObjectInfo) -> bytes | StorageError:
            try:  # the object as listed, or a reason: never a link followed, a FIFO waited on, or a byte past the limit
                return worker_store.read_listed(listed, max_bytes)
            except StorageError as e:
                return e

        def read_plan(batch: pa.RecordBatch) -> _ReadPlan:
            n = batch.num_rows
            prechecked = batch.column("reject").to_pylist()
            known = (np.asarray(batch.column("label").is_valid()) if require_label else np.ones(n, dtype=bool))
            # Condemned by the listing (too large, bad name): never read.
            listed_ok = np.array([r == "" for r in prechecked], dtype=bool)
            wanted = np.flatnonzero(known & listed_ok)
            keys, sizes = batch.column("key").to_pylist(), batch.column("size").to_pylist()
            mtimes = batch.column("mtime_ns").to_pylist()
            listed = [ObjectInfo(keys[i], sizes[i], mtimes[i]) for i in wanted]
            return _ReadPlan(keys, prechecked, known, listed_ok, wanted, listed)

        # A remote store's reads, 8 at a time; a local store's in turn (measured: 0.05 ms of CPU
        # per clip read in turn, 0.14-0.17 ms through 8 threads; featurizing a clip costs ~0.5 ms),
        # the kernel reading the next batch's objects while this one is featurized: where a day
        # does not fit the page cache, reads in turn stalled the task (0.12 ms a clip).
        concurrent = worker_store.remote
        with ThreadPoolExecutor(_FETCH_THREADS) if concurrent else nullcontext() as pool:
            planned = ((batch, read_plan(batch)) for batch in batches)
            for position, ((batch, plan), following) in enumerate(_each_with_the_next(planned)):
                if not concurrent:  # the task's first batch, then always the one after this
                    if position == 0:
                        worker_store.will_read(plan.to_read)
                    if following is not None:
                        worker_store.will_read(following[1].to_read)
                n = batch.num_rows
                keys, prechecked, known, listed_ok, wanted, _ = plan
                fetched = list((pool.map if concurrent else map)(fetch, plan.listed))
                blobs = [b if isinstance(b, bytes) else None for b in fetched]
                featurized = featurizer.featurize_many(blobs, [keys[i] for i in wanted], input_limits, content=require_label,
                                                       quiet_folders=quiet_folders)
                reasons: list[str | None] = [None] * n
                details = [""] * n
                for i in np.flatnonzero(known & ~listed_ok):
                    reasons[i] = prechecked[i]
                    details[i] = (f"{batch.column('size')[i].as_py()} bytes in the listing; the spec allows {max_bytes}"
                                  if reasons[i] == TOO_LARGE else LISTING_VERDICTS[reasons[i]])
                accepted_rows = []  # (row in the batch, row in the featurized batch)
                for j, i in enumerate(wanted):
                    if isinstance(fetched[j], ReadRefused):
                        reasons[i], details[i] = fetched[j].reason, fetched[j].detail
                    elif isinstance(fetched[j], StorageError):
                        reasons[i], details[i] = UNREADABLE, str(fetched[j])
                    elif featurized.reasons[j] is not None:
                        reasons[i], details[i] = featurized.reasons[j], featurized.details[j]
                    else:
                        accepted_rows.append((i, j))
                for i in np.flatnonzero(~known):
                    reasons[i] = UNKNOWN_LABEL
                    details[i] = f"folder {batch.column('folder')[i].as_py()!r} is not a keyword, an unknown word or a silence folder"
                warnings: list[str | None] = [None] * n  # an accepted input's content problem (spec: warn)
                quality: list[tuple[float, ...] | None] = [None] * n  # and its quality measures (preprocessing)
                for i, j in accepted_rows:
                    warnings[i] = featurized.warnings[j] if featurized.warnings else None
                    quality[i] = featurized.measures[j] if featurized.measures else None
                yield batch.append_column("features", _feature_lists(n, accepted_rows, featurized.features, row_size)) \
                    .append_column("reason", pa.array(reasons, pa.string())) \
                    .append_column("detail", pa.array(details, pa.string())) \
                    .append_column("warning", pa.array(warnings, pa.string())) \
                    .append_column("quality", pa.array(quality, pa.list_(pa.float32())))

    return featurize_batches


class _ReadPlan(NamedTuple):
    """What a batch of the listing reads: its keys, the listing's verdicts, and the rows to read."""

    keys: list[str]
    prechecked: list[str]
    known: np.ndarray
    listed_ok: np.ndarray
    wanted: np.ndarray
    listed: list[ObjectInfo]  # the rows to read, as listed

    @property
    def to_read(self) -> list[str]:
        return [o.key for o in self.listed]


def _each_with_the_next(items: Iterator[T]) -> Iterator[tuple[T, T | None]]:
    """Each item with the one after it (``None`` with the last): a reader can ask for the next
    batch's objects while it works on this one."""
    current = next(items, None)
    while current is not None:
        following = next(items, None)
        yield current, following
        current = following


def _feature_lists(n: int, accepted_rows: list[tuple[int, int]], features: np.ndarray, row_size: int) -> pa.ListArray:
    """An Arrow ``list<float>`` column over one contiguous buffer: each accepted row's
    features, null for the others."""
    has = np.zeros(n, dtype=bool)
    lengths = np.zeros(n, dtype=np.int32)
    order = [j for _, j in accepted_rows]
    for i, _ in accepted_rows:
        has[i], lengths[i] = True, row_size
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(features[order].reshape(-1), pa.float32())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~has))


# -- writing ---------------------------------------------------------------------------------------


def attempt_folder() -> str:
    """A unique folder name for this Spark task attempt's files (partition, attempt, random)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    where = f"p{context.partitionId():05d}-a{context.attemptNumber()}" if context else "driver"
    return f"{where}-{uuid.uuid4().hex[:8]}"


def promote_staged(store: ObjectStore, written: list[ManifestFile], staged: dict[str, str], version_prefix: str,
                   staging: str, threads: int = 16) -> None:
    """Move the winning task attempts' files from the staging area into the version folder
    (the only writer of the version folder is the driver, so a failed, lost or speculative
    attempt's files never land there), then drop the staging area. Files a zombie attempt writes
    into staging later are left to garbage collection."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda f: store.promote(staged[f.path], f"{version_prefix}/{f.path}"), written))
    store.delete_prefix(staging)
    store.remove_empty_folders(staging.rsplit("/", 1)[0])


def write_rejects(rejects: pd.DataFrame, store: ObjectStore, version_prefix: str) -> ManifestFile:
    """The rejects report: every input that could not be used, with its path and reason."""
    table = pa.Table.from_pandas(rejects[["path", "folder", "size", "reason", "detail"]].reset_index(drop=True), preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    rel = "rejects/rejects.parquet"
    data = buf.getvalue()
    checksum = store.write_bytes(f"{version_prefix}/{rel}", data)
    return ManifestFile(path=rel, bytes=len(data), checksum=checksum, rows=len(rejects), kind="rejects")
