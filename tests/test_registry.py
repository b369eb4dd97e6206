"""Alias moves as compare-and-set, and malformed alias entries, on both store backends (the gate's
own race, with real models, is in test_training.py)."""

from __future__ import annotations

import json
import threading

import pytest
from test_gc import MODEL, commit_model, publish

from twocluster.store import layout, registry
from twocluster.store.commitlog import AliasMoved, CommitLog
from twocluster.store.storage import ObjectStore


def test_concurrent_alias_moves_from_one_state_exactly_one_wins(store: ObjectStore):
    versions = [commit_model(store, [], f"run-{i}") for i in range(6)]
    for version in versions:
        registry.record_gate_decision(store, MODEL, version, "production", "passed", "test")
    state = registry.read_alias(store, MODEL, "production")
    barrier = threading.Barrier(len(versions))
    outcomes: list[str] = [""] * len(versions)

    def move(i: int) -> None:
        barrier.wait()
        try:
            registry.move_alias(store, MODEL, "production", versions[i], expected=state, who="test")
            outcomes[i] = "moved"
        except registry.AliasConflict:
            outcomes[i] = "conflict"

    threads = [threading.Thread(target=move, args=(i,)) for i in range(len(versions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("moved") == 1
    winner = versions[outcomes.index("moved")]
    after = registry.read_alias(store, MODEL, "production")
    assert after.version == winner and after.position == 1 and len(after.history) == 1


def test_moving_to_an_uncommitted_version_is_refused(store: ObjectStore):
    with pytest.raises(registry.RegistryError, match="is not committed"):
        registry.move_alias(store, MODEL, "production", layout.new_version_id(), expected=registry.read_alias(store, MODEL, "production"),
                            who="test", override=True, reason="test")
    assert CommitLog(store, layout.model_alias_prefix(MODEL, "production")).head() == 0


def test_malformed_alias_entries_are_skipped_and_reported(store: ObjectStore):
    good = commit_model(store, [], "run-good")
    location = layout.model_alias_prefix(MODEL, "production")
    assert CommitLog(store, location).append_at(1, AliasMoved(seq=1, model=MODEL, alias="production", version=good))
    valid = json.loads(store.read_bytes(layout.log_entry_key(location, 1)))
    for seq, doc in enumerate([
        {**valid, "seq": 2, "written_at": "2026-11-21T12:00:00"},  # naive timestamp: never used to order, accepted
        {**valid, "seq": 3, "version": "latest"},
        {**valid, "seq": 4, "model": "another_model"},
        {**valid, "seq": 5, "alias": "staging"},
        [1, 2, 3],
    ], start=2):
        store.write_bytes(layout.log_entry_key(location, seq), json.dumps(doc).encode())
    state = registry.read_alias(store, MODEL, "production")
    assert state.version == good and state.position == 6 and [e.seq for e in state.history] == [1, 2]
    assert len(state.skipped) == 4
    assert registry.require_alias(store, MODEL, "production").version == good
    newer = commit_model(store, [], "run-newer")
    assert publish(store, newer) == 7 and registry.read_alias(store, MODEL, "production").version == newer
