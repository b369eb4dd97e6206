"""How everything reaches the store: one lookup for the pipeline DAGs, the health DAG, the ops page
and the CLI (:func:`store_for`), so they all read the same store under every configuration. Beside
the architecture's folders because all of them use it (Airflow is imported in its functions only,
where a configuration asks Airflow: the CLI must not pay for Airflow, nor print its logging).

The URI, first found of:

1. an explicit override (the CLI's ``--store``);
2. the ``twocluster_store_uri`` Airflow variable (``AIRFLOW_VAR_TWOCLUSTER_STORE_URI``, a secrets
   backend, or, on the API server, the metadata database);
3. the ``TWOCLUSTER_STORE_URI`` environment variable;
4. the pipeline spec's ``store_uri``.

The credentials: the ``twocluster_store`` Airflow connection (the Spark jobs may get their own,
``twocluster_store_spark``: :func:`store_settings`), else the process's own ``AWS_*`` environment.

Who answers for Airflow (``via``): inside a task (``"task"``, the default), Airflow's task SDK (its
supervisor reads the metadata database and the secrets backends); in the API server (the ops
page, ``"server"``), Airflow's models; anywhere else (the CLI, ``"environment"``) the
``AIRFLOW_VAR_*`` / ``AIRFLOW_CONN_*`` environment only, Airflow imported only to parse a
connection that is there (a CLI call does not pay Airflow's import for nothing).
"""

from __future__ import annotations

import os
from typing import Literal

from twocluster.spec import STORE_URI_ENV, PipelineSpec, SpecError
from twocluster.store.storage import ObjectStore, S3Settings

STORE_URI_VARIABLE = "twocluster_store_uri"
STORE_CONNECTION = "twocluster_store"
SPARK_STORE_CONNECTION = "twocluster_store_spark"
Via = Literal["task", "server", "environment"]


def store_uri(spec: PipelineSpec | None, override: str | None = None, *, via: Via = "task") -> str:
    """The store's URI by the module's order; :class:`SpecError` naming every place looked at
    when none has one."""
    uri = override or _variable(STORE_URI_VARIABLE, via) or os.environ.get(STORE_URI_ENV) or (spec.store_uri if spec else None)
    if not uri:
        where = f"pipeline {spec.name!r}" if spec else "this command"
        raise SpecError(f"no store URI for {where}: pass --store, set the Airflow variable {STORE_URI_VARIABLE}, set "
                        f"{STORE_URI_ENV}{' or set store_uri in the spec' if spec else ''}")
    return uri


def store_for(spec: PipelineSpec | None, override: str | None = None, *, via: Via = "task") -> ObjectStore:
    """The store ``spec``'s pipeline uses (see the module), with its reader's identity."""
    return ObjectStore(store_uri(spec, override, via=via), store_settings(via=via))


def store_settings(*conn_ids: str, via: Via = "task") -> S3Settings | None:
    """The first of these connections that exists (default ``twocluster_store``), else ``None``:
    the process's own ``AWS_*`` environment."""
    for conn_id in conn_ids or (STORE_CONNECTION,):
        connection = _connection(conn_id, via)
        if connection is not None:
            return S3Settings.from_airflow_connection(connection)
    return None


def _variable(name: str, via: Via) -> str | None:
    if via == "environment":
        return os.environ.get(f"AIRFLOW_VAR_{name.upper()}")
    if via == "server":
        from airflow.models import Variable as ServerVariable

        return ServerVariable.get(name, default_var=None)
    from airflow.sdk import Variable

    return Variable.get(name, default=None)


def _connection(conn_id: str, via: Via):
    if via == "environment" and f"AIRFLOW_CONN_{conn_id.upper()}" not in os.environ:
        return None
    from airflow.sdk.exceptions import AirflowNotFoundException

    if via == "task":
        from airflow.sdk import BaseHook

        get = BaseHook.get_connection
    else:  # the server's models; in "environment", they parse the variable that is there
        from airflow.models.connection import Connection

        get = Connection.get_connection_from_secrets
    try:
        return get(conn_id)
    except AirflowNotFoundException:
        return None
