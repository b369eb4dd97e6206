"""Gate and publish a trained model version: load test, metric floor, champion comparison, and
only then a new create-only alias record.

    python training_jobs/publish.py --store s3://bucket --model kws_cnn --version <version> \
        --alias production --min-test-accuracy 0.9 --max-regression 0.02

Prints the decision as JSON. Exit codes: 0 published, 3 refused (the reason is in the output;
the current champion stays), 1 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

REFUSED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="store root URI (file:///... or s3://...)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--alias", default="production")
    parser.add_argument("--min-test-accuracy", type=float, required=True)
    parser.add_argument("--max-regression", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from twocluster.store import layout
    from twocluster.store.storage import ObjectStore
    from twocluster.training.gate import gate_and_publish

    try:
        layout.check_name(args.model, "model")
        layout.check_name(args.alias, "alias")
        layout.check_version(args.version)
    except layout.LayoutError as e:
        print(f"publish: {e}", file=sys.stderr)
        return 1
    decision = gate_and_publish(
        ObjectStore(args.store), args.model, args.version, args.alias, args.min_test_accuracy, args.max_regression
    )
    print(decision.to_json())
    return 0 if decision.outcome in ("published", "already_published") else REFUSED


if __name__ == "__main__":
    sys.exit(main())
