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

PARENT_ENV = "TWOCLUSTER_DIE_WITH_PARENT"


def die_with_parent() -> None:
    """When started by the local training backend: die the moment the Airflow task process does,
    whatever killed it (even SIGKILL, which runs no cleanup), so a retry never trains next to an
    orphan of the previous try (Linux ``PR_SET_PDEATHSIG``; the parent's pid is checked after
    arming it, in case the parent was already gone)."""
    expected = os.environ.get(PARENT_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(expected):
        os._exit(137)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-spec", required=True, help="path or file:// / s3:// URI of the training job spec")
    parser.add_argument("--work-dir", default=None, help="local scratch for staged shards and checkpoints (default: $TWOCLUSTER_WORK_DIR or the temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

    # Imported after argument parsing so that --help is instant.
    from twocluster.store.jobspec import JobSpecError, load_job_spec
    from twocluster.store.manifest import ManifestError
    from twocluster.store.storage import StorageError
    from twocluster.training.trainer import TrainingError, run_training

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
