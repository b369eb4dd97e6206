"""TFRecord files written without TensorFlow read back with tf.data, in both compressions the
spec offers."""

from __future__ import annotations

import numpy as np
import pytest

from twocluster.store.featurespec import TensorSpec, TFRecordSpec
from twocluster.store.tfrecord import encode_example, tfrecord_bytes


@pytest.mark.parametrize("compression", ["NONE", "GZIP"])
def test_records_read_back_with_tf_data(tmp_path, compression):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    rows = [(rng.standard_normal((97, 40)).astype(np.float32), f"label-{i}", i - 2, f"clips/{i}.wav") for i in range(5)]
    path = tmp_path / "part.tfrecord"
    path.write_bytes(tfrecord_bytes([encode_example({"x": x, "label": lbl, "label_id": np.int64(lid), "path": p})
                                     for x, lbl, lid, p in rows], compression))
    spec = TFRecordSpec(compression=compression, features={"x": TensorSpec(dtype="float32", shape=[97, 40]),
                                                           "label": TensorSpec(dtype="string"), "label_id": TensorSpec(dtype="int64"),
                                                           "path": TensorSpec(dtype="string")})
    got = [tf.io.parse_single_example(r, spec.parse_spec(["x", "label", "label_id", "path"]))
           for r in tf.data.TFRecordDataset([str(path)], compression_type=spec.compression_type)]
    assert len(got) == len(rows)
    for ex, (x, lbl, lid, p) in zip(got, rows, strict=True):
        assert np.array_equal(ex["x"].numpy(), x)
        assert ex["label"].numpy().decode() == lbl and int(ex["label_id"]) == lid and ex["path"].numpy().decode() == p
