"""The model registry on the object store: model versions and published aliases.

    models/<model>/versions/v=<version>/       a model version (manifest inside)
    models/<model>/versions/_log/<seq>.json    its commits, in order
    models/<model>/aliases/<alias>/_log/<seq>.json   where the alias pointed, in order

An alias is its commit log: entry N+1 is written create-only, so moving an alias is a
compare-and-set against the position N the mover read (:func:`move_alias`). Two gates that both
decided to publish cannot both move it; the loser re-reads and decides again. The alias points
at the model version of its highest entry that validates (right model and alias, a committed
version); malformed entries are skipped and reported, never fatal. No clock orders anything.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twocluster.store import layout
from twocluster.store.commitlog import AliasMoved, CommitLog, SkippedObject
from twocluster.store.manifest import (
    CommittedVersion,
    LocationState,
    ManifestError,
    ModelManifest,
    VersionIndex,
    resolve_version,
    scan_location,
)
from twocluster.store.storage import ObjectStore

log = logging.getLogger(__name__)


class RegistryError(LookupError):
    pass


class AliasConflict(RegistryError):
    """Someone moved the alias after the caller read it."""


def read_model_manifest(store: ObjectStore, model: str, version: str, *, verify_checksums: bool = False) -> ModelManifest:
    """A committed model version's manifest (raises :class:`ManifestError` if it is not one)."""
    return resolve_version(store, layout.model_versions_prefix(model), version, ModelManifest, verify_checksums=verify_checksums).manifest


def model_versions(store: ObjectStore, model: str) -> LocationState:
    return scan_location(store, layout.model_versions_prefix(model), ModelManifest)


@dataclass
class AliasState:
    """An alias as read from its log: ``position`` is the highest entry number taken (the
    compare-and-set expects the next one), ``current`` the entry the alias resolves to."""

    model: str
    alias: str
    position: int = 0
    current: AliasMoved | None = None
    history: list[AliasMoved] = field(default_factory=list)  # valid entries, oldest first
    skipped: list[SkippedObject] = field(default_factory=list)

    @property
    def version(self) -> str | None:
        return self.current.version if self.current else None

    def previous_version(self) -> str | None:
        """The version the alias pointed at before its current one (for a rollback)."""
        if self.current is None:
            return None
        earlier = [e.version for e in self.history if e.seq < self.current.seq and e.version != self.current.version]
        return earlier[-1] if earlier else None


def read_alias(store: ObjectStore, model: str, alias: str, committed: LocationState | VersionIndex | None = None) -> AliasState:
    """Read an alias's log and resolve it to its newest valid entry. Only the model versions the
    alias names are validated."""
    location = layout.model_alias_prefix(model, alias)
    snapshot = CommitLog(store, location).read()
    state = AliasState(model, alias, position=snapshot.head, skipped=list(snapshot.skipped))
    if committed is None:
        committed = VersionIndex(store, layout.model_versions_prefix(model), ModelManifest)
    if isinstance(committed, LocationState):
        valid = {v.version for v in committed.versions}
        is_valid = valid.__contains__
    else:
        def is_valid(version: str) -> bool:
            try:
                committed.get(version)
                return True
            except ManifestError:
                return False
    for entry in snapshot.entries:
        uri = store.uri(layout.log_entry_key(location, entry.seq))
        if not isinstance(entry, AliasMoved):
            state.skipped.append(SkippedObject(uri, f"a {entry.op!r} entry in an alias log"))
        elif (entry.model, entry.alias) != (model, alias):
            state.skipped.append(SkippedObject(uri, f"names {entry.model}:{entry.alias} but sits under {model}:{alias}"))
        elif not is_valid(entry.version):
            state.skipped.append(SkippedObject(uri, f"points at {model} version {entry.version}, which is not a valid committed version"))
        else:
            state.history.append(entry)
    for skipped in state.skipped:
        log.warning("alias %s:%s: skipping %s: %s", model, alias, skipped.uri, skipped.problem)
    state.current = state.history[-1] if state.history else None
    return state


def resolve_alias(store: ObjectStore, model: str, alias: str) -> AliasMoved | None:
    """The entry the alias resolves to, or ``None`` if nothing valid was ever published."""
    return read_alias(store, model, alias).current


def require_alias(store: ObjectStore, model: str, alias: str) -> AliasMoved:
    record = resolve_alias(store, model, alias)
    if record is None:
        raise RegistryError(
            f"nothing is published as {model}:{alias} in {store.uri(layout.model_alias_prefix(model, alias))}; "
            "train and publish a model first"
        )
    return record


def move_alias(store: ObjectStore, model: str, alias: str, version: str, *, expected: AliasState, reason: str = "",
               run_id: str = "", decision: dict[str, Any] | None = None) -> AliasMoved:
    """Point ``alias`` at a committed ``version`` if, and only if, nobody moved it since
    ``expected`` was read (compare-and-set on the alias log). Raises :class:`AliasConflict`
    otherwise: read again and decide again. Raises :class:`RegistryError` for a version that is
    not committed."""
    try:
        read_model_manifest(store, model, version)
    except ManifestError as e:
        raise RegistryError(f"cannot point {model}:{alias} at {version}: {e}") from None
    entry = AliasMoved(seq=expected.position + 1, model=model, alias=alias, version=version,
                       previous_version=expected.version, reason=reason, decision=decision or {}, run_id=run_id)
    if not CommitLog(store, layout.model_alias_prefix(model, alias)).append_at(expected.position + 1, entry):
        raise AliasConflict(f"{model}:{alias} moved after it was read at position {expected.position}")
    log.info("%s:%s -> %s (entry %d): %s", model, alias, version, entry.seq, reason)
    return entry


def model_names(store: ObjectStore) -> list[str]:
    """The models in the store (folders under ``models/`` that are valid names)."""
    names = []
    for folder in store.list_folders("models"):
        try:
            names.append(layout.check_name(folder, "model"))
        except layout.LayoutError:
            continue
    return names


def find_version_of_run(store: ObjectStore, model: str, run_id: str) -> CommittedVersion | None:
    """The committed model version a training run produced, if any (newest first)."""
    for committed in reversed(model_versions(store, model).versions):
        if committed.manifest.lineage.run_id == run_id:
            return committed
    return None


def published_versions(store: ObjectStore, model: str) -> dict[str, list[str]]:
    """``{version: [aliases that ever pointed at it]}`` over every alias of the model."""
    parent = layout.model_aliases_prefix(model)
    committed = VersionIndex(store, layout.model_versions_prefix(model), ModelManifest)
    found: dict[str, list[str]] = {}
    for alias in store.list_folders(parent):
        try:
            layout.check_name(alias, "alias")
        except layout.LayoutError:
            continue
        for entry in read_alias(store, model, alias, committed).history:
            found.setdefault(entry.version, [])
            if alias not in found[entry.version]:
                found[entry.version].append(alias)
    return found


def stage_model(store: ObjectStore, model: str, version: str, into: Path, only: Collection[str] | None = None,
                manifest: ModelManifest | None = None) -> Path:
    """Download a committed model version (``only`` these of its files, when given), every file
    verified against its manifest's checksum."""
    prefix = layout.model_version_prefix(model, version)
    manifest = manifest or read_model_manifest(store, model, version)
    files = [f for f in manifest.files if only is None or f.path in only]
    if only is not None and (missing := set(only) - {f.path for f in files}):
        raise RegistryError(f"{model} v={version} has no {sorted(missing)}")
    folder = into / version
    for f, (key, checksum) in zip(
        files, store.download_many([(f"{prefix}/{f.path}", folder / f.path) for f in files]), strict=True
    ):
        if checksum != f.checksum:
            raise RegistryError(f"{store.uri(key)}: checksum {checksum} does not match the manifest's {f.checksum}")
    return folder
