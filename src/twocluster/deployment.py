"""Where a deployment's files live: the folder that holds ``pipelines/``, ``spark_jobs/`` and
``training_jobs/`` next to ``src/`` (the checkout, or ``/opt/twocluster`` in the images, where the
package is installed editable from ``src/``)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIPELINES_DIR = Path(os.environ.get("TWOCLUSTER_PIPELINES_DIR") or ROOT / "pipelines")
SPARK_JOBS_DIR = ROOT / "spark_jobs"
TRAINING_JOBS_DIR = ROOT / "training_jobs"
