"""The training backends behind the one training operator. Docker and Kubernetes cannot run here
(no daemon, no cluster): their tests stand in a recording client for the daemon's and the API
server's answers and check the container / pod request with docker's and the kubernetes client's
own types; the local backend runs for real.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from twocluster.orchestration import backends
from twocluster.orchestration.backends import (
    DockerBackend,
    JobState,
    KubernetesBackend,
    LocalBackend,
    TrainingBackendConfig,
    job_name_for,
)
from twocluster.orchestration.operators import TrainingJobOperator

JOB = "s3://ml-store/jobs/run-7.json"
TI = SimpleNamespace(dag_id="speech_commands", task_id="train", run_id="manual__2026-11-22T10:00:00+00:00", try_number=2)
RESULT = {"status": "trained", "model": "kws_cnn", "version": "v1", "manifest_uri": "s3://ml-store/models/kws_cnn/versions/v=v1/_MANIFEST.json",
          "metrics": {"test_accuracy": 0.97}}


class FakeDockerAPI:
    """Stands in for docker's APIClient (no Docker daemon here): the daemon's answers for one
    container, and every call made."""

    def __init__(self, state: str | None = None, exit_code: int = 0):
        self.state, self.exit_code, self.calls, self.created = state, exit_code, [], []
        self.logs = [b"epoch 3/6\n", json.dumps(RESULT).encode() + b"\n"]

    def containers(self, all=False, filters=None):  # noqa: A002 - docker's name
        self.calls.append(("containers", filters))
        return [{"Id": "c0ffee", "Names": [filters["name"][1:-1]], "State": self.state}] if self.state else []

    def inspect_container(self, container):
        return {"State": {"ExitCode": self.exit_code}}

    def create_host_config(self, **kwargs):
        from docker.types import HostConfig

        return HostConfig("1.44", **kwargs)  # docker's own validation of the request

    def create_container(self, **kwargs):
        self.created.append(kwargs)
        self.state = "running"
        return {"Id": "c0ffee"}

    def start(self, container):
        self.calls.append(("start", container))

    def attach(self, container, stdout, stderr, stream, logs=False):
        self.calls.append(("attach", container, logs))
        return iter(self.logs)

    def wait(self, container):
        self.calls.append(("wait", container))
        self.state = "exited"
        return {"StatusCode": self.exit_code}

    def stop(self, container, timeout=None):
        self.calls.append(("stop", container))

    def remove_container(self, container, force=False):
        self.calls.append(("remove", container))
        self.state = None


class FakeCoreV1:
    """Stands in for the Kubernetes API server (no cluster here): one pod's answers."""

    def __init__(self, phase: str | None = None, exit_code: int = 0):
        self.phase, self.exit_code, self.calls, self.created = phase, exit_code, [], []

    def read_namespaced_pod(self, name, namespace):
        from kubernetes.client import models as k8s
        from kubernetes.client.exceptions import ApiException

        if self.phase is None:
            raise ApiException(status=404, reason="Not Found")
        terminated = k8s.V1ContainerStateTerminated(exit_code=self.exit_code)
        status = k8s.V1ContainerStatus(name="trainer", image="i", image_id="", ready=False, restart_count=0,
                                       state=k8s.V1ContainerState(terminated=terminated))
        phase, self.phase = self.phase, {"Running": "Succeeded" if self.exit_code == 0 else "Failed"}.get(self.phase, self.phase)
        return k8s.V1Pod(status=k8s.V1PodStatus(phase=phase, container_statuses=[status]))

    def create_namespaced_pod(self, namespace, body):
        self.created.append((namespace, body))
        self.phase = "Running"

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content):
        self.calls.append(("log", name, container, follow))
        return iter([b"epoch 3/6\n", json.dumps(RESULT).encode() + b"\n"])

    def delete_namespaced_pod(self, name, namespace, grace_period_seconds=None):
        self.calls.append(("delete", name))
        self.phase = None


def _run(monkeypatch, backend) -> tuple[dict, str]:
    """The operator's execute on ``backend`` as a retry of TI; returns its result and the job name."""
    monkeypatch.setenv("AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND", json.dumps({"kind": backend.kind, "image": "trainer:1"}))
    monkeypatch.setattr(backends, "backend_for", lambda config: backend)
    op = TrainingJobOperator(task_id="train", job_spec_uri=JOB)
    return op.execute(context={"ti": TI}), backend.external_id(TI.dag_id, TI.task_id, TI.run_id)


def test_docker_backend_requests_the_gpu_and_keeps_the_keys_out_of_the_request(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-worker-env")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    config = TrainingBackendConfig(kind="docker", image="registry.local/twocluster-trainer:1.2", gpus=2,
                                   env={"AWS_ENDPOINT_URL_S3": "http://s3:7480"})
    api = FakeDockerAPI()
    backend = DockerBackend(config, client=api)
    request = backend.container_request("train-x", JOB)
    assert request["image"] == "registry.local/twocluster-trainer:1.2"
    assert request["command"] == ["python", "training_jobs/train.py", "--job-spec", JOB]
    (device,) = request["host_config"]["DeviceRequests"]
    assert device["Count"] == 2 and device["Capabilities"] == [["gpu"]]  # docker's own wire format: --gpus 2
    assert request["host_config"]["NanoCpus"] == 4_000_000_000 and request["host_config"]["Memory"] == 16 * 1024**3
    assert request["environment"] == {"AWS_ENDPOINT_URL_S3": "http://s3:7480"}, "no keys in what is logged or rendered"
    backend.submit("train-x", JOB)  # the keys join the environment when the container is created
    (created,) = api.created
    assert created["environment"]["AWS_SECRET_ACCESS_KEY"] == "from-the-worker-env" and created["name"] == "train-x"
    assert ("start", "c0ffee") in api.calls
    without_gpu = DockerBackend(TrainingBackendConfig(kind="docker", gpus=0), client=api).container_request("t", JOB)
    assert not without_gpu["host_config"].get("DeviceRequests")


def test_kubernetes_pod_has_gpu_limits_selector_tolerations_and_the_secret():
    from kubernetes.client import ApiClient

    config = TrainingBackendConfig(
        kind="kubernetes", image="registry.local/twocluster-trainer:1.2", gpus=1, cpus=6, memory_gb=24,
        namespace="ml", node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        credentials_secret="twocluster-store-credentials",
    )
    backend = KubernetesBackend(config, client=FakeCoreV1())
    name = backend.external_id(TI.dag_id, TI.task_id, TI.run_id)
    doc = ApiClient().sanitize_for_serialization(backend.pod_request(name, JOB))  # what the API server would receive
    container = doc["spec"]["containers"][0]
    assert container["image"] == "registry.local/twocluster-trainer:1.2"
    assert container["command"] == ["python"] and container["args"] == ["training_jobs/train.py", "--job-spec", JOB]
    assert container["resources"]["limits"] == {"cpu": "6", "memory": "24Gi", "nvidia.com/gpu": "1"}
    assert doc["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert doc["spec"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert container["envFrom"] == [{"secretRef": {"name": "twocluster-store-credentials"}}] and "env" not in container
    assert doc["metadata"] == {"name": name, "namespace": "ml", "labels": {"app": "twocluster-trainer"}}
    assert doc["spec"]["restartPolicy"] == "Never" and len(name) <= 63 and name.startswith("train-speech-commands-train-manual")


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_a_retry_reattaches_to_the_running_job_the_same_way_on_every_backend(monkeypatch, kind):
    """Issue 34: one surface (external id, status, submit, follow, exit code, kill, remove), one
    way to re-attach: try 2 finds try 1's job by its name and follows it, starting nothing."""
    fake = FakeDockerAPI(state="running") if kind == "docker" else FakeCoreV1(phase="Running")
    backend = (DockerBackend if kind == "docker" else KubernetesBackend)(TrainingBackendConfig(kind=kind), client=fake)
    result, name = _run(monkeypatch, backend)
    assert fake.created == [], "no second trainer"
    assert result["version"] == "v1" and result["backend"] == kind and result["job"] == name
    assert backend.status(name) is JobState.MISSING, "removed once it succeeded"


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_a_finished_leftover_is_removed_and_the_job_submitted_again(monkeypatch, kind):
    fake = FakeDockerAPI(state="exited", exit_code=1) if kind == "docker" else FakeCoreV1(phase="Failed", exit_code=1)
    backend = (DockerBackend if kind == "docker" else KubernetesBackend)(TrainingBackendConfig(kind=kind), client=fake)
    fake.exit_code = 0  # the new job succeeds
    result, name = _run(monkeypatch, backend)
    assert len(fake.created) == 1 and result["version"] == "v1"
    assert (("remove", name) if kind == "docker" else ("delete", name)) in fake.calls


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_a_reattached_job_that_fails_fails_the_task(monkeypatch, kind):
    from airflow.sdk.exceptions import AirflowException

    fake = FakeDockerAPI(state="running", exit_code=137) if kind == "docker" else FakeCoreV1(phase="Running", exit_code=137)
    backend = (DockerBackend if kind == "docker" else KubernetesBackend)(TrainingBackendConfig(kind=kind), client=fake)
    with pytest.raises(AirflowException, match=r"the trainer exited with 137"):
        _run(monkeypatch, backend)
    assert backend.status(backend.external_id(TI.dag_id, TI.task_id, TI.run_id)) is JobState.FAILED, "kept for inspection"


def test_job_names_are_the_same_for_every_try_and_apart_for_runs_that_differ_late():
    a, b = "backfill__" + "x" * 200 + "a", "backfill__" + "x" * 200 + "b"
    assert job_name_for("d", "train", a) != job_name_for("d", "train", b)
    assert job_name_for("d", "train", a) == job_name_for("d", "train", a) and len(job_name_for("d", "train", a, 63)) <= 63
    assert job_name_for("speech_commands", "train", "scheduled__2026-11-20T00:00:00+00:00").startswith(
        "train-speech-commands-train-scheduled-2026-11-20t00-00-00-00-00-")


def test_backend_config_is_validated():
    with pytest.raises(ValueError, match="kind"):
        TrainingBackendConfig.from_json('{"kind": "slurm"}')
    with pytest.raises(ValueError, match="gpus"):
        TrainingBackendConfig.from_json('{"kind": "docker", "gpus": -1}')
    assert TrainingBackendConfig.from_json(None).kind == "local"


def test_the_local_backend_runs_the_trainer_and_fails_clearly(tmp_path):
    from airflow.sdk.exceptions import AirflowException

    bad = tmp_path / "job.json"
    bad.write_text('{"run_id": "x"}')
    with pytest.raises(AirflowException, match="the trainer exited with 1"):
        TrainingJobOperator(task_id="train", job_spec_uri=str(bad)).execute(context={})
    assert LocalBackend(TrainingBackendConfig()).status("any") is JobState.MISSING, "nothing outlives a try to re-attach to"


def test_the_backend_is_chosen_when_the_task_runs_not_when_the_dag_is_parsed(tmp_path, monkeypatch):
    """Issue 15: one operator class whatever the deployment; the variable is read in execute (a
    change takes effect at the next try, from the UI as from the environment)."""
    chosen = []
    real = backends.backend_for

    def recording(config):
        chosen.append(config.kind)
        return DockerBackend(config, client=FakeDockerAPI()) if config.kind == "docker" else KubernetesBackend(config, client=FakeCoreV1())

    monkeypatch.setattr(backends, "backend_for", recording)
    op = TrainingJobOperator(task_id="train", job_spec_uri=JOB)
    for kind in ("docker", "kubernetes"):
        monkeypatch.setenv("AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND", json.dumps({"kind": kind, "image": "trainer:1"}))
        assert op.execute(context={"ti": TI})["backend"] == kind
    assert chosen == ["docker", "kubernetes"]
    assert real(TrainingBackendConfig()).kind == "local"


def test_on_kill_kills_the_running_job(monkeypatch):
    fake = FakeDockerAPI(state="running")
    backend = DockerBackend(TrainingBackendConfig(kind="docker"), client=fake)
    monkeypatch.setattr(backends, "backend_for", lambda config: backend)
    monkeypatch.setenv("AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND", json.dumps({"kind": "docker"}))
    op = TrainingJobOperator(task_id="train", job_spec_uri=JOB)

    def follow_then_get_killed(job):
        yield "epoch 1/6"
        op.on_kill()  # Airflow calls it from another thread while the log streams
        yield json.dumps(RESULT)

    monkeypatch.setattr(backend, "follow", follow_then_get_killed)
    op.execute(context={"ti": TI})
    assert ("stop", backend.external_id(TI.dag_id, TI.task_id, TI.run_id)) in fake.calls


def test_the_local_trainer_gets_an_allow_listed_environment_not_the_workers(tmp_path, monkeypatch):
    """The local backend handed the trainer the worker's whole environment: on the compose
    stack's scheduler, every identity's connection (the Spark side's keys, Airflow's database,
    the Fernet key). The trainer process (an interpreter that records what it was started with)
    now gets the basics, the store client's settings, the backend's ``env`` and its own keys."""
    canary = "canary-" + "9f3a" * 6
    monkeypatch.setenv("AIRFLOW_CONN_TWOCLUSTER_STORE_SPARK", json.dumps({"conn_type": "aws", "login": "SPARK", "password": canary}))
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", canary)
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"postgresql://airflow:{canary}@db/airflow")
    monkeypatch.setenv("TWOCLUSTER_APPROVAL_NOTIFIER", f"https://hooks.example/{canary}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:7480")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "WORKER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    recorder = tmp_path / "python"
    recorder.write_text(f"#!/bin/sh\nenv > {tmp_path / 'env.txt'}\necho '{{\"version\": \"v\"}}'\n")
    recorder.chmod(0o755)
    backend = LocalBackend(TrainingBackendConfig(env={"TWOCLUSTER_WORK_DIR": str(tmp_path)}), python=str(recorder))
    backend.submit("train-x", JOB)
    assert list(backend.follow("train-x")) == ['{"version": "v"}'] and backend.exit_code("train-x") == 0
    started_with = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
    assert canary not in (tmp_path / "env.txt").read_text()
    assert not any(k.startswith("AIRFLOW") for k in started_with), sorted(started_with)
    assert started_with["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:7480" and started_with["AWS_ACCESS_KEY_ID"] == "WORKER"
    assert started_with["TWOCLUSTER_WORK_DIR"] == str(tmp_path) and started_with["PATH"] == os.environ["PATH"]
