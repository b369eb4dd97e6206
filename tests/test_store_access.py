"""One lookup for the store (issue 34): the pipeline DAGs and the health DAG (the task SDK), the
ops page (the API server's models) and the CLI (the environment) find the same store, with the
same identity, under every configuration. The ops page once read ``TWOCLUSTER_STORE_URI`` only and
answered 500 on the compose stack, which sets the Airflow variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from twocluster.spec import SpecError
from twocluster.store.storage import S3Settings
from twocluster.store_access import store_for

VIAS = ("task", "server", "environment")
CONNECTION = {"conn_type": "aws", "login": "READER", "password": "reader-secret",
              "extra": {"endpoint_url": "http://127.0.0.1:7480", "region_name": "eu-west-1"}}


@pytest.fixture
def clean(monkeypatch):
    for name in ("AIRFLOW_VAR_TWOCLUSTER_STORE_URI", "TWOCLUSTER_STORE_URI", "AIRFLOW_CONN_TWOCLUSTER_STORE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("configured, expected", [
    ({}, "file:///from/spec"),
    ({"TWOCLUSTER_STORE_URI": "file:///from/env"}, "file:///from/env"),
    ({"AIRFLOW_VAR_TWOCLUSTER_STORE_URI": "s3://from-variable", "TWOCLUSTER_STORE_URI": "file:///from/env"}, "s3://from-variable"),
])
def test_every_reader_finds_the_same_store_by_each_rule(clean, speech_spec, configured, expected):
    spec = speech_spec.model_copy(update={"store_uri": "file:///from/spec"})
    for name, value in configured.items():
        clean.setenv(name, value)
    assert {via: store_for(spec, via=via).root_uri for via in VIAS} == dict.fromkeys(VIAS, expected)
    assert {via: store_for(spec, "file:///flag", via=via).root_uri for via in VIAS} == dict.fromkeys(VIAS, "file:///flag")


def test_every_reader_takes_the_twocluster_store_connections_identity(clean, speech_spec):
    clean.setenv("AIRFLOW_VAR_TWOCLUSTER_STORE_URI", "s3://bucket")
    assert all(store_for(speech_spec, via=via).s3_settings == S3Settings.from_env() for via in VIAS)  # the process's AWS_*
    clean.setenv("AIRFLOW_CONN_TWOCLUSTER_STORE", json.dumps(CONNECTION))
    for via in VIAS:
        settings = store_for(speech_spec, via=via).s3_settings
        assert (settings.access_key, settings.secret_key, settings.endpoint_url, settings.region) == (
            "READER", "reader-secret", "http://127.0.0.1:7480", "eu-west-1"), via


def test_no_store_anywhere_names_every_place_looked_at(clean, speech_spec):
    with pytest.raises(SpecError, match="pass --store, set the Airflow variable twocluster_store_uri, set TWOCLUSTER_STORE_URI "
                                        "or set store_uri in the spec"):
        store_for(speech_spec.model_copy(update={"store_uri": None}), via="environment")


def test_the_cli_finds_the_store_by_the_airflow_variable_and_takes_the_connections_keys(clean, tmp_path):
    """The CLI read ``--store`` or ``TWOCLUSTER_STORE_URI`` only: on a host configured for
    Airflow (the variable and the connection) it looked at nothing, or at another store."""
    store = tmp_path / "store"
    store.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TWOCLUSTER_STORE_URI"}
    env["AIRFLOW_VAR_TWOCLUSTER_STORE_URI"] = store.as_uri()
    out = subprocess.run([sys.executable, "-m", "twocluster.ops.cli", "status", "--json"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["store"] == store.as_uri()
