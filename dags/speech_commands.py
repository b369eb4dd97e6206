"""Airflow DAG: keyword spotting on Speech Commands: daily Spark preprocessing, GPU training when the retrain
policy says so, and Spark batch scoring with the published model.

Everything this DAG does is declared in ``pipelines/speech_commands.yaml``; the task graph is
built by :mod:`twocluster.orchestration.dag_factory` (see its docstring for the connections, variables and
pools it uses).
"""

from pathlib import Path

from twocluster.orchestration.dag_factory import build_pipeline_dag

dag = build_pipeline_dag(Path(__file__).resolve().parents[1] / "pipelines" / "speech_commands.yaml")
