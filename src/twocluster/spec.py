"""The pipeline spec: one declarative YAML document per pipeline, validated with pydantic.

Every stage takes its parameters from here (the DAG, the Spark jobs, the trainer), so a value is
set in one place. A bad spec fails on load with an error naming the field and the problem:

    pipelines/x.yaml: invalid pipeline spec:
      featurizer.num_mel_bins: Input should be greater than 0 (got -3)
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twocluster import deployment
from twocluster.store import layout

STORE_URI_ENV = "TWOCLUSTER_STORE_URI"


class SpecError(ValueError):
    """The pipeline spec is missing, unreadable or invalid; the message names the field."""


# A name that becomes part of a store key (pipeline, model, alias).
StoreName = Annotated[str, AfterValidator(layout.check_name)]


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AudioContentChecks(_Strict):
    """What a decoded clip must sound like to be a training example (preprocessing only: scoring
    takes what arrives). Each check is measured on the clip as decoded, before resampling, and
    has its own reject reason; ``None`` turns a check off."""

    # silent: RMS level below this (dB full scale); not applied to the silence folders, whose
    # clips are quiet by design. A keyword clip that quiet is label noise.
    min_rms_dbfs: float | None = Field(-50.0, le=0)
    # clipped: more than this share of samples at full scale (|x| >= 0.999).
    max_clipped_share: float | None = Field(0.01, ge=0, le=1)
    # dc_offset: the clip's mean (full scale = 1) further from 0 than this.
    max_dc_offset: float | None = Field(0.2, ge=0, le=1)
    # reject: the clip is rejected under the check's reason; warn: it is accepted and counted as
    # a quality warning under that reason (in the version's statistics.json and on the ops page).
    action: Literal["reject", "warn"] = "reject"


class AudioInputs(_Strict):
    """Which raw files are inputs, and the limits checked before any is decoded: the size from
    the listing (no read), then the container, sample rate, channels and duration from the header
    (``soundfile.info``, no decode). Each limit has its own reject reason. ``content``: what the
    decoded clip must sound like (:class:`AudioContentChecks`)."""

    kind: Literal["audio"] = "audio"
    patterns: list[str] = Field(default_factory=lambda: ["*.wav"], min_length=1)
    # Containers as libsndfile names them; a file must also be the container its extension says.
    formats: list[Literal["WAV", "WAVEX", "FLAC", "OGG", "AIFF", "MP3"]] = Field(
        default_factory=lambda: ["WAV", "WAVEX"], min_length=1)
    max_bytes: int = Field(8 << 20, gt=0)
    # How many levels below the date's folder an input may lie (``yes/clip.wav`` is 2): deeper
    # folders are not entered, and counted as ignored (``too_deep``).
    max_depth: int = Field(8, gt=0, le=64)
    min_sample_rate: int = Field(4_000, gt=0)
    max_sample_rate: int = Field(192_000, gt=0)
    max_channels: int = Field(8, gt=0)
    content: AudioContentChecks = Field(default_factory=AudioContentChecks)


class ImageContentChecks(_Strict):
    """What a decoded image must look like to be a training example (preprocessing only), each
    check with its reject reason; ``None`` turns one off. Judged on the image as featurized
    (converted and resized, scaled to [0, 1])."""

    # blank: a standard deviation of pixel values below this (a uniform image: an empty scan).
    min_contrast: float | None = Field(0.02, ge=0, le=1)
    # saturated: more than this share of pixels at the top of the range (over-exposed).
    max_saturated_share: float | None = Field(0.9, ge=0, le=1)
    action: Literal["reject", "warn"] = "reject"  # as AudioContentChecks.action


class ImageInputs(_Strict):
    """As :class:`AudioInputs`: size from the listing, container and pixel count from the header
    (the featurizer's ``max_source_pixels``) before pixels are decoded."""

    kind: Literal["image"] = "image"
    patterns: list[str] = Field(default_factory=lambda: ["*.png", "*.jpg", "*.jpeg"], min_length=1)
    formats: list[Literal["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]] = Field(
        default_factory=lambda: ["PNG", "JPEG"], min_length=1)
    max_bytes: int = Field(32 << 20, gt=0)
    max_depth: int = Field(8, gt=0, le=64)  # as :attr:`AudioInputs.max_depth`
    content: ImageContentChecks = Field(default_factory=ImageContentChecks)


class Labels(_Strict):
    keywords: list[str] = Field(min_length=1)
    unknown_words: list[str] = Field(default_factory=list)
    unknown_label: str = "_unknown_"
    silence_label: str | None = "_silence_"
    silence_folders: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self) -> Labels:
        seen: set[str] = set()
        for word in [*self.keywords, *self.unknown_words, *self.silence_folders]:
            if word in seen:
                raise ValueError(f"label folder {word!r} is listed twice")
            seen.add(word)
        if self.unknown_label in self.keywords or (self.silence_label and self.silence_label in self.keywords):
            raise ValueError("unknown_label / silence_label may not also be keywords")
        return self

    @property
    def vocabulary(self) -> list[str]:
        """The model's output classes, in index order: silence, unknown, then the keywords
        (the order TensorFlow's Speech Commands tutorial uses)."""
        head = [self.silence_label] if self.silence_label else []
        if self.unknown_words:
            head.append(self.unknown_label)
        return [*head, *self.keywords]

    def label_for_folder(self, folder: str) -> str | None:
        """The class of a raw input by its parent folder; ``None`` means an unknown label."""
        if folder in self.keywords:
            return folder
        if folder in self.unknown_words:
            return self.unknown_label
        if self.silence_label and folder in self.silence_folders:
            return self.silence_label
        return None


class LogMelFeaturizer(_Strict):
    kind: Literal["log_mel"] = "log_mel"
    sample_rate: int = Field(16000, gt=0)
    clip_seconds: float = Field(1.0, gt=0)
    max_source_seconds: float = Field(2.0, gt=0)
    frame_length: int = Field(480, gt=0)
    frame_step: int = Field(160, gt=0)
    fft_length: int = Field(512, gt=0)
    num_mel_bins: int = Field(40, gt=0)
    lower_edge_hz: float = Field(20.0, ge=0)
    upper_edge_hz: float = Field(7600.0, gt=0)
    log_offset: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> LogMelFeaturizer:
        if self.fft_length < self.frame_length:
            raise ValueError(f"fft_length ({self.fft_length}) must be >= frame_length ({self.frame_length})")
        if self.upper_edge_hz > self.sample_rate / 2:
            raise ValueError(f"upper_edge_hz ({self.upper_edge_hz}) exceeds the Nyquist frequency {self.sample_rate / 2}")
        if self.lower_edge_hz >= self.upper_edge_hz:
            raise ValueError("lower_edge_hz must be below upper_edge_hz")
        if self.max_source_seconds < self.clip_seconds:
            raise ValueError("max_source_seconds must be >= clip_seconds")
        return self


class ImageFeaturizer(_Strict):
    kind: Literal["image"] = "image"
    height: int = Field(32, gt=0)
    width: int = Field(32, gt=0)
    channels: Literal[1, 3] = 1
    max_source_pixels: int = Field(50_000_000, gt=0)


class Splits(_Strict):
    validation_percent: float = Field(10, ge=0, lt=100)
    testing_percent: float = Field(10, ge=0, lt=100)

    @model_validator(mode="after")
    def _leave_training(self) -> Splits:
        if self.validation_percent + self.testing_percent >= 100:
            raise ValueError("validation_percent + testing_percent must leave room for training")
        return self


class Output(_Strict):
    """How datasets are written. Defaults chosen by measurement on log-mel features (2 cores,
    `bench/RESULTS.md`): GZIP level 6 deflates at ~30 MB/s per core and inflates at ~230 MB/s
    per core for a size ratio of only 0.66 on float features, so compressed TFRecords would
    make the write step CPU-bound and cap a trainer's feed at ~15 k examples/s per core (an
    H100 takes 120-160 k/s of this model); uncompressed records cost 1.5x the bytes and read at
    disk/network speed. Parquet (the copy for Keras-JAX/PyTorch trainers and analysts) uses LZ4:
    ratio 0.80 at ~240 MB/s per core, where zstd gives 0.71 at ~135 MB/s."""

    tfrecord_compression: Literal["GZIP", "NONE"] = "NONE"
    parquet_compression: Literal["lz4", "zstd", "snappy", "none"] = "lz4"
    # Rows are featurized and written in partitions of about this many MB of features, one
    # TFRecord and one Parquet shard per split each; a job never uses fewer partitions than the
    # cluster has cores. TF's data guide asks for 100 MB+ shards at scale, but each running task
    # holds its partition in the executor's heap while Spark caches it: at 100 MB, two tasks
    # overran a 1 GB heap (OutOfMemoryError, local[2], 38,400 clips). Raise it with the
    # executors' memory (about 4x target per task slot).
    target_shard_mb: float = Field(32, gt=0)


class Thresholds(_Strict):
    max_reject_rate: float = Field(0.05, ge=0, le=1)


class Gate(_Strict):
    min_test_accuracy: float = Field(0.9, ge=0, le=1)
    max_regression: float = Field(0.02, ge=0, le=1)
    # When a person must approve a version that passed the checks before the alias moves:
    # never, the first model under an alias, a model worse than the champion on any class (on the
    # same test set), or always. Until then the decision is `needs_approval` and nothing moves;
    # `twocluster approve` records the person's answer (see docs/model-control.md).
    approval: Literal["never", "first_model", "when_worse_on_any_class", "always"] = "never"
    # How long the DAG's approval step waits for a person before its default, reject, applies.
    approval_timeout_hours: float = Field(72, gt=0)


class Model(_Strict):
    name: StoreName
    # A model module in twocluster.training.models (keyword_cnn, image_cnn, ...): the trainer
    # builds the model from it; checked against the modules when the trainer starts.
    architecture: str = Field("keyword_cnn", pattern=r"^[a-z][a-z0-9_]*$")
    epochs: int = Field(25, gt=0)
    batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    learning_rate_schedule: Literal["constant", "cosine"] = "constant"
    # The model module's augmentation layers (active in training only).
    augment: bool = False
    seed: int = 1234
    gate: Gate = Gate()


class Retrain(_Strict):
    """See :mod:`twocluster.orchestration.retrain`."""

    every_days: int = Field(7, gt=0)
    min_new_examples: int = Field(2000, ge=0)
    window_days: int = Field(28, gt=0, description="a model trains on the dates in (D - window_days, D]")


class Scoring(_Strict):
    alias: StoreName = "production"
    # Aliases a run may publish to / score with (an Airflow param picks one); anything else is
    # refused before a job starts.
    allowed_aliases: list[StoreName] = Field(default_factory=lambda: ["production"], min_length=1)
    # Rows a scoring task featurizes and predicts at a time (the job's own, not a Spark session
    # setting: both jobs of a run share one Spark Connect session).
    arrow_batch_size: int = Field(256, gt=0)
    inference_batch_size: int = Field(128, gt=0)
    top_k: int = Field(3, gt=0)
    # When the featurizer's code differs from the one the model's training data was made with:
    # refuse to score (the default: features may have shifted), or score and record a warning.
    on_featurizer_change: Literal["error", "warn"] = "error"
    # Predictions below this confidence are counted (the monitoring page shows their share).
    confidence_floor: float = Field(0.5, ge=0, le=1)
    # What runs the model in the scoring workers: ``auto`` serves a version's ONNX copy (ONNX
    # Runtime: no TensorFlow import per worker, see twocluster.serving) on CPU tasks and Keras
    # on GPU tasks or when the version has no copy; ``onnx`` requires the copy; ``keras`` always
    # loads model.keras.
    runtime: Literal["auto", "onnx", "keras"] = "auto"

    @model_validator(mode="after")
    def _alias_allowed(self) -> Scoring:
        if self.alias not in self.allowed_aliases:
            raise ValueError(f"alias {self.alias!r} is not in allowed_aliases {self.allowed_aliases}")
        return self


class Retention(_Strict):
    """What `twocluster gc` keeps. It never deletes a version an alias points or pointed at, a
    dataset in the lineage of such a model, or anything younger than the grace period."""

    keep_versions: int = Field(3, ge=1, description="committed versions kept per date (datasets, predictions) and per model")
    grace_hours: float = Field(24, gt=0, description="uncommitted or unreferenced objects younger than this are left alone")


class Monitoring(_Strict):
    """What the ops page and the health check hold the pipeline to."""

    window_days: int = Field(30, gt=0, description="dates shown")
    max_lag_days: int = Field(2, ge=0, description="newest scored date may be at most this many days old")
    max_drift: float = Field(0.25, gt=0, le=1, description="total variation distance, predictions vs training labels")
    max_feature_skew: float = Field(0.2, gt=0, le=1, description="Jensen-Shannon divergence of a feature channel's histogram, "
                                                                  "a scored date vs its model's training data (the largest channel's)")


class Timeouts(_Strict):
    """How long each of the pipeline's jobs may run before Airflow stops it (its task's
    ``execution_timeout``). ``retention.grace_hours`` must outlast the longest: a writer still
    within its timeout may still be writing its staging area, which gc must not take for
    abandoned."""

    spark_job_hours: float = Field(2, gt=0, description="preprocessing and scoring, each")
    training_job_hours: float = Field(12, gt=0)

    @property
    def longest_hours(self) -> float:
        return max(self.spark_job_hours, self.training_job_hours)


class Retries(_Strict):
    """How Airflow retries a failed task of the pipeline's DAG (a storage outage, a lost Spark
    worker, a preempted trainer): ``attempts`` retries, the first after ``delay_seconds``, each
    next one twice as late, never later than ``max_delay_seconds``. Tasks whose failure a retry
    cannot cure (bad parameters, a refused dataset) are never retried."""

    attempts: int = Field(2, ge=0)
    delay_seconds: float = Field(60, gt=0)
    max_delay_seconds: float = Field(1800, gt=0)

    @model_validator(mode="after")
    def _delays_ordered(self) -> Retries:
        if self.max_delay_seconds < self.delay_seconds:
            raise ValueError(f"max_delay_seconds ({self.max_delay_seconds:g}) is below delay_seconds ({self.delay_seconds:g})")
        return self


class Arrivals(_Strict):
    """When a date's raw folder is complete enough to process. ``marker``: the source writes
    ``_ARRIVED.json`` last; ``quiet``: sources without markers, the listing unchanged for
    ``quiet_minutes`` (by the store's clock); ``none``: process whatever is there. At
    ``deadline_hours`` after the end of the date (UTC) a date still incomplete either fails with
    a message naming what is missing, or is committed with ``complete: false`` in its manifest
    (``on_deadline``); a rerun after the rest arrived commits the complete version."""

    completeness: Literal["marker", "quiet", "none"] = "marker"
    quiet_minutes: float = Field(10, gt=0)
    deadline_hours: float = Field(6, ge=0)
    on_deadline: Literal["fail", "commit_incomplete"] = "fail"
    # How far past today (UTC) a run's date may lie: a source a timezone ahead of UTC starts its
    # date before UTC does. A date further ahead is refused, not waited for (its sensor would
    # hold the DAG's run slot until its deadline).
    days_ahead: int = Field(1, ge=0, le=7)


class PipelineSpec(_Strict):
    name: StoreName
    schedule: str | None = "@daily"
    start_date: dt.date
    end_date: dt.date | None = None  # no scheduled runs after this date (a retired pipeline)
    store_uri: str | None = None
    inputs: Annotated[AudioInputs | ImageInputs, Field(discriminator="kind")]
    arrivals: Arrivals = Arrivals()
    labels: Labels
    featurizer: Annotated[LogMelFeaturizer | ImageFeaturizer, Field(discriminator="kind")]
    splits: Splits = Splits()
    output: Output = Output()
    thresholds: Thresholds = Thresholds()
    model: Model
    retrain: Retrain = Retrain()
    retries: Retries = Retries()
    scoring: Scoring = Scoring()
    retention: Retention = Retention()
    timeouts: Timeouts = Timeouts()
    monitoring: Monitoring = Monitoring()

    @field_validator("store_uri")
    @classmethod
    def _store_uri_ok(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("file:///", "s3://")):
            raise ValueError(f"{value!r} must be a file:///absolute/path or s3://bucket/prefix URI")
        return value

    @model_validator(mode="after")
    def _kinds_match(self) -> PipelineSpec:
        expected = {"audio": "log_mel", "image": "image"}[self.inputs.kind]
        if self.featurizer.kind != expected:
            raise ValueError(f"inputs.kind {self.inputs.kind!r} needs featurizer.kind {expected!r}, not {self.featurizer.kind!r}")
        return self

    @model_validator(mode="after")
    def _grace_outlasts_jobs(self) -> PipelineSpec:
        if self.retention.grace_hours < self.timeouts.longest_hours:
            raise ValueError(f"retention.grace_hours ({self.retention.grace_hours:g}) is below the longest job timeout "
                             f"({self.timeouts.longest_hours:g} h): gc would delete a running job's staging area")
        return self

    def resolve_store_uri(self, override: str | None = None) -> str:
        """``override`` (a CLI flag), else ``$TWOCLUSTER_STORE_URI``, else the spec's ``store_uri``."""
        uri = override or os.environ.get(STORE_URI_ENV) or self.store_uri
        if not uri:
            raise SpecError(f"no store URI for pipeline {self.name!r}: pass --store, set {STORE_URI_ENV} or set store_uri in the spec")
        return uri


def _format_errors(error: ValidationError, data: Any) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        got = ""
        if err["type"] not in ("missing", "extra_forbidden") and not isinstance(err.get("input"), dict):
            got = f" (got {err.get('input')!r})"
        lines.append(f"  {loc or '(top level)'}: {msg}{got}")
    return "\n".join(lines)


def parse_pipeline_spec(data: Any, source: str = "<spec>") -> PipelineSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a pipeline spec must be a mapping, got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: invalid pipeline spec:\n{_format_errors(e, data)}") from None


def load_pipeline_spec(path: str | os.PathLike[str]) -> PipelineSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the pipeline spec: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    return parse_pipeline_spec(data, str(path))


def default_spec_path(pipeline: str = "speech_commands") -> Path:
    """The spec of ``pipeline`` in the pipelines folder (``deployment.PIPELINES_DIR``; ``$TWOCLUSTER_PIPELINES_DIR`` or the checkout's)."""
    return deployment.PIPELINES_DIR / f"{layout.check_name(pipeline, 'pipeline')}.yaml"
