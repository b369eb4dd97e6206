"""Hostile arrival folders (issue 14, items 1-3): decompression bombs and lying headers, symbolic
links, hidden files, odd names and encodings, through the real preprocessing job. Every file ends
in a counted outcome with a reason; nothing is decoded before its header passed the spec's limits.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from twocluster.spark.preprocess import run_preprocess
from twocluster.store import layout
from twocluster.store.manifest import read_manifest
from twocluster.store.storage import ObjectStore, printable_name

DATE = dt.date(2026, 11, 3)
TEN_MINUTES = 600


def _wav(seconds: float = 1.0, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16", fmt: str = "WAV",
         amplitude: float = 0.4, offset: float = 0.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = np.clip(amplitude * np.sin(2 * np.pi * 440.0 * t) + offset, -1.0, 1.0)  # as a recorder clips
    buf = io.BytesIO()
    sf.write(buf, np.stack([x] * channels, axis=1) if channels > 1 else x, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def _silent_flac(seconds: int, rate: int = 48000, channels: int = 2) -> bytes:
    """A FLAC bomb: minutes of silence compress to almost nothing and decode to hundreds of MB of
    float32 (written in blocks, so making it costs no memory)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((rate, channels), dtype=np.int16)
        for _ in range(seconds):
            f.write(block)
    return buf.getvalue()


def _lying_rate(data: bytes, rate: int = 2_147_483_647) -> bytes:
    patched = bytearray(data)
    patched[24:28] = rate.to_bytes(4, "little")  # the fmt chunk's sample rate
    return bytes(patched)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# path -> (bytes, expected outcome: "accepted", a reject reason, or "ignored:<reason>")
def corpus() -> dict[str, tuple[bytes, str]]:
    return {
        "yes/ok_16k.wav": (_wav(), "accepted"),
        "yes/ok_44k_stereo_24bit.wav": (_wav(rate=44100, channels=2, subtype="PCM_24"), "accepted"),
        "no/ok_48k_float.wav": (_wav(rate=48000, subtype="FLOAT"), "accepted"),
        "no/ok_8k_unsigned_8bit.wav": (_wav(rate=8000, subtype="PCM_U8"), "accepted"),
        "up/ok_short.WAV": (_wav(seconds=0.4), "accepted"),
        "go/ünïcödé_name.wav": (_wav(), "accepted"),
        "go/ok.flac": (_wav(fmt="FLAC"), "accepted"),
        "yes/flac_named.wav": (_wav(fmt="FLAC"), "wrong_format"),
        "yes/ogg_named.flac": (_wav(fmt="OGG", subtype="VORBIS"), "wrong_format"),
        "yes/ten_minutes.flac": (_silent_flac(TEN_MINUTES), "too_long"),
        "yes/three_seconds.wav": (_wav(seconds=3.0), "too_long"),
        "yes/huge.wav": (_wav(seconds=300.0), "too_large"),  # 9.6 MB: over max_bytes, never read
        "yes/lying_rate.wav": (_lying_rate(_wav()), "bad_sample_rate"),
        "yes/cut_short.wav": (_wav()[:4000], "truncated"),
        "yes/picture.wav": (_png(), "not_audio"),
        "yes/empty.wav": (b"", "empty"),
        "yes/garbage.wav": (os.urandom(3000), "undecodable"),
        "yes/new\nline.wav": (_wav(), "bad_name"),
        # Content (issue 35): label noise a validator flags, each under its own reason.
        "yes/digital_silence.wav": (_wav(amplitude=0.0), "silent"),
        "no/near_silent.wav": (_wav(amplitude=0.0005), "silent"),  # -69 dBFS
        "_silence_/quiet_room.wav": (_wav(amplitude=0.0005), "accepted"),  # the silence class is quiet by design
        "yes/clipped.wav": (_wav(amplitude=4.0), "clipped"),
        "stop/dc_offset.wav": (_wav(amplitude=0.3, offset=0.5), "dc_offset"),
        "zebra/clip.wav": (_wav(), "unknown_label"),
        "yes/folder.wav/clip.wav": (_wav(), "unknown_label"),  # a folder that looks like an input
        "yes/.DS_Store": (b"\x00\x00\x00\x01Bud1", "ignored:hidden"),
        "yes/._ok_16k.wav": (b"\x00\x05\x16\x07AppleDouble", "ignored:hidden"),
        ".trash/yes/old.wav": (_wav(), "ignored:hidden"),
        "README.txt": (b"clips from the field recorder", "ignored:pattern"),
        "yes/clip.wav.part": (_wav()[:1000], "ignored:pattern"),
    }


@pytest.fixture
def hostile(speech_spec, tmp_path: Path):
    spec = speech_spec.model_copy(update={
        "inputs": speech_spec.inputs.model_copy(update={"patterns": ["*.wav", "*.flac"], "formats": ["WAV", "WAVEX", "FLAC"]}),
    })
    store = ObjectStore((tmp_path / "store").as_uri())
    prefix = layout.raw_date_prefix(spec.name, DATE)
    folder = store.local_path(prefix)
    for path, (data, _) in corpus().items():
        # Written as an uploader would (the store itself refuses keys with control characters).
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    outside = tmp_path / "secret.wav"
    outside.write_bytes(_wav())
    (folder / "loop").symlink_to("../..")  # a loop: would list the store again and again
    (folder / "yes" / "outside.wav").symlink_to(outside)  # out of the store
    (folder / "left").symlink_to(folder / "yes")  # another label's folder: would relabel every clip
    return spec, store


def test_every_hostile_file_ends_in_a_counted_outcome_with_its_reason(spark, hostile):
    spec, store = hostile
    result = run_preprocess(spark, spec, store, DATE, run_id="hostile", max_reject_rate=1.0)
    manifest = read_manifest(store, result.manifest_uri.split(store.root_uri + "/", 1)[1].rsplit("/", 1)[0])
    expected = corpus()
    inputs = {p: outcome for p, (_, outcome) in expected.items() if not outcome.startswith("ignored:")}
    counts = manifest.counts
    assert counts.input == len(inputs) == counts.accepted + counts.rejected
    assert counts.accepted == sum(o == "accepted" for o in inputs.values())
    wanted_reasons = pd.Series([o for o in inputs.values() if o != "accepted"]).value_counts().to_dict()
    assert counts.rejected_by_reason == wanted_reasons
    ignored = pd.Series([o.split(":")[1] for _, o in expected.values() if o.startswith("ignored:")]).value_counts().to_dict()
    assert manifest.ignored_by_reason == {**ignored, "symlink": 3} and manifest.ignored_files == sum(ignored.values()) + 3
    # The rejects report names each file with the reason it was expected to get.
    rejects_file = next(f for f in manifest.files if f.kind == "rejects")
    version_prefix = result.manifest_uri.split(store.root_uri + "/", 1)[1].rsplit("/", 1)[0]
    report = pd.read_parquet(io.BytesIO(store.read_bytes(f"{version_prefix}/{rejects_file.path}")))
    # A name with a control character is shown escaped (yes/new\x0aline.wav): never a line break in a table or a log.
    assert dict(zip(report["path"], report["reason"], strict=True)) == {printable_name(p): o for p, o in inputs.items() if o != "accepted"}
    details = dict(zip(report["path"], report["detail"], strict=True))
    assert "2147483647 Hz" in details["yes/lying_rate.wav"] and "named .wav" in details["yes/flac_named.wav"]
    assert "from the header" in details["yes/ten_minutes.flac"] and "bytes in the listing" in details["yes/huge.wav"]
    assert "digital silence" in details["yes/digital_silence.wav"] and "dBFS RMS" in details["no/near_silent.wav"]
    assert "at full scale" in details["yes/clipped.wav"] and "DC offset of 0.500" in details["stop/dc_offset.wav"]
    # Nothing through a link: "left" holds no clips of its own, and outside.wav was never an input.
    assert manifest.counts.per_label.get("left", 0) == 0 and not any("outside" in p for p in report["path"])


def test_the_listing_never_follows_a_symbolic_link(hostile):
    spec, store = hostile
    listing = store.listing(layout.raw_date_prefix(spec.name, DATE))
    keys = [o.key for o in listing.objects]
    assert len(keys) == len(corpus()) and not any("/loop/" in k or "/left/" in k or "outside" in k for k in keys)
    assert sorted(k.rsplit("/", 1)[-1] for k in listing.links) == ["left", "loop", "outside.wav"]
    assert "left" not in store.list_folders(layout.raw_date_prefix(spec.name, DATE))


MEMORY_PROBE = """
import io, json, resource, sys
import numpy as np, soundfile as sf
from twocluster.features import featurizer_for
from twocluster.spec import default_spec_path, load_pipeline_spec
spec = load_pipeline_spec(default_spec_path("speech_commands"))
inputs = spec.inputs.model_copy(update={"patterns": ["*.wav", "*.flac"], "formats": ["WAV", "WAVEX", "FLAC"]})
featurizer = featurizer_for(spec.featurizer)
names = json.loads(sys.argv[1])
blobs = [open(p, "rb").read() for p in names]
ok = [b for b, n in zip(blobs, names) if n.endswith("ok_16k.wav")]
featurizer.featurize_many(ok * 4, ["ok_16k.wav"] * 4, inputs)  # warm: the steady state of a worker
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batch = featurizer.featurize_many(blobs, names, inputs if sys.argv[2] == "checked" else None)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reasons": batch.reasons, "peak_growth_mb": (after - before) / 1024}))
"""


def test_a_ten_minute_flac_is_rejected_with_bounded_memory(tmp_path: Path):
    """The featurizer as a Spark task runs it, in a fresh process: the 28 KB-class FLAC that
    decodes to 230 MB of float32 is rejected from its header, and the batch's peak memory grows
    by less than the stated bound (64 MB). The decoder is bounded on its own too: without the
    header checks it stops reading at the allowed duration."""
    paths = []
    for name, data in [("ok_16k.wav", _wav()), ("ten_minutes.flac", _silent_flac(TEN_MINUTES)), ("ok2_16k.wav", _wav())]:
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    assert (tmp_path / "ten_minutes.flac").stat().st_size < 2_000_000
    for mode in ("checked", "unchecked"):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps(paths), mode], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        assert probe["reasons"] == [None, "too_long", None], (mode, probe)
        assert probe["peak_growth_mb"] < 64, (mode, probe)
        print(f"{mode}: peak memory growth {probe['peak_growth_mb']:.1f} MB while rejecting {TEN_MINUTES // 60} minutes of FLAC")
