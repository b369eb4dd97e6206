"""The compose topology as processes on 127.0.0.1, without Docker: `make stack-up` / `make stack-down`.

What ``docker-compose.yml`` starts as containers, started here from Debian packages and the venv:

* **PostgreSQL** (Debian's ``postgresql``): Airflow's metadata database, in a cluster of its own
  under ``.local/stack/postgres`` (``initdb`` + ``pg_ctl``; as the ``postgres`` user when run as root);
* **Ceph RGW** (:class:`twocluster_devtools.local_s3.LocalRGW`, the same launcher the compose
  stack's ``s3`` image runs) with the three per-component users and ``docker/s3/bucket-policy.json``;
* **Spark standalone**: a master and two workers from the pyspark distribution
  (``spark-class org.apache.spark.deploy.master.Master`` / ``...worker.Worker``), each worker with
  its own work dir and its own environment: the Spark side's S3 keys, as compose gives them;
* **Airflow**: ``api-server``, ``scheduler`` (LocalExecutor), ``dag-processor`` and ``triggerer``,
  with the environment **read from docker-compose.yml** (``x-airflow-common``, ``x-store-airflow``,
  ``x-store-all``; each process gets what its compose service gets), the compose host names
  mapped to loopback ports (:func:`airflow_environment`). The differences are listed, and tested,
  in :data:`STACK_OVERRIDES`;
* the **local training backend** with the trainer's own identity (the ``twocluster_store_trainer``
  connection, as the compose stack's Docker backend uses it), since there is no Docker daemon.

``up`` returns once everything answers, prints the URLs and the login and writes them to
``.local/stack/endpoints.json`` (mode 600: it holds the generated admin password). ``down`` stops
every process it started (process groups, from ``.local/stack/processes.json``) and checks that
none is left.

    python -m twocluster_devtools.stack up [--pipelines DIR]
    python -m twocluster_devtools.stack down
    eval "$(python -m twocluster_devtools.stack env --as operator)"   # then: twocluster status
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from twocluster.deployment import ROOT as REPO_ROOT
from twocluster_devtools.airflow_local import airflow_env, free_port
from twocluster_devtools.local_s3 import LocalRGW

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
BUCKET_POLICY = REPO_ROOT / "docker" / "s3" / "bucket-policy.json"
DEFAULT_DIR = REPO_ROOT / ".local" / "stack"
STORE_USERS = ("airflow", "spark", "trainer")  # the components' identities
# People's and upstreams' identities (docker/s3/bucket-policy.json): ``ingest`` drops arrivals and
# may write only under raw/; ``operator`` reads everything and writes nothing (``twocluster status``).
OUTSIDE_USERS = ("ingest", "operator")
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# Which compose store-credential block each Airflow process gets (compose: x-store-airflow on the
# API server, x-store-all on the scheduler, where tasks run; none on the others).
STORE_BLOCKS = {"api-server": "x-store-airflow", "scheduler": "x-store-all", "dag-processor": None, "triggerer": None}
# Where this stack departs from compose's Airflow environment, and why. Everything else is
# compose's, with host names mapped to loopback (tests/test_stack.py checks both).
STACK_OVERRIDES = {
    "AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND": "no Docker daemon: the local backend, with compose's trainer connection and environment",
    "SPARK_LOCAL_HOSTNAME": "the client-mode driver is reached on loopback, not by the scheduler container's name",
    "TWOCLUSTER_WORK_DIR": "a folder under the stack's directory instead of the airflow-work volume",
}
WORKERS = 2
WORKER_CORES = 1  # 2 cores here: one per worker, so each application spreads over both
WORKER_MEMORY = "2g"


class StackError(RuntimeError):
    pass


class Endpoints(BaseModel):
    """What scripts need to use a running stack (``.local/stack/endpoints.json``)."""

    airflow_url: str
    spark_master_url: str
    spark_master_web_url: str
    spark_worker_web_urls: list[str]
    s3_endpoint: str
    bucket: str
    store_uri: str
    airflow_user: str
    airflow_password: str
    # Keys for people and upstreams, never a component's: what drops arrivals (writes raw/ only)
    # and what an operator reads the store with (reads everything, writes nothing).
    ingest_access_key: str = ""
    ingest_secret_key: str = ""
    operator_access_key: str = ""
    operator_secret_key: str = ""

    def store_environment(self, user: Literal["ingest", "operator"]) -> dict[str, str]:
        """What ``twocluster`` (or any boto3 / pyarrow client) needs to reach the store as ``user``."""
        return {"TWOCLUSTER_STORE_URI": self.store_uri, "AWS_ENDPOINT_URL_S3": self.s3_endpoint, "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": getattr(self, f"{user}_access_key"), "AWS_SECRET_ACCESS_KEY": getattr(self, f"{user}_secret_key")}


# -- compose's environment, mapped onto loopback --------------------------------------------------


def _substitute(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${NAME}`` / ``${NAME:-default}`` interpolation (the forms the file uses)."""

    def one(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        if name in variables:
            return variables[name]
        if default is not None:
            return default
        raise StackError(f"docker-compose.yml uses ${{{name}}}, which the stack does not set")

    return re.sub(r"\$\{([A-Z0-9_]+)(:-([^}]*))?\}", one, value)


@functools.lru_cache(maxsize=4)
def _compose(compose_file: Path) -> dict[str, Any]:
    return yaml.safe_load(compose_file.read_text())


def compose_environment(component: str, variables: dict[str, str], compose_file: Path = COMPOSE_FILE) -> dict[str, str]:
    """The environment compose gives the Airflow ``component``'s container, interpolated."""
    compose = _compose(compose_file)
    env = dict(compose["x-airflow-common"]["environment"])
    block = STORE_BLOCKS[component]
    if block:
        env.update(compose[block])
    return {k: _substitute(str(v), variables) for k, v in env.items()}


def compose_pools(variables: dict[str, str], compose_file: Path = COMPOSE_FILE) -> dict[str, tuple[int, str]]:
    """The pools compose's ``airflow-init`` creates (``airflow pools set NAME SLOTS DOC``), interpolated."""
    script = "\n".join(_compose(compose_file)["services"]["airflow-init"]["command"])
    pools = {name: (int(_substitute(slots, variables)), doc)
             for name, slots, doc in re.findall(r'airflow pools set (\S+) "([^"]+)" "([^"]+)"', script)}
    if not pools:
        raise StackError("docker-compose.yml's airflow-init sets no pools")
    return pools


def loopback(value: str, ports: dict[str, int]) -> str:
    """Compose's service addresses -> this stack's loopback ports."""
    return (value.replace("@postgres/", f"@127.0.0.1:{ports['postgres']}/")
            .replace("http://s3:7480", f"http://127.0.0.1:{ports['s3']}")
            .replace("http://airflow-apiserver:8080", f"http://127.0.0.1:{ports['airflow']}")
            .replace('"host": "spark://spark-master", "port": 7077', f'"host": "spark://127.0.0.1", "port": {ports["spark"]}'))


def airflow_environment(component: str, variables: dict[str, str], ports: dict[str, int], home: Path, work_dir: Path,
                        pipelines_dir: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """One Airflow process's environment: the embedded installation's paths (what the image's
    ENV gives a container), compose's variables on loopback, then :data:`STACK_OVERRIDES`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "TWOCLUSTER_", "SPARK_"))}
    env = airflow_env(home, f"s3://{variables['S3_BUCKET']}", base=base)
    env.pop("TWOCLUSTER_STORE_URI")  # compose gives the store as a variable (AIRFLOW_VAR_TWOCLUSTER_STORE_URI)
    env.update({k: loopback(v, ports) for k, v in compose_environment(component, variables).items()})
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC"):
        env.pop(key, None)  # SQLite's lock wait (airflow_env); compose's database is PostgreSQL
    backend = json.loads(env["AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND"])
    env["AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND"] = json.dumps(
        {"kind": "local", "credentials_conn_id": backend["credentials_conn_id"], "env": backend["env"]})
    env["SPARK_LOCAL_HOSTNAME"] = "127.0.0.1"
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["TWOCLUSTER_WORK_DIR"] = str(work_dir)
    env["SPARK_CONF_DIR"] = str(home.parent / "spark-conf")  # the driver's spark-defaults.conf: event logs
    env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(home / "simple_auth_manager_passwords.json")
    env["AIRFLOW__API__BASE_URL"] = f"http://127.0.0.1:{ports['airflow']}"
    env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"] = str(ports["scheduler_health"])
    env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(ports["worker_logs"])
    env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] = str(ports["trigger_logs"])
    if pipelines_dir:
        env["TWOCLUSTER_PIPELINES_DIR"] = str(pipelines_dir)
    env.update(extra or {})
    return env


# -- processes ------------------------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise StackError("PostgreSQL's server is not installed: sudo apt-get install -y --no-install-recommends postgresql")
    return found[-1]


class LocalStack:
    """Start, use and stop the stack. ``extra_airflow_env``: settings a test needs on top of
    compose's (e.g. a shorter heartbeat timeout), applied to every Airflow process."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_DIR, *, pipelines_dir: Path | None = None,
                 bucket: str = "twocluster", extra_airflow_env: dict[str, str] | None = None):
        self.root = Path(root).resolve()
        self.pipelines_dir = Path(pipelines_dir).resolve() if pipelines_dir else None
        self.bucket = bucket
        self.extra_airflow_env = extra_airflow_env or {}
        self.processes: dict[str, int] = {}  # name -> pid (each the leader of its own process group)
        self.ports = {name: free_port() for name in ("postgres", "s3", "airflow", "spark", "spark_web", "scheduler_health",
                                                      "worker_logs", "trigger_logs")}
        self.worker_web_ports = [free_port() for _ in range(WORKERS)]
        self.keys = {user: ("STACK" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30)) for user in ("admin", *STORE_USERS, *OUTSIDE_USERS)}
        self.variables = {
            "POSTGRES_USER": "airflow", "POSTGRES_PASSWORD": secrets.token_urlsafe(18), "S3_BUCKET": bucket,
            "AIRFLOW_JWT_SECRET": secrets.token_urlsafe(32), "AIRFLOW_FERNET_KEY": _fernet_key(), "AIRFLOW_ADMIN_USER": "admin",
            **{f"S3_{u.upper()}_ACCESS_KEY": k[0] for u, k in self.keys.items()},
            **{f"S3_{u.upper()}_SECRET_KEY": k[1] for u, k in self.keys.items()},
        }
        self.admin_password = secrets.token_urlsafe(12)
        self.rgw: LocalRGW | None = None

    # -- paths and endpoints ------------------------------------------------------------------

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(
            airflow_url=f"http://127.0.0.1:{self.ports['airflow']}",
            spark_master_url=f"spark://127.0.0.1:{self.ports['spark']}",
            spark_master_web_url=f"http://127.0.0.1:{self.ports['spark_web']}",
            spark_worker_web_urls=[f"http://127.0.0.1:{p}" for p in self.worker_web_ports],
            s3_endpoint=f"http://127.0.0.1:{self.ports['s3']}", bucket=self.bucket, store_uri=f"s3://{self.bucket}",
            airflow_user=self.variables["AIRFLOW_ADMIN_USER"], airflow_password=self.admin_password,
            ingest_access_key=self.keys["ingest"][0], ingest_secret_key=self.keys["ingest"][1],
            operator_access_key=self.keys["operator"][0], operator_secret_key=self.keys["operator"][1],
        )

    def env_for(self, component: str) -> dict[str, str]:
        return airflow_environment(component, self.variables, self.ports, self.airflow_home, self.root / "work",
                                   self.pipelines_dir, self.extra_airflow_env)

    def s3_client(self, user: str = "admin"):
        import boto3

        access, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=self.endpoints.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id=access, aws_secret_access_key=secret)

    # -- lifecycle ----------------------------------------------------------------------------

    def up(self, timeout: float = 300) -> Endpoints:
        started = time.perf_counter()
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        for sub in ("logs", "work", "spark-events", "spark-conf", "airflow"):
            (self.root / sub).mkdir(parents=True)
        try:
            self._start_postgres()
            self._start_s3()
            self._start_spark()
            self._start_airflow(timeout)
        except BaseException:
            self.down()
            raise
        endpoints = self.endpoints
        path = self.root / "endpoints.json"
        path.touch(mode=0o600)
        path.write_text(endpoints.model_dump_json(indent=2))
        self._save_processes()
        print(f"stack up in {time.perf_counter() - started:.0f}s", flush=True)
        return endpoints

    def down(self) -> list[str]:
        """Stop everything this stack started; returns what was still running after SIGKILL."""
        if not self.processes and (self.root / "processes.json").exists():
            self.processes = json.loads((self.root / "processes.json").read_text())
        for name in reversed(list(self.processes)):
            if name != "postgres":
                self.stop_process(name)
        if (self.root / "postgres_dir").exists():
            pg = self.postgres_dir
            if (pg / "data" / "postmaster.pid").exists():
                self._as_postgres([_postgres_bin("pg_ctl"), "-D", str(pg / "data"), "-m", "fast", "-w", "stop"], check=False)
            if pg.parent != self.root:
                shutil.rmtree(pg, ignore_errors=True)
            (self.root / "postgres_dir").unlink(missing_ok=True)
        left = [name for name, pid in self.processes.items() if _group_alive(pid)]
        self.processes.clear()
        if (self.root / "processes.json").exists():
            (self.root / "processes.json").unlink()
        return left

    def stop_process(self, name: str, grace: float = 20) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds (compose's stop)."""
        pid = self.processes.get(name)
        if pid is None:
            return
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_group(pid, signal.SIGKILL)
        while _group_alive(pid) and time.monotonic() < deadline + 10:
            time.sleep(0.2)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def kill_process(self, name: str) -> None:
        """SIGKILL to the process group at once (a crashed machine)."""
        pid = self.processes[name]
        _signal_group(pid, signal.SIGKILL)
        while _group_alive(pid):
            time.sleep(0.1)

    def restart(self, name: str, timeout: float = 120) -> None:
        """Start a stopped component again with the same settings and wait until it answers."""
        if name.startswith("spark-worker-"):
            self._start_worker(int(name.rsplit("-", 1)[1]))
            self._wait(lambda: self._alive_workers() == WORKERS, timeout, "the Spark workers to register again")
        elif name in AIRFLOW_COMPONENTS:
            self._spawn(name, [self._airflow_bin, name], self.env_for(name))
            self._wait(self._airflow_healthy, timeout, "Airflow to be healthy again")
        elif name == "radosgw":
            assert self.rgw is not None
            self.rgw.start_gateway(timeout)
            self.processes["radosgw"] = self.rgw.gateway_pid
        else:
            raise StackError(f"cannot restart {name!r}")
        self._save_processes()

    # -- components ---------------------------------------------------------------------------

    def _as_postgres(self, cmd: list[str], check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if check and result.returncode != 0:
            raise StackError(f"{Path(cmd[0 if os.geteuid() else 4]).name} failed: {result.stderr.strip()[-2000:]}")
        return result

    @property
    def postgres_dir(self) -> Path:
        """The database cluster's folder. As root, PostgreSQL runs as the ``postgres`` user, who
        may not be able to reach a folder under a private one (pytest's temporary folders are
        mode 700): then a folder of its own under /tmp, named in ``postgres_dir`` here."""
        pointer = self.root / "postgres_dir"
        if pointer.exists():
            return Path(pointer.read_text())
        if os.geteuid() == 0:
            import tempfile

            path = Path(tempfile.mkdtemp(prefix="twocluster-stack-postgres-"))
        else:
            path = self.root / "postgres"
            path.mkdir(parents=True, exist_ok=True)
        pointer.write_text(str(path))
        return path

    def _start_postgres(self) -> None:
        pg = self.postgres_dir
        (pg / "socket").mkdir(parents=True)
        password_file = pg / "password"
        password_file.write_text(self.variables["POSTGRES_PASSWORD"])
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (pg, pg / "socket", password_file):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        password_file.chmod(0o600)
        self._as_postgres([_postgres_bin("initdb"), "-D", str(pg / "data"), "-U", "airflow", "--auth=scram-sha-256",
                           f"--pwfile={password_file}", "--encoding=UTF8", "--locale=C"])
        password_file.unlink()
        options = f"-p {self.ports['postgres']} -c listen_addresses=127.0.0.1 -k {pg / 'socket'} -c max_connections=200"
        self._as_postgres([_postgres_bin("pg_ctl"), "-D", str(pg / "data"), "-l", str(pg / "postgres.log"), "-o", options, "-w", "start"])
        self.processes["postgres"] = int((pg / "data" / "postmaster.pid").read_text().split()[0])
        self._as_postgres([_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.ports["postgres"]), "-U", "airflow", "airflow"],
                          env={**os.environ, "PGPASSWORD": self.variables["POSTGRES_PASSWORD"]})

    def _start_s3(self) -> None:
        admin = self.keys["admin"]
        self.rgw = LocalRGW(self.root / "s3", port=self.ports["s3"], access_key=admin[0], secret_key=admin[1])
        self.rgw.start()
        for name, pid in self.rgw.pids.items():
            self.processes[name] = pid
        self.rgw.configure_bucket(self.bucket, {u: self.keys[u] for u in (*STORE_USERS, *OUTSIDE_USERS)}, BUCKET_POLICY)

    @property
    def _spark_class(self) -> str:
        return str(_spark_home() / "bin" / "spark-class")

    def _spark_env(self, **more: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPARK_", "PYSPARK_"))}
        return {**base, "SPARK_HOME": str(_spark_home()), "SPARK_LOCAL_IP": "127.0.0.1",
                "SPARK_LOCAL_HOSTNAME": "127.0.0.1", "PYSPARK_PYTHON": sys.executable, **more}

    def _start_spark(self) -> None:
        (self.root / "spark-conf" / "spark-defaults.conf").write_text(
            # Event logs, for Spark's history server and the tests: one plain JSON-lines file per
            # application (Spark 4 rolls and zstd-compresses them by default).
            f"spark.eventLog.enabled true\nspark.eventLog.dir file://{self.root / 'spark-events'}\n"
            "spark.eventLog.rolling.enabled false\nspark.eventLog.compress false\n")
        self._spawn("spark-master", [self._spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                     "--port", str(self.ports["spark"]), "--webui-port", str(self.ports["spark_web"])],
                    self._spark_env())
        self._wait(lambda: _http_ok(f"{self.endpoints.spark_master_web_url}/json/"), 120, "the Spark master")
        for i in range(1, WORKERS + 1):
            self._start_worker(i)
        self._wait(lambda: self._alive_workers() == WORKERS, 120, f"{WORKERS} Spark workers to register")

    def _start_worker(self, i: int) -> None:
        work = self.root / f"spark-worker-{i}"
        work.mkdir(exist_ok=True)
        access, secret = self.keys["spark"]
        # The Spark side's identity, as compose's spark-worker services get it: executors inherit it.
        env = self._spark_env(AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret, AWS_ENDPOINT_URL_S3=self.endpoints.s3_endpoint,
                              AWS_REGION="us-east-1", SPARK_WORKER_DIR=str(work))
        self._spawn(f"spark-worker-{i}", [self._spark_class, "org.apache.spark.deploy.worker.Worker", self.endpoints.spark_master_url,
                                          "--host", "127.0.0.1", "--webui-port", str(self.worker_web_ports[i - 1]),
                                          "--cores", str(WORKER_CORES), "--memory", WORKER_MEMORY, "--work-dir", str(work)], env)

    def _alive_workers(self) -> int:
        return sum(w["state"] == "ALIVE" for w in self.spark_master_status()["workers"])

    def spark_master_status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoints.spark_master_web_url}/json/", timeout=10) as r:
            return json.loads(r.read())

    @property
    def _airflow_bin(self) -> str:
        return str(Path(sys.executable).parent / "airflow")

    def _start_airflow(self, timeout: float) -> None:
        from twocluster_devtools.airflow_local import prepare

        passwords = self.airflow_home / "simple_auth_manager_passwords.json"
        passwords.touch(mode=0o600)
        passwords.write_text(json.dumps({self.variables["AIRFLOW_ADMIN_USER"]: self.admin_password}))
        prepare(self.env_for("scheduler"), compose_pools(self.variables))  # compose's airflow-init: migrate, pools
        for component in AIRFLOW_COMPONENTS:
            cmd = [self._airflow_bin, component]
            if component == "api-server":
                cmd += ["--host", "127.0.0.1", "--port", str(self.ports["airflow"])]
            self._spawn(component, cmd, self.env_for(component))
        self._wait(self._airflow_healthy, timeout, "Airflow's API server, scheduler, DAG processor and triggerer")

    def _airflow_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoints.airflow_url}/api/v2/monitor/health", timeout=5) as r:
                health = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return all(health.get(part, {}).get("status") == "healthy" for part in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.root)
        log.close()
        self.processes[name] = proc.pid
        self._save_processes()

    def _save_processes(self) -> None:
        (self.root / "processes.json").write_text(json.dumps(self.processes, indent=2))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, pid in self.processes.items() if n != "postgres" and not _alive(pid)]
            if dead:
                raise StackError(f"{', '.join(dead)} exited while waiting for {what}; see {self.root / 'logs'}")
            if ready():
                return
            time.sleep(0.5)
        raise StackError(f"timed out after {timeout:.0f}s waiting for {what}; see {self.root / 'logs'}")


def _spark_home() -> Path:
    """The pyspark distribution (its launcher scripts and jars), found without importing it."""
    from importlib.util import find_spec

    spec = find_spec("pyspark")
    if spec is None or not spec.origin:
        raise StackError("pyspark is not installed in this environment (make venv)")
    return Path(spec.origin).parent


def _fernet_key() -> str:
    """A Fernet key (what ``Fernet.generate_key()`` returns: 32 random bytes, URL-safe base64)."""
    import base64

    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.split("/")[2]))
    return members


def _group_alive(pgid: int) -> bool:
    _alive(pgid)  # reap our own child if it exited
    return bool(_group_members(pgid))


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The compose topology as processes on 127.0.0.1 (no Docker).")
    parser.add_argument("command", choices=["up", "down", "env"],
                        help="env: print `export` lines for the store as --as (for eval in a shell of your own)")
    parser.add_argument("--as", dest="identity", choices=list(OUTSIDE_USERS), default="operator")
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="the stack's folder (wiped by up)")
    parser.add_argument("--pipelines", default=None, help="pipeline specs folder (default: the repository's pipelines/)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if args.command == "env":
        endpoints = Endpoints.model_validate_json((root / "endpoints.json").read_text())
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in endpoints.store_environment(args.identity).items()))
        return 0
    if args.command == "down":
        left = LocalStack(root).down()
        if left:
            print(f"still running after SIGKILL: {', '.join(left)}", file=sys.stderr)
            return 1
        print("stack down: no process left")
        return 0
    if (root / "processes.json").exists():
        LocalStack(root).down()
    stack = LocalStack(root, pipelines_dir=Path(args.pipelines) if args.pipelines else None)
    e = stack.up()
    print(string.Template("""
Airflow        $airflow_url   (user $airflow_user, password in $dir/endpoints.json)
Spark master   $spark_master_url   (web UI $spark_master_web_url)
S3 (Ceph RGW)  $s3_endpoint   bucket $bucket; users airflow, spark, trainer (components), ingest (raw/ only), operator (read-only)
Next:          make stack-demo   (sample arrivals, a backfill, then `twocluster status` with the operator key)
Stop it with:  make stack-down
""").substitute(e.model_dump(), dir=root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
