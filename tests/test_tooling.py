"""The make targets' guards: clear messages for a missing Java or missing system packages."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_bin(tmp_path: Path, name: str, script: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(script: str, path: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"} | {"PATH": path}
    return subprocess.run(["/bin/bash", str(ROOT / "tools" / script), *args], capture_output=True, text=True, env=env)


def test_check_java_accepts_the_installed_java():
    assert _run("check_java.sh", os.environ["PATH"]).returncode == 0


def test_check_java_rejects_an_old_java(tmp_path):
    bin_dir = _fake_bin(tmp_path, "java", 'echo \'openjdk version "11.0.2" 2019-01-15\' >&2\n')
    result = _run("check_java.sh", f"{bin_dir}:/usr/bin:/bin")
    assert result.returncode == 1
    assert "Spark 4 needs Java 17+" in result.stderr and "11.0.2" in result.stderr


def test_check_java_rejects_java_8_style_versions(tmp_path):
    bin_dir = _fake_bin(tmp_path, "java", 'echo \'java version "1.8.0_392"\' >&2\n')
    assert "needs Java 17+" in _run("check_java.sh", f"{bin_dir}:/usr/bin:/bin").stderr


def test_check_java_names_a_missing_java(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        ["/bin/bash", str(ROOT / "tools" / "check_java.sh")], capture_output=True, text=True,
        env={"PATH": str(empty), "JAVA_HOME": str(tmp_path / "no-jdk")},
    )
    assert result.returncode == 1 and "Java not found" in result.stderr


def test_ensure_packages_is_quiet_when_present():
    result = _run("ensure_system_packages.sh", os.environ["PATH"], "bash=bash", "ls=coreutils")
    assert result.returncode == 0 and result.stdout == ""


def test_ensure_packages_says_what_to_install_when_apt_is_unusable(tmp_path):
    # No apt-get on PATH: the script must stop and name the package instead of guessing.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "sort", "sudo"):
        real = subprocess.run(["/bin/bash", "-c", f"command -v {tool} || true"], capture_output=True, text=True).stdout.strip()
        if real:
            (bin_dir / tool).symlink_to(real)
    result = _run("ensure_system_packages.sh", str(bin_dir), "espeak-ng-nonexistent=espeak-ng")
    assert result.returncode == 1
    assert "missing system packages: espeak-ng" in result.stderr
    assert "apt-get install -y --no-install-recommends espeak-ng" in result.stderr


@pytest.mark.slow
def test_make_run_stops_its_spark_connect_server_when_terminated(tmp_path):
    """Issue 37: `make run` runs its DAG runs on a local Spark Connect server that it starts and
    stops; terminated mid-way (SIGTERM, as a CI runner or a supervisor stops it), it leaves no
    server (nor its Python workers) behind."""
    import psutil

    local = tmp_path / "local"
    env = {**os.environ, "TWOCLUSTER_STORE_URI": (tmp_path / "store").as_uri(), "PYSPARK_PYTHON": sys.executable}
    run = subprocess.Popen([sys.executable, "-m", "twocluster_demo.run_main", "--days", "1", "--clips-per-day", "20",
                            "--local-dir", str(local)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def servers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if str(local / "spark-connect") in line:
                found.append(proc)
        return found

    deadline = time.monotonic() + 240
    while not (local / "airflow").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # airflow_env's home appears once the server listens
    started = servers()
    assert run.poll() is None and started, run.stdout.read() if run.poll() is not None else "no server started"
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) != 0
    gone_by = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started) and time.monotonic() < gone_by:
        time.sleep(0.5)
    assert not [p for p in servers() if p.status() != psutil.STATUS_ZOMBIE], "the Spark Connect server outlived make run"
