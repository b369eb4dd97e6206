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
from collections.abc import Iterable, Mapping

import google_crc32c
import numpy as np

FeatureValue = bytes | str | int | float | np.ndarray | list


def _varint(value: int) -> bytes:
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


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", _masked_crc(length)) + record + struct.pack("<I", _masked_crc(record))


def tfrecord_bytes(records: Iterable[bytes], compression: str = "GZIP") -> bytes:
    """A whole TFRecord file in memory (shards are sized to fit comfortably)."""
    raw = b"".join(frame_record(r) for r in records)
    if compression == "GZIP":
        buf = io.BytesIO()
        # mtime=0 keeps the output byte-identical for identical input.
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(raw)
        return buf.getvalue()
    if compression in ("NONE", "", None):
        return raw
    raise ValueError(f"unsupported TFRecord compression {compression!r} (GZIP or NONE)")
