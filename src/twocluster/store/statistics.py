"""Feature statistics of a dataset or predictions version, and the distances between two of them.

A version's features are described per channel (the last axis of a feature tensor: each mel bin
of a log-mel spectrogram, each colour channel of an image), over every row of the version and
every other position: count, mean, standard deviation, minimum, maximum, NaN and infinity counts,
and a histogram over fixed edges (the same for every version of a feature kind, so any two
compare). Tasks compute them as they write (:func:`partial`, no second pass over the data); the
driver merges the tasks' parts (:meth:`FeatureStatistics.merge`) and writes them beside the
manifest as ``statistics.json``, a file the manifest lists (and checksums) like any other.

Skew and drift are TFDV's distances: Jensen-Shannon divergence between two histograms of the same
channel (base 2: 0 the same, 1 disjoint), and the L-infinity distance between two categorical
distributions (the largest difference of any one category's share).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from twocluster.store.manifest import ManifestFile
from twocluster.store.storage import ObjectStore

STATISTICS_FILE = "statistics.json"  # in a version's folder, listed by its manifest (no kind)
# Fixed histogram edges per feature kind: wide enough for any value the featurizer makes (values
# outside land in the first or last bin).
EDGES = {
    "log_mel": np.linspace(-14.0, 6.0, 41),  # log(1e-6) (silence) .. log of a loud clip's power
    "image": np.linspace(0.0, 1.0, 33),
}


# Statistics take every SAMPLE_EVERY-th position of each row: 4 keeps their cost (~12 us a clip of
# 97x40 log-mel values, against ~460 us to featurize it) within a few percent of preprocessing.
SAMPLE_EVERY = 4


class ChannelStatistics(BaseModel):
    model_config = ConfigDict(extra="ignore")

    count: int
    mean: float
    std: float
    min: float
    max: float
    nan: int = 0
    inf: int = 0
    histogram: list[int]


class FeatureStatistics(BaseModel):
    """One feature's statistics over a version (or one split of it)."""

    model_config = ConfigDict(extra="ignore")

    feature: str
    kind: str
    rows: int
    edges: list[float]
    channels: list[ChannelStatistics]

    def histograms(self) -> np.ndarray:
        return np.array([c.histogram for c in self.channels], dtype=np.float64)


class MeasureSummary(BaseModel):
    """One per-input quality measure over a version's accepted inputs."""

    model_config = ConfigDict(extra="ignore")

    count: int
    mean: float
    min: float
    p05: float
    p50: float
    p95: float
    max: float


CLIP_MEASURES = ("rms_dbfs", "peak", "clipped_share", "dc_offset", "silence_share")  # as twocluster.features.audio's


def clip_quality(measured: list[list[float]]) -> dict[str, MeasureSummary]:
    """Each measure's summary over the inputs' measures (rows of :data:`CLIP_MEASURES`)."""
    if not measured:
        return {}
    values = np.asarray(measured, dtype=np.float64)
    out = {}
    for i, name in enumerate(CLIP_MEASURES[: values.shape[1]]):
        column = values[:, i]
        p05, p50, p95 = np.percentile(column, [5, 50, 95])
        out[name] = MeasureSummary(count=column.size, mean=round(float(column.mean()), 6), min=round(float(column.min()), 6),
                                   p05=round(float(p05), 6), p50=round(float(p50), 6), p95=round(float(p95), 6),
                                   max=round(float(column.max()), 6))
    return out


class Skew(BaseModel):
    """How far a scored date's features lie from what its model was trained on."""

    model_config = ConfigDict(extra="ignore")

    model_version: str
    training_versions: list[str] = Field(description="the dataset versions whose statistics made the baseline")
    feature_skew: float = Field(description="the largest per-channel Jensen-Shannon divergence of the histograms")
    per_channel: list[float]
    label_distance: float | None = Field(None, description="L-infinity between predicted and training label shares")


class VersionStatistics(BaseModel):
    """``statistics.json``: a version's feature statistics, overall and per split; a predictions
    version's also carries its :class:`Skew` against the model's training data."""

    model_config = ConfigDict(extra="ignore")

    overall: FeatureStatistics
    per_split: dict[str, FeatureStatistics] = Field(default_factory=dict)
    skew: Skew | None = None
    # Accepted inputs with a content problem, by reason (the spec's content checks set to warn).
    quality_warnings: dict[str, int] = Field(default_factory=dict)
    # The accepted inputs' quality measures (audio: loudness, peak, clipping, DC offset, silence).
    clips: dict[str, MeasureSummary] = Field(default_factory=dict)


class _Sums(BaseModel):
    """What a task reports (additive): per channel counts, sums, sums of squares, extremes, histograms."""

    feature: str
    kind: str
    rows: int = 0
    count: list[int]
    total: list[float]
    squares: list[float]
    low: list[float]
    high: list[float]
    nan: list[int]
    inf: list[int]
    histogram: list[list[int]]

    def merge(self, other: _Sums) -> _Sums:
        return _Sums(feature=self.feature, kind=self.kind, rows=self.rows + other.rows,
                     count=[a + b for a, b in zip(self.count, other.count, strict=True)],
                     total=[a + b for a, b in zip(self.total, other.total, strict=True)],
                     squares=[a + b for a, b in zip(self.squares, other.squares, strict=True)],
                     low=[min(a, b) for a, b in zip(self.low, other.low, strict=True)],
                     high=[max(a, b) for a, b in zip(self.high, other.high, strict=True)],
                     nan=[a + b for a, b in zip(self.nan, other.nan, strict=True)],
                     inf=[a + b for a, b in zip(self.inf, other.inf, strict=True)],
                     histogram=[[x + y for x, y in zip(a, b, strict=True)] for a, b in zip(self.histogram, other.histogram, strict=True)])

    def finish(self) -> FeatureStatistics:
        channels = []
        for i, n in enumerate(self.count):
            mean = self.total[i] / n if n else 0.0
            var = max(self.squares[i] / n - mean * mean, 0.0) if n else 0.0
            channels.append(ChannelStatistics(count=n, mean=mean, std=math.sqrt(var), min=self.low[i] if n else 0.0,
                                              max=self.high[i] if n else 0.0, nan=self.nan[i], inf=self.inf[i],
                                              histogram=self.histogram[i]))
        return FeatureStatistics(feature=self.feature, kind=self.kind, rows=self.rows, edges=EDGES[self.kind].tolist(),
                                 channels=channels)


def partial(features: np.ndarray, feature: str, kind: str) -> _Sums:
    """One task's statistics of ``features`` ([rows, positions..., channels]): sums, extremes and
    one histogram per channel, in a few vectorised passes (the bin of a value is arithmetic on
    the uniform edges; the histograms of all channels are one ``bincount``), over every
    :data:`SAMPLE_EVERY`-th position of each row (spectrogram frames, pixel rows): adjacent
    frames overlap, and a partition's sample still holds tens of thousands of values a channel.
    Rows are counted exactly."""
    edges = EDGES[kind]
    rows, channels = features.shape[0], features.shape[-1]
    if features.ndim >= 3 and features.shape[1] >= SAMPLE_EVERY:
        features = features[:, ::SAMPLE_EVERY]
    values = features.reshape(-1, channels)
    if values.dtype != np.float32:
        values = values.astype(np.float32)
    finite = None if np.isfinite(values.sum(axis=None, dtype=np.float32)) else np.isfinite(values)  # NaN/inf poison the sum
    if finite is not None:
        nan = np.isnan(values).sum(axis=0)
        inf = (~finite).sum(axis=0) - nan
        values = np.where(finite, values, np.float32(np.nan))
        count = finite.sum(axis=0)
        total, squares = np.nansum(values, axis=0, dtype=np.float64), np.nansum(np.square(values, dtype=np.float64), axis=0)
        low, high = np.nanmin(np.where(finite.any(axis=0), values, 0), axis=0), np.nanmax(np.where(finite.any(axis=0), values, 0), axis=0)
    else:
        nan = inf = np.zeros(channels, dtype=np.int64)
        count = np.full(channels, values.shape[0], dtype=np.int64)
        total = values.sum(axis=0, dtype=np.float64)
        squares = np.einsum("ij,ij->j", values, values, dtype=np.float64)
        low, high = values.min(axis=0), values.max(axis=0)
    nb = len(edges) - 1
    scale = np.float32(nb / (edges[-1] - edges[0]))
    bins = ((values - np.float32(edges[0])) * scale).astype(np.int32) if finite is None else \
        ((np.nan_to_num(values, nan=edges[0]) - np.float32(edges[0])) * scale).astype(np.int32)
    np.clip(bins, 0, nb - 1, out=bins)
    bins += np.arange(channels, dtype=np.int32) * nb
    counted = bins.ravel() if finite is None else bins[finite]
    histogram = np.bincount(counted, minlength=channels * nb).reshape(channels, nb)
    return _Sums(feature=feature, kind=kind, rows=rows, count=count.tolist(), total=total.tolist(), squares=squares.tolist(),
                 low=low.tolist(), high=high.tolist(), nan=nan.tolist(), inf=inf.tolist(), histogram=histogram.tolist())


def sums_from_json(text: str) -> _Sums:
    return _Sums.model_validate_json(text)


def merge(parts: list[_Sums]) -> FeatureStatistics | None:
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return total.finish()


def combine(stats: list[FeatureStatistics]) -> FeatureStatistics | None:
    """Several versions' statistics as one (a model's training window): histograms and counts
    add; means and deviations are recombined from each channel's counts."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    channels = []
    for i in range(len(stats[0].channels)):
        parts = [s.channels[i] for s in stats]
        n = sum(p.count for p in parts)
        mean = sum(p.mean * p.count for p in parts) / n if n else 0.0
        second = sum((p.std ** 2 + p.mean ** 2) * p.count for p in parts) / n if n else 0.0
        channels.append(ChannelStatistics(count=n, mean=mean, std=math.sqrt(max(second - mean * mean, 0.0)),
                                          min=min(p.min for p in parts), max=max(p.max for p in parts),
                                          nan=sum(p.nan for p in parts), inf=sum(p.inf for p in parts),
                                          histogram=[sum(h) for h in zip(*(p.histogram for p in parts), strict=True)]))
    return FeatureStatistics(feature=stats[0].feature, kind=stats[0].kind, rows=sum(s.rows for s in stats),
                             edges=stats[0].edges, channels=channels)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (base 2) between histograms, row by row: 0 the same, 1 disjoint."""
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1)
    q = q / np.maximum(q.sum(axis=-1, keepdims=True), 1)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)), 0.0).sum(axis=-1)

    return np.clip((kl(p, m) + kl(q, m)) / 2, 0.0, 1.0)


def channel_skew(serving: FeatureStatistics, training: FeatureStatistics) -> list[float]:
    """Per channel, the Jensen-Shannon divergence between two versions' histograms."""
    return [round(float(d), 6) for d in jensen_shannon(serving.histograms(), training.histograms())]


def feature_skew(serving: FeatureStatistics, training: FeatureStatistics) -> float:
    """The largest per-channel Jensen-Shannon divergence between two versions' histograms."""
    return max(channel_skew(serving, training))


def l_infinity(p: dict[str, int], q: dict[str, int]) -> float | None:
    """TFDV's distance between two categorical distributions: the largest difference of a share."""
    np_, nq = sum(p.values()), sum(q.values())
    if not np_ or not nq:
        return None
    return max(abs(p.get(k, 0) / np_ - q.get(k, 0) / nq) for k in set(p) | set(q))


def write(stats: VersionStatistics, store: ObjectStore, version_prefix: str) -> ManifestFile:
    """``statistics.json`` in a version's folder (before its commit, so readers see it with the
    version or not at all), listed by the manifest without a kind: readers that predate it skip it."""
    data = stats.model_dump_json().encode()
    checksum = store.write_bytes(f"{version_prefix}/{STATISTICS_FILE}", data)
    return ManifestFile(path=STATISTICS_FILE, bytes=len(data), checksum=checksum)


def read(store: ObjectStore, version_prefix: str) -> VersionStatistics | None:
    """A version's statistics, or None where it has none (written before they existed)."""
    from twocluster.store.storage import StorageError

    try:
        return VersionStatistics.model_validate_json(store.read_bytes(f"{version_prefix}/{STATISTICS_FILE}"))
    except (StorageError, ValueError):  # missing, or not statistics (pydantic's errors are ValueErrors)
        return None


def key_in(store: ObjectStore, uri: str) -> str | None:
    """The key of ``uri`` (a lineage URI) in ``store``, or None when it lies elsewhere."""
    root = store.root_uri.rstrip("/") + "/"
    return uri[len(root):] if uri.startswith(root) else None


def training_statistics(store: ObjectStore, dataset_manifest_uris: list[str], split: str = "train") -> tuple[FeatureStatistics | None, list[str]]:
    """The ``split`` statistics of these dataset versions combined (a model's training window),
    and the versions that had any (versions written before statistics existed are left out)."""
    found, used = [], []
    for uri in dataset_manifest_uris:
        folder = key_in(store, uri.rsplit("/", 1)[0])
        stats = read(store, folder) if folder else None
        if stats is not None and (part := stats.per_split.get(split)) is not None:
            found.append(part)
            used.append(folder.rsplit("/v=", 1)[-1])
    return combine(found), used


# Below this many test rows, a test split's histograms are mostly sampling noise: a 60-clip day's
# test split (6 clips) measured 0.27 against its own training split, a 100-clip day's 0.14-0.18,
# a 2,400-clip window's far less. The skew is still reported; only the limit waits for the rows.
SPLIT_SKEW_MIN_ROWS = 200


def split_skew(store: ObjectStore, dataset_manifest_uris: list[str]) -> tuple[float, int] | None:
    """How far the test split of these dataset versions lies from their training split (the
    largest per-channel Jensen-Shannon divergence) and the test split's rows, or None without
    statistics for both."""
    train, _ = training_statistics(store, dataset_manifest_uris, "train")
    test, _ = training_statistics(store, dataset_manifest_uris, "test")
    if train is None or test is None or len(train.channels) != len(test.channels):
        return None
    return feature_skew(test, train), test.rows
