"""What data quality costs (issue 35), in one process: the write step of one partition (600 clips
of 97x40 log-mel features encoded as TFRecord + Parquet) with and without its feature statistics,
and the featurizer with and without its content checks over real clips when a `make run` store
is there. Ratios of medians of interleaved runs.

    .venv/bin/python bench/statistics_cost.py
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _statistics(on: bool):
    """The write path with its feature statistics (on), or with ``statistics.partial`` answering
    an empty part at once (off)."""
    real = statistics.partial
    empty = statistics._Sums(feature="log_mel", kind="log_mel", count=[], total=[], squares=[], low=[], high=[], nan=[], inf=[],
                             histogram=[])
    statistics.partial = real if on else (lambda *args, **kwargs: empty)
    try:
        yield
    finally:
        statistics.partial = real


def _interleaved(runs: int, once) -> tuple[list[float], list[float]]:
    """(seconds of ``once(False)``, seconds of ``once(True)``), ``runs`` of each, alternating."""
    off, on = [], []
    for _ in range(runs):
        for flag, into in ((False, off), (True, on)):
            started = time.perf_counter()
            once(flag)
            into.append(time.perf_counter() - started)
    return off, on


def _encode(table: pa.Table) -> None:
    _encode_and_upload(table, "log_mel", (97, 40), "NONE", "lz4", "part-0", ".tfrecord", lambda *args: None)


def _clips(clips_folder: pathlib.Path):
    """(spec, featurizer, blobs, names, quiet folders) of up to 600 clips under the folder, or None."""
    from twocluster.features import featurizer_for
    from twocluster.spec import default_spec_path, load_pipeline_spec

    paths = sorted(clips_folder.rglob("*.wav"))[:600]
    if not paths:
        return None
    spec = load_pipeline_spec(default_spec_path("speech_commands"))
    return (spec, featurizer_for(spec.featurizer), [p.read_bytes() for p in paths], [str(p) for p in paths],
            frozenset(spec.labels.silence_folders))


def encode_cost(runs: int = 7) -> tuple[list[float], list[float]]:
    """(seconds without statistics, seconds with) of encoding one partition, runs interleaved."""
    table = _partition()

    def once(with_statistics: bool) -> None:
        with _statistics(with_statistics):
            _encode(table)

    return _interleaved(runs, once)


def content_check_cost(clips_folder: pathlib.Path, runs: int = 5) -> tuple[list[float], list[float]] | None:
    """(seconds without content checks, seconds with) of featurizing up to 600 clips under
    ``clips_folder``, runs interleaved; None without clips."""
    found = _clips(clips_folder)
    if found is None:
        return None
    spec, featurizer, blobs, names, quiet = found
    return _interleaved(runs, lambda content: featurizer.featurize_many(blobs, names, spec.inputs, content=content,
                                                                          quiet_folders=quiet if content else frozenset()))


def partition_cost(clips_folder: pathlib.Path, runs: int = 5) -> tuple[list[float], list[float]] | None:
    """(seconds before issue 35, seconds with it) of a write task's work on one partition of up
    to 600 clips: featurize them (without / with the content checks), then encode a partition of
    that many rows as TFRecord + Parquet (without / with its feature statistics); runs
    interleaved. None without clips."""
    found = _clips(clips_folder)
    if found is None:
        return None
    spec, featurizer, blobs, names, quiet = found
    table = _partition(len(blobs))

    def once(quality: bool) -> None:
        with _statistics(quality):
            featurizer.featurize_many(blobs, names, spec.inputs, content=quality, quiet_folders=quiet if quality else frozenset())
            _encode(table)

    return _interleaved(runs, once)


if __name__ == "__main__":
    a, b = map(st.median, encode_cost())
    print(f"encode a 600-clip partition: {a * 1e3:.0f} ms without statistics, {b * 1e3:.0f} ms with ({a / b:.3f}x)")
    found = content_check_cost(ROOT / ".local" / "store" / "raw" / "speech_commands")
    if found is None:
        print("featurize with content checks: no make run store (.local/store) to read clips from")
    else:
        a, b = map(st.median, found)
        print(f"featurize 600 clips: {a * 1e3:.0f} ms without content checks, {b * 1e3:.0f} ms with ({a / b:.3f}x)")
