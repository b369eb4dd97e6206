"""Manifests and the commit protocol (DESIGN.md, contract 3).

A version folder holds data files and, written last and create-only, ``_MANIFEST.json``. A
version without a manifest does not exist for readers: every read here goes through manifests,
and "latest" is resolved from manifests, never from listing data files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twocluster import layout
from twocluster.storage import ObjectNotFound, ObjectStore

ManifestKind = Literal["dataset", "model", "predictions"]


class ManifestError(Exception):
    """A manifest is missing, malformed, or does not match the files it describes."""


class ManifestNotFound(ManifestError):
    pass


class CommitConflict(ManifestError):
    """Another writer committed this version first."""


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str = Field(description="relative to the manifest's folder")
    bytes: int = Field(ge=0)
    checksum: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    rows: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _relative_path(self) -> ManifestFile:
        parts = self.path.split("/")
        if self.path.startswith("/") or "://" in self.path or ".." in parts or "" in parts:
            raise ValueError(f"file path {self.path!r} must be relative to the manifest's folder")
        return self


class Counts(BaseModel):
    """Every input is accounted for: ``input == accepted + rejected``."""

    model_config = ConfigDict(extra="allow")

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


class Lineage(BaseModel):
    model_config = ConfigDict(extra="allow")

    inputs: list[str] = Field(default_factory=list, description="URIs or version ids read")
    code_version: str
    run_id: str
    params: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    kind: ManifestKind
    version: str
    created_at: dt.datetime
    files: list[ManifestFile]
    counts: Counts | None = None
    lineage: Lineage
    feature_spec: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        layout.check_version(self.version)
        if self.kind in ("dataset", "predictions") and self.counts is None:
            raise ValueError(f"a {self.kind} manifest needs counts")
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

    def files_under(self, folder: str) -> list[ManifestFile]:
        folder = folder.rstrip("/") + "/"
        return [f for f in self.files if f.path.startswith(folder)]


def parse_manifest(data: bytes, source: str) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors())
        raise ManifestError(f"{source}: invalid manifest: {problems}") from None


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


def commit_manifest(store: ObjectStore, version_prefix: str, manifest: Manifest, *, verify: bool = True) -> str:
    """Commit a version: check its files are all there with the recorded sizes, then write the
    manifest create-only. Returns the manifest URI; raises :class:`CommitConflict` if another
    writer committed this version first (the caller's files were not published)."""
    if verify:
        check_files_present(store, version_prefix, manifest)
    key = layout.manifest_key(version_prefix)
    if not store.put_if_absent(key, manifest.to_json()):
        raise CommitConflict(f"{store.uri(key)}: version {manifest.version} was already committed by another writer")
    return store.uri(key)


def check_files_present(store: ObjectStore, version_prefix: str, manifest: Manifest) -> None:
    """Every file the manifest lists is there with its recorded size (cheap: one listing)."""
    prefix = version_prefix.rstrip("/")
    actual = {o.key[len(prefix) + 1 :]: o.size for o in store.list(prefix)}
    for f in manifest.files:
        if f.path not in actual:
            raise ManifestError(f"{store.uri(prefix)}: manifest lists {f.path!r}, which is not there")
        if actual[f.path] != f.bytes:
            raise ManifestError(
                f"{store.uri(prefix + '/' + f.path)}: {actual[f.path]} bytes, manifest says {f.bytes}"
            )


def read_manifest(store: ObjectStore, version_prefix: str) -> Manifest:
    key = layout.manifest_key(version_prefix)
    try:
        data = store.read_bytes(key)
    except ObjectNotFound:
        raise ManifestNotFound(f"{store.uri(key)}: no manifest (the version is not committed)") from None
    manifest = parse_manifest(data, store.uri(key))
    folder_version = layout.version_from_folder(version_prefix.rstrip("/").rsplit("/", 1)[-1])
    if folder_version is not None and folder_version != manifest.version:
        raise ManifestError(f"{store.uri(key)}: says version {manifest.version} but sits in v={folder_version}")
    return manifest


def verify_files(store: ObjectStore, version_prefix: str, manifest: Manifest, paths: Iterable[str] | None = None) -> None:
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


def list_committed_versions(store: ObjectStore, parent_prefix: str) -> list[str]:
    """Version ids under ``parent_prefix`` (a folder of ``v=<version>`` folders) that have a
    manifest, oldest first. Folders without a manifest (in-flight or failed writes) are skipped."""
    candidates = [v for v in map(layout.version_from_folder, store.list_folders(parent_prefix)) if v]
    keys = {layout.manifest_key(f"{parent_prefix}/{layout.version_folder(v)}"): v for v in candidates}
    present = store.existing(keys)
    return sorted(v for k, v in keys.items() if k in present)


def resolve_latest(store: ObjectStore, parent_prefix: str) -> tuple[str, Manifest] | None:
    """The newest committed version under ``parent_prefix`` and its manifest, or ``None``.

    Newest by the manifest's ``created_at`` (ties broken by version id), read from the manifests
    themselves rather than from folder names or data files."""
    best: tuple[tuple[dt.datetime, str], Manifest] | None = None
    for version in list_committed_versions(store, parent_prefix):
        manifest = read_manifest(store, f"{parent_prefix}/{layout.version_folder(version)}")
        rank = (manifest.created_at, manifest.version)
        if best is None or rank > best[0]:
            best = (rank, manifest)
    return (best[1].version, best[1]) if best else None
