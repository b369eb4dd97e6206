"""What data quality costs (issue 35), in one process: the write step of one partition (600 clips
of 97x40 log-mel features encoded as TFRecord + Parquet) with and without its feature statistics,
and the featurizer with and without its content checks over real clips when a `make run` store
is there. Ratios of medians of interleaved runs.

    .venv/bin/python bench/statistics_cost.py
"""

from __future__ import annotations

import pathlib
import statistics as st
import time

import numpy as np
import pyarrow as pa

from twocluster.spark.preprocess import _encode_and_upload
from twocluster.store import statistics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _partition(n: int = 600) -> pa.Table:
    rng = np.random.default_rng(0)
    features = rng.normal(-5, 3, (n, 97 * 40)).astype(np.float32)
    return pa.table({
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), 97 * 40).cast(pa.list_(pa.float32())),
        "label": pa.array([str(i % 12) for i in range(n)]), "label_id": pa.array(np.arange(n) % 12, pa.int32()),
        "source_id": pa.array([f"s{i % 50}" for i in range(n)]), "path": pa.array([f"p/{i}.wav" for i in range(n)]),
        "split": pa.array(["train"] * (n * 8 // 10) + ["validation"] * (n // 10) + ["test"] * (n - n * 8 // 10 - n // 10)),
        "key": pa.array([f"k{i:05d}" for i in range(n)])})


def encode_cost(runs: int = 7) -> tuple[list[float], list[float]]:
    """(seconds without statistics, seconds with) of encoding one partition, runs interleaved."""
    table = _partition()
    real = statistics.partial
    empty = statistics._Sums(feature="log_mel", kind="log_mel", count=[], total=[], squares=[], low=[], high=[], nan=[], inf=[],
                             histogram=[])

    def once(with_statistics: bool) -> float:
        statistics.partial = real if with_statistics else (lambda *args, **kwargs: empty)
        try:
            started = time.perf_counter()
            _encode_and_upload(table, "log_mel", (97, 40), "NONE", "lz4", "part-0", ".tfrecord", lambda *args: None)
            return time.perf_counter() - started
        finally:
            statistics.partial = real

    without, with_ = [], []
    for _ in range(runs):
        without.append(once(False))
        with_.append(once(True))
    return without, with_


def content_check_cost(clips_folder: pathlib.Path, runs: int = 5) -> tuple[list[float], list[float]] | None:
    """(seconds without content checks, seconds with) of featurizing up to 600 clips under
    ``clips_folder``, runs interleaved; None without clips."""
    from twocluster.features import featurizer_for
    from twocluster.spec import default_spec_path, load_pipeline_spec

    paths = sorted(clips_folder.rglob("*.wav"))[:600]
    if not paths:
        return None
    spec = load_pipeline_spec(default_spec_path("speech_commands"))
    featurizer = featurizer_for(spec.featurizer)
    blobs, names = [p.read_bytes() for p in paths], [str(p) for p in paths]
    quiet = frozenset(spec.labels.silence_folders)
    without, with_ = [], []
    for _ in range(runs):
        started = time.perf_counter()
        featurizer.featurize_many(blobs, names, spec.inputs)
        without.append(time.perf_counter() - started)
        started = time.perf_counter()
        featurizer.featurize_many(blobs, names, spec.inputs, content=True, quiet_folders=quiet)
        with_.append(time.perf_counter() - started)
    return without, with_


def partition_cost(clips_folder: pathlib.Path, runs: int = 5) -> tuple[list[float], list[float]] | None:
    """(seconds before issue 35, seconds with it) of a write task's work on one partition of up
    to 600 clips: featurize them (without / with the content checks), then encode a partition of
    that many rows as TFRecord + Parquet (without / with its feature statistics); runs
    interleaved. None without clips."""
    from twocluster.features import featurizer_for
    from twocluster.spec import default_spec_path, load_pipeline_spec

    paths = sorted(clips_folder.rglob("*.wav"))[:600]
    if not paths:
        return None
    spec = load_pipeline_spec(default_spec_path("speech_commands"))
    featurizer = featurizer_for(spec.featurizer)
    blobs, names = [p.read_bytes() for p in paths], [str(p) for p in paths]
    quiet = frozenset(spec.labels.silence_folders)
    table = _partition(len(paths))
    real = statistics.partial
    empty = statistics._Sums(feature="log_mel", kind="log_mel", count=[], total=[], squares=[], low=[], high=[], nan=[], inf=[],
                             histogram=[])

    def once(quality: bool) -> float:
        statistics.partial = real if quality else (lambda *args, **kwargs: empty)
        try:
            started = time.perf_counter()
            if quality:
                featurizer.featurize_many(blobs, names, spec.inputs, content=True, quiet_folders=quiet)
            else:
                featurizer.featurize_many(blobs, names, spec.inputs)
            _encode_and_upload(table, "log_mel", (97, 40), "NONE", "lz4", "part-0", ".tfrecord", lambda *args: None)
            return time.perf_counter() - started
        finally:
            statistics.partial = real

    before, after = [], []
    for _ in range(runs):
        before.append(once(False))
        after.append(once(True))
    return before, after


if __name__ == "__main__":
    a, b = map(st.median, encode_cost())
    print(f"encode a 600-clip partition: {a * 1e3:.0f} ms without statistics, {b * 1e3:.0f} ms with ({a / b:.3f}x)")
    found = content_check_cost(ROOT / ".local" / "store" / "raw" / "speech_commands")
    if found is None:
        print("featurize with content checks: no make run store (.local/store) to read clips from")
    else:
        a, b = map(st.median, found)
        print(f"featurize 600 clips: {a * 1e3:.0f} ms without content checks, {b * 1e3:.0f} ms with ({a / b:.3f}x)")
