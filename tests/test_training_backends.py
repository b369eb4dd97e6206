"""The training launchers. Docker and Kubernetes cannot run here (no daemon, no cluster): these
tests build each backend's operator and validate the container / pod specification with the
providers' and the kubernetes client's own models; the local backend runs for real in
test_training.py-style data below."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from training_backends import LocalTrainingOperator, TrainingBackendConfig, training_operator  # noqa: E402

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
    # Each DAG run and try gets its own container name (a valid Docker name).
    ti = SimpleNamespace(dag_id="speech_commands", run_id="scheduled__2026-11-20T00:00:00+00:00", try_number=2)
    op.execute(context={"ti": ti})
    assert op.container_name == "train-speech-commands-scheduled-2026-11-20t00-00-00-00-00-2"


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
