"""Manifests and the commit protocol (DESIGN.md, contract 3).

A version folder holds data files and ``_MANIFEST.json`` (files with sizes and checksums, counts,
feature spec, lineage). A version becomes visible when an entry naming it, with its manifest's
checksum, is appended to its location's commit log (:mod:`twocluster.store.commitlog`):

    1. write data files (task attempts write under ``_staging/`` and the winner is promoted)
    2. write ``v=<version>/_MANIFEST.json`` create-only
    3. append ``{"op": "commit", "version": ..., "manifest_checksum": ...}`` to ``<location>/_log/``

"Latest" is the highest log entry that validates: its manifest is there, has the recorded
checksum, parses as the expected kind, sits in its own folder, and lists files that are all
present with their sizes (and, where data is read for use, their checksums). Entries that fail are
skipped with a warning naming the object and the problem, so one bad object never wedges a
pipeline: a rerun commits a new version past it. No writer's clock decides anything.

Manifests are typed by kind (:class:`DatasetManifest`, :class:`ModelManifest`,
:class:`PredictionsManifest`) with declared fields only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from twocluster.store import layout
from twocluster.store.commitlog import CommitLog, SkippedObject, VersionCommitted, VersionRemoved
from twocluster.store.featurespec import FeatureSpec
from twocluster.store.storage import ObjectNotFound, ObjectStore, StorageError, checksum_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: the pre-log layout (no format_version field), see `twocluster migrate`

# A dataset's shards come in three formats of the same rows: TFRecords (tf.data), a Parquet copy
# (analytics, older trainers) and an Arrow IPC copy (the trainer's feed: fixed-width features,
# memory-mapped, no decoding per example).
DataFormat = Literal["tfrecord", "parquet", "arrow"]
FileKind = Literal["tfrecord", "parquet", "arrow", "rejects", "predictions", "model"]


class ManifestError(Exception):
    """A manifest is missing, malformed, or does not match the files it describes."""


class ManifestNotFound(ManifestError):
    pass


class CommitConflict(ManifestError):
    """Another writer committed this version first."""


class LegacyLayoutError(ManifestError):
    """The location holds versions committed before commit logs existed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ManifestFile(_Strict):
    path: str = Field(description="relative to the manifest's folder")
    bytes: int = Field(ge=0)
    checksum: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    rows: int | None = Field(default=None, ge=0)
    kind: FileKind | None = None
    split: str | None = None

    @model_validator(mode="after")
    def _relative_path(self) -> ManifestFile:
        parts = self.path.split("/")
        if self.path.startswith("/") or "://" in self.path or ".." in parts or "" in parts:
            raise ValueError(f"file path {self.path!r} must be relative to the manifest's folder")
        return self


class Counts(_Strict):
    """Every input is accounted for: ``input == accepted + rejected``."""

    input: int = Field(ge=0)
    accepted: int = Field(ge=0)
    rejected: int = Field(ge=0)
    per_split: dict[str, int] = Field(default_factory=dict)
    per_label: dict[str, int] = Field(default_factory=dict)
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reconcile(self) -> Counts:
        if self.input != self.accepted + self.rejected:
            raise ValueError(
                f"counts do not reconcile: input={self.input} != accepted={self.accepted} "
                f"+ rejected={self.rejected}"
            )
        for name, breakdown, total in (
            ("per_split", self.per_split, self.accepted),
            ("per_label", self.per_label, self.accepted),
            ("rejected_by_reason", self.rejected_by_reason, self.rejected),
        ):
            if breakdown and sum(breakdown.values()) != total:
                raise ValueError(f"counts.{name} sums to {sum(breakdown.values())}, expected {total}")
        return self


class Lineage(_Strict):
    inputs: list[str] = Field(default_factory=list, description="URIs read (raw folders, manifests, model versions)")
    code_version: str = Field(description="package version + git commit, for people")
    code: dict[str, str] = Field(default_factory=dict, description="content hashes of the code (twocluster.version.code_hashes)")
    run_id: str
    params: dict[str, Any] = Field(default_factory=dict)
    input_fingerprint: str | None = Field(None, description="what the output was computed from; equal means a rerun is a no-op")
    dataset_versions: list[str] = Field(default_factory=list, description="models: the dataset versions trained on")


class _ManifestBase(_Strict):
    format_version: Literal[2] = FORMAT_VERSION
    version: str = Field(pattern=layout.VERSION_PATTERN)
    created_at: dt.datetime = Field(description="informational; never used to order versions")
    files: list[ManifestFile]
    lineage: Lineage
    seconds: dict[str, float] = Field(default_factory=dict, description="how long each step took")

    @model_validator(mode="after")
    def _check(self):
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must carry a timezone")
        paths = [f.path for f in self.files]
        if len(paths) != len(set(paths)):
            raise ValueError("files lists a path twice")
        if layout.MANIFEST_NAME in paths:
            raise ValueError("a manifest does not list itself")
        return self

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2, exclude_none=True) + "\n").encode()

    def file(self, path: str) -> ManifestFile:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"manifest of version {self.version} lists no file {path!r}")


class DatasetManifest(_ManifestBase):
    kind: Literal["dataset"] = "dataset"
    pipeline: str
    date: dt.date
    counts: Counts
    feature_spec: FeatureSpec
    ignored_files: int = Field(0, ge=0)
    ignored_by_reason: dict[str, int] = Field(default_factory=dict, description="files that are not inputs: pattern, hidden, symlink")
    complete: bool = Field(True, description="false: committed at the arrivals deadline without the date's marker / quiet listing")

    def data_files(self, kind: DataFormat, splits: Iterable[str] | None = None) -> list[ManifestFile]:
        """The shards of one format (the TFRecords, their Parquet or Arrow copy), of ``splits`` or all."""
        wanted = None if splits is None else set(splits)
        return [f for f in self.files if f.kind == kind and (wanted is None or f.split in wanted)]

    def tfrecord_files(self, splits: Iterable[str] | None = None) -> list[ManifestFile]:
        return self.data_files("tfrecord", splits)


class ModelMetrics(_Strict):
    train_accuracy: float
    validation_accuracy: float
    test_accuracy: float
    test_loss: float
    test_examples: int = Field(ge=0)
    training_seconds: float | None = None


class ModelManifest(_ManifestBase):
    kind: Literal["model"] = "model"
    model: str
    feature_spec: FeatureSpec
    metrics: ModelMetrics

    @property
    def label_vocabulary(self) -> list[str]:
        return self.feature_spec.label_vocabulary


class PredictionSummary(_Strict):
    """What the predictions look like, computed when they are written (the monitoring page reads
    this instead of the Parquet files)."""

    predicted_labels: dict[str, int] = Field(default_factory=dict)
    mean_confidence: float | None = None
    confidence_floor: float
    below_confidence_floor: int = Field(0, ge=0)


class PredictionsManifest(_ManifestBase):
    kind: Literal["predictions"] = "predictions"
    pipeline: str
    date: dt.date
    counts: Counts
    feature_spec: FeatureSpec
    model: str
    model_version: str = Field(pattern=layout.VERSION_PATTERN)
    model_loads: int = Field(0, ge=0)
    python_workers: int = Field(0, ge=0)
    model_runtimes: list[Literal["onnx", "keras"]] = Field(default_factory=list, description="what served the model in the workers")
    ignored_files: int = Field(0, ge=0)
    ignored_by_reason: dict[str, int] = Field(default_factory=dict, description="files that are not inputs: pattern, hidden, symlink")
    summary: PredictionSummary | None = None


Manifest = Annotated[DatasetManifest | ModelManifest | PredictionsManifest, Field(discriminator="kind")]
AnyManifest = DatasetManifest | ModelManifest | PredictionsManifest
M = TypeVar("M", DatasetManifest, ModelManifest, PredictionsManifest)
_MANIFEST = TypeAdapter(Manifest)
_KINDS: dict[str, type] = {"dataset": DatasetManifest, "model": ModelManifest, "predictions": PredictionsManifest}


def _problems(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors(include_url=False))


def parse_manifest(data: bytes, source: str, kind: type[M] | None = None) -> M:
    """Parse and validate a manifest (of ``kind`` if given); errors name the source and field."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{source}: not JSON: {e}") from None
    if isinstance(raw, dict) and "format_version" not in raw:
        raise LegacyLayoutError(f"{source}: a manifest of the pre-log layout; run `twocluster migrate --apply`")
    try:
        manifest = _MANIFEST.validate_python(raw)
    except ValidationError as e:
        raise ManifestError(f"{source}: invalid manifest: {_problems(e)}") from None
    if kind is not None and not isinstance(manifest, kind):
        raise ManifestError(f"{source}: is a {manifest.kind} manifest, expected a {kind.model_fields['kind'].default}")
    return manifest


# -- writing -------------------------------------------------------------------------------------


def describe_files(store: ObjectStore, version_prefix: str, rows: dict[str, int] | None = None) -> list[ManifestFile]:
    """List every data file under a version folder with its size and checksum (for writers that
    did not track checksums while writing)."""
    rows = rows or {}
    prefix = version_prefix.rstrip("/") + "/"
    described = []
    for obj in store.list(version_prefix):
        rel = obj.key[len(prefix) :]
        if rel == layout.MANIFEST_NAME or rel.rsplit("/", 1)[-1].startswith("."):
            continue
        described.append(ManifestFile(path=rel, bytes=obj.size, checksum=store.checksum(obj.key), rows=rows.get(rel)))
    return described


def commit_version(store: ObjectStore, location: str, manifest: AnyManifest, *, verify: bool = True) -> str:
    """Commit a version whose files are in place: check they are all there with their recorded
    sizes, write the manifest create-only, then append the commit to the location's log (the step
    that makes it visible). Returns the manifest URI; raises :class:`CommitConflict` if another
    writer committed this version id first."""
    version_prefix = _version_prefix(location, manifest.version)
    if verify:
        check_files_present(store, version_prefix, manifest)
    key = layout.manifest_key(version_prefix)
    data = manifest.to_json()
    if not store.put_if_absent(key, data):
        raise CommitConflict(f"{store.uri(key)}: version {manifest.version} was already committed by another writer")
    checksum = checksum_bytes(data)
    CommitLog(store, location).append(
        lambda seq: VersionCommitted(seq=seq, version=manifest.version, manifest_checksum=checksum,
                                     run_id=manifest.lineage.run_id, manifest=data.decode())
    )
    return store.uri(key)


def check_files_present(store: ObjectStore, version_prefix: str, manifest: AnyManifest, *,
                        manifest_bytes: int | None = None) -> None:
    """Every file the manifest lists is there with its recorded size (cheap: one listing); with
    ``manifest_bytes``, the manifest object too, with that size."""
    prefix = version_prefix.rstrip("/")
    actual = {o.key[len(prefix) + 1 :]: o.size for o in store.list(prefix)}
    if manifest_bytes is not None and actual.get(layout.MANIFEST_NAME) != manifest_bytes:
        key = layout.manifest_key(prefix)
        if layout.MANIFEST_NAME not in actual:
            raise ManifestError(f"{store.uri(key)}: committed but the manifest is missing")
        raise ManifestError(f"{store.uri(key)}: the manifest changed after its commit "
                            f"({actual[layout.MANIFEST_NAME]} bytes, the commit recorded {manifest_bytes})")
    for f in manifest.files:
        if f.path not in actual:
            raise ManifestError(f"{store.uri(prefix)}: manifest lists {f.path!r}, which is not there")
        if actual[f.path] != f.bytes:
            raise ManifestError(f"{store.uri(prefix + '/' + f.path)}: {actual[f.path]} bytes, manifest says {f.bytes}")


def verify_files(store: ObjectStore, version_prefix: str, manifest: AnyManifest, paths: Iterable[str] | None = None) -> None:
    """Re-read files and compare sizes and checksums with the manifest (all files, or ``paths``)."""
    wanted = manifest.files if paths is None else [manifest.file(p) for p in paths]
    for f in wanted:
        key = f"{version_prefix.rstrip('/')}/{f.path}"
        try:
            actual = store.checksum(key)
        except ObjectNotFound:
            raise ManifestError(f"{store.uri(key)}: listed in the manifest but missing") from None
        if actual != f.checksum:
            raise ManifestError(f"{store.uri(key)}: checksum {actual} does not match the manifest's {f.checksum}")


def unlisted_files(store: ObjectStore, version_prefix: str, manifest: AnyManifest) -> list[str]:
    """Objects in a version folder that its manifest does not list (there should be none)."""
    prefix = version_prefix.rstrip("/")
    listed = {f.path for f in manifest.files} | {layout.MANIFEST_NAME}
    return [o.key for o in store.list(prefix) if o.key[len(prefix) + 1 :] not in listed]


# -- reading -------------------------------------------------------------------------------------


def read_manifest(store: ObjectStore, version_prefix: str, kind: type[M] | None = None) -> M:
    """The manifest of one version folder (not whether the version is committed: see
    :func:`resolve_version`)."""
    key = layout.manifest_key(version_prefix)
    try:
        data = store.read_bytes(key)
    except ObjectNotFound:
        raise ManifestNotFound(f"{store.uri(key)}: no manifest (the version is not committed)") from None
    manifest = parse_manifest(data, store.uri(key), kind)
    folder_version = layout.version_from_folder(version_prefix.rstrip("/").rsplit("/", 1)[-1])
    if folder_version is not None and folder_version != manifest.version:
        raise ManifestError(f"{store.uri(key)}: says version {manifest.version} but sits in v={folder_version}")
    return manifest


@dataclass
class CommittedVersion:
    """A version that validated against its commit log entry."""

    version: str
    seq: int
    manifest: Any  # DatasetManifest | ModelManifest | PredictionsManifest
    manifest_uri: str


@dataclass
class LocationState:
    """Everything a location's log says: valid versions in commit order, versions retired by GC,
    and what was skipped and why."""

    location: str
    versions: list[CommittedVersion] = field(default_factory=list)
    removed: dict[str, str] = field(default_factory=dict)  # version -> reason
    skipped: list[SkippedObject] = field(default_factory=list)
    head: int = 0

    @property
    def latest(self) -> CommittedVersion | None:
        return self.versions[-1] if self.versions else None

    def find(self, version: str) -> CommittedVersion | None:
        return next((v for v in self.versions if v.version == version), None)


def _version_prefix(location: str, version: str) -> str:
    location = location.strip("/")
    return f"{location}/{layout.version_folder(version)}" if location else layout.version_folder(version)


def _validate_entry(store: ObjectStore, location: str, entry: VersionCommitted, kind: type[M] | None, verify_checksums: bool) -> CommittedVersion:
    version_prefix = _version_prefix(location, entry.version)
    key = layout.manifest_key(version_prefix)
    if entry.manifest is not None and not verify_checksums:
        # The log carries the manifest: no read, and the listing below checks the object's size.
        data = entry.manifest.encode()
        if checksum_bytes(data) != entry.manifest_checksum:
            raise ManifestError(f"{store.uri(layout.log_entry_key(location, entry.seq))}: the manifest it carries "
                                f"does not match its checksum {entry.manifest_checksum}")
    else:
        try:
            data = store.read_bytes(key)
        except ObjectNotFound:
            raise ManifestError(f"{store.uri(key)}: committed (log seq {entry.seq}) but the manifest is missing") from None
        if checksum_bytes(data) != entry.manifest_checksum:
            raise ManifestError(f"{store.uri(key)}: the manifest changed after its commit (log seq {entry.seq} recorded {entry.manifest_checksum})")
    manifest = parse_manifest(data, store.uri(key), kind)
    if manifest.version != entry.version:
        raise ManifestError(f"{store.uri(key)}: says version {manifest.version} but sits in v={entry.version}")
    check_files_present(store, version_prefix, manifest, manifest_bytes=len(data))
    if verify_checksums:
        verify_files(store, version_prefix, manifest)
    return CommittedVersion(entry.version, entry.seq, manifest, store.uri(key))


def _check_legacy(store: ObjectStore, location: str) -> None:
    """An empty log over a folder of committed pre-log versions: refuse loudly rather than treat
    the location as empty (which would retrain or reprocess everything)."""
    folders = [v for v in map(layout.version_from_folder, store.list_folders(location)) if v]
    if not folders:
        return
    keys = [layout.manifest_key(_version_prefix(location, v)) for v in folders]
    for key in sorted(store.existing(keys)):
        try:
            raw = json.loads(store.read_bytes(key))
        except (ValueError, StorageError):
            continue
        if isinstance(raw, dict) and "format_version" not in raw:
            raise LegacyLayoutError(
                f"{store.uri(location)} holds versions committed before commit logs existed ({store.uri(key)}); "
                f"run `twocluster migrate --store {store.root_uri} --apply` once to record them in commit logs"
            )


def scan_location(store: ObjectStore, location: str, kind: type[M] | None = None, *, verify_checksums: bool = False,
                  newest_only: bool = False) -> LocationState:
    """Read a location's log and validate its commits, newest first. With ``newest_only``, stop at
    the first version that validates (what "latest" needs)."""
    location = location.rstrip("/")
    snapshot = CommitLog(store, location).read()
    state = LocationState(location, skipped=list(snapshot.skipped), head=snapshot.head)
    if snapshot.head == 0:
        _check_legacy(store, location)
        return state
    first_commit: dict[str, VersionCommitted] = {}
    for entry in snapshot.entries:
        if isinstance(entry, VersionCommitted):
            first_commit.setdefault(entry.version, entry)
        elif not isinstance(entry, VersionRemoved):
            state.skipped.append(SkippedObject(store.uri(layout.log_entry_key(location, entry.seq)), f"a {entry.op!r} entry in a version log"))
    now = standing(snapshot.entries)
    state.removed = {v: e.reason for v, e in now.items() if isinstance(e, VersionRemoved)}
    # Newest first by first commit: a version gc retired and restored keeps its place in the order.
    for version, first in sorted(first_commit.items(), key=lambda item: item[1].seq, reverse=True):
        entry = now[version]
        if not isinstance(entry, VersionCommitted):
            continue
        try:
            committed = _validate_entry(store, location, entry, kind, verify_checksums)
        except ManifestError as e:
            log.warning("skipping version %s of %s: %s", entry.version, store.uri(location), e)
            state.skipped.append(SkippedObject(store.uri(_version_prefix(location, entry.version)), str(e)))
            continue
        committed.seq = first.seq
        state.versions.append(committed)
        if newest_only:
            break
    state.versions.reverse()
    return state


def resolve_latest(store: ObjectStore, location: str, kind: type[M] | None = None, *,
                   verify_checksums: bool = False) -> CommittedVersion | None:
    """The newest committed version of a location that validates, or ``None``. Invalid entries
    above it are skipped with a warning (and reported by ``twocluster status``)."""
    return scan_location(store, location, kind, verify_checksums=verify_checksums, newest_only=True).latest


def standing(entries: Iterable[Any]) -> dict[str, VersionCommitted | VersionRemoved]:
    """Each version's newest commit or remove entry: a version garbage collection retired is gone
    unless it was committed again after (gc restores a version an alias moved to meanwhile)."""
    found: dict[str, VersionCommitted | VersionRemoved] = {}
    for entry in entries:
        if isinstance(entry, VersionCommitted | VersionRemoved):
            found[entry.version] = entry
    return found


class VersionIndex:
    """A location's commits read once, validated on demand (for readers that only need a few
    versions of a long log, e.g. the model versions an alias points at)."""

    def __init__(self, store: ObjectStore, location: str, kind: type[M] | None = None):
        self.store, self.location, self.kind = store, location.rstrip("/"), kind
        self._entries = {v: e for v, e in standing(CommitLog(store, location).read().entries).items() if isinstance(e, VersionCommitted)}
        self._checked: dict[str, CommittedVersion | ManifestError] = {}

    def get(self, version: str) -> CommittedVersion:
        """The committed version, validated (raises :class:`ManifestError` if it is not one)."""
        if version not in self._checked:
            entry = self._entries.get(version)
            try:
                if entry is None:
                    raise ManifestNotFound(f"{self.store.uri(self.location)}: version {version} is not committed")
                self._checked[version] = _validate_entry(self.store, self.location, entry, self.kind, False)
            except ManifestError as e:
                self._checked[version] = e
        found = self._checked[version]
        if isinstance(found, ManifestError):
            raise found
        return found


def resolve_version(store: ObjectStore, location: str, version: str, kind: type[M] | None = None, *,
                    verify_checksums: bool = False) -> CommittedVersion:
    """A specific version, only if it is committed (in the log, not removed) and validates."""
    layout.check_version(version)
    snapshot = CommitLog(store, location).read()
    entry = standing(snapshot.entries).get(version)
    if isinstance(entry, VersionRemoved):
        raise ManifestNotFound(f"{store.uri(location)}: version {version} was removed ({entry.reason})")
    if isinstance(entry, VersionCommitted):
        return _validate_entry(store, location, entry, kind, verify_checksums)
    if snapshot.head == 0:
        _check_legacy(store, location)
    raise ManifestNotFound(f"{store.uri(location)}: version {version} is not committed")


# -- writers in flight ---------------------------------------------------------------------------

HEARTBEAT_SECONDS = 60.0


class InFlight:
    """A writer's heartbeat while it builds a version: ``<location>/_inflight/<version>.json``,
    rewritten every ``HEARTBEAT_SECONDS`` (the store's own modification time, not the writer's
    clock, says when) and removed when the writer finishes. Garbage collection never touches a
    version, or its staging area, whose heartbeat is younger than the grace period.

        with InFlight(store, location, version, run_id):
            ...write files, commit...
    """

    def __init__(self, store: ObjectStore, location: str, version: str, run_id: str, interval: float = HEARTBEAT_SECONDS):
        import threading

        self.store, self.key, self.interval = store, layout.inflight_key(location, version), interval
        self._body = json.dumps({"version": version, "run_id": run_id}).encode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{version}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.write_bytes(self.key, self._body)
            except StorageError as e:  # a missed beat is not fatal; GC's grace is many beats long
                log.warning("heartbeat %s: %s", self.store.uri(self.key), e)

    def __enter__(self) -> InFlight:
        self.store.write_bytes(self.key, self._body)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.store.delete(self.key)
        self.store.remove_empty_folders(self.key.rsplit("/", 1)[0])
