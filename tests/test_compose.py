"""The compose stack, validated as far as this machine allows: no Docker daemon runs here, so
the stack is never started. Docker Compose itself (Debian's docker-compose, installed by
`make test`) validates and resolves the file offline; the tests then check its structure, that
the images install from the lock, and that no credential is written in the repository. The
stack's S3 set-up (users, bucket policy, the one-shot check) runs for real against the local
Ceph RGW, the same server the S3 image runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from twocluster_devtools import s3_check
from twocluster_devtools.local_s3 import LocalRGW

ROOT = Path(__file__).resolve().parents[1]
ONE_SHOT = {"airflow-init", "s3-init"}


def _lock_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert match, f"{package} is not pinned in requirements.lock"
    return match.group(1)


@pytest.fixture(scope="module")
def compose() -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing (make test installs Debian's docker-compose)"
    result = subprocess.run([exe, "-f", "docker-compose.yml", "--env-file", ".env.example", "config"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_validation_catches_a_broken_file(tmp_path):
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["airflow-scheduler"]["depends_on"]["no-such-service"] = {"condition": "service_healthy"}
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    shutil.copy(ROOT / ".env.example", tmp_path / ".env.example")
    result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "--env-file", ".env.example", "config", "-q"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no-such-service" in result.stderr


def test_every_service_is_healthchecked_or_one_shot(compose):
    services = compose["services"]
    expected = {"postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer", "spark-master", "spark-worker-1", "spark-worker-2", "s3", "s3-init", "trainer"}
    assert expected <= set(services)
    for name, service in services.items():
        if name in ONE_SHOT or name == "trainer":
            assert service.get("restart", "no") == "no", name
        else:
            assert "healthcheck" in service, f"{name} has no healthcheck"


def test_airflow_services_wait_for_init_and_init_waits_for_postgres(compose):
    services = compose["services"]
    assert services["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name
        assert services[name]["image"] == services["airflow-init"]["image"]
    assert services["airflow-scheduler"]["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
    assert services["s3-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
    for worker in ("spark-worker-1", "spark-worker-2"):
        assert services[worker]["depends_on"]["spark-master"]["condition"] == "service_healthy"
        assert services[worker]["image"] == services["spark-master"]["image"], "one Spark image for master and workers"


def test_connections_and_gpu_reservation(compose):
    import json

    env = compose["services"]["airflow-scheduler"]["environment"]
    spark = json.loads(env["AIRFLOW_CONN_SPARK_DEFAULT"])
    assert (spark["host"], spark["port"]) == ("spark://spark-master", 7077)
    backend = json.loads(env["AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND"])
    assert backend["kind"] == "docker" and backend["gpus"] == 1 and backend["credentials_conn_id"] == "twocluster_store_trainer"
    assert "/var/run/docker.sock" in " ".join(map(str, compose["services"]["airflow-scheduler"]["volumes"]))
    (device,) = compose["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and int(device["count"]) == 1
    # Each component gets its own store user.
    workers = compose["services"]["spark-worker-1"]["environment"]
    trainer = compose["services"]["trainer"]["environment"]
    store = json.loads(env["AIRFLOW_CONN_TWOCLUSTER_STORE"])
    assert len({workers["AWS_ACCESS_KEY_ID"], trainer["AWS_ACCESS_KEY_ID"], store["login"]}) == 3


def test_the_backend_config_in_compose_is_valid(compose):
    import json

    from twocluster.orchestration.backends import TrainingBackendConfig

    env = compose["services"]["airflow-scheduler"]["environment"]
    config = TrainingBackendConfig.model_validate(json.loads(env["AIRFLOW_VAR_TWOCLUSTER_TRAINING_BACKEND"]))
    assert config.network_mode == "twocluster" == next(iter(compose["networks"].values()))["name"]


def test_images_install_the_locked_versions():
    airflow = (ROOT / "docker" / "airflow" / "Dockerfile").read_text()
    spark = (ROOT / "docker" / "spark" / "Dockerfile").read_text()
    trainer = (ROOT / "training_jobs" / "Dockerfile").read_text()
    s3 = (ROOT / "docker" / "s3" / "Dockerfile").read_text()
    assert f"ARG AIRFLOW_VERSION={_lock_version('apache-airflow')}" in airflow
    assert f"ARG TF_VERSION={_lock_version('tensorflow-cpu')}" in trainer
    for text in (airflow, spark, trainer, s3):
        assert "requirements.lock" in text
    # Spark: pyspark comes with the spark extra at the lock's pin (-c), and nothing else installs a Spark.
    assert re.search(r'pip install[^\n]*-c requirements\.lock[^\n]*"\.\[spark\]"', spark)
    assert _lock_version("pyspark") == "4.2.0" and "FROM apache/spark" not in spark


def test_no_literal_credentials_in_the_stack():
    text = (ROOT / "docker-compose.yml").read_text()
    for line in text.splitlines():
        for key, value in re.findall(r'"?(\w*(?:PASSWORD|SECRET|ACCESS_KEY|login|password)\w*)"?\s*[:=]\s*"?([^",}\s]+)', line):
            assert value.startswith("${"), f"literal credential for {key}: {line.strip()}"
    example = (ROOT / ".env.example").read_text()
    for key, value in re.findall(r"^(\w*(?:PASSWORD|SECRET|_KEY)\w*)=(.*)$", example, re.M):
        assert value == "" or value.startswith("CHANGE-ME"), f".env.example sets a real-looking {key}"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.slow
def test_s3_users_policy_and_init_check_on_rgw(tmp_path, monkeypatch):
    """The S3 image's set-up for real: users from the environment, the bucket policy, s3-init."""
    keys = {f"S3_{u}_{k}_KEY": f"{u}-{k}-{i}".lower() for i, u in enumerate(("AIRFLOW", "SPARK", "TRAINER", "INGEST", "OPERATOR"))
            for k in ("ACCESS", "SECRET")}
    for k, v in keys.items():
        monkeypatch.setenv(k, v)
    import string

    with LocalRGW(tmp_path / "rgw") as rgw:
        rgw.create_bucket("stack")
        # The keys reach radosgw-admin on its stdin, never its arguments (world-readable in /proc).
        started: list[list[str]] = []
        real_run = subprocess.run

        def recording_run(cmd, *args, **kwargs):
            started.append(list(cmd))
            return real_run(cmd, *args, **kwargs)

        monkeypatch.setattr(subprocess, "run", recording_run)
        for user in ("airflow", "spark", "trainer", "ingest", "operator"):
            rgw.add_user(user, keys[f"S3_{user.upper()}_ACCESS_KEY"], keys[f"S3_{user.upper()}_SECRET_KEY"])
        monkeypatch.setattr(subprocess, "run", real_run)
        assert started and not any(k in " ".join(cmd) for cmd in started for n, k in keys.items() if "SECRET" in n)
        policy = string.Template((ROOT / "docker" / "s3" / "bucket-policy.json").read_text()).substitute(bucket="stack")
        rgw.client().put_bucket_policy(Bucket="stack", Policy=policy)
        assert s3_check.main(["--endpoint", rgw.endpoint_url, "--bucket", "stack", "--timeout", "30"]) == 0

        spark = s3_check._client(rgw.endpoint_url, "spark")
        spark.put_object(Bucket="stack", Key="datasets/p/date=2026-11-20/v=x/_MANIFEST.json", Body=b"{}", IfNoneMatch="*")
        spark.put_object(Bucket="stack", Key="datasets/p/date=2026-11-20/_staging/v=x/a/part-0", Body=b"rows")
        spark.delete_object(Bucket="stack", Key="datasets/p/date=2026-11-20/_staging/v=x/a/part-0")  # promotion cleans up
        # ... through the store, as promote_staged does: RGW refused the multi-object delete
        # (pyarrow's delete_dir) to this prefix-limited user (found by the stack test).
        from twocluster.store.storage import ObjectStore, S3Settings

        as_spark = ObjectStore("s3://stack", S3Settings(endpoint_url=rgw.endpoint_url, region="us-east-1",
                                                        access_key=keys["S3_SPARK_ACCESS_KEY"], secret_key=keys["S3_SPARK_SECRET_KEY"]))
        for i in range(3):
            as_spark.write_bytes(f"datasets/p/date=2026-11-20/_staging/v=x/p{i}/part-{i}", b"rows")
        as_spark.delete_prefix("datasets/p/date=2026-11-20/_staging/v=x")
        assert as_spark.list("datasets/p/date=2026-11-20/_staging/") == []
        trainer = s3_check._client(rgw.endpoint_url, "trainer")
        trainer.put_object(Bucket="stack", Key="models/m/versions/v=x/_MANIFEST.json", Body=b"{}", IfNoneMatch="*")
        trainer.put_object(Bucket="stack", Key="models/m/runs/r/LATEST.json", Body=b"{}")
        airflow = s3_check._client(rgw.endpoint_url, "airflow")
        airflow.put_object(Bucket="stack", Key="models/m/aliases/production/_log/00000000000000000001.json", Body=b"{}", IfNoneMatch="*")
        airflow.put_object(Bucket="stack", Key="models/m/gate/_log/00000000000000000001.json", Body=b"{}", IfNoneMatch="*")
        assert airflow.get_object(Bucket="stack", Key="datasets/p/date=2026-11-20/v=x/_MANIFEST.json")["Body"].read() == b"{}"

        # Issue 14, item 6: only the gate (Airflow's identity) moves aliases or records decisions;
        # the trainer cannot publish around it, and no component writes outside its own area.
        from botocore.exceptions import ClientError

        from twocluster.store import layout
        from twocluster.store.commitlog import AliasMoved, CommitLog
        from twocluster.store.storage import StorageError

        denied = [(trainer, "models/m/aliases/production/_log/00000000000000000002.json"),
                  (trainer, "models/m/gate/_log/00000000000000000002.json"),
                  (spark, "models/m/aliases/production/_log/00000000000000000002.json"),
                  (spark, "models/m/versions/v=y/_MANIFEST.json"), (trainer, "datasets/p/date=2026-11-20/v=y/_MANIFEST.json"),
                  (airflow, "datasets/p/date=2026-11-20/v=y/_MANIFEST.json"), (airflow, "models/m/versions/v=y/_MANIFEST.json")]
        for client, key in denied:
            with pytest.raises(ClientError, match="AccessDenied"):
                client.put_object(Bucket="stack", Key=key, Body=b"{}", IfNoneMatch="*")
        with pytest.raises(ClientError, match="AccessDenied"):
            trainer.delete_object(Bucket="stack", Key="models/m/aliases/production/_log/00000000000000000001.json")
        # Issue 33: commit records outlive their writers: no component deletes a log entry or a
        # manifest under its own prefix either (only gc, with the owner's keys, retires them).
        for client, key in [(spark, "datasets/p/date=2026-11-20/v=x/_MANIFEST.json"), (trainer, "models/m/versions/v=x/_MANIFEST.json"),
                            (airflow, "models/m/aliases/production/_log/00000000000000000001.json"),
                            (airflow, "models/m/gate/_log/00000000000000000001.json")]:
            with pytest.raises(ClientError, match="AccessDenied"):
                client.delete_object(Bucket="stack", Key=key)
            assert airflow.head_object(Bucket="stack", Key=key)  # still there
        spark.delete_object(Bucket="stack", Key="datasets/p/date=2026-11-20/_staging/v=x/a/part-0")  # staging still goes
        as_trainer = ObjectStore("s3://stack", S3Settings(endpoint_url=rgw.endpoint_url, region="us-east-1",
                                                            access_key=keys["S3_TRAINER_ACCESS_KEY"], secret_key=keys["S3_TRAINER_SECRET_KEY"]))
        alias_log = CommitLog(as_trainer, layout.model_alias_prefix("m", "production"))
        with pytest.raises(StorageError, match="AccessDenied|403"):
            alias_log.append_at(alias_log.head() + 1, AliasMoved(seq=1, model="m", alias="production", version="20261120T000000Z-deadbeef"))

        # Issue 34: what drops arrivals writes raw/ and nothing else, and sees nothing; an
        # operator's key reads everything and writes nothing.
        ingest, operator = s3_check._client(rgw.endpoint_url, "ingest"), s3_check._client(rgw.endpoint_url, "operator")
        ingest.put_object(Bucket="stack", Key="raw/p/date=2026-11-20/clip.wav", Body=b"RIFF")
        assert operator.get_object(Bucket="stack", Key="raw/p/date=2026-11-20/clip.wav")["Body"].read() == b"RIFF"
        assert operator.get_object(Bucket="stack", Key="models/m/versions/v=x/_MANIFEST.json")["Body"].read() == b"{}"
        assert operator.list_objects_v2(Bucket="stack", Prefix="datasets/")["KeyCount"] >= 1
        for client, key in [(ingest, "datasets/p/date=2026-11-20/v=z/_MANIFEST.json"), (ingest, "models/m/aliases/production/_log/x.json"),
                            (operator, "raw/p/date=2026-11-20/other.wav"), (operator, "models/m/aliases/production/_log/x.json")]:
            with pytest.raises(ClientError, match="AccessDenied"):
                client.put_object(Bucket="stack", Key=key, Body=b"{}")
        # It may list (S3 answers "not found" only to a caller that may list, and an upload that
        # resumes asks what is there) and read what it dropped, nothing else.
        assert ingest.list_objects_v2(Bucket="stack", Prefix="raw/p/")["KeyCount"] == 1
        as_ingest = ObjectStore("s3://stack", S3Settings(endpoint_url=rgw.endpoint_url, region="us-east-1",
                                                         access_key=keys["S3_INGEST_ACCESS_KEY"], secret_key=keys["S3_INGEST_SECRET_KEY"]))
        assert as_ingest.exists("raw/p/date=2026-11-20/clip.wav") and not as_ingest.exists("raw/p/date=2026-11-21/_ARRIVED")
        for call in (lambda: ingest.get_object(Bucket="stack", Key="models/m/versions/v=x/_MANIFEST.json"),
                     lambda: operator.delete_object(Bucket="stack", Key="raw/p/date=2026-11-20/clip.wav")):
            with pytest.raises(ClientError, match="AccessDenied"):
                call()

        # Without the policy, s3-init refuses to let the stack start.
        rgw.client().delete_bucket_policy(Bucket="stack")
        assert s3_check.main(["--endpoint", rgw.endpoint_url, "--bucket", "stack", "--timeout", "5"]) == 1


@pytest.mark.slow
def test_the_s3_image_prints_where_its_keys_are_never_the_keys(tmp_path):
    """The compose ``s3`` service printed ``export AWS_SECRET_ACCESS_KEY=<admin secret>`` to its
    log. Its entry point (the same launcher) now writes the keys to a mode-600 file and prints
    where it is."""
    import os
    import signal
    import sys

    keys = {f"S3_{u}_{k}_KEY": f"{u.lower()}-{k.lower()}-canary-7f1e" for u in ("ADMIN", "SPARK") for k in ("ACCESS", "SECRET")}
    folder = tmp_path / "s3"
    proc = subprocess.Popen([sys.executable, "-m", "twocluster_devtools.local_s3", "--dir", str(folder), "--bucket", "canary", "--user", "spark"],
                            env={**os.environ, **keys}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if "mode 600" in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    printed = "".join(output)
    assert "mode 600" in printed, printed
    assert not any(v in printed for k, v in keys.items() if "SECRET" in k), printed
    keys_file = folder / "s3.env"
    assert str(keys_file.resolve()) in printed and keys_file.stat().st_mode & 0o777 == 0o600
    assert f"AWS_SECRET_ACCESS_KEY={keys['S3_ADMIN_SECRET_KEY']}" in keys_file.read_text()


def test_each_airflow_container_holds_only_the_store_identities_it_uses(compose):
    """Issue 14, item 6: the API server reads with Airflow's identity; the scheduler (tasks run
    there) also holds the Spark side's and the trainer's; nobody else holds any."""
    def identities(service: str) -> set[str]:
        env = compose["services"][service].get("environment") or {}
        return {k.removeprefix("AIRFLOW_CONN_") for k in env if k.startswith("AIRFLOW_CONN_TWOCLUSTER_STORE")}

    assert identities("airflow-scheduler") == {"TWOCLUSTER_STORE", "TWOCLUSTER_STORE_SPARK", "TWOCLUSTER_STORE_TRAINER"}
    assert identities("airflow-apiserver") == {"TWOCLUSTER_STORE"}
    for service in ("airflow-dag-processor", "airflow-triggerer", "airflow-init"):
        assert identities(service) == set(), service
    # The Spark workers and the trainer hold their own keys only.
    for service in ("spark-worker-1", "spark-worker-2", "trainer"):
        env = compose["services"][service]["environment"]
        assert not any(k.startswith("AIRFLOW_CONN_") for k in env)
