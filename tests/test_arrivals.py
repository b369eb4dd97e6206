"""Complete days only (issue 14, item 4): the arrivals policy both ways (wait, then proceed; the
deadline, then fail or commit incomplete), and a late file picked up by a rerun."""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest

from twocluster.orchestration.arrivals import ArrivalsIncomplete, deadline_of, decide
from twocluster.spark.preprocess import run_preprocess
from twocluster.store import layout
from twocluster.store.manifest import DatasetManifest, resolve_latest
from twocluster.store.storage import ObjectStore
from twocluster_demo import sample_data

DATE = dt.date(2026, 11, 4)
BEFORE = dt.datetime(2026, 11, 5, 3, tzinfo=dt.UTC)  # 3 h after the date's end: within the 6 h deadline
AFTER = dt.datetime(2026, 11, 5, 7, tzinfo=dt.UTC)


def _policy(spec, **changes):
    return spec.model_copy(update={"arrivals": spec.arrivals.model_copy(update=changes)})


def _arrive(store: ObjectStore, spec, names=("yes/a_nohash_0.wav", "no/b_nohash_0.wav"), marker=False) -> str:
    prefix = layout.raw_date_prefix(spec.name, DATE)
    for name in names:
        store.write_bytes(f"{prefix}/{name}", b"RIFF....WAVE")
    if marker:
        store.write_bytes(f"{prefix}/{layout.ARRIVED_MARKER}", b"{}")
    return prefix


def test_marker_policy_waits_then_proceeds(file_store, speech_spec):
    spec = _policy(speech_spec, completeness="marker")
    assert deadline_of(spec, DATE) == dt.datetime(2026, 11, 5, 6, tzinfo=dt.UTC)
    waiting = decide(file_store, spec, DATE, now=BEFORE)
    assert not waiting.proceed and "no _ARRIVED.json" in waiting.reason and waiting.files == 0
    _arrive(file_store, spec)
    assert not decide(file_store, spec, DATE, now=BEFORE).proceed  # half-copied day: keep waiting
    _arrive(file_store, spec, names=(), marker=True)
    done = decide(file_store, spec, DATE, now=BEFORE)
    assert done.proceed and done.complete and done.files == 2


def test_at_the_deadline_it_fails_naming_what_is_missing_or_commits_incomplete(file_store, speech_spec):
    _arrive(file_store, speech_spec)
    with pytest.raises(ArrivalsIncomplete, match=r"2026-11-04: arrivals incomplete at the deadline .*no _ARRIVED.json in file://.*2 files so far"):
        decide(file_store, _policy(speech_spec, on_deadline="fail"), DATE, now=AFTER)
    late = decide(file_store, _policy(speech_spec, on_deadline="commit_incomplete"), DATE, now=AFTER)
    assert late.proceed and not late.complete and "marked incomplete" in late.reason


def test_an_empty_day_fails_at_the_deadline_even_when_incomplete_commits_are_allowed(file_store, speech_spec):
    with pytest.raises(ArrivalsIncomplete, match="0 files"):
        decide(file_store, _policy(speech_spec, on_deadline="commit_incomplete"), DATE, now=AFTER)


def test_quiet_policy_waits_for_a_still_listing_by_the_stores_clock(file_store, speech_spec):
    spec = _policy(speech_spec, completeness="quiet", quiet_minutes=10)
    prefix = _arrive(file_store, spec)
    assert not decide(file_store, spec, DATE, now=BEFORE).proceed  # just written (probe: the store's clock)
    old = time.time() - 11 * 60
    for obj in file_store.list(prefix):
        os.utime(file_store.local_path(obj.key), (old, old))
    quiet = decide(file_store, spec, DATE, now=BEFORE)
    assert quiet.proceed and quiet.complete and "no change for 10 minutes" in quiet.reason
    # A file that lands now makes the listing young again.
    _arrive(file_store, spec, names=("yes/late_nohash_0.wav",))
    assert not decide(file_store, spec, DATE, now=BEFORE, store_now_ns=time.time_ns()).proceed


def test_an_incomplete_commit_is_recorded_and_a_rerun_picks_up_late_files(spark, file_store, speech_spec):
    spec = speech_spec.model_copy(update={"start_date": DATE})
    sample_data.generate(file_store, spec, [DATE], clips_per_day=24, seed=5)
    prefix = layout.raw_date_prefix(spec.name, DATE)
    file_store.delete(f"{prefix}/{layout.ARRIVED_MARKER}")
    first = run_preprocess(spark, spec, file_store, DATE, run_id="deadline", max_reject_rate=1.0, complete=False)
    location = layout.dataset_date_prefix(spec.name, DATE)
    assert resolve_latest(file_store, location, DatasetManifest).manifest.complete is False
    # The rest arrives: one late clip and the marker. The rerun commits a complete version with it.
    clip = next(o for o in file_store.list(prefix) if o.key.endswith(".wav"))
    file_store.write_bytes(clip.key.rsplit("/", 1)[0] + "/zz_late_nohash_0.wav", file_store.read_bytes(clip.key))
    file_store.write_bytes(f"{prefix}/{layout.ARRIVED_MARKER}", b"{}")
    second = run_preprocess(spark, spec, file_store, DATE, run_id="rerun", max_reject_rate=1.0)
    latest = resolve_latest(file_store, location, DatasetManifest).manifest
    assert second.status == "committed" and second.version != first.version
    assert latest.complete is True and latest.counts.input == first.counts["input"] + 1
    assert run_preprocess(spark, spec, file_store, DATE, run_id="again", max_reject_rate=1.0).status == "unchanged"
