"""Airflow DAG: the hourly health check of every pipeline in ``pipelines/`` (freshness, reject
rate, prediction drift), failing through the failure notifier with the dates named. Built by
:mod:`twocluster.ops.health_dag`."""

from twocluster.ops.health_dag import build_health_dag

dag = build_health_dag()
