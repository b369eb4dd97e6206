"""Airflow's REST API (v2) with a user's token: what the stack demo and the stack tests drive a
running Airflow with (``/auth/token``, then ``Authorization: Bearer``)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


class AirflowApiError(RuntimeError):
    pass


class AirflowApi:
    def __init__(self, url: str, user: str, password: str):
        self.url = url.rstrip("/")
        request = urllib.request.Request(f"{self.url}/auth/token", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"username": user, "password": password}).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            self.token = json.loads(response.read())["access_token"]

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        """(HTTP status, the answer as JSON, or as text when it is not JSON)."""
        request = urllib.request.Request(f"{self.url}/api/v2{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text, status = response.read().decode(), response.status
        except urllib.error.HTTPError as e:
            text, status = e.read().decode(), e.code
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def ok(self, method: str, path: str, body: dict | None = None) -> Any:
        status, answer = self.call(method, path, body)
        if status not in (200, 201):
            raise AirflowApiError(f"{method} {path}: {status} {answer}")
        return answer

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.ok("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(3)
        raise AirflowApiError(f"run {run_id} still {run['state']} after {timeout:.0f}s; tasks: {self.task_states(dag_id, run_id)}")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        answer = self.ok("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")
        return {ti["task_id"]: ti for ti in answer["task_instances"]}

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {t: ti["state"] for t, ti in self.task_instances(dag_id, run_id).items()}

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        status, answer = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}?full_content=true")
        return json.dumps(answer)

    def trigger(self, dag_id: str, conf: dict) -> str:
        run = self.ok("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def dag_runs(self, dag_id: str) -> list[dict]:
        return self.ok("GET", f"/dags/{dag_id}/dagRuns?limit=100&order_by=logical_date")["dag_runs"]
