"""TFRecord as a Spark 4 data source, in Python: ``spark.read.format("tfrecord")`` and
``df.write.format("tfrecord")``, with no JVM jar and no TensorFlow.

    from twocluster.spark.datasource import register
    register(spark)
    df = spark.read.format("tfrecord").load("s3://bucket/data/train/")            # schema inferred
    df = spark.read.format("tfrecord").schema("log_mel array<float>, label string").load(path)
    df.write.format("tfrecord").mode("overwrite").option("compression", "GZIP").save(path)

Spark 4's Python Data Source API (:mod:`pyspark.sql.datasource`) runs the reader and the writer in
Python workers and the commit on the driver. Paths are local (``/data/x``, ``file://``) or the
object store's (``s3://``), read and written through the project's store layer
(:class:`twocluster.store.storage.ObjectStore`: boto3 / pyarrow, no Hadoop S3A); executors use
their own credentials (their environment), never the driver's.

**Reading.** One partition per file; a folder is read through its commit record (``_SUCCESS``,
below) when it has one, else as every file below it whose path has no part starting with ``_`` or
``.`` (how TensorFlow's own writers leave a folder). Records are checked against their masked
CRC-32C (length and data) and decoded from ``tf.train.Example`` straight into Arrow batches.
Schema: the caller's (``.schema(...)``), a dataset manifest's feature spec (``option("manifest",
uri)``), or inferred from the first records (``inferRecords``, default 100). Options:
``compression`` (``auto`` by suffix, ``GZIP``, ``ZLIB``, ``NONE``), ``corruptRecords`` (``fail``,
the default: an error naming the file and the byte offset; ``skip``: the file's remaining
records are skipped from the first corrupt one, and each file's skipped count and first offset
is logged, and recorded in ``badRecordsPath`` when given, one JSON line per file), and
``batchRows`` (rows per Arrow batch, default 2,048).

**Writing.** Each task attempt writes its shards under ``_temporary/<write id>/`` with the
partition id and the attempt number in their folder, so retried and speculative attempts never
collide. ``commit`` (the driver, given only the successful attempts' messages) moves exactly
those shards into the folder as ``part-<partition>-<shard>-<write id>.tfrecord[.gz]`` and then
writes the folder's commit record ``_SUCCESS`` (JSON: the write id, each file with its rows,
bytes and CRC-32C) last: create-only, so of two writers to one new folder exactly one wins and
the other removes its files and fails; with ``mode("overwrite")`` the record is replaced and the
files it no longer lists are removed after it. Readers read what the record lists, so a write in
progress, a failed one, or a loser's files are never read; a folder holding an unfinished write
(``_temporary/``) and no record is refused. ``abort`` removes what the attempts wrote. Options:
``compression`` (``NONE`` by default, or ``GZIP``), ``recordsPerShard`` (0 = one shard per
task), ``encodings`` (``column:kind,...`` with kind ``float``, ``int64`` or ``bytes``: how a
column is stored when its type alone does not say, e.g. an integer column as floats).

Types: ``float``/``double`` and arrays of them ↔ ``float_list``; integers and arrays ↔
``int64_list``; ``string``/``binary`` and arrays ↔ ``bytes_list``; a null is an absent feature.
"""

from __future__ import annotations

import gzip
import json
import logging
import struct
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql.datasource import DataSource, DataSourceArrowWriter, DataSourceReader, InputPartition, WriterCommitMessage
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    DataType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from twocluster.store.storage import ObjectNotFound, ObjectStore, S3Settings, StorageError
from twocluster.store.tfrecord import encode_example, masked_crc, tfrecord_bytes, tfrecord_file

log = logging.getLogger(__name__)

SHORT_NAME = "tfrecord"
COMMIT_RECORD = "_SUCCESS"
STAGING = "_temporary"
_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")


class TFRecordError(ValueError):
    """A TFRecord file or record that cannot be read, or an option that cannot be honoured."""


def register(spark) -> None:
    """Register the source with a session under its short name, ``tfrecord``."""
    spark.dataSource.register(TFRecordDataSource)


# -- where ----------------------------------------------------------------------------------------


def _store_and_key(path: str, options: Mapping[str, str] | None = None) -> tuple[ObjectStore, str]:
    """A store rooted at the path's parent folder and the path's last part: every key the source
    touches is below the path itself. S3 settings come from the environment (``AWS_*``, as any
    S3 client's), the ``endpoint`` and ``region`` options overriding theirs; credentials never
    come from options."""
    if "://" not in path:
        path = Path(path).resolve().as_uri()
    path = path.rstrip("/")
    settings = None
    if path.startswith("s3://"):
        settings = S3Settings.from_env()
        options = options or {}
        settings = replace(settings, endpoint_url=options.get("endpoint") or settings.endpoint_url,
                           region=options.get("region") or settings.region)
    parent, _, name = path.rpartition("/")
    if parent.endswith(":/") or parent.endswith(":"):  # s3://bucket itself
        return ObjectStore(path, settings), ""
    return ObjectStore(parent, settings), name


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/"))


class _FilePartition(InputPartition):
    """One file to read (a task): where it is, and how it is compressed."""

    def __init__(self, root_uri: str, s3, key: str, compression: str):
        super().__init__(key)
        self.root_uri, self.s3, self.key, self.compression = root_uri, s3, key, compression


def _compression_of(key: str, option: str) -> str:
    option = (option or "auto").upper()
    if option == "AUTO":
        return "GZIP" if key.endswith(".gz") else "ZLIB" if key.endswith((".zlib", ".zz")) else "NONE"
    if option in ("GZIP", "ZLIB", "NONE", ""):
        return option or "NONE"
    raise TFRecordError(f"compression {option!r}: use auto, GZIP, ZLIB or NONE")


def _files(path: str, compression: str, options: Mapping[str, str] | None = None) -> list[_FilePartition]:
    """The files a read of ``path`` covers (comma-separated paths allowed), in name order."""
    found: list[_FilePartition] = []
    for one in [p.strip() for p in path.split(",") if p.strip()]:
        store, key = _store_and_key(one, options)
        s3 = store.worker_settings
        if key and store.exists(key) and not store.list(key + "/"):
            found.append(_FilePartition(store.root_uri, s3, key, _compression_of(key, compression)))
            continue
        record = _read_commit_record(store, key)
        if record is not None:
            found += [_FilePartition(store.root_uri, s3, f"{key}/{f['name']}".strip("/"), _compression_of(f["name"], compression))
                      for f in record["files"]]
            continue
        listed = store.list(key)
        base = len(key) + 1 if key else 0
        if any(o.key[base:].split("/")[0] == STAGING for o in listed):
            raise TFRecordError(f"{store.uri(key)}: holds an unfinished write ({STAGING}/) and no {COMMIT_RECORD}: "
                                "nothing committed to read")
        files = [o.key for o in listed if o.size > 0 and not _hidden(o.key[base:])]
        if not files:
            raise TFRecordError(f"{store.uri(key) if key else store.root_uri}: no TFRecord files")
        found += [_FilePartition(store.root_uri, s3, k, _compression_of(k, compression)) for k in sorted(files)]
    return found


def _read_commit_record(store: ObjectStore, folder: str) -> dict | None:
    key = f"{folder}/{COMMIT_RECORD}".strip("/")
    try:
        data = store.read_bytes(key)
    except (ObjectNotFound, FileNotFoundError, StorageError):
        return None
    try:
        record = json.loads(data)
        assert isinstance(record["files"], list)
        return record
    except (ValueError, KeyError, TypeError, AssertionError):
        return None  # an empty Hadoop-style _SUCCESS, or another writer's: read the folder


# -- records ---------------------------------------------------------------------------------------


def _decompressed(data: bytes, compression: str) -> bytes:
    if compression == "GZIP":
        return gzip.decompress(data)
    if compression == "ZLIB":
        return zlib.decompress(data)
    return data


def iter_records(data: bytes, where: str, skip_corrupt: bool = False) -> Iterator[tuple[int, bytes]]:
    """(byte offset, record) of each framed record in a decompressed TFRecord file, CRCs checked.
    A corrupt record raises :class:`TFRecordError` naming ``where`` and its offset, or, with
    ``skip_corrupt``, ends the iteration there (the framing past a bad length cannot be trusted)
    with the offset left in the iterator's return value."""
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        problem = None
        if end - offset < _HEADER.size:
            problem = "a truncated record header"
        else:
            length, length_crc = _HEADER.unpack_from(view, offset)
            if masked_crc(data[offset : offset + 8]) != length_crc:
                problem = "a corrupt record length (CRC mismatch)"
            elif offset + _HEADER.size + length + _CRC.size > end:
                problem = f"a truncated record ({length} bytes announced)"
            else:
                start = offset + _HEADER.size
                record = data[start : start + length]
                (data_crc,) = _CRC.unpack_from(view, start + length)
                if masked_crc(record) != data_crc:
                    problem = "a corrupt record (data CRC mismatch)"
        if problem is not None:
            if skip_corrupt:
                return offset
            raise TFRecordError(f"{where}: {problem} at byte offset {offset}")
        yield offset, record
        offset = start + length + _CRC.size
    return None


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message: a memoryview for length-delimited
    fields, an int for varints, 4 or 8 raw bytes for fixed ones."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 2:
            size, pos = _varint(buf, pos)
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 5:
            yield number, wire, buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            yield number, wire, buf[pos : pos + 8]
            pos += 8
        else:
            raise TFRecordError(f"unsupported protobuf wire type {wire}")


FLOATS, INT64S, BYTES = "float", "int64", "bytes"
_KINDS = {1: BYTES, 2: FLOATS, 3: INT64S}


def parse_example(record) -> dict[str, tuple[str, object]]:
    """``{name: (kind, values)}`` of a serialized ``tf.train.Example``: kind ``float`` with a
    float32 array (a view of the record's bytes), ``int64`` with an int64 array, ``bytes`` with a
    list of bytes.

    One flat loop over the three nested messages (Example > Features > map entry > Feature):
    every field on that path is length-delimited, so each step is a tag byte and a length. A
    record laid out otherwise (unpacked lists, unknown fields) takes the general path."""
    try:
        return _parse_flat(record)
    except _NotFlat:
        return _parse_general(memoryview(record))


class _NotFlat(Exception):
    pass


def _parse_flat(buf) -> dict[str, tuple[str, object]]:
    features: dict[str, tuple[str, object]] = {}
    end = len(buf)
    if not end:
        return features
    if buf[0] != 0x0A:  # Example.features (1, length-delimited)
        raise _NotFlat
    size, pos = _varint(buf, 1)
    if pos + size != end:
        raise _NotFlat
    while pos < end:
        if buf[pos] != 0x0A:  # Features.feature: a map entry
            raise _NotFlat
        size, pos = _varint(buf, pos + 1)
        entry_end = pos + size
        if buf[pos] != 0x0A:  # entry.key
            raise _NotFlat
        size, pos = _varint(buf, pos + 1)
        name = str(buf[pos : pos + size], "utf-8")
        pos += size
        if pos == entry_end:
            continue
        if buf[pos] != 0x12:  # entry.value: the Feature
            raise _NotFlat
        size, pos = _varint(buf, pos + 1)
        if pos == entry_end:  # an empty Feature
            continue
        kind = _KINDS.get(buf[pos] >> 3)
        if kind is None or buf[pos] & 7 != 2:
            raise _NotFlat
        size, pos = _varint(buf, pos + 1)
        list_end = pos + size
        if kind == BYTES:
            values = []
            while pos < list_end:
                size, pos = _varint(buf, pos + 1)
                values.append(bytes(buf[pos : pos + size]))
                pos += size
        elif pos == list_end:
            values = np.zeros(0, np.float32 if kind == FLOATS else np.int64)
        elif buf[pos] != 0x0A:
            raise _NotFlat  # an unpacked list
        else:
            size, pos = _varint(buf, pos + 1)
            if kind == FLOATS:
                values = np.frombuffer(buf, "<f4", size // 4, pos)
            else:
                stop, found = pos + size, []
                while pos < stop:
                    value, pos = _varint(buf, pos)
                    found.append(value)
                values = _int64s(found)
        features[name] = (kind, values)
        pos = entry_end
    return features


def _parse_general(record: memoryview) -> dict[str, tuple[str, object]]:
    features: dict[str, tuple[str, object]] = {}
    for number, _, features_msg in _fields(record):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(features_msg):
            if entry_number != 1:
                continue
            name, feature = "", None
            for n, _, value in _fields(entry):
                if n == 1:
                    name = bytes(value).decode()
                elif n == 2:
                    feature = value
            if feature is None:
                continue
            for kind_number, _, values_msg in _fields(feature):
                kind = _KINDS.get(kind_number)
                if kind is not None:
                    features[name] = (kind, _list_values(kind, values_msg))
    return features


def _list_values(kind: str, message: memoryview):
    if kind == BYTES:
        return [bytes(v) for n, _, v in _fields(message) if n == 1]
    if kind == FLOATS:
        chunks = []
        for n, _, v in _fields(message):
            if n == 1:
                chunks.append(bytes(v))  # packed (wire 2) or one fixed32 (wire 5): little-endian floats either way
        return np.frombuffer(b"".join(chunks), "<f4") if chunks else np.zeros(0, np.float32)
    values: list[int] = []
    for n, wire, v in _fields(message):
        if n != 1:
            continue
        if wire == 2:
            pos = 0
            while pos < len(v):
                value, pos = _varint(v, pos)
                values.append(value)
        else:
            values.append(v)
    return _int64s(values)


def _int64s(varints: list[int]) -> np.ndarray:
    """Decoded varints as int64: a negative int64 is its 64-bit two's complement on the wire."""
    return np.array(varints, np.uint64).view(np.int64)


# -- schema ---------------------------------------------------------------------------------------

_ELEMENT = {FLOATS: FloatType(), INT64S: LongType()}


def infer_schema(examples: list[dict[str, tuple[str, object]]]) -> StructType:
    """A schema for the sampled examples: a feature with exactly one value in every sample is a
    scalar, otherwise an array; bytes are strings when they all decode as UTF-8."""
    kinds: dict[str, str] = {}
    multi: dict[str, bool] = {}
    text: dict[str, bool] = {}
    for example in examples:
        for name, (kind, values) in example.items():
            if kinds.setdefault(name, kind) != kind:
                raise TFRecordError(f"feature {name!r} is a {kinds[name]} list in one record and a {kind} list in another")
            multi[name] = multi.get(name, False) or len(values) != 1
            if kind == BYTES:
                text[name] = text.get(name, True) and all(_is_utf8(v) for v in values)
    fields = []
    for name in sorted(kinds):
        kind = kinds[name]
        element = (StringType() if text[name] else BinaryType()) if kind == BYTES else _ELEMENT[kind]
        fields.append(StructField(name, ArrayType(element) if multi[name] else element))
    return StructType(fields)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
        return True
    except UnicodeDecodeError:
        return False


def schema_from_manifest(uri: str, options: Mapping[str, str] | None = None) -> StructType:
    """The schema a dataset version's TFRecords have, from its manifest's feature spec
    (``uri``: the version folder or its manifest)."""
    from twocluster.store.layout import MANIFEST_NAME
    from twocluster.store.manifest import read_manifest

    folder = uri[: -len(MANIFEST_NAME)].rstrip("/") if uri.endswith(MANIFEST_NAME) else uri.rstrip("/")
    store, key = _store_and_key(folder, options)
    manifest = read_manifest(store, key)
    tfrecord = manifest.feature_spec.tfrecord
    if tfrecord is None:
        raise TFRecordError(f"{uri}: this dataset version has no TFRecords")
    element = {"float32": FloatType(), "int64": LongType(), "string": StringType()}
    return StructType([StructField(name, ArrayType(element[t.dtype]) if t.shape else element[t.dtype])
                       for name, t in tfrecord.features.items()])


# -- Arrow batches ---------------------------------------------------------------------------------


def _arrow_type(data_type: DataType) -> pa.DataType:
    from pyspark.sql.pandas.types import to_arrow_type

    return to_arrow_type(data_type)


def _column(name: str, data_type: DataType, rows: list[dict], where: str) -> pa.Array:
    """One Arrow column of ``data_type`` from the parsed examples (absent features are null)."""
    arrow_type = _arrow_type(data_type)
    is_array = isinstance(data_type, ArrayType)
    element = data_type.elementType if is_array else data_type
    if isinstance(element, (StringType, BinaryType)):
        wanted = BYTES
    elif isinstance(element, (FloatType, DoubleType)):
        wanted = FLOATS
    elif isinstance(element, (LongType, IntegerType)):
        wanted = INT64S
    else:
        raise TFRecordError(f"column {name!r}: {data_type.simpleString()} cannot be read from a tf.train.Example")
    values = []
    for i, row in enumerate(rows):
        found = row.get(name)
        if found is None:
            values.append(None)
            continue
        kind, data = found
        if kind != wanted:
            raise TFRecordError(f"{where}: record {i} of the batch: feature {name!r} is a {kind} list, "
                                f"the schema says {data_type.simpleString()}")
        values.append(data)
    if wanted == FLOATS and is_array and all(v is not None for v in values):
        lengths = np.fromiter((len(v) for v in values), np.int64, len(values))
        offsets = np.zeros(len(values) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(values) if values else np.zeros(0, np.float32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(arrow_type.value_type.to_pandas_dtype(), copy=False)))
    out = []
    for v in values:
        if v is None:
            out.append(None)
        elif is_array:
            out.append([x.decode() for x in v] if isinstance(element, StringType) else list(v) if wanted == BYTES else v.tolist())
        else:
            if len(v) != 1:
                raise TFRecordError(f"{where}: feature {name!r} has {len(v)} values where the schema says one "
                                    f"({data_type.simpleString()}; declare it an array)")
            first = v[0]
            out.append(first.decode() if isinstance(element, StringType) else first if wanted == BYTES else first.item())
    return pa.array(out, type=arrow_type)


class TFRecordReader(DataSourceReader):
    def __init__(self, schema: StructType, options: dict[str, str]):
        self.schema = schema
        self.path = options["path"]
        self.compression = options.get("compression", "auto")
        self.skip_corrupt = options.get("corruptrecords", "fail").lower() == "skip"
        if options.get("corruptrecords", "fail").lower() not in ("fail", "skip"):
            raise TFRecordError(f"corruptRecords {options['corruptRecords']!r}: use fail or skip")
        self.bad_records_path = options.get("badrecordspath")
        self.batch_rows = int(options.get("batchrows", 2048))
        self.options = {k: v for k, v in options.items() if k in ("endpoint", "region")}

    def partitions(self) -> list[_FilePartition]:
        return _files(self.path, self.compression, self.options)

    def read(self, partition: _FilePartition) -> Iterator[pa.RecordBatch]:
        store = ObjectStore(partition.root_uri, partition.s3)
        where = store.uri(partition.key)
        data = _decompressed(store.read_bytes(partition.key), partition.compression)
        arrow_schema = pa.schema([pa.field(f.name, _arrow_type(f.dataType)) for f in self.schema.fields])
        rows: list[dict] = []
        records = iter_records(data, where, self.skip_corrupt)
        skipped_at = None
        while True:
            try:
                _, record = next(records)
            except StopIteration as stop:
                skipped_at = stop.value
                break
            rows.append(parse_example(record))
            if len(rows) >= self.batch_rows:
                yield self._batch(rows, arrow_schema, where)
                rows = []
        if rows:
            yield self._batch(rows, arrow_schema, where)
        if skipped_at is not None:
            self._report_corrupt(store, partition, where, skipped_at, len(data))

    def _batch(self, rows: list[dict], arrow_schema: pa.Schema, where: str) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays([_column(f.name, f.dataType, rows, where) for f in self.schema.fields], schema=arrow_schema)

    def _report_corrupt(self, store: ObjectStore, partition: _FilePartition, where: str, offset: int, size: int) -> None:
        """The skipped tail of a file: logged, and recorded under ``badRecordsPath`` when given."""
        log.warning("%s: skipped the records from byte offset %d (a corrupt record; %d bytes unread)", where, offset, size - offset)
        if not self.bad_records_path:
            return
        from pyspark import TaskContext

        context = TaskContext.get()
        attempt = f"p{context.partitionId():05d}-a{context.attemptNumber()}" if context else "driver"
        bad_store, bad_key = _store_and_key(self.bad_records_path, self.options)
        line = json.dumps({"path": where, "offset": offset, "unread_bytes": size - offset, "reason": "corrupt record"})
        bad_store.write_bytes(f"{bad_key}/{attempt}-{uuid.uuid4().hex[:8]}.json".strip("/"), (line + "\n").encode())


# -- writing --------------------------------------------------------------------------------------


@dataclass
class TFRecordCommitMessage(WriterCommitMessage):
    partition: int
    attempt: int
    files: list[dict] = field(default_factory=list)  # staged key, final name, rows, bytes, crc32c


def _encodings(option: str | None) -> dict[str, str]:
    found = {}
    for item in [i.strip() for i in (option or "").split(",") if i.strip()]:
        name, _, kind = item.partition(":")
        if kind not in (FLOATS, INT64S, BYTES):
            raise TFRecordError(f"encodings {item!r}: use column:float, column:int64 or column:bytes")
        found[name.strip()] = kind
    return found


def _feature_columns(batch: pa.Table, encodings: dict[str, str]) -> dict[str, object]:
    """Each column as what :func:`tfrecord_file` encodes: a 2-D float array for fixed-length float
    lists (its fast path), arrays or lists per row otherwise."""
    columns = {}
    for name in batch.column_names:
        column = batch[name].combine_chunks()
        kind = encodings.get(name)
        value_type = column.type.value_type if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
            or pa.types.is_fixed_size_list(column.type) else column.type
        if kind is None:
            kind = FLOATS if pa.types.is_floating(value_type) else INT64S if (pa.types.is_integer(value_type) or pa.types.is_boolean(value_type)) \
                else BYTES if (pa.types.is_string(value_type) or pa.types.is_binary(value_type) or pa.types.is_large_string(value_type)) else None
            if kind is None:
                raise TFRecordError(f"column {name!r}: {column.type} has no tf.train.Feature encoding (set encodings)")
        if value_type != column.type:  # a list column
            lengths = column.value_lengths().to_numpy(zero_copy_only=False)
            values = column.flatten()
            if kind == FLOATS and len(lengths) and (lengths == lengths[0]).all():
                columns[name] = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), int(lengths[0]))
                continue
            columns[name] = [(np.asarray(v, np.float32) if kind == FLOATS else np.asarray(v, np.int64) if kind == INT64S
                              else [x if isinstance(x, bytes) else str(x).encode() for x in v]) for v in column.to_pylist()]
        elif kind == FLOATS:
            columns[name] = [np.float32(v) for v in column.to_pylist()]
        elif kind == INT64S:
            columns[name] = [np.int64(v) for v in column.to_pylist()]
        else:
            columns[name] = [v if isinstance(v, bytes) else str(v).encode() for v in column.to_pylist()]
    return columns


def encode_shard(batch: pa.Table, compression: str, encodings: dict[str, str] | None = None) -> bytes:
    """A TFRecord file of one ``tf.train.Example`` per row; a null is an absent feature. Byte for
    byte what :func:`twocluster.store.tfrecord.tfrecord_file` writes for the same columns."""
    columns = _feature_columns(batch, encodings or {})
    if not any(batch[name].null_count for name in batch.column_names):
        return tfrecord_file(columns, compression)
    valid = {name: batch[name].is_valid().to_pylist() for name in columns}
    return tfrecord_bytes((encode_example({name: column[i] for name, column in columns.items() if valid[name][i]})
                           for i in range(batch.num_rows)), compression)


class TFRecordWriter(DataSourceArrowWriter):
    def __init__(self, schema: StructType, options: dict[str, str], overwrite: bool):
        self.path = options["path"]
        self.overwrite = overwrite
        self.compression = options.get("compression", "NONE").upper()
        if self.compression not in ("NONE", "GZIP"):
            raise TFRecordError(f"compression {self.compression!r}: the writer writes NONE or GZIP")
        self.records_per_shard = int(options.get("recordspershard", 0))
        self.encodings = _encodings(options.get("encodings"))
        self.write_id = uuid.uuid4().hex
        self.options = {k: v for k, v in options.items() if k in ("endpoint", "region")}
        store, key = _store_and_key(self.path, self.options)
        self.root_uri, self.s3, self.key = store.root_uri, store.worker_settings, key
        if not overwrite and _read_commit_record(store, key) is not None:
            raise TFRecordError(f"{store.uri(key)}: already holds a committed TFRecord output; write with mode('overwrite') "
                                "or to another path")

    @property
    def suffix(self) -> str:
        return ".tfrecord.gz" if self.compression == "GZIP" else ".tfrecord"

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.key, *parts) if p)

    def write(self, iterator: Iterator[pa.RecordBatch]) -> TFRecordCommitMessage:
        from pyspark import TaskContext

        context = TaskContext.get()
        partition, attempt = (context.partitionId(), context.attemptNumber()) if context else (0, 0)
        store = ObjectStore(self.root_uri, self.s3)
        staging = self._key(STAGING, self.write_id, f"p{partition:05d}-a{attempt}-{uuid.uuid4().hex[:8]}")
        message = TFRecordCommitMessage(partition, attempt)
        pending: list[pa.RecordBatch] = []
        pending_rows = 0

        def flush() -> None:
            nonlocal pending, pending_rows
            if not pending_rows:
                return
            table = pa.Table.from_batches(pending)
            data = encode_shard(table, self.compression, self.encodings)
            name = f"part-{partition:05d}-{len(message.files):03d}-{self.write_id[:12]}{self.suffix}"
            staged = f"{staging}/{name}"
            checksum = store.write_bytes(staged, data)
            message.files.append({"staged": staged, "name": name, "rows": table.num_rows, "bytes": len(data), "checksum": checksum})
            pending, pending_rows = [], 0

        for batch in iterator:
            if self.records_per_shard:
                start = 0
                while start < batch.num_rows:
                    take = min(self.records_per_shard - pending_rows, batch.num_rows - start)
                    pending.append(batch.slice(start, take))
                    pending_rows += take
                    start += take
                    if pending_rows >= self.records_per_shard:
                        flush()
            else:
                pending.append(batch)
                pending_rows += batch.num_rows
        flush()
        return message

    def commit(self, messages: list[TFRecordCommitMessage | None]) -> None:
        store = _store_and_key(self.path, self.options)[0]  # the driver's own credentials
        files = sorted((f for m in messages if m is not None for f in m.files), key=lambda f: f["name"])
        for f in files:
            store.promote(f["staged"], self._key(f["name"]))
        record = json.dumps({"writer": "twocluster.spark.datasource", "write_id": self.write_id,
                             "committed_at": datetime.now(UTC).isoformat(), "rows": sum(f["rows"] for f in files),
                             "files": [{k: f[k] for k in ("name", "rows", "bytes", "checksum")} for f in files]},
                            indent=1).encode()
        record_key = self._key(COMMIT_RECORD)
        if self.overwrite:
            store.write_bytes(record_key, record)
            listed = {f["name"] for f in files}
            base = len(self.key) + 1 if self.key else 0
            for old in store.list(self.key):
                relative = old.key[base:]
                if not _hidden(relative) and relative not in listed:
                    store.delete(old.key)
        elif not store.put_if_absent(record_key, record):
            for f in files:
                store.delete(self._key(f["name"]))
            self._remove_staging(store)
            raise TFRecordError(f"{store.uri(self.key)}: another write committed to this folder first; nothing of this "
                                "write was published")
        self._remove_staging(store)
        log.info("committed %d TFRecord files (%d rows) to %s", len(files), sum(f["rows"] for f in files), store.uri(self.key))

    def abort(self, messages: list[TFRecordCommitMessage | None]) -> None:
        store = _store_and_key(self.path, self.options)[0]
        record = _read_commit_record(store, self.key)
        mine = record is not None and record.get("write_id") == self.write_id
        if not mine:  # a commit that failed half-way: its promoted files go too
            for m in messages:
                for f in (m.files if m is not None else []):
                    store.delete(self._key(f["name"]))
        self._remove_staging(store)

    def _remove_staging(self, store: ObjectStore) -> None:
        store.delete_prefix(self._key(STAGING, self.write_id))
        store.remove_empty_folders(self._key(STAGING))


def _lower(options) -> dict[str, str]:
    """Spark hands options over case-insensitively (lower-cased keys); so are they read here."""
    return {k.lower(): v for k, v in options.items()}


# -- the source ------------------------------------------------------------------------------------


class TFRecordDataSource(DataSource):
    """``format("tfrecord")``: see the module's documentation for the options."""

    @classmethod
    def name(cls) -> str:
        return SHORT_NAME

    def schema(self) -> StructType:
        if "path" not in self.options:
            raise TFRecordError("no path: use .load(path) / .save(path) or option('path', ...)")
        if self.options.get("manifest"):
            return schema_from_manifest(self.options["manifest"], self.options)
        wanted = int(self.options.get("inferrecords", 100))
        examples: list[dict] = []
        for partition in _files(self.options["path"], self.options.get("compression", "auto"), self.options):
            store = ObjectStore(partition.root_uri, partition.s3)
            data = _decompressed(store.read_bytes(partition.key), partition.compression)
            for _, record in iter_records(data, store.uri(partition.key), skip_corrupt=True):
                examples.append(parse_example(record))
                if len(examples) >= wanted:
                    return infer_schema(examples)
        if not examples:
            raise TFRecordError(f"{self.options['path']}: no records to infer a schema from; give one with .schema(...)")
        return infer_schema(examples)

    def reader(self, schema: StructType) -> TFRecordReader:
        return TFRecordReader(schema, _lower(self.options))

    def writer(self, schema: StructType, overwrite: bool) -> TFRecordWriter:
        return TFRecordWriter(schema, _lower(self.options), overwrite)
