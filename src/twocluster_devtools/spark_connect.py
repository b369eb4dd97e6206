"""A Spark Connect server on 127.0.0.1 from the pyspark distribution: the long-lived Spark
application a deployment's ``spark_default`` connection can point at (type ``spark_connect``),
for the bench and the tests. Jobs then run as Spark Connect clients on its warm JVM and Python
workers instead of starting a Spark application each (:class:`~twocluster.orchestration.dag_factory.PipelineSparkOperator`).

    with LocalSparkConnect(workdir, cores=2) as server:
        server.url         # sc://127.0.0.1:<port>
        server.connection  # AIRFLOW_CONN_SPARK_DEFAULT's value

Spark 4.2's server keeps every session's Python workers until it stops (3 processes per session
here; SPARK-54055 releases them on session close upstream). The jobs share a session per code
version and settings (``twocluster.spark.session.connect_session``), so that is a few sets, not
one per job; a deployment that changes its code often restarts its server on a schedule.

The server gets the jobs' application settings (``twocluster.spark.session.SPARK_SETTINGS``) and
runs its Python workers with this environment's interpreter; its log is ``<workdir>/spark-connect.log``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twocluster.spark.session import SPARK_SETTINGS
from twocluster_devtools.airflow_local import free_port
from twocluster_devtools.stack import StackError, _spark_home

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"


class LocalSparkConnect:
    def __init__(self, workdir: str | os.PathLike[str], cores: int = 2, port: int | None = None, timeout: float = 180):
        self.workdir, self.cores, self.timeout = Path(workdir), cores, timeout
        self.port = port or free_port()
        self.url = f"sc://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "spark-connect.log"
        self._process: subprocess.Popen | None = None

    @property
    def connection(self) -> str:
        """The Airflow connection for it, as ``AIRFLOW_CONN_SPARK_DEFAULT`` takes it."""
        return json.dumps({"conn_type": "spark_connect", "host": "sc://127.0.0.1", "port": self.port})

    def start(self) -> LocalSparkConnect:
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = {
            **SPARK_SETTINGS,
            "spark.connect.grpc.binding.address": "127.0.0.1",
            "spark.connect.grpc.binding.port": str(self.port),
            "spark.sql.shuffle.partitions": str(2 * self.cores),
            "spark.ui.enabled": "false",  # tests start several; a job's UI is not what they look at
            "spark.local.dir": str(self.workdir / "spark-local"),
        }
        command = [str(_spark_home() / "bin" / "spark-submit"), "--master", f"local[{self.cores}]", "--class", SERVER_CLASS,
                   "--name", "twocluster Spark Connect", *(arg for key, value in settings.items() for arg in ("--conf", f"{key}={value}"))]
        # The server's executors read the store with their own environment, as a cluster's
        # workers would; their Python is this environment's.
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
        env.pop("SPARK_REMOTE", None)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + self.timeout
        while not self._accepts():
            if self._process.poll() is not None:
                raise StackError(f"the Spark Connect server exited ({self._process.returncode}); see {self.log_path}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"the Spark Connect server did not listen on {self.port} within {self.timeout:.0f}s; see {self.log_path}")
            time.sleep(0.25)
        return self

    def _accepts(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, grace: float = 20) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # The whole group: spark-submit's JVM and the Python workers it started.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> LocalSparkConnect:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
