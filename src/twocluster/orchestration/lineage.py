"""The Airflow side of lineage (:mod:`twocluster.lineage.datasets` builds the datasets): the provider's
return type for the operators, whether the provider is on, and what a Spark job's driver is told
so that its own OpenLineage run hangs under the task that launched it.

Imported only when a task runs (never at DAG parse time): the provider's modules are not light.
"""

from __future__ import annotations

import json
from typing import Any

from twocluster.lineage import CONTEXT_ENV, Parent


def operator_lineage(inputs: list, outputs: list):
    """The provider's return type for ``get_openlineage_facets_on_complete``."""
    from airflow.providers.openlineage.extractors import OperatorLineage

    return OperatorLineage(inputs=inputs, outputs=outputs)


def enabled() -> bool:
    """Whether the OpenLineage provider will emit events (a transport is configured)."""
    try:
        from airflow.providers.openlineage.conf import is_disabled
    except ImportError:
        return False
    return not is_disabled()


def task_parent(task_instance: Any) -> Parent:
    """The task run as a parent, by the provider's own macros (the ids its task events carry)."""
    from airflow.providers.openlineage.plugins import macros

    namespace = macros.lineage_job_namespace()
    return Parent(namespace, macros.lineage_job_name(task_instance), macros.lineage_run_id(task_instance),
                  macros.lineage_root_job_namespace(task_instance), macros.lineage_root_job_name(task_instance),
                  macros.lineage_root_run_id(task_instance))


def job_driver_environment(task_instance: Any, with_transport: bool) -> dict[str, str]:
    """What a Spark job's driver needs to report its own run under ``task_instance``: the parent
    (``OPENLINEAGE_CONTEXT``) and, with ``with_transport`` (a driver that runs beside the task, so
    an endpoint's key stays in a process environment), the provider's transport in the client's
    own variable. A driver elsewhere (YARN, Kubernetes cluster mode) is configured where it runs
    (``OPENLINEAGE_URL`` or ``openlineage.yml`` in its image). Empty when the provider is off."""
    if not enabled():
        return {}
    from airflow.providers.openlineage import conf

    env = {CONTEXT_ENV: task_parent(task_instance).to_context()}
    if with_transport:
        if transport := conf.transport():
            env["OPENLINEAGE__TRANSPORT"] = json.dumps(transport)
        elif config_path := conf.config_path():
            env["OPENLINEAGE_CONFIG"] = config_path
    return env
