"""What an operator looks at, read from the store: the one typed reader behind the ops page, its
JSON endpoints, the health check and ``twocluster status`` (:func:`pipeline_overview` for a
pipeline's window, :func:`store_status` for everything a store holds; both build the same rows
with the same functions, through the commit logs).

Nothing is duplicated into a second database: manifests, commit logs and alias logs are the
source of truth. Reads are parallel (object-store latency, not CPU, is the cost) and cached per
location by the name of its newest log entry, so a page reload reads only what was committed
since.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from twocluster.spec import PipelineSpec
from twocluster.store import layout, registry, statistics
from twocluster.store.commitlog import CommitLog, GateDecided
from twocluster.store.manifest import (
    CommittedVersion,
    DatasetManifest,
    LegacyLayoutError,
    ModelManifest,
    PredictionsManifest,
    scan_location,
)
from twocluster.store.storage import ObjectStore, StoreSnapshot, printable_name

_READERS = 32


class Skipped(BaseModel):
    uri: str
    problem: str


class Raw(BaseModel):
    files: int
    bytes: int
    complete: bool = Field(description="the arrival marker is there")


class DatasetRow(BaseModel):
    version: str
    log_entry: int
    run_id: str
    input: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    reject_rate: float
    per_label: dict[str, int]
    seconds: dict[str, float]
    manifest_uri: str


class PredictionsRow(BaseModel):
    version: str
    log_entry: int
    run_id: str
    rows: int
    rejected: int
    model: str
    model_version: str
    predicted_labels: dict[str, int]
    mean_confidence: float | None
    below_confidence_floor_share: float | None
    drift: float | None = Field(description="total variation distance to the model's training labels")
    feature_skew: float | None = Field(None, description="largest per-channel Jensen-Shannon divergence of the scored features' "
                                                         "histograms from the model's training data (statistics.json)")
    label_distance: float | None = Field(None, description="L-infinity between predicted and training label shares")
    seconds: dict[str, float]
    manifest_uri: str


class DateRow(BaseModel):
    date: dt.date
    raw: Raw
    dataset: DatasetRow | None
    predictions: PredictionsRow | None
    problems: list[str] = Field(default_factory=list, description="what an operator should look at")


class GateRecord(BaseModel):
    alias: str
    outcome: str
    reason: str
    test_accuracy: float | None = None
    champion_version: str | None = None
    champion_test_accuracy: float | None = None
    seq: int
    run_id: str = ""


class ModelRow(BaseModel):
    version: str
    log_entry: int
    run_id: str
    trained_at: dt.datetime
    trained_on: list[str]
    dataset_versions: list[str]
    test_accuracy: float
    validation_accuracy: float
    training_seconds: float | None
    aliases: list[str]
    gate: list[GateRecord]
    files: list[str]


class AliasMove(BaseModel):
    alias: str
    seq: int
    version: str
    previous_version: str | None
    reason: str
    written_at: dt.datetime
    authority: str = "legacy"  # gate | approval | override | rollback | legacy (twocluster.store.registry.MoveAuthority)
    who: str = ""


class Freshness(BaseModel):
    newest_scored_date: dt.date | None
    lag_days: int | None
    max_lag_days: int
    late: bool


class PipelineOverview(BaseModel):
    pipeline: str
    model: str
    store: str
    generated_at: dt.datetime
    window: list[dt.date]
    freshness: Freshness
    max_reject_rate: float
    max_drift: float
    max_feature_skew: float = 1.0
    dates: list[DateRow]
    models: list[ModelRow]
    alias_moves: list[AliasMove]
    aliases: dict[str, str | None]
    skipped: list[Skipped]
    read_seconds: float = 0.0
    broken_aliases: dict[str, str] = Field(default_factory=dict)  # alias -> why its target does not validate


def tvd(p: dict[str, int], q: dict[str, int]) -> float | None:
    """Total variation distance between two label count distributions (0: same, 1: disjoint)."""
    np_, nq = sum(p.values()), sum(q.values())
    if not np_ or not nq:
        return None
    return round(0.5 * sum(abs(p.get(k, 0) / np_ - q.get(k, 0) / nq) for k in set(p) | set(q)), 4)


class _LocationCache:
    """Latest committed version per location, keyed by the location's newest log entry."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[int, Any]] = {}

    def latest(self, store: ObjectStore, location: str, kind) -> tuple[CommittedVersion | None, list]:
        head = CommitLog(store, location).head()  # one listing
        key = (store.root_uri, location)
        with self._lock:
            cached = self._entries.get(key)
        if cached is not None and cached[0] == head:
            return cached[1]
        try:
            state = scan_location(store, location, kind, newest_only=True)
            result = (state.latest, [Skipped(uri=s.uri, problem=s.problem) for s in state.skipped])
        except LegacyLayoutError as e:
            result = (None, [Skipped(uri=store.uri(location), problem=str(e))])
        if head:
            with self._lock:
                self._entries[key] = (head, result)
        return result


CACHE = _LocationCache()
_COMMIT_RECORDS: dict[tuple, bytes] = {}  # log entries and manifests, by (store, key, size, mtime)
_COMMIT_RECORDS_LIMIT = 50_000


def _is_immutable(key: str) -> bool:
    """What the page may cache by key, size and time: commit records, and a version's
    statistics.json (written before its commit, never after)."""
    parts = key.split("/")
    return layout.is_commit_record(key) or (len(parts) >= 2 and parts[-1] == statistics.STATISTICS_FILE
                                            and parts[-2].startswith(layout.VERSION_FOLDER_PREFIX) and layout.STAGING_FOLDER not in parts)


def snapshot(store: ObjectStore, spec: PipelineSpec) -> StoreSnapshot:
    """The pipeline's part of the store as the page reads it: one recursive listing per area (its
    datasets, predictions, and the model's versions, aliases and gate log), then every log entry
    not seen before read in parallel (a commit's entry carries its manifest). A reload costs a few listings plus what was
    committed since; nothing is read one location at a time."""
    if isinstance(store, StoreSnapshot):
        return store
    if len(_COMMIT_RECORDS) > _COMMIT_RECORDS_LIMIT:
        _COMMIT_RECORDS.clear()
    model = spec.model.name
    view = StoreSnapshot(store, [layout.datasets_prefix(spec.name), layout.predictions_prefix(spec.name),
                                 layout.model_versions_prefix(model), layout.model_aliases_prefix(model),
                                 layout.model_gate_prefix(model)],
                         immutable_cache=_COMMIT_RECORDS, is_immutable=_is_immutable, readers=_READERS)
    # Commits carry their manifests; a scored date's skew is in its predictions' statistics.json.
    predictions = layout.predictions_prefix(spec.name) + "/"
    view.prefetch(key for key in view.objects
                  if layout.is_log_entry_key(key) or (key.startswith(predictions) and _is_immutable(key)))
    return view


def _raw(store: ObjectStore, pipeline: str, date: dt.date) -> Raw:
    # Imported here: the orchestration package loads Airflow, which `twocluster status` never needs.
    from twocluster.orchestration.arrivals import arrived

    listed = arrived(store, pipeline, date)
    return Raw(files=listed.files, bytes=listed.bytes, complete=listed.marker)


def dataset_row(committed: CommittedVersion) -> DatasetRow:
    d: DatasetManifest = committed.manifest
    return DatasetRow(
        version=committed.version, log_entry=committed.seq, run_id=d.lineage.run_id, input=d.counts.input, accepted=d.counts.accepted,
        rejected=d.counts.rejected, rejected_by_reason=d.counts.rejected_by_reason,
        reject_rate=round(d.counts.rejected / d.counts.input, 4) if d.counts.input else 0.0,
        per_label=d.counts.per_label, seconds=d.seconds, manifest_uri=committed.manifest_uri)


def predictions_row(committed: CommittedVersion) -> PredictionsRow:
    p: PredictionsManifest = committed.manifest
    summary = p.summary
    return PredictionsRow(
        version=committed.version, log_entry=committed.seq, run_id=p.lineage.run_id, rows=p.counts.accepted, rejected=p.counts.rejected,
        model=p.model, model_version=p.model_version,
        predicted_labels=summary.predicted_labels if summary else {},
        mean_confidence=summary.mean_confidence if summary else None,
        below_confidence_floor_share=(round(summary.below_confidence_floor / p.counts.accepted, 4)
                                      if summary and p.counts.accepted else None),
        drift=None, seconds=p.seconds, manifest_uri=committed.manifest_uri)


class ModelsRead(BaseModel):
    """A model's versions, aliases and gate decisions as read once for the page or the CLI."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    versions: Any  # registry.ModelVersions
    alias_states: dict[str, Any]  # alias -> registry.AliasState
    rows: list[ModelRow]
    skipped: list[Skipped]


def read_models(store: ObjectStore, model: str, known_aliases: Iterable[str] = ()) -> ModelsRead:
    """Every committed version of ``model`` with its gate decisions and the aliases on it; the
    aliases are ``known_aliases`` and every folder under ``aliases/`` that an alias could be named
    (any other folder, ``Production`` or a hand upload's, is listed as skipped, never read)."""
    versions = registry.model_versions(store, model)
    skipped = [Skipped(uri=s.uri, problem=s.problem) for s in versions.skipped]
    alias_names = set(known_aliases)
    for folder in store.list_folders(layout.model_aliases_prefix(model)):
        if layout.is_valid_name(folder):
            alias_names.add(folder)
        else:
            skipped.append(Skipped(uri=printable_name(store.uri(layout.model_aliases_prefix(model)) + "/" + folder),
                                   problem="not an alias: alias names are 1-64 lowercase letters, digits, '_' or '-'"))
    alias_states = {a: registry.read_alias(store, model, a, versions) for a in sorted(alias_names)}
    for state in alias_states.values():
        skipped += [Skipped(uri=s.uri, problem=s.problem) for s in state.skipped]
    gate_log = CommitLog(store, layout.model_gate_prefix(model)).read()
    skipped += [Skipped(uri=s.uri, problem=s.problem) for s in gate_log.skipped]
    gate_by_version: dict[str, list[GateRecord]] = {}
    # A pass is written before its alias move; it reads "published" once a move names it (a pass
    # whose move lost a race to another gate stays "passed").
    moved_on = {(a, auth.gate_entry) for a, st in alias_states.items() for e in st.history
                if (auth := registry.authority_of(e)).gate_entry is not None}
    for entry in gate_log.entries:
        if isinstance(entry, GateDecided):
            outcome = "published" if entry.outcome == "passed" and (entry.alias, entry.seq) in moved_on else entry.outcome
            gate_by_version.setdefault(entry.version, []).append(GateRecord(
                alias=entry.alias, outcome=outcome, reason=entry.reason, seq=entry.seq, run_id=entry.run_id,
                test_accuracy=entry.numbers.get("test_accuracy"), champion_version=entry.numbers.get("champion_version"),
                champion_test_accuracy=entry.numbers.get("champion_test_accuracy")))
    current = {a: s.version for a, s in alias_states.items()}
    rows = []
    for v in versions.versions:
        m: ModelManifest = v.manifest
        rows.append(ModelRow(
            version=v.version, log_entry=v.seq, run_id=m.lineage.run_id, trained_at=m.created_at,
            trained_on=sorted({dv[0] for u in m.lineage.inputs if (dv := layout.dated_version(u))}),
            dataset_versions=m.lineage.dataset_versions, test_accuracy=m.metrics.test_accuracy,
            validation_accuracy=m.metrics.validation_accuracy, training_seconds=m.seconds.get("fit", m.metrics.training_seconds),
            aliases=sorted(a for a, cur in current.items() if cur == v.version), gate=gate_by_version.get(v.version, []),
            files=[f.path for f in m.files if f.path in ("training_curves.png", "metrics.json", "history.csv")]))
    return ModelsRead(versions=versions, alias_states=alias_states, rows=rows, skipped=skipped)


def pipeline_overview(store: ObjectStore, spec: PipelineSpec, today: dt.date | None = None,
                      window_days: int | None = None) -> PipelineOverview:
    import time

    started = time.perf_counter()
    today = today or dt.datetime.now(dt.UTC).date()
    window_days = window_days or spec.monitoring.window_days
    last = min(today, spec.end_date) if spec.end_date else today
    first = max(spec.start_date, last - dt.timedelta(days=window_days - 1))
    window = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    skipped: list[Skipped] = []
    # Raw arrivals are listed per date (a year of raw files would be hundreds of pages), while the
    # commit records are read; both are round trips, so they overlap.
    with ThreadPoolExecutor(_READERS) as raw_pool:
        raw_listings = {day: raw_pool.submit(_raw, store, spec.name, day) for day in window}
        store = snapshot(store, spec)
        raw_by_day = {day: future.result() for day, future in raw_listings.items()}

    # Models first: predictions are compared with the labels their model was trained on.
    model = spec.model.name
    models_read = read_models(store, model, spec.scoring.allowed_aliases)
    versions, alias_states, models = models_read.versions, models_read.alias_states, models_read.rows
    skipped += models_read.skipped
    current = {a: s.version for a, s in alias_states.items()}
    training_labels: dict[str, dict[str, int]] = {}
    moves = sorted((AliasMove(alias=a, seq=e.seq, version=e.version, previous_version=e.previous_version, reason=e.reason,
                              written_at=e.written_at, authority=(auth := registry.authority_of(e)).kind, who=auth.who or e.run_id)
                    for a, s in alias_states.items() for e in s.history),
                   key=lambda mv: (mv.alias, mv.seq))

    def label_counts_of(model_version: str) -> dict[str, int]:
        if model_version not in training_labels:
            counts: dict[str, int] = {}
            committed = versions.find(model_version)
            for date, version in filter(None, map(layout.dated_version, committed.manifest.lineage.inputs if committed else [])):
                latest, _ = CACHE.latest(store, layout.dataset_date_prefix(spec.name, date), DatasetManifest)
                if latest is not None and latest.version == version:
                    for label, n in latest.manifest.counts.per_label.items():
                        counts[label] = counts.get(label, 0) + n
            training_labels[model_version] = counts
        return training_labels[model_version]

    def read_date(day: dt.date) -> tuple[DateRow, list[Skipped]]:
        dataset, skipped_d = CACHE.latest(store, layout.dataset_date_prefix(spec.name, day), DatasetManifest)
        predictions, skipped_p = CACHE.latest(store, layout.predictions_date_prefix(spec.name, day), PredictionsManifest)
        row = DateRow(date=day, raw=raw_by_day[day], dataset=dataset_row(dataset) if dataset else None,
                      predictions=predictions_row(predictions) if predictions else None)
        if predictions is not None:
            version_stats = statistics.read(store, layout.predictions_version_prefix(spec.name, day, predictions.version))
            if version_stats is not None and version_stats.skew is not None:
                row.predictions.feature_skew = round(version_stats.skew.feature_skew, 4)
                row.predictions.label_distance = version_stats.skew.label_distance
        return row, skipped_d + skipped_p

    rows = []
    for row, row_skipped in map(read_date, window):  # from the snapshot: no round trips left
        skipped += row_skipped
        if row.predictions is not None and row.predictions.predicted_labels:
            row.predictions.drift = tvd(row.predictions.predicted_labels, label_counts_of(row.predictions.model_version))
        rows.append(row)

    threshold = spec.thresholds.max_reject_rate
    for row in rows:
        if row.raw.files and not row.raw.complete:
            row.problems.append("arrivals incomplete (no arrival marker)")
        if row.dataset is None:
            row.problems.append("no dataset committed" if row.raw.files else "no arrivals")
        elif row.dataset.reject_rate > threshold:
            row.problems.append(f"reject rate {row.dataset.reject_rate:.1%} above {threshold:.1%}")
        if row.dataset is not None and row.predictions is None:
            row.problems.append("not scored")
        if row.predictions and row.predictions.drift is not None and row.predictions.drift > spec.monitoring.max_drift:
            row.problems.append(f"prediction drift {row.predictions.drift:.2f} above {spec.monitoring.max_drift:.2f}")
        skew = row.predictions.feature_skew if row.predictions else None
        if skew is not None and skew > spec.monitoring.max_feature_skew:
            row.problems.append(f"feature skew {skew:.2f} above {spec.monitoring.max_feature_skew:.2f}")
    scored = [r.date for r in rows if r.predictions is not None]
    newest = max(scored) if scored else None
    lag = (last - newest).days if newest else None
    freshness = Freshness(newest_scored_date=newest, lag_days=lag, max_lag_days=spec.monitoring.max_lag_days,
                          late=lag is None or lag > spec.monitoring.max_lag_days)
    return PipelineOverview(
        pipeline=spec.name, model=model, store=store.root_uri, generated_at=dt.datetime.now(dt.UTC), window=window,
        freshness=freshness, max_reject_rate=threshold, max_drift=spec.monitoring.max_drift,
        max_feature_skew=spec.monitoring.max_feature_skew, dates=rows, models=models,
        alias_moves=moves, aliases=current, broken_aliases={a: s.broken for a, s in alias_states.items() if s.broken}, skipped=_unique(skipped), read_seconds=round(time.perf_counter() - started, 3))


def _unique(items: list[Skipped]) -> list[Skipped]:
    seen, out = set(), []
    for s in items:
        if (s.uri, s.problem) not in seen:
            seen.add((s.uri, s.problem))
            out.append(s)
    return out


class RunView(BaseModel):
    """What one DAG run left in the store: the dates it committed a dataset or predictions for,
    the model versions it trained, and the gate's decisions it made (Airflow's per-run view)."""

    pipeline: str
    model: str
    run_id: str
    dates: list[DateRow]
    models: list[ModelRow]
    gate: list[GateRecord]


def run_view(overview: PipelineOverview, run_id: str) -> RunView:
    dates = [r for r in overview.dates
             if (r.dataset and r.dataset.run_id == run_id) or (r.predictions and r.predictions.run_id == run_id)]
    gate = [g for m in overview.models for g in m.gate if g.run_id == run_id]
    decided = {m.version for m in overview.models for g in m.gate if g.run_id == run_id}
    models = [m for m in overview.models if m.run_id == run_id or m.version in decided]
    return RunView(pipeline=overview.pipeline, model=overview.model, run_id=run_id, dates=dates, models=models, gate=gate)


def health_problems(overview: PipelineOverview) -> list[str]:
    """What the health check fails on: freshness beyond its limit, a broken alias, and dates whose
    reject rate, prediction drift or feature skew is above threshold, each with the dates named."""
    problems = []
    f = overview.freshness
    if f.late:
        problems.append(f"{overview.pipeline}: newest scored date is {f.newest_scored_date or 'none'}"
                        f" ({'never' if f.lag_days is None else f'{f.lag_days} days'} behind; limit {f.max_lag_days})")
    problems += [f"{overview.model}:{alias} is broken (nothing falls back to an older version): {why}"
                 for alias, why in overview.broken_aliases.items()]
    rejecting = [str(r.date) for r in overview.dates if r.dataset and r.dataset.reject_rate > overview.max_reject_rate]
    if rejecting:
        problems.append(f"{overview.pipeline}: reject rate above {overview.max_reject_rate:.1%} on {', '.join(rejecting)}")
    drifting = [str(r.date) for r in overview.dates if r.predictions and r.predictions.drift is not None
                and r.predictions.drift > overview.max_drift]
    if drifting:
        problems.append(f"{overview.pipeline}: prediction drift above {overview.max_drift:.2f} on {', '.join(drifting)}")
    skewed = [f"{r.date} ({r.predictions.feature_skew:.2f})" for r in overview.dates
              if r.predictions and r.predictions.feature_skew is not None and r.predictions.feature_skew > overview.max_feature_skew]
    if skewed:
        problems.append(f"{overview.pipeline}: feature skew against the model's training data above {overview.max_feature_skew:.2f} "
                        f"on {', '.join(skewed)}")
    return problems


class AliasRow(BaseModel):
    version: str | None
    log_entry: int
    previous_version: str | None
    reason: str
    moves: int
    broken: str | None = Field(None, description="why the alias's newest target does not validate (then nothing serves)")
    authority: str


class StatusDate(BaseModel):
    date: dt.date
    dataset: DatasetRow | None = None
    predictions: PredictionsRow | None = None
    dataset_versions: int = Field(0, description="committed dataset versions of the date")


class PipelineStatus(BaseModel):
    dates: list[StatusDate]


class ModelStatus(BaseModel):
    aliases: dict[str, AliasRow]
    versions: list[ModelRow]


class StoreStatus(BaseModel):
    """Everything a store holds (``twocluster status``): every pipeline's dates, every model's
    versions and aliases, what was skipped as invalid. The rows are the ops page's."""

    store: str
    pipelines: dict[str, PipelineStatus] = Field(default_factory=dict)
    models: dict[str, ModelStatus] = Field(default_factory=dict)
    skipped: list[Skipped] = Field(default_factory=list)


def store_status(store: ObjectStore, pipeline: str | None = None) -> StoreStatus:
    """What the store holds, as read through the commit logs (the same reads the pipeline makes).
    Read like the ops page: one recursive listing per area, every log entry in parallel (a
    commit's entry carries its manifest), then no round trip per location."""
    out = StoreStatus(store=store.root_uri)
    store = StoreSnapshot(store, ["datasets", "predictions", "models"], immutable_cache=_COMMIT_RECORDS,
                          is_immutable=layout.is_commit_record, readers=_READERS)
    store.prefetch(key for key in store.objects if layout.is_log_entry_key(key))
    skipped: list[Skipped] = []
    for name in sorted(set(store.list_folders("datasets")) | set(store.list_folders("predictions"))):
        if pipeline and name != pipeline:
            continue
        dates: dict[dt.date, StatusDate] = {}
        for parent, kind in ((layout.datasets_prefix(name), DatasetManifest), (layout.predictions_prefix(name), PredictionsManifest)):
            for folder in store.list_folders(parent):
                day = layout.date_from_folder(folder)
                if day is None:
                    continue
                state = scan_location(store, f"{parent}/{folder}", kind)
                skipped += [Skipped(uri=s.uri, problem=s.problem) for s in state.skipped]
                row = dates.setdefault(day, StatusDate(date=day))
                if state.latest is None:
                    continue
                if kind is DatasetManifest:
                    row.dataset, row.dataset_versions = dataset_row(state.latest), len(state.versions)
                else:
                    row.predictions = predictions_row(state.latest)
        out.pipelines[name] = PipelineStatus(dates=[dates[d] for d in sorted(dates)])
    for model in registry.model_names(store):
        read = read_models(store, model)
        skipped += read.skipped
        out.models[model] = ModelStatus(
            versions=read.rows,
            aliases={alias: AliasRow(version=state.version, log_entry=state.current.seq, previous_version=state.previous_version(),
                                     reason=state.current.reason, moves=len(state.history), broken=state.broken,
                                     authority=registry.authority_of(state.current).kind)
                     for alias, state in read.alias_states.items() if state.current is not None})
    out.skipped = _unique(skipped)
    return out
