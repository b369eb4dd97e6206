"""The health-check DAG run for real (`airflow dags test`) against a store with a stale,
rejected-heavy pipeline: it fails through the failure notifier with the dates named."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml
from test_monitoring import _dataset, _raw

from twocluster.store.storage import ObjectStore
from twocluster_devtools.airflow_local import REPO_ROOT, airflow, airflow_env, prepare

D = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(3)]


@pytest.mark.slow
def test_an_unhealthy_pipeline_fails_the_check_and_names_the_dates(tmp_path, speech_spec):
    data = yaml.safe_load((REPO_ROOT / "pipelines" / "speech_commands.yaml").read_text())
    data.update(start_date=D[0].isoformat(), end_date=D[-1].isoformat())
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "speech_commands.yaml").write_text(yaml.safe_dump(data))
    spec = speech_spec.model_copy(update={"start_date": D[0], "end_date": D[-1]})
    store = ObjectStore((tmp_path / "store").as_uri())
    for day in D:
        _raw(store, spec, day)
    _dataset(store, spec, D[0])
    _dataset(store, spec, D[1], rejected=40)  # nothing was ever scored, and D[1] rejects 29%
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "health.py").write_text(f'"""Airflow DAG: the health check, for the test."""\nfrom twocluster.ops.health_dag import build_health_dag\n\n'
                                    f"dag = build_health_dag({str(pipelines)!r})\n")
    env = airflow_env(tmp_path / "airflow", store.root_uri, dags_folder=dags)
    prepare(env)
    out = airflow(env, "dags", "test", "twocluster_health", capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    finished = [line for line in log.splitlines() if "DagRun Finished" in line]
    assert finished and "state=failed" in finished[-1], log[-4000:]
    assert "UNHEALTHY speech_commands: newest scored date is none" in log
    assert f"reject rate above 5.0% on {D[1]}" in log
    assert "FAILED twocluster_health.check_speech_commands" in log, "the failure notifier reported it"
