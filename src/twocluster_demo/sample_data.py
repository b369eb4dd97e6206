"""Sample data: Speech Commands spoken by espeak-ng, arriving day by day in the object store.

No dataset can be downloaded here, so this makes one in the real dataset's layout, so that the
real Speech Commands drops in unchanged::

    raw/<pipeline>/date=<YYYY-MM-DD>/<label>/<speaker>_nohash_<n>.wav   (16 kHz, mono, 16-bit, 1 s)

* keywords and the auxiliary ("unknown") words are spoken by *speakers*: an espeak-ng English
  voice combined with a voice variant, each with its own base speed and pitch, and some jitter
  per utterance; the speaker id is a hash of the voice and variant, as opaque as the real ones.
* ``_silence_`` clips are one second of background noise (white, pink, brown, mains hum or
  babble) at varied levels; a share of the speech clips get noise mixed in at 5-30 dB SNR.
* espeak-ng writes 22.05 kHz; clips are resampled to 16 kHz with a polyphase filter.
* Optionally, a few broken arrivals per day (empty, truncated, not audio, unknown label,
  too long), because real uploads contain them and the pipeline must reject them, not crash.

**Held-out set.** Splits follow the real dataset's rule (:mod:`twocluster.spark.splits`): a speaker's
id decides once and for all whether all of their clips are train, validation or test, so the
validation and test speakers (about 10% each) are never heard in training.

Deterministic: the same seed, dates and size give byte-identical files. A finished date gets a
create-only ``_ARRIVED.json`` marker and is skipped by later calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf
from scipy import signal

from twocluster.spec import STORE_URI_ENV, PipelineSpec, default_spec_path, load_pipeline_spec
from twocluster.store import layout
from twocluster.store.storage import ObjectStore

log = logging.getLogger(__name__)

ESPEAK_RATE = 22050
ARRIVED_MARKER = layout.ARRIVED_MARKER
BAD_KINDS = ("empty", "truncated", "not_audio", "image_in_audio", "unknown_label", "too_long")
NOISE_KINDS = ("white", "pink", "brown", "hum", "babble")


class SampleDataError(RuntimeError):
    pass


@dataclass(frozen=True)
class Speaker:
    voice: str  # espeak-ng voice file, e.g. gmw/en-US
    variant: str  # espeak-ng variant, e.g. Alex
    speaker_id: str  # 8 hex digits, like the real dataset's ids

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}"


@dataclass(frozen=True)
class ClipPlan:
    folder: str  # label folder
    file_name: str
    word: str | None  # None: a noise-only clip
    speaker: Speaker | None
    words_per_minute: int
    pitch: int
    offset: float  # where the word starts, as a share of the free room in the clip
    gain_db: float
    noise: str | None
    snr_db: float
    seed: int


def _espeak() -> str:
    path = shutil.which("espeak-ng")
    if not path:
        raise SampleDataError("espeak-ng is not installed: sudo apt-get install -y espeak-ng (or run `make run`)")
    return path


@lru_cache(maxsize=1)
def list_speakers() -> tuple[Speaker, ...]:
    """English espeak-ng voices (its own formant voices; MBROLA voices need extra packages)
    combined with every voice variant."""
    espeak = _espeak()

    def voice_files(language: str) -> list[str]:
        out = subprocess.run([espeak, f"--voices={language}"], capture_output=True, text=True, check=True).stdout
        return [line.split()[4] for line in out.splitlines()[1:] if len(line.split()) >= 5]

    voices = sorted({f for f in voice_files("en") if f.startswith("gmw/")})
    variants = sorted({f.split("/", 1)[1] for f in voice_files("variant") if f.startswith("!v/")})
    if not voices or not variants:
        raise SampleDataError("espeak-ng lists no English voices or no variants; is espeak-ng-data installed?")
    return tuple(
        Speaker(voice, variant, hashlib.sha1(f"{voice}+{variant}".encode()).hexdigest()[:8])
        for voice in voices
        for variant in variants
    )


def _speaker_traits(speaker: Speaker) -> tuple[int, int]:
    """A speaker's own base speed (words/minute) and pitch (0-99), stable across days."""
    rng = np.random.default_rng(int(speaker.speaker_id, 16))
    return int(rng.integers(135, 215)), int(rng.integers(25, 75))


def plan_day(spec: PipelineSpec, date: dt.date, clips: int, seed: int) -> list[ClipPlan]:
    """What to generate for one date: ~70% keywords, ~20% other words, ~10% silence."""
    speakers = list_speakers()
    rng = np.random.default_rng([seed, date.toordinal()])
    keywords, others = spec.labels.keywords, spec.labels.unknown_words
    silence_folder = spec.labels.silence_folders[0] if spec.labels.silence_folders else None
    per_speaker_word: Counter[tuple[str, str]] = Counter()
    plans = []
    for i in range(clips):
        draw = rng.random()
        if silence_folder and draw < 0.10:
            folder, word, speaker = silence_folder, None, None
        else:
            pool = others if (others and draw < 0.30) else keywords
            word = str(rng.choice(pool))
            folder = word
            speaker = speakers[int(rng.integers(len(speakers)))]
        if speaker is None:
            noise = str(rng.choice(NOISE_KINDS))
            source = f"{noise}{hashlib.sha1(f'{seed}-{date}-{i}'.encode()).hexdigest()[:8]}"
            wpm, pitch = 0, 0
        else:
            noise = str(rng.choice(NOISE_KINDS)) if rng.random() < 0.5 else None
            source = speaker.speaker_id
            base_wpm, base_pitch = _speaker_traits(speaker)
            wpm = int(np.clip(base_wpm + rng.normal(0, 12), 110, 240))
            pitch = int(np.clip(base_pitch + rng.normal(0, 6), 0, 99))
        n = per_speaker_word[(source, folder)]
        per_speaker_word[(source, folder)] += 1
        plans.append(
            ClipPlan(
                folder=folder,
                file_name=f"{source}_nohash_{n}.wav",
                word=word,
                speaker=speaker,
                words_per_minute=wpm,
                pitch=pitch,
                offset=float(rng.random()),
                gain_db=float(rng.uniform(-12, 0)),
                noise=noise,
                snr_db=float(rng.uniform(5, 30)),
                seed=int(rng.integers(2**31)),
            )
        )
    return plans


def _speak(plan: ClipPlan, workdir: str) -> np.ndarray:
    out = os.path.join(workdir, f"{plan.seed}.wav")
    cmd = [_espeak(), "-v", plan.speaker.espeak_voice, "-s", str(plan.words_per_minute), "-p", str(plan.pitch), "-w", out, plan.word]
    subprocess.run(cmd, check=True, capture_output=True)
    audio, rate = sf.read(out, dtype="float32")
    os.unlink(out)
    if rate != ESPEAK_RATE:
        raise SampleDataError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
    return audio


def _noise(kind: str, n: int, rng: np.random.Generator, rate: int) -> np.ndarray:
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind in ("pink", "brown"):
        # Shape white noise's spectrum: 1/f power (pink) or 1/f^2 (brown).
        spectrum = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n)
        f[0] = f[1]
        spectrum /= np.sqrt(f) if kind == "pink" else f
        x = np.fft.irfft(spectrum, n)
    elif kind == "hum":
        t = np.arange(n) / rate
        mains = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 6))
        x = x + 0.05 * rng.standard_normal(n)
    elif kind == "babble":
        # Several band-limited noise "voices" with syllable-rate amplitude modulation.
        b, a = signal.butter(4, [300, 3400], btype="band", fs=rate)
        t = np.arange(n) / rate
        x = sum(
            signal.lfilter(b, a, rng.standard_normal(n)) * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)))
            for _ in range(4)
        )
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    x = np.asarray(x, dtype=np.float64)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _to_wav(audio: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def render_clip(plan: ClipPlan, rate: int, clip_seconds: float, workdir: str) -> bytes:
    """One clip as WAV bytes: speech placed in a one-second window, plus optional noise."""
    rng = np.random.default_rng(plan.seed)
    n = int(round(rate * clip_seconds))
    clip = np.zeros(n)
    if plan.word is not None:
        speech = _speak(plan, workdir).astype(np.float64)
        g = np.gcd(rate, ESPEAK_RATE)
        speech = signal.resample_poly(speech, rate // g, ESPEAK_RATE // g)
        voiced = np.flatnonzero(np.abs(speech) > 0.02 * np.max(np.abs(speech)))
        speech = speech[voiced[0] : voiced[-1] + 1] if voiced.size else speech
        speech = speech[:n]
        start = int(plan.offset * (n - speech.size))
        clip[start : start + speech.size] = speech / (np.max(np.abs(speech)) + 1e-12)
        clip *= 10 ** (plan.gain_db / 20) * 0.8
        if plan.noise:
            speech_rms = np.sqrt(np.mean(clip[start : start + speech.size] ** 2))
            clip += _noise(plan.noise, n, rng, rate) * speech_rms / 10 ** (plan.snr_db / 20)
    else:
        level = 10 ** (rng.uniform(-50, -15) / 20)
        clip = _noise(plan.noise, n, rng, rate) * level
    return _to_wav(clip, rate)


def render_bad_files(spec: PipelineSpec, date: dt.date, count: int, seed: int) -> dict[str, bytes]:
    """Broken arrivals, one of each kind in turn: the inputs a preprocessing job must reject."""
    rng = np.random.default_rng([seed, date.toordinal(), 99])
    rate = spec.featurizer.sample_rate
    keyword = spec.labels.keywords[0]
    files: dict[str, bytes] = {}
    for i in range(count):
        kind = BAD_KINDS[(date.toordinal() + i) % len(BAD_KINDS)]
        good = _to_wav(0.1 * rng.standard_normal(rate), rate)
        name = f"bad{i:02d}{kind.replace('_', '')}_nohash_0"
        if kind == "empty":
            files[f"{keyword}/{name}.wav"] = b""
        elif kind == "truncated":
            files[f"{keyword}/{name}.wav"] = good[: len(good) // 3]
        elif kind == "not_audio":
            files[f"{keyword}/{name}.wav"] = rng.bytes(4096)
        elif kind == "image_in_audio":
            # A real PNG (an 8x8 gradient) saved where audio belongs, with a .wav name.
            files[f"{keyword}/{name}.wav"] = _tiny_png()
        elif kind == "unknown_label":
            files[f"banana/{name}.wav"] = good
        elif kind == "too_long":
            files[f"{keyword}/{name}.wav"] = _to_wav(0.1 * rng.standard_normal(rate * 30), rate)
    return files


def _tiny_png() -> bytes:
    """A real 8x8 grey gradient PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1)), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _render_batch(args: tuple[list[ClipPlan], int, float]) -> list[bytes]:
    plans, rate, clip_seconds = args
    with tempfile.TemporaryDirectory(prefix="espeak-") as workdir:
        return [render_clip(p, rate, clip_seconds, workdir) for p in plans]


@dataclass
class DayReport:
    date: str
    prefix: str
    clips: int
    bad_files: int
    per_label: dict[str, int]
    bytes: int
    skipped: bool = False


def generate_day(
    store: ObjectStore,
    spec: PipelineSpec,
    date: dt.date,
    clips: int,
    seed: int,
    bad_files: int = 0,
    workers: int | None = None,
    force: bool = False,
) -> DayReport:
    prefix = layout.raw_date_prefix(spec.name, date)
    marker = f"{prefix}/{ARRIVED_MARKER}"
    if store.exists(marker) and not force:
        arrived = json.loads(store.read_bytes(marker))
        return DayReport(**{**arrived, "skipped": True})
    if spec.featurizer.kind != "log_mel":
        raise SampleDataError(f"pipeline {spec.name!r} is not an audio pipeline")
    plans = plan_day(spec, date, clips, seed)
    rate, clip_seconds = spec.featurizer.sample_rate, spec.featurizer.clip_seconds
    workers = workers or os.cpu_count() or 1
    batches = [plans[i : i + 25] for i in range(0, len(plans), 25)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rendered = [wav for batch in pool.map(_render_batch, [(b, rate, clip_seconds) for b in batches]) for wav in batch]
    files = {f"{p.folder}/{p.file_name}": wav for p, wav in zip(plans, rendered, strict=True)}
    files.update(render_bad_files(spec, date, bad_files, seed))
    for rel, data in sorted(files.items()):
        store.write_bytes(f"{prefix}/{rel}", data)
    report = DayReport(
        date=date.isoformat(),
        prefix=prefix,
        clips=len(plans),
        bad_files=bad_files,
        per_label=dict(sorted(Counter(p.folder for p in plans).items())),
        bytes=sum(len(d) for d in files.values()),
    )
    # Written last: a date without it is an interrupted arrival and is generated again.
    if force:
        store.delete(marker)
    store.put_if_absent(marker, json.dumps({k: v for k, v in asdict(report).items() if k != "skipped"}, indent=2).encode())
    return report


def arrival_dates(days: int, end_date: dt.date | None = None) -> list[dt.date]:
    end = end_date or (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))
    return [end - dt.timedelta(days=d) for d in range(days - 1, -1, -1)]


def generate(
    store: ObjectStore,
    spec: PipelineSpec,
    dates: list[dt.date],
    clips_per_day: int,
    seed: int = 0,
    bad_files_per_day: int = 0,
    workers: int | None = None,
    force: bool = False,
) -> list[DayReport]:
    return [generate_day(store, spec, d, clips_per_day, seed, bad_files_per_day, workers, force) for d in dates]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate Speech Commands-style sample data with espeak-ng, as daily arrivals "
        "under raw/<pipeline>/date=YYYY-MM-DD/ in the object store."
    )
    parser.add_argument("--spec", default=str(default_spec_path()), help="pipeline spec YAML (default: %(default)s)")
    parser.add_argument("--store", default=None, help=f"store URI (default: ${STORE_URI_ENV}, then the spec's store_uri)")
    parser.add_argument("--days", type=int, default=3, help="number of daily arrivals (default: %(default)s)")
    parser.add_argument("--end-date", type=dt.date.fromisoformat, default=None, help="last date (default: yesterday, UTC)")
    parser.add_argument("--clips-per-day", type=int, default=600, help="good clips per day (default: %(default)s)")
    parser.add_argument("--bad-files-per-day", type=int, default=2, help="broken arrivals per day (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="regenerate dates that already arrived")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    spec = load_pipeline_spec(args.spec)
    store = ObjectStore(spec.resolve_store_uri(args.store))
    started = time.perf_counter()
    reports = generate(
        store, spec, arrival_dates(args.days, args.end_date), args.clips_per_day, args.seed,
        args.bad_files_per_day, args.workers, args.force,
    )
    for r in reports:
        state = "already there" if r.skipped else "generated"
        print(f"{store.uri(r.prefix)}: {r.clips} clips + {r.bad_files} broken files, {r.bytes / 1e6:.1f} MB ({state})")
    print(f"sample data ready in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
