"""The `twocluster` operator CLI, run as the installed console script against real stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_gc import MODEL, commit_model, publish
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
    for version in (first, second):
        registry.record_gate_decision(store, MODEL, version, "production", "passed", "test: passed")
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
    # A grace shorter than the longest job's timeout would take a running writer's staging area.
    before = store.list("")
    refused = twocluster(store, "gc", "--keep", "1", "--grace-hours", "0", "--apply", check=False)
    assert refused.returncode == 2 and "below the longest job timeout (12 h, the default)" in refused.stderr
    assert "pass --force" in refused.stderr and store.list("") == before  # nothing deleted
    out = twocluster(store, "gc", "--keep", "1", "--grace-hours", "0.0001", "--force", "--json")
    plan = json.loads(out.stdout)
    assert not plan["applied"] and len(plan["deletions"]) == 2 and plan["deleted_objects"] == 0
    assert "dry run: pass --apply" in twocluster(store, "gc", "--keep", "1", "--grace-hours", "0.0001", "--force").stdout
    applied = json.loads(twocluster(store, "gc", "--keep", "1", "--grace-hours", "0.0001", "--force", "--apply", "--json").stdout)
    assert applied["applied"] and applied["deleted_objects"] == 2 * 3  # two files and a manifest each


# -- issue 32: the gate cannot be bypassed silently, rollback walks the history, nothing falls back --


def test_alias_set_refuses_a_version_the_gate_refused_unless_overridden_and_recorded(store: ObjectStore):
    """Defect: `alias set` moved the alias to a version the gate refused, exit 0, nothing recorded."""
    good, refused, unjudged = (commit_model(store, [], f"run-{i}") for i in range(3))
    publish(store, good)
    registry.record_gate_decision(store, MODEL, refused, "production", "refused", "test accuracy 0.412 is below the floor 0.900")

    out = twocluster(store, "alias", "set", MODEL, "production", refused, check=False)
    assert out.returncode == 1 and "is refused: test accuracy 0.412 is below the floor 0.900" in out.stderr
    out = twocluster(store, "alias", "set", MODEL, "production", unjudged, check=False)
    assert out.returncode == 1 and "has no gate decision for 'production'" in out.stderr
    no_reason = twocluster(store, "alias", "set", MODEL, "production", refused, "--override-gate", check=False)
    assert no_reason.returncode == 1 and "--override-gate needs --reason" in no_reason.stderr
    assert registry.read_alias(store, MODEL, "production").version == good

    moved = twocluster(store, "alias", "set", MODEL, "production", refused, "--override-gate", "--reason", "incident 42: known good")
    assert "GATE OVERRIDDEN" in moved.stdout and registry.read_alias(store, MODEL, "production").version == refused
    history = json.loads(twocluster(store, "alias", "history", MODEL, "production", "--json").stdout)
    assert [(m["entry"], m["from"], m["to"], m["authority"]) for m in history["moves"]] == [
        (1, None, good, "gate-passed"), (2, good, refused, "overridden")]
    assert history["moves"][1]["why"] == "incident 42: known good" and history["moves"][1]["who"].startswith("os:")
    assert history["moves"][0]["gate_entry"] == 1 and history["moves"][1]["time"]
    assert "[set by a gate override]" in twocluster(store, "status").stdout
    text = twocluster(store, "alias", "history", MODEL, "production").stdout
    assert "overridden" in text and "incident 42" in text


def test_rollback_walks_the_history_instead_of_toggling(store: ObjectStore):
    """Defect: with production at A -> B -> C, the first rollback went to B and the second back to
    C. It walks back: C -> B -> A, then there is nothing left; --to names a target explicitly."""
    a, b, c = (commit_model(store, [], f"run-{i}") for i in range(3))
    for version in (a, b, c):
        publish(store, version)
    first = json.loads(twocluster(store, "alias", "rollback", MODEL, "production", "--json").stdout)
    assert (first["previous_version"], first["version"]) == (c, b)
    second = json.loads(twocluster(store, "alias", "rollback", MODEL, "production", "--json").stdout)
    assert (second["previous_version"], second["version"]) == (b, a)
    third = twocluster(store, "alias", "rollback", MODEL, "production", check=False)
    assert third.returncode == 1 and "no earlier version to roll back to" in third.stderr
    assert registry.read_alias(store, MODEL, "production").version == a
    explicit = json.loads(twocluster(store, "alias", "rollback", MODEL, "production", "--to", c, "--json").stdout)
    assert explicit["version"] == c
    never = twocluster(store, "alias", "rollback", MODEL, "production", "--to", commit_model(store, [], "run-x"), check=False)
    assert never.returncode == 1 and "never served under 'production'" in never.stderr
    history = json.loads(twocluster(store, "alias", "history", MODEL, "production", "--json").stdout)
    assert [m["authority"] for m in history["moves"]] == ["gate-passed"] * 3 + ["rollback"] * 3


def test_rollback_refuses_a_target_whose_files_do_not_verify(store: ObjectStore):
    a, b, c = (commit_model(store, [], f"run-{i}") for i in range(3))
    for version in (a, b, c):
        publish(store, version)
    store.write_bytes(f"{layout.model_version_prefix(MODEL, b)}/model.keras", b"WEIGHTS")  # same size, other bytes
    rolled = json.loads(twocluster(store, "alias", "rollback", MODEL, "production", "--json").stdout)
    assert rolled["version"] == a and "checksum" in rolled["skipped_targets"][0] and b in rolled["skipped_targets"][0]
    to_b = twocluster(store, "alias", "rollback", MODEL, "production", "--to", b, check=False)
    assert to_b.returncode == 1 and "no rollback target verifies" in to_b.stderr


def test_a_broken_champion_is_an_error_not_a_silent_fallback(store: ObjectStore):
    """Defect: with the champion's model file deleted, require_alias quietly returned the previous
    champion and scoring ran with it. Now resolving names the alias, the version and the problem,
    status and history say BROKEN, and only a person's rollback (or a new publish) moves on."""
    from twocluster.spark.scoring import resolve_model

    older, champion = commit_model(store, [], "run-older"), commit_model(store, [], "run-champion")
    publish(store, older), publish(store, champion)
    store.delete(f"{layout.model_version_prefix(MODEL, champion)}/model.keras")
    with pytest.raises(registry.AliasBroken, match=f"kws_cnn:production is broken: its entry 2 points at version {champion}.*model.keras"):
        registry.require_alias(store, MODEL, "production")
    with pytest.raises(registry.AliasBroken):
        resolve_model(store, MODEL, "production", None)
    status = json.loads(twocluster(store, "status", "--json").stdout)
    assert "model.keras" in status["models"][MODEL]["aliases"]["production"]["broken"]
    assert "BROKEN" in twocluster(store, "status").stdout
    assert twocluster(store, "alias", "history", MODEL, "production", check=False).returncode == 1
    rolled = json.loads(twocluster(store, "alias", "rollback", MODEL, "production", "--reason", "champion files lost", "--json").stdout)
    assert rolled["version"] == older and registry.require_alias(store, MODEL, "production").version == older
