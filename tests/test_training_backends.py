"""The training launchers. Docker and Kubernetes cannot run here (no daemon, no cluster): these
tests build each backend's operator and validate the container / pod specification with the
providers' and the kubernetes client's own models; the local backend runs for real in
test_training.py-style data below."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from twocluster.orchestration.backends import LocalTrainingOperator, TrainingBackendConfig, training_operator

JOB = "s3://ml-store/jobs/run-7.json"


def test_docker_backend_requests_the_gpu(monkeypatch):
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import DeviceRequest

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-worker-env")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    config = TrainingBackendConfig(kind="docker", image="registry.local/twocluster-trainer:1.2", gpus=2,
                                   env={"AWS_ENDPOINT_URL_S3": "http://s3:7480"})
    op = training_operator(config, task_id="train", job_spec_uri=JOB)
    assert isinstance(op, DockerOperator)
    assert op.image == "registry.local/twocluster-trainer:1.2"
    assert op.command == ["python", "training_jobs/train.py", "--job-spec", JOB]
    (request,) = op.device_requests
    assert isinstance(request, DeviceRequest)
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]  # docker's own wire format
    assert op.environment["AWS_ENDPOINT_URL_S3"] == "http://s3:7480"
    assert "AWS_SECRET_ACCESS_KEY" not in op.environment, "secrets are not in the operator's (rendered) fields"
    # At execute time (on the worker) the credentials become private environment; the Docker
    # daemon is not reachable here, so stop right after that step.
    monkeypatch.setattr(DockerOperator, "execute", lambda self, context: dict(self._private_environment))
    assert op.execute(context={}) == {"AWS_SECRET_ACCESS_KEY": "from-the-worker-env", "AWS_ACCESS_KEY_ID": "worker-key"}
    # One container name per DAG run and task, the same for every try (a valid Docker name).
    monkeypatch.setattr(type(op), "cli", property(lambda self: FakeDockerAPI()))
    names = set()
    for try_number in (1, 2):
        ti = SimpleNamespace(dag_id="speech_commands", task_id="train", run_id="scheduled__2026-11-20T00:00:00+00:00",
                             try_number=try_number)
        op.execute(context={"ti": ti})
        names.add(op.container_name)
    (name,) = names
    assert name.startswith("train-speech-commands-train-scheduled-2026-11-20t00-00-00-00-00-") and len(name) <= 128


class FakeDockerAPI:
    """Stands in for docker's APIClient (no Docker daemon here): the calls the operator makes,
    with the daemon's answers for one container."""

    def __init__(self, containers=(), exit_code=0, logs=(b"epoch 3/6\n", b'{"version": "v1"}\n')):
        self._containers = list(containers)
        self.exit_code, self.logs, self.calls = exit_code, list(logs), []

    def containers(self, all=False, filters=None):  # noqa: A002 - docker's name
        self.calls.append(("containers", filters))
        return [c for c in self._containers if f"^/{c['Names'][0][1:]}$" == (filters or {}).get("name")]

    def attach(self, container, stdout, stderr, stream, logs=False):
        self.calls.append(("attach", container, logs))
        return iter(self.logs)

    def wait(self, container):
        self.calls.append(("wait", container))
        return {"StatusCode": self.exit_code}

    def remove_container(self, container, force=False):
        self.calls.append(("remove", container, force))


def _docker_op(monkeypatch, api):
    from airflow.providers.docker.operators.docker import DockerOperator

    op = training_operator(TrainingBackendConfig(kind="docker", image="trainer:1"), task_id="train", job_spec_uri=JOB)
    monkeypatch.setattr(type(op), "cli", property(lambda self: api))
    started = []
    monkeypatch.setattr(DockerOperator, "execute", lambda self, context: started.append(self.container_name) or "started")
    return op, started


TI = SimpleNamespace(dag_id="speech_commands", task_id="train", run_id="manual__2026-11-22T10:00:00+00:00", try_number=2)


def test_docker_retry_reattaches_to_the_running_trainer_instead_of_starting_another(monkeypatch):
    """Issue 14, item 8 (Docker daemon faked: none runs here)."""
    from twocluster.orchestration.backends import container_name_for

    name = container_name_for(TI.dag_id, TI.task_id, TI.run_id)
    api = FakeDockerAPI([{"Id": "c0ffee", "Names": [f"/{name}"], "State": "running"}])
    op, started = _docker_op(monkeypatch, api)
    assert op.execute(context={"ti": TI}) == '{"version": "v1"}'
    assert started == [], "no second container"
    assert ("attach", "c0ffee", True) in api.calls and ("wait", "c0ffee") in api.calls and ("remove", "c0ffee", False) in api.calls


def test_docker_retry_removes_a_finished_leftover_and_starts_the_trainer(monkeypatch):
    from twocluster.orchestration.backends import container_name_for

    name = container_name_for(TI.dag_id, TI.task_id, TI.run_id)
    api = FakeDockerAPI([{"Id": "dead01", "Names": [f"/{name}"], "State": "exited"}])
    op, started = _docker_op(monkeypatch, api)
    assert op.execute(context={"ti": TI}) == "started" and started == [name]
    assert ("remove", "dead01", True) in api.calls


def test_docker_reattached_trainer_that_failed_fails_the_task(monkeypatch):
    from airflow.providers.docker.exceptions import DockerContainerFailedException

    from twocluster.orchestration.backends import container_name_for

    name = container_name_for(TI.dag_id, TI.task_id, TI.run_id)
    api = FakeDockerAPI([{"Id": "c0ffee", "Names": [f"/{name}"], "State": "running"}], exit_code=137)
    op, _ = _docker_op(monkeypatch, api)
    with pytest.raises(DockerContainerFailedException):
        op.execute(context={"ti": TI})


def test_docker_names_of_runs_that_differ_late_do_not_collide():
    from twocluster.orchestration.backends import container_name_for

    a, b = "backfill__" + "x" * 200 + "a", "backfill__" + "x" * 200 + "b"
    assert container_name_for("d", "train", a) != container_name_for("d", "train", b)


def test_kubernetes_retry_finds_the_running_pod_of_an_earlier_try():
    """The pod operator's own re-attach (Kubernetes API faked: no cluster here): the retry's
    label selector leaves out the try number, so try 2 finds try 1's running pod."""
    from kubernetes.client import models as k8s

    op = training_operator(TrainingBackendConfig(kind="kubernetes", image="trainer:1"), task_id="train", job_spec_uri=JOB)
    pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="train-abc", labels={"try_number": "1"}))
    selectors = []

    class FakeCoreV1:
        def list_namespaced_pod(self, namespace, label_selector):
            selectors.append(label_selector)
            return SimpleNamespace(items=[pod])

    context = {"ti": SimpleNamespace(dag_id="speech_commands", task_id="train", run_id="manual__1", try_number=2, map_index=-1),
               "run_id": "manual__1", "dag": SimpleNamespace(dag_id="speech_commands")}
    op.__dict__["client"] = FakeCoreV1()
    assert op.find_pod("default", context) is pod
    assert "try_number" not in selectors[0] and "run_id=" in selectors[0] and op.reattach_on_restart


def test_docker_backend_without_gpu_has_no_device_request():
    op = training_operator(TrainingBackendConfig(kind="docker", gpus=0), task_id="t", job_spec_uri=JOB)
    assert op.device_requests is None


def test_kubernetes_backend_pod_has_gpu_limits_selector_and_tolerations():
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    config = TrainingBackendConfig(
        kind="kubernetes", image="registry.local/twocluster-trainer:1.2", gpus=1, cpus=6, memory_gb=24,
        namespace="ml", node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        credentials_secret="twocluster-store-credentials",
    )
    op = training_operator(config, task_id="train", job_spec_uri=JOB)
    pod = op.build_pod_request_obj(context=None, dry_run=True)  # no cluster here
    assert isinstance(pod, k8s.V1Pod)
    doc = ApiClient().sanitize_for_serialization(pod)  # what the API server would receive
    container = doc["spec"]["containers"][0]
    assert container["image"] == "registry.local/twocluster-trainer:1.2"
    assert container["command"] == ["python"] and container["args"] == ["training_jobs/train.py", "--job-spec", JOB]
    assert container["resources"]["limits"] == {"cpu": "6", "memory": "24Gi", "nvidia.com/gpu": "1"}
    assert doc["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert doc["spec"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert container["envFrom"] == [{"secretRef": {"name": "twocluster-store-credentials"}}]
    assert doc["metadata"]["namespace"] == "ml"
    assert doc["metadata"]["labels"]["app"] == "twocluster-trainer"
    assert doc["metadata"]["name"].startswith("train-train")
    assert op.durable


def test_backend_config_is_validated():
    with pytest.raises(ValueError, match="kind"):
        TrainingBackendConfig.from_json('{"kind": "slurm"}')
    with pytest.raises(ValueError, match="gpus"):
        TrainingBackendConfig.from_json('{"kind": "docker", "gpus": -1}')
    assert TrainingBackendConfig.from_json(None).kind == "local"


def test_local_backend_runs_the_trainer_and_fails_clearly(tmp_path):
    from airflow.exceptions import AirflowException

    bad = tmp_path / "job.json"
    bad.write_text('{"run_id": "x"}')
    op = training_operator(TrainingBackendConfig(), task_id="train", job_spec_uri=str(bad))
    assert isinstance(op, LocalTrainingOperator)
    with pytest.raises(AirflowException, match="the trainer exited with 1"):
        op.execute(context={})


def test_the_backend_is_chosen_when_the_task_runs_not_when_the_dag_is_parsed(tmp_path, monkeypatch):
    """Issue 15: one operator class whatever the deployment; the variable is read in execute (a
    change takes effect at the next try, from the UI as from the environment)."""
    from airflow.exceptions import AirflowException

    from twocluster.orchestration import backends
    from twocluster.orchestration.operators import TrainingJobOperator

    bad = tmp_path / "job.json"
    bad.write_text('{"run_id": "x"}')
    monkeypatch.setenv("AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND", json.dumps({"kind": "docker", "image": "trainer:1"}))
    op = TrainingJobOperator(task_id="train", job_spec_uri=str(bad))
    built = []
    monkeypatch.setattr(backends, "training_operator", lambda config, **kw: built.append(config.kind) or _Recorder())
    assert op.execute(context={}) == "ran" and built == ["docker"]
    monkeypatch.setenv("AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND", json.dumps({"kind": "kubernetes", "image": "trainer:1"}))
    op.execute(context={})
    op.on_kill()
    assert built == ["docker", "kubernetes"] and _Recorder.killed
    monkeypatch.undo()

    # Unset: the local process, for real.
    with pytest.raises(AirflowException, match="the trainer exited with 1"):
        TrainingJobOperator(task_id="train", job_spec_uri=str(bad)).execute(context={})


class _Recorder:
    killed = False

    def execute(self, context):
        return "ran"

    def on_kill(self):
        _Recorder.killed = True


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
    op = LocalTrainingOperator(task_id="train", job_spec_uri=JOB, python=str(recorder), env={"TWOCLUSTER_WORK_DIR": str(tmp_path)})
    assert op.execute(context={}) == {"version": "v"}
    started_with = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
    assert canary not in (tmp_path / "env.txt").read_text()
    assert not any(k.startswith("AIRFLOW") for k in started_with), sorted(started_with)
    assert started_with["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:7480" and started_with["AWS_ACCESS_KEY_ID"] == "WORKER"
    assert started_with["TWOCLUSTER_WORK_DIR"] == str(tmp_path) and started_with["PATH"] == os.environ["PATH"]
