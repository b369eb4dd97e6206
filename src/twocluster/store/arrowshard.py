"""The dataset's Arrow copy: the trainer's feed (issue 37).

A TFRecord example costs its reader a protobuf parse per example (tf.data parsed ~11,500 a second
on one core); the Parquet copy costs a decode of every page (~29,000). An accelerator takes
~150,000 examples a second, so feeding one took 5-13 cores. This copy costs (almost) nothing per
example: an Arrow IPC file, uncompressed, whose features are one fixed-width column
(``fixed_size_list<float32>[prod(shape)]``) beside the label ids. Memory-mapped, a record batch's
features are a C-contiguous ``float32`` array of ``[rows, *shape]`` in place, with no decoding
and no copy; a reader copies only the rows a training batch gathers.

The same rows, in the same order, as the partition's TFRecord and Parquet shards; the values are
the same float32 values (no float16: the model's accuracy is the Parquet copy's, bit for bit).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa

FEATURES, LABEL_ID = "features", "label_id"
BATCH_ROWS = 1024  # rows per record batch: ~16 MB of log-mel features; readers slice within them


class ArrowShardError(ValueError):
    pass


def encode(features: np.ndarray, label_ids: np.ndarray) -> bytes:
    """An Arrow IPC file of ``features`` (``[rows, *shape]``, float32) and their label ids."""
    width = int(np.prod(features.shape[1:]))
    values = np.ascontiguousarray(features, dtype=np.float32).reshape(-1)
    table = pa.table({FEATURES: pa.FixedSizeListArray.from_arrays(pa.array(values), width),
                      LABEL_ID: pa.array(np.asarray(label_ids, dtype=np.int64))})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=BATCH_ROWS)
    return sink.getvalue()


def open_shard(path: str | Path, shape: list[int] | tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The shard's record batches as ``(features [rows, *shape], label ids)`` views of the
    memory-mapped file: nothing is read until a view's rows are touched."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError) as e:
        raise ArrowShardError(f"{path}: not an Arrow IPC shard ({e})") from None
    width = int(np.prod(shape))
    schema = reader.schema
    if (FEATURES not in schema.names or LABEL_ID not in schema.names
            or schema.field(FEATURES).type != pa.list_(pa.float32(), width)):
        raise ArrowShardError(f"{path}: expected {FEATURES}: fixed_size_list<float>[{width}] and {LABEL_ID}, found {schema}")
    batches = []
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        if batch.num_rows == 0:
            continue
        column = batch.column(FEATURES)
        if column.null_count or column.values.null_count:
            raise ArrowShardError(f"{path}: record batch {i} has null features")
        features = column.flatten().to_numpy(zero_copy_only=True).reshape(batch.num_rows, *shape)
        batches.append((features, batch.column(LABEL_ID).to_numpy(zero_copy_only=True)))
    return batches
