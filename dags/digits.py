"""Airflow DAG: handwritten digits: daily Spark preprocessing of image arrivals, GPU training of the
image model when the retrain policy says so, and Spark batch scoring with the published model.

Declared in ``pipelines/digits.yaml``; built by :mod:`twocluster.orchestration.dag_factory`.
"""

from twocluster.deployment import PIPELINES_DIR
from twocluster.orchestration.dag_factory import build_pipeline_dag

# The deployment's pipelines folder: pipelines/ next to dags/, or $TWOCLUSTER_PIPELINES_DIR.
dag = build_pipeline_dag(PIPELINES_DIR / "digits.yaml")
