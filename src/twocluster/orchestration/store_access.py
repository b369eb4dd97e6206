"""How the Airflow side reaches the store: the URI from the ``twocluster_store_uri`` variable (else
``$TWOCLUSTER_STORE_URI``, else the spec's ``store_uri``) and the credentials from an Airflow
connection (``twocluster_store``; the Spark jobs may get their own, ``twocluster_store_spark``),
else the worker's own ``AWS_*`` environment. Used by the pipeline DAGs and the health check."""

from __future__ import annotations

from twocluster.spec import PipelineSpec
from twocluster.store.storage import ObjectStore, S3Settings

STORE_URI_VARIABLE = "twocluster_store_uri"
STORE_CONNECTION = "twocluster_store"
SPARK_STORE_CONNECTION = "twocluster_store_spark"


def store_for(spec: PipelineSpec) -> ObjectStore:
    from airflow.sdk import Variable

    uri = spec.resolve_store_uri(Variable.get(STORE_URI_VARIABLE, default=None))
    return ObjectStore(uri, store_settings())


def store_settings(*conn_ids: str) -> S3Settings | None:
    """The first of these connections that exists (default ``twocluster_store``), else ``None``:
    the worker's own ``AWS_*`` environment."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    for conn_id in conn_ids or (STORE_CONNECTION,):
        try:
            return S3Settings.from_airflow_connection(BaseHook.get_connection(conn_id))
        except AirflowNotFoundException:
            continue
    return None
