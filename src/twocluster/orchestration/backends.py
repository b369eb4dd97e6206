"""Launching the training job on the GPU cluster from Airflow: one operator,
:class:`twocluster.orchestration.operators.TrainingJobOperator`, and one backend per cluster manager behind it, chosen when the task
runs (as the Spark provider picks its cluster from the connection at execute time) from the
``twocluster_training_backend`` Airflow variable (JSON, :class:`TrainingBackendConfig`; the UI, the
secrets backend or ``AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND``; the local process when unset). The
DAG's shape is the same in every deployment, and a change of the variable takes effect at the
next try. Every backend runs the same trainer entry point with the same job spec:

* ``local``: a separate OS process on the Airflow worker (the embedded default). It shares
  nothing with Airflow but the store and the spec; killing the task kills the process group.
* ``docker``: the Docker provider's ``DockerOperator`` on the image built from
  ``training_jobs/Dockerfile``, with a GPU ``DeviceRequest``.
* ``kubernetes``: the cncf-kubernetes provider's ``KubernetesPodOperator`` with
  ``nvidia.com/gpu`` limits, node selector and tolerations from configuration; it re-attaches to
  a running pod on retry instead of starting a duplicate.

Every backend passes the job spec by URI and nothing else; the trainer itself is idempotent per
``run_id`` (a rerun resumes from the last checkpoint or returns the finished version), so a
retried task never trains twice. Store credentials come from the environment / a Kubernetes
secret, never from this configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from typing import Any, Literal

from airflow.sdk import BaseOperator
from pydantic import BaseModel, ConfigDict, Field

from twocluster.deployment import ROOT as REPO_ROOT
from twocluster.deployment import TRAINING_JOBS_DIR

TRAINER_COMMAND = ["python", "training_jobs/train.py"]  # inside the trainer image (WORKDIR /app)
BACKEND_VARIABLE = "twocluster_training_backend"


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class TrainingBackendConfig(BaseModel):
    """Where and how training runs; from an Airflow variable (JSON) or the environment."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "docker", "kubernetes"] = "local"
    image: str = "twocluster-trainer:latest"
    gpus: int = Field(1, ge=0)
    cpus: float = Field(4, gt=0)
    memory_gb: float = Field(16, gt=0)
    # docker
    docker_url: str = "unix://var/run/docker.sock"
    network_mode: str | None = None
    # kubernetes
    namespace: str = "default"
    kubernetes_conn_id: str = "kubernetes_default"
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu")])
    credentials_secret: str | None = Field(None, description="Kubernetes secret with the AWS_* variables for the store")
    # local, docker: the Airflow connection (type aws) holding the trainer's own store credentials;
    # unset: the worker's AWS_* variables are handed over
    credentials_conn_id: str | None = None
    # every backend: non-secret environment for the trainer (e.g. AWS_ENDPOINT_URL_S3, TWOCLUSTER_WORK_DIR)
    env: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str | None) -> TrainingBackendConfig:
        return cls.model_validate(json.loads(text)) if text else cls()


class LocalTrainingOperator(BaseOperator):
    """Run the trainer as a child process and return its JSON result.

    The trainer gets its own process group (so a kill reaches everything it started) and dies
    with this task process (``PR_SET_PDEATHSIG``, armed by the trainer): a task killed even with
    SIGKILL, which runs no ``on_kill``, leaves no trainer behind to race its retry. ``on_kill``
    stops the group within Airflow's grace period: SIGTERM, then SIGKILL after
    ``KILL_GRACE_SECONDS``."""

    KILL_GRACE_SECONDS = 3.0  # Airflow escalates to SIGKILL of the task process after 5 s

    template_fields = ("job_spec_uri",)

    def __init__(self, *, job_spec_uri: str, env: dict[str, str] | None = None, python: str | None = None,
                 credentials_conn_id: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.job_spec_uri = job_spec_uri
        self.env = env or {}
        self.python = python or sys.executable
        self.credentials_conn_id = credentials_conn_id
        self._proc: subprocess.Popen | None = None

    def trainer_environment(self) -> dict[str, str]:
        """What the trainer runs with: of the worker's environment only what a Python process,
        TensorFlow and the store client need (:data:`TRAINER_ENVIRONMENT`; never the worker's
        Airflow connections, secrets backend or other identities), the backend's ``env``, and
        the store credentials: the trainer's own (the ``credentials_conn_id`` connection) where
        one is configured, so it never runs with the Airflow worker's or the Spark side's
        identity; else the worker's ``AWS_*`` (the one identity a local set-up has)."""
        env = {k: v for k, v in os.environ.items() if k in TRAINER_ENVIRONMENT or k.startswith(TRAINER_ENVIRONMENT_PREFIXES)}
        env.update(self.env)
        if self.credentials_conn_id:
            from airflow.sdk import BaseHook

            from twocluster.store.storage import S3Settings

            settings = S3Settings.from_airflow_connection(BaseHook.get_connection(self.credentials_conn_id))
            env = {k: v for k, v in env.items() if k not in STORE_CREDENTIAL_VARIABLES}
            env.update({k: v for k, v in settings.as_env().items() if k in STORE_CREDENTIAL_VARIABLES})
        return env

    def execute(self, context: Any) -> dict:
        cmd = [self.python, str(TRAINING_JOBS_DIR / "train.py"), "--job-spec", self.job_spec_uri]
        self.log.info("starting the trainer: %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env={**self.trainer_environment(), "TWOCLUSTER_DIE_WITH_PARENT": str(os.getpid())},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        last = ""
        for line in self._proc.stdout:
            line = line.rstrip()
            self.log.info("trainer: %s", line)
            if line.startswith("{"):
                last = line
        code = self._proc.wait()
        if code != 0:
            from airflow.exceptions import AirflowException

            raise AirflowException(f"the trainer exited with {code}; see the log above")
        return json.loads(last)

    def on_kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=self.KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()


STORE_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# The worker's environment the local trainer inherits: the process's basics, the Python and
# accelerator settings, the store client's (``AWS_*``: endpoint, region, CA bundle, and the
# worker's keys unless the trainer has its own) and the trainer's own settings. Everything else
# (``AIRFLOW_CONN_*``, ``AIRFLOW__*``, other services' keys, a notifier's webhook) stays behind.
TRAINER_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH",
                       "PYTHONHASHSEED", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "JAVA_HOME", "OMP_NUM_THREADS", "KERAS_BACKEND",
                       "XLA_FLAGS", "TWOCLUSTER_WORK_DIR", "TWOCLUSTER_CODE_VERSION", "TWOCLUSTER_STORE_URI")
TRAINER_ENVIRONMENT_PREFIXES = ("LC_", "AWS_", "TF_", "CUDA_", "NVIDIA_", "NCCL_")


def _docker_training_operator_class():
    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.providers.docker.operators.docker import DockerOperator, fetch_logs

    class DockerTrainingOperator(DockerOperator):
        """The provider's DockerOperator, handing the worker's store credentials to the container
        at execute time as private (never rendered or logged) environment, so they are neither in
        the DAG file nor in the serialized DAG.

        The container's name is fixed per (DAG, run, task), like the Kubernetes operator's pod
        labels: a retry, or a try on a worker that restarted, finds the container an earlier try
        started and re-attaches to it while it runs (waits for it, streams its logs, takes its
        result) instead of starting a second trainer on the same run; a finished leftover is
        removed and the trainer started again (it returns the run's committed version at once if
        that try got that far)."""

        def __init__(self, *, credentials_conn_id: str | None = None, **kwargs):
            super().__init__(**kwargs)
            self.credentials_conn_id = credentials_conn_id

        def execute(self, context):
            if self.credentials_conn_id:
                from airflow.sdk import BaseHook

                from twocluster.store.storage import S3Settings

                settings = S3Settings.from_airflow_connection(BaseHook.get_connection(self.credentials_conn_id))
                self._private_environment = {k: v for k, v in settings.as_env().items() if k in STORE_CREDENTIAL_VARIABLES}
            else:
                self._private_environment = {k: os.environ[k] for k in STORE_CREDENTIAL_VARIABLES if k in os.environ}
            ti = context.get("ti")
            if ti is not None:
                self.container_name = container_name_for(ti.dag_id, ti.task_id, ti.run_id)
                found = self.cli.containers(all=True, filters={"name": f"^/{self.container_name}$"})
                if found:
                    container = found[0]
                    if container.get("State") == "running":
                        self.log.info("re-attaching to %s, started by an earlier try", self.container_name)
                        return self._reattach(container["Id"])
                    self.log.info("removing %s, left %s by an earlier try", self.container_name, container.get("State"))
                    self.cli.remove_container(container["Id"], force=True)
            return super().execute(context)

        def _reattach(self, container_id: str):
            self.container = {"Id": container_id}  # so on_kill stops it
            log_stream = self.cli.attach(container=container_id, stdout=True, stderr=True, stream=True, logs=True)
            lines = fetch_logs(log_stream, self.log)
            result = self.cli.wait(container_id)
            if result["StatusCode"] != 0:
                raise DockerContainerFailedException(f"Docker container failed: {result!r}", logs=lines)
            if self.auto_remove in ("success", "force"):
                self.cli.remove_container(container_id)
            return lines[-1] if self.do_xcom_push and lines else None

    return DockerTrainingOperator


def training_operator(config: TrainingBackendConfig, *, task_id: str, job_spec_uri: str, **kwargs) -> BaseOperator:
    """The operator that runs one training job on the backend ``config`` describes (built by
    :class:`~twocluster.orchestration.operators.TrainingJobOperator` when its task runs)."""
    args = ["--job-spec", job_spec_uri]
    if config.kind == "local":
        return LocalTrainingOperator(task_id=task_id, job_spec_uri=job_spec_uri, env=config.env,
                                     credentials_conn_id=config.credentials_conn_id, **kwargs)
    if config.kind == "docker":
        from docker.types import DeviceRequest

        return _docker_training_operator_class()(
            task_id=task_id,
            image=config.image,
            command=[*TRAINER_COMMAND, *args],
            docker_url=config.docker_url,
            network_mode=config.network_mode,
            # The GPU reservation: `docker run --gpus <n>`.
            device_requests=[DeviceRequest(count=config.gpus, capabilities=[["gpu"]])] if config.gpus else None,
            cpus=config.cpus,
            mem_limit=f"{int(config.memory_gb * 1024)}m",
            environment=dict(config.env),
            mount_tmp_dir=False,
            auto_remove="success",
            credentials_conn_id=config.credentials_conn_id,
            **kwargs,
        )
    if config.kind == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        limits = {"cpu": f"{config.cpus:g}", "memory": f"{config.memory_gb:g}Gi"}
        if config.gpus:
            limits["nvidia.com/gpu"] = str(config.gpus)
        return KubernetesPodOperator(
            task_id=task_id,
            name=_dns_name(f"train-{task_id}"),
            namespace=config.namespace,
            kubernetes_conn_id=config.kubernetes_conn_id,
            image=config.image,
            cmds=TRAINER_COMMAND[:1],
            arguments=[*TRAINER_COMMAND[1:], *args],
            container_resources=k8s.V1ResourceRequirements(requests=dict(limits), limits=limits),
            node_selector=config.node_selector,
            tolerations=[k8s.V1Toleration(**t.model_dump(exclude_none=True)) for t in config.tolerations],
            env_vars=[k8s.V1EnvVar(name=k, value=v) for k, v in config.env.items()],
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=config.credentials_secret))]
            if config.credentials_secret else None,
            # The operator adds dag_id/task_id/run_id/try labels itself; a retry (or a restarted
            # worker) finds the running pod by them and re-attaches instead of starting another.
            labels={"app": "twocluster-trainer"},
            durable=True,
            on_finish_action="delete_succeeded_pod",
            get_logs=True,
            **kwargs,
        )
    raise ValueError(f"unknown training backend {config.kind!r}")


def container_name_for(dag_id: str, task_id: str, run_id: str) -> str:
    """The trainer container of one task of one DAG run, the same for every try: readable, and
    unique (a digest of the three ids, so runs whose cleaned names collide or are cut stay
    apart)."""
    digest = hashlib.sha256(f"{dag_id}\0{task_id}\0{run_id}".encode()).hexdigest()[:12]
    return f"{_dns_name(f'train-{dag_id}-{task_id}-{run_id}', 100)}-{digest}"


def _dns_name(value: str, limit: int = 50) -> str:
    """Pod and container names: lowercase RFC 1123 labels (the pod operator appends a random suffix)."""
    cleaned = "".join(c if c.isalnum() else "-" for c in value.lower())
    return "-".join(filter(None, cleaned.split("-")))[:limit].rstrip("-")
