"""The embedded Airflow: a metadata database (SQLite) and configuration under one folder, the
repository's plugins, and the connections the pipeline DAGs need, for `make run`, the tests and
local development. Nothing here is used by a deployed Airflow (the compose stack sets the same
variables itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twocluster.deployment import ROOT as REPO_ROOT

# SQLite lets one writer in at a time and makes the others wait only 5 s by default; with a
# scheduler, a DAG processor, a triggerer and an API server writing one file on two busy cores, a
# CLI write (`airflow backfill create`) waited longer than that and failed with "database is
# locked". Wait up to a minute instead (`sqlite3.connect(timeout=)`; aiosqlite passes it through).
SQLITE_CONNECT_ARGS = {"timeout": 60}
POOLS = {"spark_cluster": (1, "Spark jobs in flight (the Spark cluster's capacity)"),
         "gpu_training": (1, "training jobs in flight (the GPU backend's capacity)")}


def airflow_env(airflow_home: Path, store_uri: str, *, dags_folder: Path | None = None, spark_master: str = "local[*]",
                spark_connection: str | None = None, base: dict[str, str] | None = None,
                lineage_dir: Path | None = None) -> dict[str, str]:
    """Environment for `airflow` commands against the embedded installation. The Spark jobs run
    on ``spark_master`` (an application each), or where ``spark_connection`` (the
    ``spark_default`` connection as JSON, e.g. a Spark Connect server's) says. With
    ``lineage_dir``, OpenLineage events go there, one JSON file each (the client's file
    transport); without, the OpenLineage provider stays off."""
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_SPARK_DEFAULT": spark_connection or json.dumps({"conn_type": "spark", "host": spark_master}),
        "TWOCLUSTER_STORE_URI": store_uri,
        # spark-submit (run bare by the Spark provider) and the executors' Python come from the venv.
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
        "PYSPARK_PYTHON": sys.executable,
    })
    if lineage_dir is not None:
        Path(lineage_dir).mkdir(parents=True, exist_ok=True)
        env["AIRFLOW__OPENLINEAGE__NAMESPACE"] = "twocluster"
        env["AIRFLOW__OPENLINEAGE__TRANSPORT"] = json.dumps({"type": "file", "log_file_path": str(Path(lineage_dir) / "event")})
    if env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite").startswith("sqlite"):
        for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC"):
            env[key] = f"{__name__}.SQLITE_CONNECT_ARGS"
    return env


def airflow(env: dict[str, str], *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=env, **kwargs)


def prepare(env: dict[str, str], pools: dict[str, tuple[int, str]] = POOLS) -> None:
    """Create or migrate the metadata database and the pools (both idempotent)."""
    for cmd in (["db", "migrate"], *(["pools", "set", name, str(slots), doc] for name, (slots, doc) in pools.items())):
        result = airflow(env, *cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """`airflow api-server` on 127.0.0.1 with the repository's plugins (the ops page among them) and
    one admin user of the simple auth manager, whose password is written to a file only the
    owner can read (never to a command line or a log). Used by `make ui` and the browser tests.

        with ApiServer(env, home) as server:
            server.url, server.user, server.password
    """

    def __init__(self, env: dict[str, str], home: Path, port: int | None = None, user: str = "admin", password: str | None = None):
        import secrets

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.user = user
        self.password = password or secrets.token_urlsafe(12)
        self.home = Path(home)
        passwords = self.home / "simple_auth_manager_passwords.json"
        passwords.parent.mkdir(parents=True, exist_ok=True)
        passwords.write_text(json.dumps({user: self.password}))
        passwords.chmod(0o600)
        self.env = {**env,
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:admin",
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                    "AIRFLOW__API__BASE_URL": self.url,
                    "AIRFLOW__API__HOST": "127.0.0.1",
                    "AIRFLOW__API__PORT": str(self.port)}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> ApiServer:
        import time
        import urllib.request

        prepare(self.env)
        log = open(self.home / "api-server.log", "w")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "api-server", "--host", "127.0.0.1",
                                         "--port", str(self.port)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"airflow api-server exited; see {self.home / 'api-server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"airflow api-server did not answer within {timeout:.0f}s; see {self.home / 'api-server.log'}")

    def token(self) -> str:
        import urllib.request

        request = urllib.request.Request(f"{self.url}/auth/token", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"username": self.user, "password": self.password}).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["access_token"]

    def stop(self) -> None:
        import signal

        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
