"""`make run`: the main job on the embedded default (local folder store, local Spark, local
training backend).

Built so far: the sample-data arrivals. The pipeline stages (Spark preprocessing, GPU training,
Spark scoring, the Airflow DAG tying them together) land on top of this, and `make run` will
then run the whole DAG for the latest date.
"""

from __future__ import annotations

import argparse
import sys
import time

from twocluster import sample_data
from twocluster.spec import default_spec_path, load_pipeline_spec
from twocluster.storage import ObjectStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(default_spec_path()))
    parser.add_argument("--store", default=None, help="store URI (default: $TWOCLUSTER_STORE_URI)")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--clips-per-day", type=int, default=600)
    args = parser.parse_args(argv)

    spec = load_pipeline_spec(args.spec)
    store = ObjectStore(spec.resolve_store_uri(args.store))
    started = time.perf_counter()
    reports = sample_data.generate(
        store, spec, sample_data.arrival_dates(args.days), args.clips_per_day, seed=0, bad_files_per_day=2
    )
    print(f"\n== {spec.name}: sample data in {store.root_uri}")
    for r in reports:
        labels = ", ".join(f"{k}={v}" for k, v in r.per_label.items())
        state = "already there" if r.skipped else "generated"
        print(f"  {r.date}: {r.clips} clips + {r.bad_files} broken files, {r.bytes / 1e6:.1f} MB ({state})")
        print(f"    {labels}")
    print(f"  took {time.perf_counter() - started:.1f}s")
    print(
        "\nOnly the data generator exists so far: the Spark preprocessing, training, scoring stages and\n"
        "the Airflow DAG are not built yet. Once they land, `make run` runs the whole DAG for the latest date."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
