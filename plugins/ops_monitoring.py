"""The ops page inside the Airflow UI: the FastAPI app of :mod:`twocluster.ops.opsview` mounted on the
API server at ``/twocluster``, linked from the navigation ("Browse" -> "Pipeline health") and from
every DAG run (a "Store lineage" tab: what that run committed).

Every route requires an authenticated Airflow user (``requires_authenticated()``; a plugin's
sub-app is public otherwise). The store is the one the DAGs use: the ``TWOCLUSTER_STORE_URI``
environment variable, else the spec's ``store_uri``; pipelines are the specs in
``TWOCLUSTER_PIPELINES_DIR`` (default: the repository's ``pipelines/``).
"""

from __future__ import annotations

from functools import lru_cache

from airflow.plugins_manager import AirflowPlugin

from twocluster.deployment import PIPELINES_DIR

URL_PREFIX = "/twocluster"


@lru_cache(maxsize=1)
def _app():
    from airflow.api_fastapi.core_api.security import requires_authenticated

    from twocluster.ops.opsview import create_app, load_specs
    from twocluster.store.storage import ObjectStore

    def store_for(spec):
        return ObjectStore(spec.resolve_store_uri())

    return create_app(store_for, lambda: load_specs(PIPELINES_DIR), auth=requires_authenticated(), base=URL_PREFIX)


class OpsPageApp:
    """The ops page as an ASGI app that builds itself on its first request. Every Airflow process
    that loads plugins imports this module (``airflow dags test``, a task resolving its operator
    links), and building the page's app there, importing the ops view, its charts and the store,
    cost each of them ~1.3 s (py-spy of an ``airflow dags test``, 2026-12-01); only the API
    server ever serves it."""

    async def __call__(self, scope, receive, send):
        await _app()(scope, receive, send)


class TwoclusterOpsPlugin(AirflowPlugin):
    name = "twocluster_ops"
    fastapi_apps = [{"app": OpsPageApp(), "url_prefix": URL_PREFIX, "name": "twocluster ops"}]
    external_views = [{
        "name": "Pipeline health",
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "category": "browse",
        "url_route": "pipeline-health",
    }, {
        # A tab on every DAG run: what that run committed (the UI fills in the placeholders).
        "name": "Store lineage",
        "href": f"{URL_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}",
        "destination": "dag_run",
        "url_route": "store-lineage",
    }]
