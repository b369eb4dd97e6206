"""Stage metrics reach a real StatsD listener (a UDP socket on loopback) through Airflow's own
metrics client, configured as a deployment would configure it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMIT = """
import sys
from twocluster.orchestration.dag_factory import _record_metrics
_record_metrics("twocluster.speech_commands.dataset", {{"accepted": 600, "rejected": 2, "reject_rate": 0.0033,
                "rejected_by_reason": {{"truncated": 1, "not_audio": 1}}, "seconds": {{"featurize": 3.5, "write": 1.25}}}})
"""


def test_counts_and_timings_per_stage_reach_a_statsd_listener(tmp_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(10)
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__METRICS__STATSD_ON": "True",
           "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1", "AIRFLOW__METRICS__STATSD_PORT": str(listener.getsockname()[1]),
           "AIRFLOW__METRICS__STATSD_PREFIX": "airflow"}
    out = subprocess.run([sys.executable, "-c", EMIT.format(plugins=str(ROOT / "plugins"))], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    prefix = "airflow.twocluster.speech_commands.dataset"
    expected = {f"{prefix}.accepted:600|g", f"{prefix}.rejected:2|g", f"{prefix}.reject_rate:0.0033|g",
                f"{prefix}.rejected.truncated:1|c", f"{prefix}.rejected.not_audio:1|c",
                f"{prefix}.seconds.featurize:3500.000000|ms", f"{prefix}.seconds.write:1250.000000|ms"}
    received: set[str] = set()
    try:
        while not expected <= received:
            received |= set(listener.recv(65536).decode().splitlines())
    except TimeoutError:
        pass
    finally:
        listener.close()
    assert expected <= received, expected - received
