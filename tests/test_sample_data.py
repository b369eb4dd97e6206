from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pytest
import soundfile as sf

from twocluster.spark import splits
from twocluster.store import layout
from twocluster.store.storage import ObjectStore
from twocluster_demo import sample_data

DATES = [dt.date(2026, 11, 19), dt.date(2026, 11, 20)]


def _snapshot(store: ObjectStore) -> dict[str, str]:
    return {o.key: store.checksum(o.key) for o in store.list("raw")}


def test_generator_is_deterministic(speech_spec, tmp_path):
    a, b = ObjectStore((tmp_path / "a").as_uri()), ObjectStore((tmp_path / "b").as_uri())
    sample_data.generate(a, speech_spec, DATES, clips_per_day=40, seed=7, bad_files_per_day=2, workers=2)
    sample_data.generate(b, speech_spec, DATES, clips_per_day=40, seed=7, bad_files_per_day=2, workers=1)
    assert _snapshot(a) == _snapshot(b)
    c = ObjectStore((tmp_path / "c").as_uri())
    sample_data.generate(c, speech_spec, DATES[:1], clips_per_day=40, seed=8, workers=2)
    assert set(_snapshot(c).values()).isdisjoint(_snapshot(a).values()), "another seed gives other clips"


def test_clips_have_the_speech_commands_format_and_layout(speech_spec, file_store):
    report = sample_data.generate_day(file_store, speech_spec, DATES[0], clips=120, seed=1, bad_files=0)
    prefix = layout.raw_date_prefix("speech_commands", DATES[0])
    wavs = file_store.list(prefix, suffixes=(".wav",))
    assert len(wavs) == report.clips == 120
    known = set(speech_spec.labels.keywords) | set(speech_spec.labels.unknown_words) | {"_silence_"}
    for obj in wavs:
        folder, name = obj.key[len(prefix) + 1 :].split("/")
        assert folder in known
        assert "_nohash_" in name
        info = sf.info(io.BytesIO(file_store.read_bytes(obj.key)))
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 16000)
    # Mostly keywords, some unknown words and some silence.
    per_label = report.per_label
    assert sum(per_label[k] for k in speech_spec.labels.keywords if k in per_label) > 0.5 * report.clips
    assert per_label.get("_silence_", 0) > 0


def test_speech_is_audible_and_silence_is_quiet(speech_spec, file_store):
    sample_data.generate_day(file_store, speech_spec, DATES[0], clips=80, seed=3)
    prefix = layout.raw_date_prefix("speech_commands", DATES[0])
    peaks: dict[bool, list[float]] = {True: [], False: []}
    for obj in file_store.list(prefix, suffixes=(".wav",)):
        audio, _ = sf.read(io.BytesIO(file_store.read_bytes(obj.key)))
        peaks["/_silence_/" in obj.key].append(float(np.max(np.abs(audio))))
    assert np.median(peaks[False]) > 0.1, "speech clips carry a spoken word"
    assert np.median(peaks[True]) < np.median(peaks[False])


def test_held_out_speakers_are_disjoint_from_training(speech_spec, file_store):
    sample_data.generate(file_store, speech_spec, DATES, clips_per_day=300, seed=0)
    by_split: dict[str, set[str]] = {s: set() for s in splits.SPLITS}
    for obj in file_store.list("raw", suffixes=(".wav",)):
        by_split[splits.split_for_path(obj.key, 10, 10)].add(splits.source_id(obj.key))
    assert all(by_split.values()), "every split gets speakers"
    assert by_split["train"].isdisjoint(by_split["test"])
    assert by_split["train"].isdisjoint(by_split["validation"])
    assert by_split["validation"].isdisjoint(by_split["test"])


def test_split_rule_is_the_speech_commands_one():
    # Same speaker, different utterances and labels: same split.
    assert splits.source_id("yes/0a7c2a8d_nohash_3.wav") == "0a7c2a8d"
    assert len({splits.split_for_path(p, 10, 10) for p in ("yes/0a7c2a8d_nohash_0.wav", "no/0a7c2a8d_nohash_5.wav")}) == 1
    # Pinned values from TensorFlow's which_set() for these speaker ids.
    assert splits.split_for_source("0a7c2a8d", 10, 10) == _which_set_reference("0a7c2a8d")
    shares = [splits.split_for_source(f"{i:08x}", 10, 10) for i in range(5000)]
    assert 0.07 < shares.count("test") / 5000 < 0.13


def _which_set_reference(speaker: str) -> str:
    # A transcription of tensorflow/examples/speech_commands/input_data.py:which_set.
    import hashlib
    import re

    hash_name = re.sub(r"_nohash_.*$", "", speaker)
    percentage_hash = (int(hashlib.sha1(hash_name.encode()).hexdigest(), 16) % (2**27)) * (100.0 / (2**27 - 1))
    return "validation" if percentage_hash < 10 else "test" if percentage_hash < 20 else "train"


def test_broken_arrivals_and_the_marker(speech_spec, store):
    first = sample_data.generate_day(store, speech_spec, DATES[1], clips=12, seed=2, bad_files=6)
    prefix = layout.raw_date_prefix("speech_commands", DATES[1])
    keys = [o.key[len(prefix) + 1 :] for o in store.list(prefix)]
    bad = sorted(k for k in keys if "/bad" in k)
    assert len(bad) == 6
    assert any(k.startswith("banana/") for k in bad)
    assert store.size(f"{prefix}/{next(k for k in bad if 'empty' in k)}") == 0
    arrived = json.loads(store.read_bytes(f"{prefix}/{sample_data.ARRIVED_MARKER}"))
    assert arrived["clips"] == 12 and arrived["bad_files"] == 6

    again = sample_data.generate_day(store, speech_spec, DATES[1], clips=12, seed=2, bad_files=6)
    assert again.skipped and again.bytes == first.bytes


def test_cli_reports_what_it_made(tmp_path, capsys):
    uri = (tmp_path / "cli").as_uri()
    assert sample_data.main(["--store", uri, "--days", "1", "--end-date", "2026-11-20", "--clips-per-day", "10", "--bad-files-per-day", "1"]) == 0
    out = capsys.readouterr().out
    assert "raw/speech_commands/date=2026-11-20: 10 clips + 1 broken files" in out


def test_missing_espeak_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    sample_data.list_speakers.cache_clear()
    try:
        with pytest.raises(sample_data.SampleDataError, match="apt-get install -y espeak-ng"):
            sample_data.list_speakers()
    finally:
        sample_data.list_speakers.cache_clear()
