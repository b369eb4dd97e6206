"""The trainer container's entry point: train one model version from a JSON job spec.

    python training_jobs/train.py --job-spec s3://bucket/jobs/<run>.json
    python training_jobs/train.py --job-spec /path/to/job.json

Prints one JSON line (model, version, manifest URI, metrics). Rerunning the same job spec
resumes from the run's last checkpoint in the store, or returns the finished version.
Exit codes: 0 trained (or already trained), 1 bad spec / bad data (nothing was trained).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-spec", required=True, help="path or file:// / s3:// URI of the training job spec")
    parser.add_argument("--work-dir", default=None, help="local scratch for staged shards and checkpoints (default: $TWOCLUSTER_WORK_DIR or the temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

    # Imported after argument parsing so that --help is instant.
    from twocluster.jobspec import JobSpecError, load_job_spec
    from twocluster.manifest import ManifestError
    from twocluster.storage import StorageError
    from twocluster.training import TrainingError, run_training

    try:
        spec = load_job_spec(args.job_spec)
        result = run_training(spec, args.work_dir)
    except (JobSpecError, ManifestError, StorageError, TrainingError) as e:
        print(f"training failed before any model was written: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
