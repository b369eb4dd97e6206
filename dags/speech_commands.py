"""Airflow DAG: keyword spotting on Speech Commands: daily Spark preprocessing, GPU training when the retrain
policy says so, and Spark batch scoring with the published model.

Everything this DAG does is declared in ``pipelines/speech_commands.yaml``; the task graph is
built by :mod:`twocluster.orchestration.dag_factory` (see its docstring for the connections, variables and
pools it uses).
"""

from twocluster.deployment import PIPELINES_DIR
from twocluster.orchestration.dag_factory import build_pipeline_dag

# The deployment's pipelines folder: pipelines/ next to dags/, or $TWOCLUSTER_PIPELINES_DIR.
dag = build_pipeline_dag(PIPELINES_DIR / "speech_commands.yaml")
