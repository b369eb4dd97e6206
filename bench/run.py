"""Benchmarks: each figure measures the project's real code path and its baseline in the same run,
repeated, reporting the median and the spread, and the ratio to the baseline.

    python bench/run.py            # full size
    python bench/run.py --quick    # small, for a smoke check

Writes bench/results/latest.json (one entry per figure: value, baseline, ratio, goal, unit, met)
and bench/RESULTS.md (the table, with the date and the machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


@dataclass
class Figure:
    id: str
    what: str
    unit: str
    value: float
    baseline: float
    ratio: float
    goal: str
    met: bool
    runs: list[float]
    baseline_runs: list[float]
    spread: float  # (max - min) / median of the project's runs
    notes: str = ""


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _spread(xs: list[float]) -> float:
    m = _median(xs)
    return float((max(xs) - min(xs)) / m) if m else 0.0


def _timed(fn: Callable[[], int]) -> float:
    """Items per second of one call of ``fn`` (which returns the number of items it did)."""
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


# -- featurization -------------------------------------------------------------------------------


def featurize_figures(repeats: int, clips: int, workdir: Path) -> list[Figure]:
    from pyspark.sql.functions import udf

    from twocluster import sample_data
    from twocluster.features import featurizer_for
    from twocluster.preprocess import FEATURIZED_SCHEMA, featurize, list_inputs
    from twocluster.sparkutil import get_spark
    from twocluster.spec import default_spec_path, load_pipeline_spec
    from twocluster.storage import ObjectStore

    spec = load_pipeline_spec(default_spec_path())
    store = ObjectStore((workdir / "store").as_uri())
    date = dt.date(2026, 1, 1)
    sample_data.generate_day(store, spec, date, clips=clips, seed=5, bad_files=0)
    inputs, _, _ = list_inputs(store, spec, date)
    keys = list(inputs["key"])

    featurizer = featurizer_for(spec.featurizer)

    def single_process() -> int:
        # The baseline a user would write: one loop over the files, same featurizer, same batches.
        for i in range(0, len(keys), 64):
            featurizer.featurize_many([store.read_bytes(k) for k in keys[i : i + 64]])
        return len(keys)

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = get_spark("bench-featurize", master="local[2]")
    frame = spark.createDataFrame(inputs).repartition(spark.sparkContext.defaultParallelism * 2).cache()
    frame.count()

    def spark_pandas_udf() -> int:
        return featurize(frame, spec, store).filter("reason IS NULL").count()

    root_uri, feat_json = store.root_uri, spec.featurizer.model_dump_json()

    @udf(FEATURIZED_SCHEMA)
    def featurize_row(key: str):
        # Row-at-a-time: one Python call, one fetch and one featurization per row.
        from twocluster.preprocess import _worker_featurizer

        f = _worker_featurizer(feat_json, "log_mel")
        b = f.featurize_many([ObjectStore(root_uri).read_bytes(key)])
        return (b.features[0].reshape(-1).tolist() if b.reasons[0] is None else None, b.reasons[0], b.details[0])

    def spark_row_udf() -> int:
        return frame.withColumn("f", featurize_row("key")).filter("f.reason IS NULL").count()

    # Warm both sides once (Python workers, librosa/numba, the JVM), then measure.
    single_process()
    spark_pandas_udf()
    spark_row_udf()
    base, project, row = [], [], []
    for _ in range(repeats):
        base.append(_timed(single_process))
        project.append(_timed(spark_pandas_udf))
        row.append(_timed(spark_row_udf))
    spark.stop()

    featurize_ratio = _median(project) / _median(base)
    row_ratio = _median(project) / _median(row)
    return [
        Figure("featurize", "preprocess featurization, Spark local[2] pandas UDF", "clips/s", _median(project), _median(base),
               featurize_ratio, ">= 1.5", featurize_ratio >= 1.5, project, base, _spread(project),
               f"{len(keys)} clips; baseline: the same featurizer in a single-process loop"),
        Figure("row_udf", "same, vs a row-at-a-time Python UDF", "clips/s", _median(project), _median(row),
               row_ratio, ">= 5", row_ratio >= 5, project, row, _spread(project), "row UDF does the same fetch + featurize per row"),
    ]


# -- report --------------------------------------------------------------------------------------


def machine() -> dict:
    import pyspark
    import tensorflow as tf  # noqa: F401  (version only)

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "tensorflow": sys.modules["tensorflow"].__version__,
        "platform": platform.platform(),
    }


def write_report(figures: list[Figure], quick: bool, started: float) -> str:
    RESULTS_DIR.mkdir(exist_ok=True)
    info = machine()
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": info,
        "seconds": round(time.perf_counter() - started, 1),
        "figures": [asdict(f) for f in figures],
    }
    (RESULTS_DIR / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"Run {doc['date']} ({'quick' if quick else 'full'}, {doc['seconds']}s) on {info['cores']} cores, "
        f"{info['ram_gib']} GiB RAM, Python {info['python']}, PySpark {info['pyspark']}, TensorFlow {info['tensorflow']}.",
        "",
        "| id | what | value | baseline | ratio | goal | met | spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.id} | {f.what} | {f.value:.1f} {f.unit} | {f.baseline:.1f} {f.unit} | {f.ratio:.2f}x | {f.goal} | "
            f"{'yes' if f.met else 'NO'} | {f.spread:.0%} |"
        )
    table = "\n".join(lines)
    if not quick:
        (HERE / "RESULTS.md").write_text("# Benchmark results\n\nMedians of repeated runs; spread = (max - min) / median.\n\n" + table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    repeats, clips = (2, 400) if args.quick else (5, 2400)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        figures = featurize_figures(repeats, clips, Path(tmp))
    print(write_report(figures, args.quick, started))
    np.set_printoptions()
    return 0


if __name__ == "__main__":
    sys.exit(main())
