"""The ops page inside the Airflow UI: the FastAPI app of :mod:`twocluster.ops.opsview` mounted on the
API server at ``/twocluster``, linked from the navigation ("Browse" -> "Pipeline health") and from
every DAG run (a "Store lineage" tab: what that run committed).

Every route requires an authenticated Airflow user (``requires_authenticated()``; a plugin's
sub-app is public otherwise). The store is the one the DAGs use, by the same lookup
(:func:`twocluster.store_access.store_for`; a 500 on the compose stack when the page
read ``TWOCLUSTER_STORE_URI`` only); pipelines are the specs in ``TWOCLUSTER_PIPELINES_DIR``
(default: the repository's ``pipelines/``).
"""

from __future__ import annotations

from functools import lru_cache

from airflow.plugins_manager import AirflowPlugin

from twocluster.deployment import PIPELINES_DIR

URL_PREFIX = "/twocluster"


def _trigger_run(request, dag_id: str, conf: dict) -> str:
    """Trigger ``dag_id`` through Airflow's own REST API with the caller's token (the cookie the UI
    signed them in with, or their bearer token): the run is theirs, with Airflow's permission
    checks and audit log, as if they had pressed Trigger."""
    import json
    import urllib.error
    import urllib.request

    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN

    token = request.cookies.get(COOKIE_NAME_JWT_TOKEN) or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    body = {"logical_date": None, "conf": conf, "note": "re-run from the twocluster ops page"}
    call = urllib.request.Request(f"{request.url.scheme}://{request.url.netloc}/api/v2/dags/{dag_id}/dagRuns", method="POST",
                                  data=json.dumps(body).encode(), headers={"Authorization": f"Bearer {token}",
                                                                           "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return json.loads(response.read())["dag_run_id"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{e.code}: {e.read()[:500].decode(errors='replace')}") from None


@lru_cache(maxsize=1)
def _app():
    import hashlib
    import secrets

    from airflow.api_fastapi.core_api.security import get_user, requires_authenticated
    from airflow.configuration import conf
    from fastapi import Depends

    from twocluster import store_access
    from twocluster.ops.opsview import create_app, load_specs

    def store_for(spec):
        return store_access.store_for(spec, via="server")  # the DAGs' lookup, read where the API server reads

    def signed_in(user=Depends(get_user)) -> str:  # noqa: B008 - FastAPI's idiom; no annotation: they are strings here
        return user.get_name()

    # The forms' token key: from Airflow's JWT secret, so every API server worker agrees (a
    # random one per process when none is configured: one process only, as `make ui` runs).
    secret = conf.get("api_auth", "jwt_secret", fallback="") or secrets.token_hex(32)
    return create_app(store_for, lambda: load_specs(PIPELINES_DIR), auth=requires_authenticated(), base=URL_PREFIX,
                      user=signed_in, csrf_key=hashlib.sha256(b"twocluster-ops-forms:" + secret.encode()).digest(),
                      trigger_run=_trigger_run)


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
