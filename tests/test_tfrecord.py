"""TFRecord files written without TensorFlow read back with tf.data, in both compressions the
spec offers."""

from __future__ import annotations

import numpy as np
import pytest

from twocluster.store.featurespec import TensorSpec, TFRecordSpec
from twocluster.store.tfrecord import encode_example, tfrecord_bytes, tfrecord_file


def _rows(n: int) -> list[tuple[np.ndarray, str, int, str]]:
    rng = np.random.default_rng(0)
    # Paths up to 300 characters: lengths past 127 take two-byte varints.
    return [(rng.standard_normal((97, 40)).astype(np.float32), f"label-{i}", i - 2, f"clips/{'d/' * (i * 30)}{i}.wav") for i in range(n)]


def _per_record(rows, compression: str) -> bytes:
    return tfrecord_bytes([encode_example({"x": x, "label": lbl, "label_id": np.int64(lid), "path": p}) for x, lbl, lid, p in rows],
                          compression)


def _columns(rows, compression: str) -> bytes:
    return tfrecord_file({"x": np.stack([r[0] for r in rows]), "label": [r[1] for r in rows],
                          "label_id": np.array([r[2] for r in rows], np.int64), "path": [r[3] for r in rows]}, compression)


@pytest.mark.parametrize("compression", ["NONE", "GZIP"])
def test_a_file_written_from_columns_is_byte_for_byte_the_per_record_file(compression):
    rows = _rows(6)
    assert _columns(rows, compression) == _per_record(rows, compression)
    assert tfrecord_file({"x": np.zeros((0, 97, 40), np.float32), "label": []}, compression) == tfrecord_bytes([], compression)
    with pytest.raises(ValueError, match="different lengths"):
        tfrecord_file({"x": np.zeros((2, 3), np.float32), "label": ["a"]}, compression)


@pytest.mark.parametrize("writer", [_per_record, _columns])
@pytest.mark.parametrize("compression", ["NONE", "GZIP"])
def test_records_read_back_with_tf_data(tmp_path, compression, writer):
    import tensorflow as tf

    rows = _rows(5)
    path = tmp_path / "part.tfrecord"
    path.write_bytes(writer(rows, compression))
    spec = TFRecordSpec(compression=compression, features={"x": TensorSpec(dtype="float32", shape=[97, 40]),
                                                           "label": TensorSpec(dtype="string"), "label_id": TensorSpec(dtype="int64"),
                                                           "path": TensorSpec(dtype="string")})
    got = [tf.io.parse_single_example(r, spec.parse_spec(["x", "label", "label_id", "path"]))
           for r in tf.data.TFRecordDataset([str(path)], compression_type=spec.compression_type)]
    assert len(got) == len(rows)
    for ex, (x, lbl, lid, p) in zip(got, rows, strict=True):
        assert np.array_equal(ex["x"].numpy(), x)
        assert ex["label"].numpy().decode() == lbl and int(ex["label_id"]) == lid and ex["path"].numpy().decode() == p
