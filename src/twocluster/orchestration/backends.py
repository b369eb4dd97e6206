"""The GPU cluster, as the training operator sees it: one surface, one backend per cluster manager.

:class:`twocluster.orchestration.operators.TrainingJobOperator` runs a training job on the backend
the ``twocluster_training_backend`` Airflow variable names when the task runs (JSON,
:class:`TrainingBackendConfig`; the UI, the secrets backend or
``AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND``; the local process when unset), as the Spark provider
picks its cluster from the connection at execute time: the DAG's shape is the same in every
deployment, and a change of the variable takes effect at the next try.

Every backend has the same surface (:class:`TrainingBackend`), the one the Spark provider's
cluster managers share: an **external id** (the job's name on the cluster, derived from the DAG,
task and run, the same for every try), **submit**, **status**, **follow** (its log, until it
ends), **exit code**, **kill** and **remove**. So a retry, or a try on a worker that restarted,
re-attaches one way whatever the backend: a job of that name still running is followed instead
of started again; a finished leftover is removed and the job submitted anew (the trainer returns
its committed version at once if that try got that far). Every backend runs the same trainer
entry point with the job spec's URI and nothing else:

* ``local``: an OS process on the Airflow worker (the embedded default), in its own process group,
  dying with the task process (``PR_SET_PDEATHSIG``): nothing survives a try to re-attach to;
* ``docker``: a container on the Docker daemon (docker-py, the client the Docker provider uses)
  from the image built from ``training_jobs/Dockerfile``, with a GPU ``DeviceRequest``;
* ``kubernetes``: a pod (the kubernetes client, through the cncf-kubernetes provider's hook for the
  cluster's configuration) with ``nvidia.com/gpu`` limits, node selector and tolerations.

Store credentials reach the trainer as its process's or container's environment (the trainer's
own connection, else the worker's ``AWS_*``) or, on Kubernetes, from a secret; never on a
command line, in the configuration or in a rendered field.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from enum import StrEnum
from typing import Any, ClassVar, Literal

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


STORE_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# The worker's environment the local trainer inherits: the process's basics, the Python and
# accelerator settings, the store client's (``AWS_*``: endpoint, region, CA bundle, and the
# worker's keys unless the trainer has its own) and the trainer's own settings. Everything else
# (``AIRFLOW_CONN_*``, ``AIRFLOW__*``, other services' keys, a notifier's webhook) stays behind.
TRAINER_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH",
                       "PYTHONHASHSEED", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "JAVA_HOME", "OMP_NUM_THREADS", "KERAS_BACKEND",
                       "XLA_FLAGS", "TWOCLUSTER_WORK_DIR", "TWOCLUSTER_CODE_VERSION", "TWOCLUSTER_STORE_URI")
TRAINER_ENVIRONMENT_PREFIXES = ("LC_", "AWS_", "TF_", "CUDA_", "NVIDIA_", "NCCL_")


class JobState(StrEnum):
    MISSING = "missing"
    RUNNING = "running"  # pending or running: follow it
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TrainingBackend(ABC):
    """One cluster manager's way to run the trainer (see the module's docstring)."""

    kind: ClassVar[str]
    NAME_LIMIT: ClassVar[int] = 100

    def __init__(self, config: TrainingBackendConfig, client: Any = None):
        self.config = config
        self._client = client  # the cluster manager's API client; tests hand in a recording one

    @property
    def client(self):
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self):
        """The cluster manager's API client, made on first use (never at DAG parse time)."""
        raise NotImplementedError(f"the {self.kind} backend has no API client")

    def external_id(self, dag_id: str, task_id: str, run_id: str) -> str:
        """The job's name on the cluster: the same for every try of one task of one DAG run."""
        return job_name_for(dag_id, task_id, run_id, self.NAME_LIMIT)

    def trainer_arguments(self, job_spec_uri: str) -> list[str]:
        return ["--job-spec", job_spec_uri]

    def store_credentials(self) -> dict[str, str]:
        """The trainer's own store keys (the ``credentials_conn_id`` connection) where one is
        configured, so it never runs with the worker's or the Spark side's identity; else the
        worker's ``AWS_*`` keys (the one identity a local set-up has)."""
        if self.config.credentials_conn_id:
            from airflow.sdk import BaseHook

            from twocluster.store.storage import S3Settings

            settings = S3Settings.from_airflow_connection(BaseHook.get_connection(self.config.credentials_conn_id))
            return {k: v for k, v in settings.as_env().items() if k in STORE_CREDENTIAL_VARIABLES}
        return {k: os.environ[k] for k in STORE_CREDENTIAL_VARIABLES if k in os.environ}

    @abstractmethod
    def status(self, job: str) -> JobState: ...

    @abstractmethod
    def submit(self, job: str, job_spec_uri: str) -> None: ...

    @abstractmethod
    def follow(self, job: str) -> Iterator[str]:
        """The job's log lines (from its start) until it ends."""

    @abstractmethod
    def exit_code(self, job: str) -> int:
        """Waits for the job to end."""

    @abstractmethod
    def kill(self, job: str) -> None: ...

    @abstractmethod
    def remove(self, job: str) -> None: ...


class LocalBackend(TrainingBackend):
    """The trainer as a child process of the task: its own process group (a kill reaches
    everything it started), dying with the task process (``PR_SET_PDEATHSIG``, armed by the
    trainer), so a task killed even with SIGKILL, which runs no ``on_kill``, leaves no trainer
    behind to race its retry; a retry therefore always finds it missing. ``kill`` stops the
    group within Airflow's grace period: SIGTERM, then SIGKILL after ``KILL_GRACE_SECONDS``."""

    kind = "local"
    KILL_GRACE_SECONDS = 3.0  # Airflow escalates to SIGKILL of the task process after 5 s

    def __init__(self, config: TrainingBackendConfig, python: str | None = None):
        super().__init__(config)
        self.python = python or sys.executable
        self._processes: dict[str, subprocess.Popen] = {}

    def trainer_environment(self) -> dict[str, str]:
        """Of the worker's environment only what a Python process, TensorFlow and the store
        client need (:data:`TRAINER_ENVIRONMENT`; never the worker's Airflow connections, secrets
        backend or other identities), the backend's ``env``, and the store credentials."""
        env = {k: v for k, v in os.environ.items() if k in TRAINER_ENVIRONMENT or k.startswith(TRAINER_ENVIRONMENT_PREFIXES)}
        env.update(self.config.env)
        env = {k: v for k, v in env.items() if k not in STORE_CREDENTIAL_VARIABLES}
        return {**env, **self.store_credentials()}

    def status(self, job: str) -> JobState:
        proc = self._processes.get(job)
        if proc is None:
            return JobState.MISSING
        code = proc.poll()
        return JobState.RUNNING if code is None else JobState.SUCCEEDED if code == 0 else JobState.FAILED

    def submit(self, job: str, job_spec_uri: str) -> None:
        cmd = [self.python, str(TRAINING_JOBS_DIR / "train.py"), *self.trainer_arguments(job_spec_uri)]
        self._processes[job] = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env={**self.trainer_environment(), "TWOCLUSTER_DIE_WITH_PARENT": str(os.getpid())},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def follow(self, job: str) -> Iterator[str]:
        for line in self._processes[job].stdout:
            yield line.rstrip("\n")

    def exit_code(self, job: str) -> int:
        return self._processes[job].wait()

    def kill(self, job: str) -> None:
        proc = self._processes.get(job)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def remove(self, job: str) -> None:
        self._processes.pop(job, None)


class DockerBackend(TrainingBackend):
    """A container on the Docker daemon at ``docker_url``, named by the external id (a valid
    Docker name: found again by a retry). The store credentials are part of the container's
    environment, given when it is created (as ``docker run -e``), never in a rendered field."""

    kind = "docker"

    def _connect(self):
        import docker

        return docker.APIClient(base_url=self.config.docker_url)

    def _container(self, job: str) -> dict | None:
        found = self.client.containers(all=True, filters={"name": f"^/{job}$"})
        return found[0] if found else None

    def status(self, job: str) -> JobState:
        container = self._container(job)
        if container is None:
            return JobState.MISSING
        if container.get("State") in ("created", "running", "restarting", "paused"):
            return JobState.RUNNING
        code = self.client.inspect_container(container["Id"])["State"]["ExitCode"]
        return JobState.SUCCEEDED if code == 0 else JobState.FAILED

    def container_request(self, job: str, job_spec_uri: str) -> dict[str, Any]:
        """``create_container``'s arguments (without the credentials): the GPU reservation is
        ``docker run --gpus <n>``."""
        from docker.types import DeviceRequest

        config = self.config
        host_config = self.client.create_host_config(
            device_requests=[DeviceRequest(count=config.gpus, capabilities=[["gpu"]])] if config.gpus else None,
            nano_cpus=int(config.cpus * 1e9), mem_limit=f"{int(config.memory_gb * 1024)}m", network_mode=config.network_mode)
        return {"image": config.image, "command": [*TRAINER_COMMAND, *self.trainer_arguments(job_spec_uri)], "name": job,
                "environment": dict(config.env), "labels": {"app": "twocluster-trainer"}, "host_config": host_config}

    def submit(self, job: str, job_spec_uri: str) -> None:
        request = self.container_request(job, job_spec_uri)
        request["environment"] = {**request["environment"], **self.store_credentials()}
        container = self.client.create_container(**request)
        self.client.start(container["Id"])

    def follow(self, job: str) -> Iterator[str]:
        pending = b""
        for chunk in self.client.attach(container=job, stdout=True, stderr=True, stream=True, logs=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from (line.decode(errors="replace") for line in lines)
        if pending:
            yield pending.decode(errors="replace")

    def exit_code(self, job: str) -> int:
        return int(self.client.wait(job)["StatusCode"])

    def kill(self, job: str) -> None:
        self.client.stop(job, timeout=10)

    def remove(self, job: str) -> None:
        self.client.remove_container(job, force=True)


class KubernetesBackend(TrainingBackend):
    """A pod in ``namespace``, named by the external id (an RFC 1123 label: found again by a
    retry), with GPU limits, node selector and tolerations; the store credentials come from
    ``credentials_secret``. The cluster's configuration is the ``kubernetes_conn_id`` connection's
    (the cncf-kubernetes provider's hook)."""

    kind = "kubernetes"
    NAME_LIMIT = 63
    POLL_SECONDS = 5.0

    def _connect(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.config.kubernetes_conn_id).core_v1_client

    def _pod(self, job: str):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.client.read_namespaced_pod(job, self.config.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def status(self, job: str) -> JobState:
        pod = self._pod(job)
        phase = pod.status.phase if pod is not None and pod.status else None
        return {None: JobState.MISSING, "Succeeded": JobState.SUCCEEDED, "Failed": JobState.FAILED}.get(phase, JobState.RUNNING)

    def pod_request(self, job: str, job_spec_uri: str):
        from kubernetes.client import models as k8s

        config = self.config
        limits = {"cpu": f"{config.cpus:g}", "memory": f"{config.memory_gb:g}Gi"}
        if config.gpus:
            limits["nvidia.com/gpu"] = str(config.gpus)
        container = k8s.V1Container(
            name="trainer", image=config.image, command=TRAINER_COMMAND[:1],
            args=[*TRAINER_COMMAND[1:], *self.trainer_arguments(job_spec_uri)],
            resources=k8s.V1ResourceRequirements(requests=dict(limits), limits=limits),
            env=[k8s.V1EnvVar(name=k, value=v) for k, v in config.env.items()] or None,
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=config.credentials_secret))]
            if config.credentials_secret else None)
        return k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name=job, namespace=config.namespace, labels={"app": "twocluster-trainer"}),
            spec=k8s.V1PodSpec(containers=[container], restart_policy="Never", node_selector=config.node_selector or None,
                               tolerations=[k8s.V1Toleration(**t.model_dump(exclude_none=True)) for t in config.tolerations] or None))

    def submit(self, job: str, job_spec_uri: str) -> None:
        self.client.create_namespaced_pod(self.config.namespace, self.pod_request(job, job_spec_uri))

    def _wait_while(self, job: str, phases: tuple[str, ...]):
        while (pod := self._pod(job)) is not None and pod.status and pod.status.phase in phases:
            time.sleep(self.POLL_SECONDS)
        return pod

    def follow(self, job: str) -> Iterator[str]:
        self._wait_while(job, ("Pending",))  # a pending pod has no log yet
        stream = self.client.read_namespaced_pod_log(job, self.config.namespace, container="trainer", follow=True,
                                                     _preload_content=False)
        for line in stream:
            yield (line.decode(errors="replace") if isinstance(line, bytes) else line).rstrip("\n")

    def exit_code(self, job: str) -> int:
        pod = self._wait_while(job, ("Pending", "Running"))
        for status in (pod.status.container_statuses or []) if pod is not None else []:
            if status.state and status.state.terminated:
                return int(status.state.terminated.exit_code)
        return 0 if pod is not None and pod.status.phase == "Succeeded" else 1

    def kill(self, job: str) -> None:
        self.client.delete_namespaced_pod(job, self.config.namespace, grace_period_seconds=10)

    def remove(self, job: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.client.delete_namespaced_pod(job, self.config.namespace)
        except ApiException as e:
            if e.status != 404:
                raise


BACKENDS: dict[str, type[TrainingBackend]] = {b.kind: b for b in (LocalBackend, DockerBackend, KubernetesBackend)}


def backend_for(config: TrainingBackendConfig) -> TrainingBackend:
    return BACKENDS[config.kind](config)


def job_name_for(dag_id: str, task_id: str, run_id: str, limit: int = 100) -> str:
    """The trainer job of one task of one DAG run, the same for every try: readable, a valid
    Docker name and RFC 1123 label, and unique (a digest of the three ids, so runs whose cleaned
    names collide or are cut stay apart)."""
    digest = hashlib.sha256(f"{dag_id}\0{task_id}\0{run_id}".encode()).hexdigest()[:12]
    return f"{_dns_name(f'train-{dag_id}-{task_id}-{run_id}', limit - 13)}-{digest}"


def _dns_name(value: str, limit: int) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in value.lower())
    return "-".join(filter(None, cleaned.split("-")))[:limit].rstrip("-")
