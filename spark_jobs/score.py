"""spark-submit entry point: score one date's raw inputs with the published model.

    spark-submit --master local[2] spark_jobs/score.py \
        --spec pipelines/speech_commands.yaml --date 2026-11-20 --store file:///data/store [--alias production | --model-version V]

With ``SPARK_REMOTE=sc://host:15002`` set (PySpark's own variable), run as a plain Python
process instead, the job runs as a Spark Connect client on that long-lived server
(``twocluster.spark.session.connect_session``).

Prints one JSON line (predictions version, counts, model version, model loads). Exit codes:
0 committed or unchanged; 1 nothing published, feature-spec mismatch or bad arguments. Where an
OpenLineage transport is configured, the job reports its run under the run that launched it
(``twocluster.lineage``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from dataclasses import asdict

from twocluster import lineage
from twocluster.spark.scoring import ScoringError, run_scoring
from twocluster.spark.session import get_spark, stop_spark
from twocluster.spec import STORE_URI_ENV, SpecError, load_pipeline_spec
from twocluster.store.layout import LayoutError, check_date, check_name
from twocluster.store.manifest import ManifestError
from twocluster.store.registry import RegistryError
from twocluster.store.storage import ObjectStore, StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--date", required=True, type=check_date, help="the date to score (YYYY-MM-DD)")
    parser.add_argument("--store", default=None, help=f"store URI (default: ${STORE_URI_ENV}, then the spec's store_uri)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--alias", type=lambda v: check_name(v, "alias"), default=None, help="model alias (default: the spec's scoring.alias)")
    group.add_argument("--model-version", default=None, help="score with this model version instead of an alias")
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--master", default=None, help="Spark master when not run by spark-submit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_pipeline_spec(args.spec)
        store = ObjectStore(spec.resolve_store_uri(args.store))
        spark = get_spark(f"score-{spec.name}-{args.date}", master=args.master)
        try:
            with lineage.scoring_run(spark, store, spec.name, args.date):
                result = run_scoring(spark, spec, store, args.date, args.run_id or f"manual-{uuid.uuid4().hex[:12]}", args.alias,
                                     args.model_version)
        finally:
            stop_spark(spark)  # on a Spark Connect server: closes this client; the shared session stays for the next job
    except (SpecError, LayoutError, StorageError, ScoringError, RegistryError, ManifestError) as e:
        print(f"scoring failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
