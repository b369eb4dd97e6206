"""The trainer's data: dataset manifests -> verified local shards -> batches.

A dataset version is validated (committed in its date's log, feature specs compatible across the
window) before anything is downloaded; its shards are staged to local disk in parallel, each
checked against the manifest's checksum and cached by dataset version (TensorFlow cannot open
``s3://``: that moved to tensorflow-io, which does not load against TF 2.21).

The trainer reads the dataset's Arrow copy (:mod:`twocluster.store.arrowshard`) where every
dataset of the window has one: fixed-width features, nothing decoded per example, streamed from
the memory-mapped shards on JAX and PyTorch (:class:`ArrowBatches`), gathered natively in
``tf.data`` on TensorFlow (:func:`arrow_tf_dataset`). For
datasets written before that copy, two input pipelines, chosen by the Keras backend:

* TensorFlow: ``tf.data`` over the TFRecords (parallel interleave and parse, cache, shuffle,
  prefetch), which tf.distribute strategies shard;
* JAX or PyTorch: a ``keras.utils.PyDataset`` over the Parquet copy, decoded once into one
  contiguous array (no TensorFlow in the image at all).

Both yield ``(features shaped like the feature spec, label ids)``; augmentation is part of the
model (its own Keras layers, active only in training), so both pipelines train the same thing.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from twocluster.store import arrowshard, layout
from twocluster.store.featurespec import FeatureSpec
from twocluster.store.manifest import DataFormat, DatasetManifest, ManifestError, resolve_version
from twocluster.store.storage import ObjectStore, S3Settings, split_uri

log = logging.getLogger(__name__)

STAGE_CACHE_MAX_AGE_SECONDS = 7 * 86400  # staged datasets no job used for a week are evicted


class DataError(RuntimeError):
    pass


@dataclass
class StagedData:
    feature_spec: FeatureSpec
    format: DataFormat
    files: dict[str, list[str]]  # split -> local shard paths
    rows: dict[str, int]
    cache_dir: Path  # where the shards were staged (and the TensorFlow feed packs a split)
    dataset_versions: list[str] = field(default_factory=list)
    featurizer_code: list[str] = field(default_factory=list)  # distinct hashes across the datasets

    @property
    def feature_name(self) -> str:
        return self.feature_spec.feature_name

    @property
    def feature_shape(self) -> list[int]:
        return self.feature_spec.feature_shape

    @property
    def vocabulary(self) -> list[str]:
        return self.feature_spec.label_vocabulary


def input_format_for_backend(backend: str | None = None) -> DataFormat:
    """For datasets without the Arrow copy: TFRecords through tf.data on the TensorFlow backend;
    the Parquet copy on the others."""
    if backend is None:
        import keras

        backend = keras.backend.backend()
    return "tfrecord" if backend == "tensorflow" else "parquet"


def feed_format(manifests: list[DatasetManifest], splits: list[str], backend: str | None = None) -> DataFormat:
    """The Arrow copy when every dataset lists it for every one of ``splits`` it has rows in,
    else the backend's pipeline over the older formats (:func:`input_format_for_backend`)."""
    def has_arrow(m: DatasetManifest) -> bool:
        return all(m.data_files("arrow", [s]) for s in splits if m.counts.per_split.get(s, 0))

    return "arrow" if all(has_arrow(m) for m in manifests) else input_format_for_backend(backend)


# -- validate and stage ------------------------------------------------------------------------------


def open_dataset_manifest(uri: str, settings: S3Settings | None = None) -> tuple[ObjectStore, DatasetManifest]:
    """A dataset by its manifest URI, only if it is committed in its date's log (not removed, the
    manifest unchanged since the commit). Returns a store rooted at the version folder.
    ``settings``: how to reach an ``s3://`` URI (default: this process's ``AWS_*`` environment,
    the trainer's identity; the gate passes its own store's)."""
    folder, name = split_uri(uri)
    location, version_folder = split_uri(folder)
    version = layout.version_from_folder(version_folder)
    if name != layout.MANIFEST_NAME or version is None:
        raise DataError(f"{uri}: not a dataset manifest URI (.../v=<version>/{layout.MANIFEST_NAME})")
    manifest = resolve_version(ObjectStore(location, settings), "", version, DatasetManifest).manifest
    if manifest.feature_spec.tfrecord is None:
        raise DataError(f"{uri}: the manifest records no TFRecord feature spec")
    return ObjectStore(folder, settings), manifest


def load_dataset_manifests(uris: list[str], splits: list[str], settings: S3Settings | None = None) -> list[tuple[ObjectStore, DatasetManifest]]:
    """Read and cross-check every dataset manifest before anything is downloaded."""
    loaded = [open_dataset_manifest(uri, settings) for uri in uris]
    first_uri, first = uris[0], loaded[0][1].feature_spec
    for uri, (_, m) in zip(uris[1:], loaded[1:], strict=True):
        problems = first.compatible_with(m.feature_spec)
        if m.feature_spec.tfrecord != first.tfrecord or m.feature_spec.label_vocabulary != first.label_vocabulary:
            problems.append("TFRecord layout or label vocabulary")
        if problems:
            raise DataError(f"{uri}: feature spec differs from {first_uri}'s ({'; '.join(problems)}); datasets cannot be mixed")
        if not m.feature_spec.same_code_as(first):
            raise DataError(
                f"{uri} was featurized by other featurizer code ({m.feature_spec.featurizer_code[:19]}) than {first_uri} "
                f"({first.featurizer_code[:19]}); reprocess the older dates of the window before training on them together"
            )
    for split in splits:
        if sum(m.counts.per_split.get(split, 0) for _, m in loaded) == 0:
            raise DataError(f"no examples in split {split!r} across {len(loaded)} dataset(s) {uris}")
    return loaded


def stage_splits(uris: list[str], splits: list[str], cache_dir: Path, fmt: DataFormat | Literal["auto"] = "tfrecord",
                 max_workers: int = 8, settings: S3Settings | None = None) -> StagedData:
    """Download the shards of ``splits`` in format ``fmt`` (``auto``: :func:`feed_format`) that
    the manifests list, in parallel, verifying each checksum. Shards already in ``cache_dir``
    with a matching checksum are not fetched again (a retry or a resumed run on the same node
    starts at once)."""
    loaded = load_dataset_manifests(uris, splits, settings)
    if fmt == "auto":
        fmt = feed_format([m for _, m in loaded], splits)
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    started, fetched_bytes, reused = time.perf_counter(), 0, 0
    for store, manifest in loaded:
        todo = []
        for f in manifest.data_files(fmt, splits):
            local = cache_dir / manifest.version / f.path
            files.setdefault(f.split, []).append(str(local))
            rows[f.split] = rows.get(f.split, 0) + (f.rows or 0)
            marker = local.with_name(local.name + ".sha256")
            if local.exists() and marker.exists() and marker.read_text() == f.checksum and local.stat().st_size == f.bytes:
                reused += 1
                continue
            todo.append((f, local, marker))
        for (key, checksum), (f, local, marker) in zip(
            store.download_many([(f.path, local) for f, local, _ in todo], max_workers=max_workers), todo, strict=True
        ):
            if checksum != f.checksum:
                local.unlink(missing_ok=True)
                raise ManifestError(f"{store.uri(key)}: checksum {checksum} does not match the manifest's {f.checksum}")
            marker.write_text(checksum)
            fetched_bytes += f.bytes
        if (cache_dir / manifest.version).exists():
            os.utime(cache_dir / manifest.version)  # recently used: kept by prune_stage_cache
    log.info("staged %d %s shards (%.1f MB fetched, %d reused from %s) in %.1fs", sum(map(len, files.values())), fmt,
             fetched_bytes / 1e6, reused, cache_dir, time.perf_counter() - started)
    return StagedData(
        feature_spec=loaded[0][1].feature_spec,
        format=fmt,
        files={s: sorted(v) for s, v in files.items()},
        rows=rows,
        cache_dir=cache_dir,
        dataset_versions=[m.version for _, m in loaded],
        featurizer_code=sorted({m.feature_spec.featurizer_code for _, m in loaded}),
    )


def prune_stage_cache(cache_dir: Path, keep: set[str], max_age_seconds: float = STAGE_CACHE_MAX_AGE_SECONDS) -> list[Path]:
    """Remove staged dataset versions not in ``keep`` that no job has used for ``max_age_seconds``
    (the trainer's local cache would otherwise grow by a dataset per day forever)."""
    removed = []
    if not cache_dir.is_dir():
        return removed
    now = time.time()
    for entry in cache_dir.iterdir():
        if entry.is_dir() and entry.name not in keep and now - entry.stat().st_mtime > max_age_seconds:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# -- input pipelines ---------------------------------------------------------------------------------


def batches(data: StagedData, split: str, batch_size: int, *, training: bool, seed: int, shuffle_buffer: int = 4096):
    """``(features, label ids)`` batches of one staged split, in the pipeline its format needs."""
    if not data.files.get(split):
        raise DataError(f"no staged shards for split {split!r}")
    if data.format == "tfrecord":
        return _tf_dataset(data, split, batch_size, training=training, seed=seed, shuffle_buffer=shuffle_buffer)
    if data.format == "arrow":
        import keras

        if keras.backend.backend() == "tensorflow":
            return arrow_tf_dataset(data, split, batch_size, training=training, seed=seed)
        return ArrowBatches(data, split, batch_size, training=training, seed=seed)
    return ParquetBatches(data, split, batch_size, training=training, seed=seed)


def _tf_dataset(data: StagedData, split: str, batch_size: int, *, training: bool, seed: int, shuffle_buffer: int):
    import tensorflow as tf

    files = data.files[split]
    tfrecord = data.feature_spec.tfrecord
    parse_spec = tfrecord.parse_spec([data.feature_name, "label_id"])

    def parse(record):
        example = tf.io.parse_single_example(record, parse_spec)
        return example[data.feature_name], example["label_id"]

    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=tfrecord.compression_type),
        cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training,
    )
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _read_parquet_split(data: StagedData, split: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.ParquetDataset(data.files[split]).read(columns=["features", "label_id"])
    n = table.num_rows
    features = table["features"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return features.astype(np.float32, copy=False).reshape(n, *data.feature_shape), table["label_id"].to_numpy().astype(np.int64)


def _py_dataset_base():
    import keras

    return keras.utils.PyDataset


class _ShuffledBatches(_py_dataset_base()):
    """A split's rows (``self.y`` holds their labels) in batches: a new order each training
    epoch, file order for evaluation. Subclasses gather a batch's features (:meth:`_batch`)."""

    def __init__(self, labels: np.ndarray, batch_size: int, *, training: bool, seed: int):
        super().__init__()
        self.y = labels
        self.batch_size, self.training = batch_size, training
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(self.y)) if training else np.arange(len(self.y))

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index < 0 or index >= len(self):
            raise IndexError(index)
        return self._batch(self._order[index * self.batch_size : (index + 1) * self.batch_size])

    def _batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        if self.training:
            self._order = self._rng.permutation(len(self.y))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class ParquetBatches(_ShuffledBatches):
    """A split of the Parquet copy decoded once into one contiguous array (the tf.data path's
    ``cache()``), served in shuffled batches; backend-agnostic (JAX, PyTorch, TensorFlow)."""

    def __init__(self, data: StagedData, split: str, batch_size: int, *, training: bool, seed: int):
        self.x, labels = _read_parquet_split(data, split)
        super().__init__(labels, batch_size, training=training, seed=seed)

    def _batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.training:  # a contiguous slice: no copy
            return self.x[rows[0] : rows[-1] + 1], self.y[rows[0] : rows[-1] + 1]
        return self.x[rows], self.y[rows]


def _arrow_split(data: StagedData, split: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """A split's staged Arrow shards: each record batch's memory-mapped ``(features, label ids)``,
    and all the split's label ids in one array (8 bytes a row)."""
    parts = [part for path in data.files[split] for part in arrowshard.open_shard(path, data.feature_shape)]
    if not parts:
        raise DataError(f"no rows in the staged Arrow shards of split {split!r}")
    return parts, np.concatenate([y for _, y in parts]).astype(np.int64, copy=False)


class ArrowBatches(_ShuffledBatches):
    """A split of the Arrow copy, streamed from its memory-mapped shards in shuffled batches
    (backend-agnostic: JAX, PyTorch, TensorFlow). Nothing is decoded: a batch gathers its rows'
    features from the shards' pages (the rows of a training batch are taken in file order, so
    each shard's rows are one fancy-index copy); an evaluation batch inside one record batch is
    a view of the file."""

    def __init__(self, data: StagedData, split: str, batch_size: int, *, training: bool, seed: int):
        self.feature_shape = tuple(data.feature_shape)
        self._parts, labels = _arrow_split(data, split)
        self._starts = np.cumsum([0] + [len(y) for _, y in self._parts])
        super().__init__(labels, batch_size, training=training, seed=seed)

    def _batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.training:
            rows = np.sort(rows)  # the same examples; a batch's loss does not depend on their order
        first = int(np.searchsorted(self._starts, rows[0], side="right")) - 1
        if not self.training and rows[-1] < self._starts[first + 1]:  # inside one record batch: a view
            lo = rows[0] - self._starts[first]
            return self._parts[first][0][lo : lo + len(rows)], self.y[rows[0] : rows[-1] + 1]
        out = np.empty((len(rows), *self.feature_shape), np.float32)
        bounds = np.searchsorted(rows, self._starts)
        for part in range(first, len(self._parts)):
            lo, hi = bounds[part], bounds[part + 1]
            if lo == len(rows):
                break
            if lo < hi:
                local = rows[lo:hi] - self._starts[part]
                features = self._parts[part][0]
                if local[-1] - local[0] + 1 == hi - lo:  # consecutive rows: one slice copy
                    out[lo:hi] = features[local[0] : local[-1] + 1]
                else:
                    np.take(features, local, axis=0, out=out[lo:hi])
        return out, self.y[rows]


PACK_PREFIX = "feed-"  # a packed split's folder in the stage cache (pruned like a dataset version)


def packed_split(data: StagedData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split of the staged Arrow copy as one local ``.npy`` file of features (``[rows, *shape]``
    float32, 64-byte aligned) beside one of label ids, both memory-mapped copy-on-write: the
    window's rows made one contiguous array that nothing holds in memory (the page cache serves
    it, so a split bigger than memory still trains) and that nothing can write back to the file.

    The pack is written once per window (its name is a digest of the staged shards' paths, which
    name immutable dataset versions), sequentially from the memory-mapped shards, to a temporary
    name renamed into place: a retry or the next run on the node maps it at once, and a killed
    pack is never read."""
    import hashlib

    digest = hashlib.sha256("\n".join(data.files[split]).encode()).hexdigest()[:16]
    folder = data.cache_dir / f"{PACK_PREFIX}{digest}"
    features_path, labels_path = folder / f"{split}.features.npy", folder / f"{split}.labels.npy"
    if not features_path.exists():  # renamed into place last: its presence means the whole pack
        folder.mkdir(parents=True, exist_ok=True)
        parts, labels = _arrow_split(data, split)
        started = time.perf_counter()
        partial_features, partial_labels = (path.with_name(f".{path.name}.{os.getpid()}") for path in (features_path, labels_path))
        try:
            with open(partial_features, "wb") as out:
                np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                           "shape": (len(labels), *data.feature_shape)})
                for features, _ in parts:
                    out.write(memoryview(features).cast("B"))
            with open(partial_labels, "wb") as out:
                np.save(out, labels)
            # The labels first: the features' name is the pack's commit.
            os.replace(partial_labels, labels_path)
            os.replace(partial_features, features_path)
        finally:
            partial_features.unlink(missing_ok=True)
            partial_labels.unlink(missing_ok=True)
        log.info("packed split %s: %d rows from %d record batches into %s in %.2fs", split, len(labels), len(parts),
                 features_path, time.perf_counter() - started)
    os.utime(folder)  # recently used: kept by prune_stage_cache
    features = np.load(features_path, mmap_mode="c")
    labels = np.load(labels_path)
    if features.shape != (len(labels), *data.feature_shape):
        raise DataError(f"{features_path}: shape {features.shape} does not match {len(labels)} labels of shape {data.feature_shape}")
    return features, labels


def _tensor_over(array: np.ndarray):
    """A TensorFlow tensor over ``array``'s memory (DLPack: no copy) where TensorFlow can use it
    in place (64-byte aligned, writable: TensorFlow aborts the process on a misaligned buffer),
    a copy otherwise."""
    import tensorflow as tf

    if array.flags.writeable and array.flags.c_contiguous and array.ctypes.data % 64 == 0:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.constant(array)


def arrow_tf_dataset(data: StagedData, split: str, batch_size: int, *, training: bool, seed: int):
    """The TensorFlow backend's pipeline over the Arrow copy, in ``tf.data`` (which tf.distribute
    strategies shard): the split's :func:`packed_split`, memory-mapped, is one tensor in place (no
    copy, no parse), and each batch is one native ``gather`` of shuffled row ids from it, so
    nothing runs in Python per batch and rows are read from the file's pages as batches need
    them.

    (Measured, 2026-12-07, one core: Python in tf.data, ``from_generator`` over
    :class:`ArrowBatches`, fed 15-30 k examples/s where the same batches in Python came at
    170-300 k; a dataset element per example, ``FixedLengthRecordDataset`` over the shards' feature
    buffers, 30 k shuffled; a gather per record batch of the shards, ~100 k at 32 record
    batches; the split copied into a variable, ~1 GB/s, so its first epoch fed 45 k.)"""
    import tensorflow as tf

    packed_features, packed_labels = packed_split(data, split)
    features, labels = _tensor_over(packed_features), tf.constant(packed_labels)
    rows = int(labels.shape[0])
    ds = tf.data.Dataset.range(rows)
    if training:
        ds = ds.shuffle(rows, seed=seed, reshuffle_each_iteration=True)
    # Without tf.data's autotuning model: its thread made destroying an epoch's iterator (fit
    # makes one an epoch) wait 40-80 ms in about one epoch of three, idle, on top of 60-100 ms of
    # streaming a 30,656-row split (measured 2026-12-08, this VM). Nothing here has a parallelism
    # to tune, and prefetch's own buffer still grows while the consumer waits.
    options = tf.data.Options()
    options.autotune.enabled = False
    return (ds.batch(batch_size).map(lambda ids: (tf.gather(features, ids), tf.gather(labels, ids)))
            .prefetch(tf.data.AUTOTUNE).with_options(options))


def feature_sample(ds, max_rows: int = 2048) -> np.ndarray:
    """Up to ``max_rows`` feature rows of a pipeline (what a model adapts its normalization to)."""
    rows, n = [], 0
    for x, _ in ds:
        rows.append(np.asarray(x))
        n += len(rows[-1])
        if n >= max_rows:
            break
    return np.concatenate(rows)[:max_rows]
