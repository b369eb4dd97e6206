"""Airflow DAG: handwritten digits: daily Spark preprocessing of image arrivals, GPU training of the
image model when the retrain policy says so, and Spark batch scoring with the published model.

Declared in ``pipelines/digits.yaml``; built by :mod:`twocluster.orchestration.dag_factory`.
"""

from pathlib import Path

from twocluster.orchestration.dag_factory import build_pipeline_dag

dag = build_pipeline_dag(Path(__file__).resolve().parents[1] / "pipelines" / "digits.yaml")
