"""spark-submit entry point: preprocess one date's raw arrivals into a committed dataset.

    spark-submit --master local[2] spark_jobs/preprocess.py \
        --spec pipelines/speech_commands.yaml --date 2026-11-20 --store file:///data/store

With ``SPARK_REMOTE=sc://host:15002`` set (PySpark's own variable), run as a plain Python
process instead, the job runs as a Spark Connect client on that long-lived server
(``twocluster.spark.session.connect_session``).

Prints one JSON line with the outcome (version, counts, manifest URI) for the caller (Airflow
pushes it to XCom). Where an OpenLineage transport is configured, the job reports its run
(START, COMPLETE or FAIL) under the run that launched it (``twocluster.lineage``). Exit code 0: committed or unchanged; 1: rejected (reject rate above the
threshold, bad arguments); the message says which.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid

from twocluster import lineage
from twocluster.spark.preprocess import PreprocessError, run_preprocess
from twocluster.spark.session import get_spark, stop_spark
from twocluster.spec import STORE_URI_ENV, SpecError, load_pipeline_spec
from twocluster.store.layout import LayoutError, check_date
from twocluster.store.manifest import ManifestError
from twocluster.store.storage import ObjectStore, StorageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--date", required=True, type=check_date, help="the date to process (YYYY-MM-DD)")
    parser.add_argument("--store", default=None, help=f"store URI (default: ${STORE_URI_ENV}, then the spec's store_uri)")
    parser.add_argument("--run-id", default=None, help="recorded in the manifest's lineage (default: a new id)")
    parser.add_argument("--max-reject-rate", type=float, default=None, help="override the spec's thresholds.max_reject_rate")
    parser.add_argument("--incomplete", action="store_true",
                        help="the date's arrivals are known incomplete (past the deadline): recorded in the manifest")
    parser.add_argument("--master", default=None, help="Spark master when not run by spark-submit (e.g. local[2])")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        spec = load_pipeline_spec(args.spec)
        store = ObjectStore(spec.resolve_store_uri(args.store))
        spark = get_spark(f"preprocess-{spec.name}-{args.date}", master=args.master)
        try:
            with lineage.preprocess_run(spark, store, spec.name, args.date):
                result = run_preprocess(spark, spec, store, args.date, args.run_id or f"manual-{uuid.uuid4().hex[:12]}",
                                        args.max_reject_rate, complete=not args.incomplete)
        finally:
            stop_spark(spark)  # on a Spark Connect server: closes this client; the shared session stays for the next job
    except (SpecError, LayoutError, StorageError, ManifestError, PreprocessError) as e:
        print(f"preprocess failed: {e}", file=sys.stderr)
        return 1
    print(result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
