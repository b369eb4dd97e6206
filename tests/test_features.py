from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from twocluster.features import featurizer_for
from twocluster.features.audio import LogMelFeaturizer, slaney_mel_filterbank
from twocluster.spark.preprocess import run_preprocess
from twocluster.spec import ImageFeaturizer, parse_pipeline_spec
from twocluster.store import layout
from twocluster.store.manifest import read_manifest


def _wav(audio: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def _tone(rate: int, hz: float, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * hz * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture(scope="module")
def audio(speech_spec) -> LogMelFeaturizer:
    return featurizer_for(speech_spec.featurizer)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_any_source_rate_gives_the_16k_spectrogram(audio, rate):
    reference = audio.featurize_one(_wav(_tone(16000, 1000.0), 16000))
    got = audio.featurize_one(_wav(_tone(rate, 1000.0), rate))
    assert got.shape == reference.shape == (97, 40)
    # The tone lands in the same mel bin, and the spectra agree closely.
    assert np.argmax(got.mean(axis=0)) == np.argmax(reference.mean(axis=0))
    assert np.corrcoef(got.ravel(), reference.ravel())[0, 1] > 0.99


def test_resampling_removes_content_above_the_new_nyquist(audio):
    # A 12 kHz tone at 48 kHz cannot exist at 16 kHz: correct resampling filters it out instead
    # of folding it down to 4 kHz.
    aliased = audio.featurize_one(_wav(_tone(48000, 12000.0), 48000))
    clean = audio.featurize_one(_wav(_tone(48000, 4000.0), 48000))
    assert aliased.max() < clean.max() - 6


def test_stereo_float_and_flac_inputs_decode(audio):
    mono = audio.featurize_one(_wav(_tone(16000, 500.0), 16000))
    stereo = audio.featurize_one(_wav(_tone(44100, 500.0, channels=2), 44100, subtype="FLOAT"))
    flac = audio.featurize_one(_wav(_tone(16000, 500.0), 16000, fmt="FLAC"))
    assert np.allclose(mono, flac, atol=0.05)  # log domain: quantisation near the floor differs slightly
    assert np.corrcoef(mono.ravel(), stereo.ravel())[0, 1] > 0.99


def test_short_clips_are_padded_and_long_rejected(audio):
    short = audio.featurize_many([_wav(_tone(16000, 500.0, seconds=0.3), 16000)])
    assert short.reasons == [None] and short.features.shape == (1, 97, 40)
    long = audio.featurize_many([_wav(_tone(16000, 500.0, seconds=2.5), 16000)])
    assert long.reasons == ["too_long"] and "more than the 2.0s allowed" in long.details[0]
    from twocluster.spec import AudioInputs

    checked = audio.featurize_many([_wav(_tone(16000, 500.0, seconds=2.5), 16000)], ["yes/long.wav"], AudioInputs())
    assert checked.reasons == ["too_long"] and "2.5s (from the header)" in checked.details[0]


def _librosa_log_mel(audio: LogMelFeaturizer, clips: np.ndarray) -> np.ndarray:
    """The spectrogram through ``librosa.stft`` and ``librosa.filters.mel``: the reference."""
    import librosa

    f = audio.spec
    stft = librosa.stft(clips, n_fft=f.fft_length, hop_length=f.frame_step, win_length=f.frame_length, window="hann", center=False)
    basis = librosa.filters.mel(sr=f.sample_rate, n_fft=f.fft_length, n_mels=f.num_mel_bins, fmin=f.lower_edge_hz, fmax=f.upper_edge_hz)
    mel = np.einsum("mf,nft->ntm", basis, np.abs(stft) ** 2, optimize=True)
    return np.log(mel + f.log_offset).astype(np.float32)


def test_batched_spectrogram_equals_librosa_on_real_speech(audio, speech_spec, tmp_path):
    """The featurizer's own batched STFT (one FFT call per chunk of clips) and its 16-bit PCM
    read give what ``sf.read`` + ``librosa.stft`` give, on real spoken words (espeak-ng),
    clip for clip, in a batch that spans several FFT chunks."""
    from twocluster.store.storage import ObjectStore
    from twocluster_demo import sample_data

    store = ObjectStore(tmp_path.as_uri())
    day = dt.date(2026, 11, 2)
    sample_data.generate_day(store, speech_spec, day, clips=70, seed=3, bad_files=0)
    keys = [o.key for o in store.list(layout.raw_date_prefix(speech_spec.name, day)) if o.key.endswith(".wav")]
    blobs = [store.read_bytes(k) for k in keys]
    assert len(blobs) > 64  # more than two FFT chunks

    batch = audio.featurize_many(blobs, keys, speech_spec.inputs)
    assert batch.reasons == [None] * len(blobs)
    reference_clips = np.zeros((len(blobs), audio.num_samples), np.float32)
    for i, b in enumerate(blobs):
        samples, rate = sf.read(io.BytesIO(b), dtype="float32")
        assert rate == 16000 and sf.info(io.BytesIO(b)).subtype == "PCM_16"
        reference_clips[i, : min(len(samples), audio.num_samples)] = samples[: audio.num_samples]
    reference = _librosa_log_mel(audio, reference_clips)
    assert batch.features.shape == reference.shape == (len(blobs), 97, 40)
    # float32 FFTs in a different order: agreement to ~1e-4 in the log domain (values span ~-14..5)
    assert np.abs(batch.features - reference).max() < 1e-3
    assert np.abs(batch.features - reference).mean() < 1e-5


def test_filterbank_and_window_are_librosas(audio, speech_spec):
    import librosa

    f = speech_spec.featurizer
    expected = librosa.filters.mel(sr=f.sample_rate, n_fft=f.fft_length, n_mels=f.num_mel_bins, fmin=f.lower_edge_hz,
                                   fmax=f.upper_edge_hz)
    assert audio._mel_basis.shape == expected.shape == (40, 257)
    assert np.allclose(audio._mel_basis, expected, rtol=1e-5, atol=1e-8)
    assert np.allclose(audio._window, librosa.filters.get_window("hann", f.frame_length, fftbins=True), atol=1e-7)
    assert np.allclose(librosa.filters.mel(sr=44100, n_fft=2048, n_mels=128, fmin=0.0, fmax=22050.0),
                       slaney_mel_filterbank(44100, 2048, 128, 0.0, 22050.0),
                       rtol=1e-5, atol=1e-8)


def test_resampling_is_librosas_soxr_hq(audio):
    import librosa

    tone = _tone(44100, 700.0).astype(np.float32)
    ours = audio.decode(_wav(tone, 44100, subtype="FLOAT"))
    theirs = librosa.resample(tone, orig_sr=44100, target_sr=16000, res_type="soxr_hq")
    assert np.allclose(ours[: len(theirs)], theirs[:16000], atol=1e-6)


def test_the_featurizer_does_not_import_librosa():
    """A Spark Python worker's featurizer start-up: importing librosa (numba, scipy.signal) costs
    seconds per process, every run."""
    import subprocess
    import sys

    code = ("import sys, io, numpy as np, soundfile as sf; from twocluster.spec import LogMelFeaturizer; "
            "from twocluster.features import featurizer_for; f = featurizer_for(LogMelFeaturizer()); "
            "b = io.BytesIO(); sf.write(b, np.zeros(8000), 8000, subtype='PCM_16', format='WAV'); "
            "assert f.featurize_many([b.getvalue()]).reasons == [None]; "
            "print(sorted(m for m in ('librosa', 'numba', 'scipy.signal', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_batch_equals_one_by_one(audio):
    blobs = [_wav(_tone(16000, hz), 16000) for hz in (300.0, 900.0, 2500.0)]
    batch = audio.featurize_many(blobs)
    for i, b in enumerate(blobs):
        assert np.allclose(batch.features[i], audio.featurize_one(b), atol=1e-5)


# -- images --------------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_image_featurizer_on_real_photos():
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()  # china.jpg and flower.jpg, shipped with scikit-learn
    jpegs = []
    for array in photos.images:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    rgb = featurizer_for(ImageFeaturizer(height=48, width=64, channels=3))
    batch = rgb.featurize_many([*jpegs, b"not an image", b""])
    assert batch.reasons == [None, None, "undecodable", "empty"]
    assert batch.features.shape == (4, 48, 64, 3)
    assert 0.0 <= batch.features[:2].min() and batch.features[:2].max() <= 1.0
    # Resizing keeps the picture: the mean colour survives.
    assert np.allclose(batch.features[0].mean(axis=(0, 1)), photos.images[0].mean(axis=(0, 1)) / 255, atol=0.02)
    tiny = featurizer_for(ImageFeaturizer(height=4, width=4, max_source_pixels=1000))
    assert tiny.featurize_many(jpegs[:1]).reasons == ["too_large"]


def test_preprocess_job_runs_an_image_pipeline(spark, file_store):
    """The job is not audio-only: scikit-learn's handwritten digits, as PNG files per label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    spec = parse_pipeline_spec(
        {
            "name": "digits",
            "start_date": "2026-11-01",
            "inputs": {"kind": "image", "patterns": ["*.png"]},
            "labels": {"keywords": [str(d) for d in range(10)], "silence_label": None},
            "featurizer": {"kind": "image", "height": 16, "width": 16, "channels": 1},
            "model": {"name": "digits_cnn"},
        },
        "digits.yaml",
    )
    date = dt.date(2026, 11, 20)
    prefix = layout.raw_date_prefix("digits", date)
    for i in range(150):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        file_store.write_bytes(f"{prefix}/{digits.target[i]}/writer{i % 30:02d}_nohash_{i}.png", _png(pixels))
    file_store.write_bytes(f"{prefix}/3/broken_nohash_0.png", b"\x89PNG\r\n\x1a\n truncated")
    # Content (issue 35): an empty scan and an over-exposed one, each under its reason.
    file_store.write_bytes(f"{prefix}/4/empty_scan_nohash_0.png", _png(np.full((8, 8), 128, np.uint8)))
    file_store.write_bytes(f"{prefix}/7/overexposed_nohash_0.png", _png(np.pad(np.full((2, 2), 90, np.uint8), 15, constant_values=255)))
    result = run_preprocess(spark, spec, file_store, date, run_id="digits")
    manifest = read_manifest(file_store, layout.dataset_version_prefix("digits", date, result.version))
    assert (manifest.counts.input, manifest.counts.accepted, manifest.counts.rejected) == (153, 150, 3)
    assert manifest.counts.rejected_by_reason == {"undecodable": 1, "blank": 1, "saturated": 1}
    assert manifest.feature_spec.features["image"].model_dump() == {"dtype": "float32", "shape": [16, 16, 1]}
    assert manifest.feature_spec.label_vocabulary == [str(d) for d in range(10)]


def test_content_problems_are_rejected_or_counted_as_warnings_as_the_spec_says(speech_spec):
    """Issue 35: the spec decides whether a content problem rejects the clip (the default) or
    lets it in with a quality warning under the same reason."""
    def wav(x: np.ndarray) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, x, 16000, subtype="PCM_16", format="WAV")
        return buf.getvalue()

    t = np.arange(16000) / 16000
    clips = {"yes/fine.wav": wav(0.3 * np.sin(2 * np.pi * 440 * t)), "yes/silent.wav": wav(np.zeros(16000)),
             "no/clipped.wav": wav(np.clip(4 * np.sin(2 * np.pi * 440 * t), -1, 1)),
             "up/offset.wav": wav(0.2 * np.sin(2 * np.pi * 440 * t) + 0.5), "_silence_/room.wav": wav(np.zeros(16000))}
    featurizer = featurizer_for(speech_spec.featurizer)
    quiet = frozenset(speech_spec.labels.silence_folders)
    rejected = featurizer.featurize_many(list(clips.values()), list(clips), speech_spec.inputs, content=True, quiet_folders=quiet)
    assert rejected.reasons == [None, "silent", "clipped", "dc_offset", None] and rejected.warnings == [None] * 5
    warn = speech_spec.inputs.model_copy(update={"content": speech_spec.inputs.content.model_copy(update={"action": "warn"})})
    warned = featurizer.featurize_many(list(clips.values()), list(clips), warn, content=True, quiet_folders=quiet)
    assert warned.reasons == [None] * 5 and warned.warnings == [None, "silent", "clipped", "dc_offset", None]
    assert np.abs(warned.features[2]).sum() > 0, "a warned clip is featurized and kept"
    # Scoring takes what arrives: no content checks without content=True.
    assert featurizer.featurize_many(list(clips.values()), list(clips), speech_spec.inputs).reasons == [None] * 5
