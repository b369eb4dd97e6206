"""The `twocluster` operator CLI, run as the installed console script against real stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_gc import MODEL, commit_model
from test_manifest import LOCATION, PIPELINE, T0, _commit

from twocluster.store import layout, registry
from twocluster.store.storage import ObjectStore

CLI = str(Path(sys.executable).parent / "twocluster")


def twocluster(store: ObjectStore, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **(store.s3_settings.as_env() if store.s3_settings else {})}
    env.pop("TWOCLUSTER_STORE_URI", None)
    out = subprocess.run([CLI, *args, "--store", store.root_uri] if args[0] != "verify" else [CLI, *args],
                         capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_status_alias_set_and_rollback(store: ObjectStore):
    dataset = layout.new_version_id(T0)
    _commit(store, dataset)
    uri = store.uri(layout.manifest_key(layout.dataset_version_prefix(PIPELINE, "2026-11-20", dataset)))
    first, second = commit_model(store, [uri], "run-1"), commit_model(store, [uri], "run-2")
    store.write_bytes(layout.log_entry_key(layout.model_alias_prefix(MODEL, "production"), 1), b"{broken")

    assert "production -> " + first in twocluster(store, "alias", "set", MODEL, "production", first).stdout
    moved = json.loads(twocluster(store, "alias", "set", MODEL, "production", second, "--json").stdout)
    assert moved["moved"] and moved["previous_version"] == first and moved["log_entry"] == 3

    status = json.loads(twocluster(store, "status", "--json").stdout)
    date = status["pipelines"][PIPELINE]["dates"][0]
    assert date["date"] == "2026-11-20" and date["dataset"]["version"] == dataset
    assert date["dataset"]["rejected_by_reason"] == {"empty": 2} and date["predictions"] is None
    model = status["models"][MODEL]
    assert model["aliases"]["production"]["version"] == second and model["aliases"]["production"]["previous_version"] == first
    assert [v["version"] for v in model["versions"]] == [first, second] and model["versions"][1]["aliases"] == ["production"]
    assert model["versions"][0]["trained_on"] == ["2026-11-20"]
    assert len(status["skipped"]) == 1 and "unreadable log entry" in status["skipped"][0]["problem"]
    text = twocluster(store, "status").stdout
    assert f"production -> {second} (before: {first})" in text and "skipped as invalid (1)" in text

    rolled = json.loads(twocluster(store, "alias", "rollback", MODEL, "production", "--json").stdout)
    assert rolled["version"] == first and registry.read_alias(store, MODEL, "production").version == first

    unknown = twocluster(store, "alias", "set", MODEL, "production", layout.new_version_id(), check=False)
    assert unknown.returncode == 1 and "is not committed" in unknown.stderr
    bad = twocluster(store, "alias", "set", MODEL, "production", "latest", check=False)
    assert bad.returncode == 1 and "not a version id" in bad.stderr
    never = twocluster(store, "alias", "rollback", MODEL, "canary", check=False)
    assert never.returncode == 1 and "nothing is published as kws_cnn:canary" in never.stderr


def test_verify_finds_corruption_and_strays(store: ObjectStore):
    version = layout.new_version_id(T0)
    prefix = _commit(store, version)
    uri = store.uri(prefix)
    assert "ok, 2 files verified" in twocluster(store, "verify", uri).stdout
    store.write_bytes(f"{prefix}/parquet/part-0.parquet", b"ROWS")  # same size, other bytes
    store.write_bytes(f"{prefix}/parquet/part-1-stray.parquet", b"x")
    out = twocluster(store, "verify", uri + "/_MANIFEST.json", "--json", check=False)
    result = json.loads(out.stdout)
    assert out.returncode == 1 and not result["ok"] and result["log_entry"] == 1
    assert any("checksum" in p for p in result["problems"]) and any("part-1-stray" in p for p in result["problems"])
    uncommitted = twocluster(store, "verify", store.uri(f"{LOCATION}/v={layout.new_version_id()}"), check=False)
    assert uncommitted.returncode == 1 and "not committed" in uncommitted.stdout


def test_gc_is_a_dry_run_unless_applied(store: ObjectStore):
    for _ in range(3):
        _commit(store, layout.new_version_id(T0))
    out = twocluster(store, "gc", "--keep", "1", "--grace-hours", "0.0001", "--json")
    plan = json.loads(out.stdout)
    assert not plan["applied"] and len(plan["deletions"]) == 2 and plan["deleted_objects"] == 0
    assert "dry run: pass --apply" in twocluster(store, "gc", "--keep", "1", "--grace-hours", "0.0001").stdout
    applied = json.loads(twocluster(store, "gc", "--keep", "1", "--grace-hours", "0.0001", "--apply", "--json").stdout)
    assert applied["applied"] and applied["deleted_objects"] == 2 * 3  # two files and a manifest each
