"""TFRecord files of ``tf.train.Example`` written without TensorFlow.

Spark's Python workers should not import TensorFlow (seconds of start-up and hundreds of MB per
worker, only to serialise a protobuf), and the ``tfrecord`` PyPI package's protos clash with
TensorFlow's in one process. An Example is a small, stable protobuf, so it is encoded here
directly in the protobuf wire format; the framing is TFRecord's (length, masked CRC-32C of the
length, data, masked CRC-32C of the data). The tests read the files back with
``tf.data.TFRecordDataset`` and ``tf.io.parse_single_example``.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Iterable, Mapping, Sequence

import google_crc32c
import numpy as np

FeatureValue = bytes | str | int | float | np.ndarray | list


_SHORT_VARINTS = [bytes([v]) if v < 0x80 else bytes([v & 0x7F | 0x80, v >> 7]) for v in range(1 << 14)]


def _varint(value: int) -> bytes:
    if 0 <= value < 1 << 14:  # tags, lengths of names and paths: one table lookup
        return _SHORT_VARINTS[value]
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 values are encoded as 10-byte two's complement
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value: FeatureValue) -> bytes:
    # Feature { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    if isinstance(value, (bytes, str)):
        data = value.encode() if isinstance(value, str) else value
        return _field(1, _field(1, data))
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (bytes, str)):
        return _field(1, b"".join(_field(1, v.encode() if isinstance(v, str) else v) for v in value))
    array = np.asarray(value)
    if array.dtype.kind == "f":
        packed = np.ascontiguousarray(array, dtype="<f4").tobytes()
        return _field(2, _field(1, packed))  # FloatList { repeated float value = 1 [packed] }
    if array.dtype.kind in "iub":
        packed = b"".join(_varint(int(v)) for v in array.reshape(-1))
        return _field(3, _field(1, packed))  # Int64List { repeated int64 value = 1 [packed] }
    raise TypeError(f"cannot store a {array.dtype} value in a tf.train.Feature")


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """Serialise ``{name: value}`` as a ``tf.train.Example``. Arrays are flattened (the reader
    reshapes them with the shape recorded in the feature spec)."""
    # Example { Features features = 1; }  Features { map<string, Feature> feature = 1; }
    entries = b"".join(
        _field(1, _field(1, name.encode()) + _field(2, _feature(value))) for name, value in sorted(features.items())
    )
    return _field(1, entries)


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (the framing's checksum of a length or a record)."""
    return _mask(google_crc32c.value(data))


def frame_record(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", masked_crc(length)) + record + struct.pack("<I", masked_crc(record))


def tfrecord_bytes(records: Iterable[bytes], compression: str = "GZIP") -> bytes:
    """A whole TFRecord file in memory (shards are sized to fit comfortably)."""
    return _compressed(b"".join(frame_record(r) for r in records), compression)


def tfrecord_file(columns: Mapping[str, Sequence | np.ndarray], compression: str = "GZIP") -> bytes:
    """A whole TFRecord file of one Example per row of ``columns`` (``{name: a value per row}``),
    byte for byte what :func:`tfrecord_bytes` of :func:`encode_example` of each row writes, at a
    fraction of the cost for rows of large float tensors: a float column of two or more
    dimensions (``[rows, ...]``) has the same headers in every row, computed once, and each row's
    floats are copied once into the file, never re-wrapped field by field; its CRC is extended
    over the pieces of the record instead of computed over a concatenated copy."""
    names = sorted(columns)
    rows = len(columns[names[0]]) if names else 0
    if any(len(columns[name]) != rows for name in names):
        raise ValueError(f"columns of different lengths: { {name: len(columns[name]) for name in names} }")
    dense: dict[str, tuple[bytes, bytes, int]] = {}  # name -> (entry up to the floats, all rows' floats, row bytes)
    for name in names:
        column = columns[name]
        if isinstance(column, np.ndarray) and column.dtype.kind == "f" and column.ndim >= 2:
            flat = np.ascontiguousarray(column.reshape(rows, int(np.prod(column.shape[1:]))), dtype="<f4")
            size = flat.shape[1] * 4
            # An entry's floats are its last bytes: the headers are those of a zero row.
            prefix = _field(1, _field(1, name.encode()) + _field(2, _feature(np.zeros(flat.shape[1], np.float32))))[:-size]
            dense[name] = (prefix, flat.tobytes(), size)
    pieces: list[bytes] = []
    for i in range(rows):
        entries: list[bytes] = []
        for name in names:
            if name in dense:
                prefix, floats, size = dense[name]
                entries += (prefix, floats[i * size : (i + 1) * size])
            else:
                entries.append(_field(1, _field(1, name.encode()) + _field(2, _feature(columns[name][i]))))
        body = sum(map(len, entries))
        head = _varint(1 << 3 | 2) + _varint(body)  # Example { Features features = 1; }
        crc = google_crc32c.value(head)
        for entry in entries:
            crc = google_crc32c.extend(crc, entry)
        length = struct.pack("<Q", len(head) + body)
        pieces += (length, struct.pack("<I", masked_crc(length)), head, *entries, struct.pack("<I", _mask(crc)))
    return _compressed(b"".join(pieces), compression)


def _compressed(raw: bytes, compression: str) -> bytes:
    if compression == "GZIP":
        buf = io.BytesIO()
        # mtime=0 keeps the output byte-identical for identical input.
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(raw)
        return buf.getvalue()
    if compression in ("NONE", "", None):
        return raw
    raise ValueError(f"unsupported TFRecord compression {compression!r} (GZIP or NONE)")
