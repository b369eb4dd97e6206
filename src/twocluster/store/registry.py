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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from twocluster.store import layout
from twocluster.store.commitlog import AliasMoved, CommitLog, GateDecided, GateOutcome, SkippedObject
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


class AliasBroken(RegistryError):
    """The alias's current target does not validate. Never resolved to an older version instead:
    a person rolls it back (``twocluster alias rollback``) or a gate publishes a new version."""


class GateNotPassed(RegistryError):
    """The version has no passing gate decision or approval for the alias."""


def read_model_manifest(store: ObjectStore, model: str, version: str, *, verify_checksums: bool = False) -> ModelManifest:
    """A committed model version's manifest (raises :class:`ManifestError` if it is not one)."""
    return resolve_version(store, layout.model_versions_prefix(model), version, ModelManifest, verify_checksums=verify_checksums).manifest


def model_versions(store: ObjectStore, model: str) -> LocationState:
    return scan_location(store, layout.model_versions_prefix(model), ModelManifest)


# -- who moved an alias, and on what authority ---------------------------------------------------

MoveKind = Literal["gate", "approval", "override", "rollback", "legacy"]
# Gate-log outcomes that let a version be an alias's target (``published`` and
# ``already_published`` are what the gate wrote before "passed" existed: it passed then).
PASSED = ("passed", "published", "already_published")
MAY_SERVE = (*PASSED, "approved")  # the standings that let a version be the alias's target


class MoveAuthority(BaseModel):
    """Why an alias move was allowed, recorded in the move's entry (inside its ``decision``, so
    the entry keeps the schema that scoring images of the previous release read).

    ``gate``: a passing gate decision (``gate_entry``); ``approval``: a person's approval in the
    gate log; ``override``: ``--override-gate`` with a reason; ``rollback``: back to a version
    that served before (``rolled_back_from`` is the version it left); ``legacy``: written before
    moves were audited."""

    model_config = ConfigDict(extra="forbid")

    kind: MoveKind
    who: str = ""
    gate_entry: int | None = None
    rolled_back_from: str | None = None


def authority_of(entry: AliasMoved) -> MoveAuthority:
    raw = entry.decision.get("authority")
    if isinstance(raw, dict):
        try:
            return MoveAuthority.model_validate(raw)
        except ValidationError:
            pass
    return MoveAuthority(kind="legacy", who=entry.run_id)


def gate_decisions(store: ObjectStore, model: str) -> list[GateDecided]:
    """Every gate decision and approval on the model's versions, oldest first."""
    return [e for e in CommitLog(store, layout.model_gate_prefix(model)).read().entries if isinstance(e, GateDecided)]


def gate_standing(store: ObjectStore, model: str, version: str, alias: str,
                  decisions: list[GateDecided] | None = None) -> GateDecided | None:
    """The newest gate decision (or a person's approval or rejection) on ``version`` for ``alias``."""
    decisions = gate_decisions(store, model) if decisions is None else decisions
    return next((d for d in reversed(decisions) if d.version == version and d.alias == alias), None)


def describe_standing(standing: GateDecided | None, model: str, version: str, alias: str) -> str:
    if standing is None:
        return f"{model} version {version} has no gate decision for {alias!r}"
    by = f" by {standing.decided_by}" if standing.decided_by else ""
    return f"the gate's decision on {model} version {version} for {alias!r} (gate entry {standing.seq}) is {standing.outcome}{by}: {standing.reason}"


# -- reading an alias ----------------------------------------------------------------------------


@dataclass
class AliasState:
    """An alias as read from its log: ``position`` is the highest entry number taken (the
    compare-and-set expects the next one), ``current`` the entry the alias resolves to, and
    ``broken`` why that entry's version does not validate (then nothing serves it)."""

    model: str
    alias: str
    position: int = 0
    current: AliasMoved | None = None
    history: list[AliasMoved] = field(default_factory=list)  # its moves, oldest first
    skipped: list[SkippedObject] = field(default_factory=list)
    broken: str | None = None

    @property
    def version(self) -> str | None:
        return self.current.version if self.current else None

    def rolled_back_from(self) -> set[str]:
        return {a.rolled_back_from for e in self.history if (a := authority_of(e)).kind == "rollback" and a.rolled_back_from}

    def rollback_candidates(self) -> list[str]:
        """Where a rollback may go, best first: versions the alias pointed at before its current
        entry, newest first, leaving out the current one and any version a rollback left."""
        if self.current is None:
            return []
        left = self.rolled_back_from() | {self.current.version}
        seen: list[str] = []
        for e in reversed(self.history[:-1]):
            if e.version not in left and e.version not in seen:
                seen.append(e.version)
        return seen

    def previous_version(self) -> str | None:
        """The version a rollback would go to (the newest candidate; it is validated then)."""
        candidates = self.rollback_candidates()
        return candidates[0] if candidates else None


def read_alias(store: ObjectStore, model: str, alias: str, committed: LocationState | VersionIndex | None = None) -> AliasState:
    """Read an alias's log. The alias is its newest move; if that move's version does not validate
    (not committed, retired, a file missing or of the wrong size, a bad manifest), the state says
    so in ``broken``: an alias never falls back to an older entry by itself."""
    location = layout.model_alias_prefix(model, alias)
    snapshot = CommitLog(store, location).read()
    state = AliasState(model, alias, position=snapshot.head, skipped=list(snapshot.skipped))
    for entry in snapshot.entries:
        uri = store.uri(layout.log_entry_key(location, entry.seq))
        if not isinstance(entry, AliasMoved):
            state.skipped.append(SkippedObject(uri, f"a {entry.op!r} entry in an alias log"))
        elif (entry.model, entry.alias) != (model, alias):
            state.skipped.append(SkippedObject(uri, f"names {entry.model}:{entry.alias} but sits under {model}:{alias}"))
        else:
            state.history.append(entry)
    for skipped in state.skipped:
        log.warning("alias %s:%s: skipping %s: %s", model, alias, skipped.uri, skipped.problem)
    state.current = state.history[-1] if state.history else None
    if state.current is not None:
        state.broken = _target_problem(store, model, state.current.version, committed)
        if state.broken:
            log.error("alias %s:%s is broken: entry %d points at %s: %s", model, alias, state.current.seq, state.current.version, state.broken)
    return state


def _target_problem(store: ObjectStore, model: str, version: str, committed: LocationState | VersionIndex | None) -> str | None:
    if isinstance(committed, LocationState):
        if committed.find(version) is not None:
            return None
        if version in committed.removed:
            return f"version {version} was retired ({committed.removed[version]})"
        problems = [s.problem for s in committed.skipped if f"v={version}" in s.uri]
        return problems[0] if problems else f"version {version} is not a committed {model} version"
    index = committed or VersionIndex(store, layout.model_versions_prefix(model), ModelManifest)
    try:
        index.get(version)
        return None
    except ManifestError as e:
        return str(e)


def resolve_alias(store: ObjectStore, model: str, alias: str) -> AliasMoved | None:
    """The entry the alias resolves to, ``None`` if nothing was ever published; raises
    :class:`AliasBroken` if its target does not validate."""
    state = read_alias(store, model, alias)
    if state.broken:
        raise AliasBroken(f"{model}:{alias} is broken: its entry {state.current.seq} points at version {state.version}, which does "
                          f"not validate: {state.broken}. Nothing falls back to an older version by itself: roll it back "
                          f"(`twocluster alias rollback {model} {alias} --reason ...`) or publish a new version")
    return state.current


def require_alias(store: ObjectStore, model: str, alias: str) -> AliasMoved:
    record = resolve_alias(store, model, alias)
    if record is None:
        raise RegistryError(
            f"nothing is published as {model}:{alias} in {store.uri(layout.model_alias_prefix(model, alias))}; "
            "train and publish a model first"
        )
    return record


# -- moving an alias -----------------------------------------------------------------------------


def move_alias(store: ObjectStore, model: str, alias: str, version: str, *, expected: AliasState, who: str, reason: str = "",
               run_id: str = "", decision: dict[str, Any] | None = None, override: bool = False,
               rollback: bool = False) -> AliasMoved:
    """Point ``alias`` at a committed ``version`` if, and only if, nobody moved it since
    ``expected`` was read (compare-and-set on the alias log), and only on an authority:

    * by default the version's gate standing for this alias must be a pass or a person's approval
      (:func:`gate_standing`); otherwise :class:`GateNotPassed` names the decision;
    * ``rollback``: the version served under this alias before (it is in ``expected.history``);
    * ``override``: anything committed, with a ``reason``; recorded as an override.

    A retired (tombstoned) version is never a target. Raises :class:`AliasConflict` if the alias
    moved (read again and decide again), :class:`RegistryError` otherwise."""
    layout.check_name(alias, "alias")
    try:
        read_model_manifest(store, model, version)
    except ManifestError as e:
        raise RegistryError(f"cannot point {model}:{alias} at {version}: {e}") from None
    if not who:
        raise RegistryError(f"moving {model}:{alias} needs a 'who' for its history")
    if override:
        if not reason.strip():
            raise RegistryError(f"overriding the gate for {model}:{alias} needs a reason")
        authority = MoveAuthority(kind="override", who=who)
    elif rollback:
        if version not in {e.version for e in expected.history}:
            raise RegistryError(f"cannot roll {model}:{alias} back to {version}: it never served under {alias!r}")
        authority = MoveAuthority(kind="rollback", who=who, rolled_back_from=expected.version)
    else:
        standing = gate_standing(store, model, version, alias)
        if standing is None or standing.outcome not in MAY_SERVE:
            raise GateNotPassed(f"refusing to point {model}:{alias} at {version}: {describe_standing(standing, model, version, alias)}. "
                                "An operator may bypass the gate with --override-gate --reason TEXT (recorded as an override)")
        authority = MoveAuthority(kind="approval" if standing.outcome == "approved" else "gate", who=who, gate_entry=standing.seq)
    entry = AliasMoved(seq=expected.position + 1, model=model, alias=alias, version=version, previous_version=expected.version,
                       reason=reason, decision={**(decision or {}), "authority": authority.model_dump(exclude_none=True)},
                       run_id=run_id)
    if not CommitLog(store, layout.model_alias_prefix(model, alias)).append_at(expected.position + 1, entry):
        raise AliasConflict(f"{model}:{alias} moved after it was read at position {expected.position}")
    # GC may have retired the version between the check above and the write: it re-checks the
    # aliases after its tombstone, and this side re-checks the tombstone after its move, so one of
    # the two always sees the other (see twocluster.store.gc).
    try:
        read_model_manifest(store, model, version)
    except ManifestError as e:
        _undo_move(store, model, alias, entry, who, str(e))
        raise RegistryError(f"{model}:{alias}: {version} was retired while the alias moved to it ({e}); the move was undone") from None
    log.info("%s:%s -> %s (entry %d, %s by %s): %s", model, alias, version, entry.seq, authority.kind, who, reason)
    return entry


def _undo_move(store: ObjectStore, model: str, alias: str, entry: AliasMoved, who: str, problem: str) -> None:
    if entry.previous_version is None:
        log.error("%s:%s points at a retired version %s and had no version before it: %s", model, alias, entry.version, problem)
        return
    undo = AliasMoved(seq=entry.seq + 1, model=model, alias=alias, version=entry.previous_version, previous_version=entry.version,
                      reason=f"undone: {entry.version} was retired by gc while the alias moved to it",
                      decision={"authority": MoveAuthority(kind="rollback", who=who, rolled_back_from=entry.version).model_dump(exclude_none=True)},
                      run_id=entry.run_id)
    if not CommitLog(store, layout.model_alias_prefix(model, alias)).append_at(entry.seq + 1, undo):
        log.error("%s:%s moved again before the move to retired %s could be undone; see `twocluster alias history`", model, alias, entry.version)


def record_gate_decision(store: ObjectStore, model: str, version: str, alias: str, outcome: GateOutcome, reason: str, *,
                         numbers: dict[str, Any] | None = None, run_id: str = "", decided_by: str = "") -> GateDecided:
    """Append a decision (the gate's, or a person's approval or rejection) to the model's gate log."""
    layout.check_version(version), layout.check_name(alias, "alias")
    return CommitLog(store, layout.model_gate_prefix(model)).append(lambda seq: GateDecided(
        seq=seq, model=model, alias=alias, version=version, outcome=outcome, reason=reason, numbers=numbers or {},
        run_id=run_id, decided_by=decided_by))


APPROVAL_OPTIONS = ("publish", "staging", "reject")
STAGING_ALIAS = "staging"


def decide_approval(store: ObjectStore, model: str, version: str, alias: str, option: str, *, who: str, comment: str,
                    run_id: str = "") -> dict[str, Any]:
    """Record a person's answer to a version the gate left waiting (``needs_approval``) and act
    on it: ``publish`` moves ``alias``, ``staging`` moves only the ``staging`` alias, ``reject``
    moves nothing. Answering again returns the recorded answer (a retried approval task)."""
    if option not in APPROVAL_OPTIONS:
        raise RegistryError(f"approval option {option!r} is not one of {APPROVAL_OPTIONS}")
    if not who:
        raise RegistryError("an approval needs a 'who' for the record")
    standing = gate_standing(store, model, version, alias)
    if standing is not None and standing.decided_by and standing.outcome in ("approved", "rejected"):
        return {"outcome": standing.outcome, "gate_entry": standing.seq, "alias_moved": None, "already_decided": True,
                "decided_by": standing.decided_by}
    if standing is None or standing.outcome != "needs_approval":
        raise RegistryError(f"{model} version {version} is not waiting for approval for {alias!r}: "
                            f"{describe_standing(standing, model, version, alias)}")
    comment = comment.strip() or "(no comment)"
    numbers = {"option": option, "needs_approval_entry": standing.seq}
    if option == "reject":
        entry = record_gate_decision(store, model, version, alias, "rejected", comment, numbers=numbers, run_id=run_id, decided_by=who)
        return {"outcome": "rejected", "gate_entry": entry.seq, "alias_moved": None}
    target = alias if option == "publish" else STAGING_ALIAS
    if option == "staging" and target != alias:
        record_gate_decision(store, model, version, alias, "rejected", f"published to {STAGING_ALIAS} only: {comment}",
                             numbers=numbers, run_id=run_id, decided_by=who)
    entry = record_gate_decision(store, model, version, target, "approved", comment, numbers=numbers, run_id=run_id, decided_by=who)
    for _ in range(10):
        state = read_alias(store, model, target)
        if state.version == version and not state.broken:
            break
        try:
            move_alias(store, model, target, version, expected=state, who=who, reason=f"approved: {comment}", run_id=run_id,
                       decision={"gate_entry": entry.seq, **standing.numbers})
            break
        except AliasConflict:
            continue
    else:
        raise RegistryError(f"{model}:{target} kept moving while applying the approval of {version}")
    return {"outcome": "approved", "gate_entry": entry.seq, "alias_moved": target}


def model_names(store: ObjectStore) -> list[str]:
    """The models in the store (folders under ``models/`` that are valid names)."""
    names = []
    for folder in store.list_folders("models"):
        try:
            names.append(layout.check_name(folder, "model"))
        except layout.LayoutError:
            continue
    return names


def find_version_of_run(store: ObjectStore, model: str, run_id: str, input_fingerprint: str | None = None) -> CommittedVersion | None:
    """The committed model version a training run produced, if any (newest first); with
    ``input_fingerprint``, only one trained from those inputs (a run's identity is its inputs: a
    version the same run id trained from other datasets or code is not this run's result)."""
    for committed in reversed(model_versions(store, model).versions):
        lineage = committed.manifest.lineage
        if lineage.run_id == run_id and (input_fingerprint is None or lineage.input_fingerprint == input_fingerprint):
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
