"""Audio: decode any soundfile-readable clip, resample to the spec's rate, pad or trim to the
clip length, and compute a log-mel spectrogram (Slaney-style mel filterbank, as librosa's).

The spectrogram is computed for a whole batch at once: every frame of every clip goes through one
real FFT call (scipy's pocketfft over a contiguous ``[frames, fft_length]`` buffer) and one matmul
with the filterbank. ``librosa.stft`` and ``librosa.filters.mel`` compute the same thing (the tests
hold them equal on real clips) at about twice the cost per clip, and importing librosa (numba,
scipy.signal) costs 4.4 s in every process that featurizes, every Spark Python worker of every
run included; here the worker imports soundfile and scipy.fft (~1.3 s), and soxr when it
resamples (librosa's own ``soxr_hq`` resampler)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

from twocluster.features import UNDECODABLE, WRONG_FORMAT, FeaturizeError, Featurizer, extension_of
from twocluster.spec import AudioContentChecks, AudioInputs
from twocluster.spec import LogMelFeaturizer as LogMelSpec

TRUNCATED = "truncated"
SILENT = "silent"
CLIPPED = "clipped"
DC_OFFSET = "dc_offset"
FULL_SCALE = 0.999  # a sample at or beyond it is clipped
NOT_AUDIO = "not_audio"
TOO_LONG = "too_long"
BAD_SAMPLE_RATE = "bad_sample_rate"
BAD_CHANNELS = "bad_channels"

_TRANSFORM_CHUNK = 32  # clips per FFT call: ~6 MB of buffers

# The containers a file name's extension promises (libsndfile detects the container from the
# content, so a FLAC named .wav would otherwise decode as FLAC).
_CONTAINERS_BY_EXTENSION = {"wav": {"WAV", "WAVEX", "RF64"}, "wave": {"WAV", "WAVEX", "RF64"}, "flac": {"FLAC"},
                            "ogg": {"OGG"}, "oga": {"OGG"}, "aif": {"AIFF"}, "aiff": {"AIFF"}, "mp3": {"MP3"}}

# Magic numbers of files that turn up where audio belongs.
_NON_AUDIO_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
}


def _check_container(data: bytes) -> None:
    for magic, what in _NON_AUDIO_MAGIC.items():
        if data.startswith(magic):
            raise FeaturizeError(NOT_AUDIO, f"the content is {what}")
    # A RIFF/WAVE file states its own length; an upload cut short has fewer bytes than that.
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        declared = int.from_bytes(data[4:8], "little") + 8
        if declared > len(data) and declared != 0x7FFFFFFF + 8:  # streaming writers leave the max
            raise FeaturizeError(TRUNCATED, f"the WAV header declares {declared} bytes, the file has {len(data)}")


SILENCE_FRAME_DBFS = -60.0  # a 10 ms frame this quiet counts as silence


def clip_measures(audio: np.ndarray, rate: int) -> tuple[float, ...]:
    """A decoded clip's quality, as ``twocluster.store.statistics.CLIP_MEASURES``: RMS level (dB full scale; -120 for
    digital silence), peak, share of samples at full scale, DC offset (the worst channel's
    mean), share of 10 ms frames quieter than :data:`SILENCE_FRAME_DBFS`.

    Taken on every clip that is featurized, so it is written for its cost (~20 µs for a second
    of mono audio where the plain expressions took 55 µs, an eighth of featurizing the clip):
    one array of float32 squares, summed per frame with one ``reduceat`` (the total from the
    frames), the peak from the extremes, the clipping count only when a sample reaches full
    scale, no temporary array of absolute values."""
    samples, channels = audio.shape
    flat = audio.reshape(-1)
    power = np.square(flat) if channels == 1 else np.square(audio).mean(axis=1)
    frame = max(rate // 100, 1)
    full = samples // frame * frame
    if full:
        starts = np.arange(0, full, frame)
        frame_power = np.add.reduceat(power[:full], starts)  # per-frame sums
        total = float(frame_power.sum()) + float(power[full:].sum())
        quiet = float(np.count_nonzero(frame_power < frame * 10 ** (SILENCE_FRAME_DBFS / 10))) / frame_power.size
    else:
        total = float(power.sum())
        quiet = float(power[0] < 10 ** (SILENCE_FRAME_DBFS / 10))
    rms = (total / samples) ** 0.5
    peak = max(float(flat.max()), -float(flat.min()))
    clipped = (np.count_nonzero(flat >= FULL_SCALE) + np.count_nonzero(flat <= -FULL_SCALE)) / flat.size if peak >= FULL_SCALE else 0.0
    if channels == 1:
        offset = abs(float(np.add.reduceat(flat[:full], starts).sum() + flat[full:].sum()) if full else float(flat.sum())) / samples
    else:
        offset = float(np.abs(audio.mean(axis=0, dtype=np.float64)).max())
    return (20 * np.log10(rms) if rms > 0 else -120.0, peak, float(clipped), offset, quiet)


def check_content(audio: np.ndarray, checks: AudioContentChecks, may_be_quiet: bool = False,
                  measures: tuple[float, ...] | None = None) -> None:
    """Raise :class:`FeaturizeError` (``clipped``, ``dc_offset``, ``silent``) for a decoded clip
    ([samples, channels] float32 at its own rate, full scale 1) that fails one of ``checks``.
    Clipping and offset are judged per channel (the worst one), loudness on the clip as a whole.
    ``measures``: the clip's :func:`clip_measures`, where already taken."""
    if measures is not None:
        level, _, clipped, offset, _ = measures
        if checks.max_clipped_share is not None and clipped > checks.max_clipped_share:
            raise FeaturizeError(CLIPPED, f"{clipped:.1%} of the samples are at full scale; the spec allows "
                                          f"{checks.max_clipped_share:.1%}")
        if checks.max_dc_offset is not None and offset > checks.max_dc_offset:
            raise FeaturizeError(DC_OFFSET, f"a DC offset of {offset:.3f} (full scale 1); the spec allows {checks.max_dc_offset}")
        if checks.min_rms_dbfs is not None and not may_be_quiet and level < checks.min_rms_dbfs:
            raise FeaturizeError(SILENT, f"{'digital silence' if level <= -120 else f'{level:.1f} dBFS RMS'}, quieter than the "
                                         f"{checks.min_rms_dbfs:g} dBFS a labelled clip needs")
        return
    if checks.max_clipped_share is not None:
        clipped = float(np.count_nonzero(np.abs(audio) >= FULL_SCALE)) / audio.size
        if clipped > checks.max_clipped_share:
            raise FeaturizeError(CLIPPED, f"{clipped:.1%} of the samples are at full scale; the spec allows "
                                          f"{checks.max_clipped_share:.1%}")
    if checks.max_dc_offset is not None:
        offset = float(np.abs(audio.mean(axis=0, dtype=np.float64)).max())
        if offset > checks.max_dc_offset:
            raise FeaturizeError(DC_OFFSET, f"a DC offset of {offset:.3f} (full scale 1); the spec allows {checks.max_dc_offset}")
    if checks.min_rms_dbfs is not None and not may_be_quiet:
        rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
        level = 20 * np.log10(rms) if rms > 0 else -np.inf
        if level < checks.min_rms_dbfs:
            raise FeaturizeError(SILENT, f"{'digital silence' if rms == 0 else f'{level:.1f} dBFS RMS'}, quieter than the "
                                         f"{checks.min_rms_dbfs:g} dBFS a labelled clip needs")


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, ``htk=False``): linear below 1 kHz, log above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3))


def slaney_mel_filterbank(sample_rate: int, fft_length: int, num_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """[num_mels, fft_length // 2 + 1] triangular filters on Slaney's mel scale, area-normalised
    (``librosa.filters.mel(..., htk=False, norm="slaney")``, which the tests compare it with)."""
    fft_hz = np.fft.rfftfreq(fft_length, d=1.0 / sample_rate)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), num_mels + 2))
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.astype(np.float32)


class LogMelFeaturizer(Featurizer):
    feature_name = "log_mel"

    def __init__(self, spec: LogMelSpec):
        self.spec = spec
        self.num_samples = int(round(spec.sample_rate * spec.clip_seconds))
        num_frames = 1 + (self.num_samples - spec.fft_length) // spec.frame_step
        self.shape = (num_frames, spec.num_mel_bins)
        self.decoded_shape = (self.num_samples,)
        # The filterbank is computed once per featurizer (once per Spark Python worker).
        self._mel_basis = slaney_mel_filterbank(spec.sample_rate, spec.fft_length, spec.num_mel_bins,
                                                spec.lower_edge_hz, spec.upper_edge_hz)
        # librosa.stft's window: a periodic Hann of frame_length samples, centred in fft_length.
        # Only the window's support is copied into each FFT buffer: the zeros it would have on
        # the left rotate the spectrum's phase, never its power.
        n = np.arange(spec.frame_length)
        self._window = (0.5 - 0.5 * np.cos(2 * np.pi * n / spec.frame_length)).astype(np.float32)
        self._window_offset = (spec.fft_length - spec.frame_length) // 2
        # Power = re^2 + im^2 folded into the filterbank matmul: the squared spectrum is read
        # as interleaved (re, im) floats, so each filter weight appears twice.
        self._mel_interleaved = np.repeat(self._mel_basis.T, 2, axis=0)  # [2 * bins, mels]


    def _check_info(self, info, name: str, inputs: AudioInputs) -> None:
        """The header checks (``Featurizer.check_header``), on an open ``SoundFile``: :meth:`read`
        checks and decodes in one open of the file."""
        promised = _CONTAINERS_BY_EXTENSION.get(extension_of(name))
        if info.format not in inputs.formats:
            raise FeaturizeError(WRONG_FORMAT, f"a {info.format} file; the spec allows {', '.join(inputs.formats)}")
        if promised is not None and info.format not in promised:
            raise FeaturizeError(WRONG_FORMAT, f"a {info.format} file named .{extension_of(name)}")
        if not inputs.min_sample_rate <= info.samplerate <= inputs.max_sample_rate:
            raise FeaturizeError(BAD_SAMPLE_RATE, f"{info.samplerate} Hz in the header; the spec allows "
                                                  f"{inputs.min_sample_rate}-{inputs.max_sample_rate} Hz")
        if not 1 <= info.channels <= inputs.max_channels:
            raise FeaturizeError(BAD_CHANNELS, f"{info.channels} channels; the spec allows 1-{inputs.max_channels}")
        seconds = info.frames / info.samplerate
        if seconds > self.spec.max_source_seconds:
            raise FeaturizeError(TOO_LONG, f"{seconds:.1f}s (from the header) is longer than the "
                                           f"{self.spec.max_source_seconds}s allowed")

    def decode(self, data: bytes) -> np.ndarray:
        return self.read(data)

    def read(self, data: bytes, name: str = "", inputs: AudioInputs | None = None, content: bool = False,
             may_be_quiet: bool = False, warnings: list[str] | None = None, measures: list | None = None) -> np.ndarray:
        """Mono float32 at the spec's sample rate, exactly one clip long; with ``inputs``, the
        header is checked against its limits first, in the same open of the file. The decoder
        reads at most the allowed duration, so a header that understates the length cannot make
        it allocate more. With ``content``, the decoded clip is checked against
        ``inputs.content`` (:func:`check_content`)."""
        _check_container(data)
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                if inputs is not None:
                    self._check_info(f, name, inputs)
                rate = f.samplerate
                if not 0 < rate <= 1_000_000:
                    raise FeaturizeError(BAD_SAMPLE_RATE, f"{rate} Hz in the header")
                limit = int(self.spec.max_source_seconds * rate) + 1
                if f.subtype == "PCM_16":
                    # libsndfile's float conversion of 16-bit PCM is x / 32768; reading the
                    # integers and scaling here gives the same floats at half the cost.
                    audio = f.read(limit, dtype="int16", always_2d=True).astype(np.float32) * np.float32(1 / 32768)
                else:
                    audio = f.read(limit, dtype="float32", always_2d=True)
        except FeaturizeError:
            raise
        except sf.LibsndfileError as e:
            raise FeaturizeError(UNDECODABLE, f"not a readable audio file ({e.error_string})") from None
        except (RuntimeError, TypeError, ValueError) as e:
            raise FeaturizeError(UNDECODABLE, f"not a readable audio file ({e})") from None
        if audio.size == 0:
            raise FeaturizeError(UNDECODABLE, "the audio has no samples")
        if audio.shape[0] >= limit:
            raise FeaturizeError(TOO_LONG, f"more than the {self.spec.max_source_seconds}s allowed")
        if content and inputs is not None:
            taken = clip_measures(audio, rate)
            if measures is not None:
                measures.append(taken)
            try:
                check_content(audio, inputs.content, may_be_quiet, taken)
            except FeaturizeError as problem:
                self.content_problem(problem, inputs.content, warnings)
        mono = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)  # one channel: a view, no copy
        if rate != self.spec.sample_rate:
            import soxr

            # soxr's high-quality resampler (librosa's res_type="soxr_hq"): correct
            # anti-aliasing for 22.05/44.1/48 kHz sources.
            mono = soxr.resample(mono, rate, self.spec.sample_rate, quality="HQ").astype(np.float32)
        clip = np.zeros(self.num_samples, dtype=np.float32)
        clip[: min(mono.size, self.num_samples)] = mono[: self.num_samples]
        return clip

    def transform(self, clips: np.ndarray) -> np.ndarray:
        """[n, samples] -> [n, frames, mels] log-mel spectrograms, in chunks of clips whose FFT
        buffers stay in cache."""
        out = np.empty((len(clips), *self.shape), dtype=np.float32)
        for start in range(0, len(clips), _TRANSFORM_CHUNK):
            out[start : start + _TRANSFORM_CHUNK] = self._log_mel(clips[start : start + _TRANSFORM_CHUNK])
        return out

    def _log_mel(self, clips: np.ndarray) -> np.ndarray:
        import scipy.fft

        spec, (num_frames, num_mels) = self.spec, self.shape
        n = len(clips)
        frames = sliding_window_view(clips[:, self._window_offset :], spec.frame_length, axis=1)[:, :: spec.frame_step][:, :num_frames]
        buffers = np.zeros((n * num_frames, spec.fft_length), dtype=np.float32)
        np.multiply(frames.reshape(n * num_frames, spec.frame_length), self._window, out=buffers[:, : spec.frame_length])
        interleaved = scipy.fft.rfft(buffers, axis=-1).view(np.float32)  # complex64 as (re, im) pairs
        np.square(interleaved, out=interleaved)
        mel = interleaved @ self._mel_interleaved
        np.add(mel, spec.log_offset, out=mel)
        return np.log(mel, out=mel).reshape(n, num_frames, num_mels)
