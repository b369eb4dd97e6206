"""Clock-free ordering of commits: one append-only, create-only log per output location.

Modelled on Delta Lake's transaction log (PROTOCOL.md in delta-io/delta): every change to an
output location is a JSON entry whose object name is its sequence number,

    <location>/_log/00000000000000000001.json
    <location>/_log/00000000000000000002.json
    ...

and a writer claims the next number with a *create-only* write (S3 ``If-None-Match: *``, a local
hard link). Two writers racing for one number cannot both win; the loser re-reads the log and
tries the next number (a commit), or gives up and re-decides (a compare-and-set, e.g. an alias
move, :meth:`CommitLog.append_at`). Nothing here reads a clock to decide an order: "latest" is the
highest-numbered entry that validates. ``written_at`` in an entry is for people only.

An entry that cannot be read (not JSON, fails its schema, or claims another sequence number than
its name) still occupies its number, so appenders go past it, and readers skip it with a reason
(:class:`SkippedObject`) that ``twocluster status`` reports.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from twocluster.store import layout
from twocluster.store.storage import ObjectNotFound, ObjectStore, StorageError

log = logging.getLogger(__name__)

MAX_APPEND_ATTEMPTS = 1000


class CommitLogError(RuntimeError):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _commit_id() -> str:
    return uuid.uuid4().hex


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=1)
    # Random per entry: makes every writer's bytes unique, so a create-only write that comes back
    # "exists" can be told apart from the writer's own earlier attempt by comparing bytes.
    commit_id: str = Field(default_factory=_commit_id, pattern=r"^[0-9a-f]{32}$")
    written_at: dt.datetime = Field(default_factory=_now, description="informational; never used to order")
    run_id: str = ""


class VersionCommitted(_Entry):
    """A version folder became visible: its manifest, with the manifest's checksum (so an edited or
    swapped manifest does not validate)."""

    op: Literal["commit"] = "commit"
    version: str = Field(pattern=layout.VERSION_PATTERN)
    manifest_checksum: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    # The manifest's exact text, as Delta Lake's log carries each commit's actions: a reader
    # learns what was committed from the log alone (one read per location, not two) and checks
    # the manifest object against it by size in the listing it makes anyway; readers that use the
    # data compare the object's checksum too. Entries written before this field lack it.
    manifest: str | None = None


class VersionRemoved(_Entry):
    """A committed version was retired (garbage collection); written before its files go."""

    op: Literal["remove"] = "remove"
    version: str = Field(pattern=layout.VERSION_PATTERN)
    reason: str


class AliasMoved(_Entry):
    """An alias now points at a model version (the gate, or an operator's ``alias set``/``rollback``)."""

    op: Literal["alias"] = "alias"
    model: str
    alias: str
    version: str = Field(pattern=layout.VERSION_PATTERN)
    previous_version: str | None = None
    reason: str = ""
    decision: dict[str, Any] = Field(default_factory=dict, description="the gate's numbers, for the record")


# passed: the automatic gate let the version through for the alias (written before the move);
# needs_approval: it passed the checks but the spec's approval policy wants a person;
# approved / rejected: a person's answer (``decided_by``); refused: the automatic gate said no.
# published / already_published: what the gate wrote after moving, before "passed" existed.
GateOutcome = Literal["passed", "needs_approval", "approved", "rejected", "refused", "published", "already_published"]


class GateDecided(_Entry):
    """A decision on a model version for an alias (``models/<model>/gate/_log``): the gate's,
    whatever it was, and a person's approval or rejection. An alias may only move to a version
    whose newest decision for that alias is a pass or an approval (the registry checks)."""

    op: Literal["gate"] = "gate"
    model: str
    alias: str
    version: str = Field(pattern=layout.VERSION_PATTERN)
    outcome: GateOutcome
    reason: str
    numbers: dict[str, Any] = Field(default_factory=dict)
    decided_by: str = ""


LogEntry = Annotated[VersionCommitted | VersionRemoved | AliasMoved | GateDecided, Field(discriminator="op")]
_ENTRY = TypeAdapter(LogEntry)


@dataclass(frozen=True)
class SkippedObject:
    """Something a reader ignored, and why (reported, never silently dropped)."""

    uri: str
    problem: str


@dataclass
class LogSnapshot:
    """What a log held when it was read: entries in commit order, the entries that could not be
    read, and ``head``, the highest sequence number taken (readable or not). ``checkpoint``: the
    checkpoint the read started from (0: none), ``reads``: the objects it read."""

    location: str
    entries: list[LogEntry] = field(default_factory=list)
    skipped: list[SkippedObject] = field(default_factory=list)
    head: int = 0
    checkpoint: int = 0
    reads: int = 0
    transient: int = 0  # entries that could not be read for a passing reason (not recorded in a checkpoint)
    entry_problems: dict[int, SkippedObject] = field(default_factory=dict)  # numbered entries skipped, by number

    def newest_first(self) -> Iterator[LogEntry]:
        return reversed(self.entries)


class _SkippedRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq: int
    uri: str
    problem: str


class Checkpoint(BaseModel):
    """A log's entries 1..``seq`` in one object (Delta Lake's checkpoint): what a reader would
    get by reading every entry, written by the appender of every ``CHECKPOINT_INTERVAL``-th entry."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=1, le=layout.MAX_LOG_SEQ)
    entries: list[LogEntry]
    skipped: list[_SkippedRecord] = Field(default_factory=list)


_CHECKPOINT = TypeAdapter(Checkpoint)
CHECKPOINT_INTERVAL = 10  # Delta Lake's default checkpointInterval


@dataclass
class _LogListing:
    """A ``_log/`` folder's names, sorted out: entries and checkpoints by number, and names that
    try to be entries but are not."""

    entries: dict[int, str] = field(default_factory=dict)
    checkpoints: dict[int, str] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)

    def contiguous_end(self, start: int) -> int:
        """The last number of the unbroken run of entries from ``start`` (``start - 1``: none)."""
        end = start - 1
        while end + 1 in self.entries:
            end += 1
        return end


class CommitLog:
    """The commit log of one output location (a folder of versions, or an alias).

    The log is the unbroken run of entries from 1: an entry number is only ever claimed right
    after the one before it, so an object beyond a gap (a stray ``99999999999999999999.json``, a
    name of the wrong length) is not part of the log. It is reported and never decides where the
    next entry goes. Every ``CHECKPOINT_INTERVAL`` entries the appender also writes a checkpoint
    of the entries so far and a ``_last_checkpoint`` hint, so a reader reads a constant number of
    objects however long the log grows: the hint, one listing from the checkpoint on, the
    checkpoint, and the entries after it.
    """

    def __init__(self, store: ObjectStore, location: str):
        self.store = store
        self.location = location.rstrip("/")

    def __repr__(self) -> str:
        return f"CommitLog({self.store.uri(layout.log_prefix(self.location))!r})"

    # -- listing -----------------------------------------------------------------------------

    def _list(self, from_seq: int = 0) -> _LogListing:
        """The log's names from entry ``from_seq`` (its checkpoint included) on; all with 0."""
        prefix = layout.log_prefix(self.location)
        after = layout.log_entry_key(self.location, from_seq - 1) if from_seq > 1 else ""
        found = _LogListing()
        for obj in self.store.list(prefix, recursive=False, start_after=after):
            name = obj.key.rsplit("/", 1)[-1]
            if (seq := layout.log_seq_from_name(name)) is not None:
                found.entries[seq] = obj.key
            elif (seq := layout.log_checkpoint_seq_from_name(name)) is not None:
                found.checkpoints[seq] = obj.key
            elif layout.looks_like_log_entry(name):
                found.invalid.append(obj.key)
        return found

    def _hint(self) -> int:
        """The ``_last_checkpoint`` hint (0 when missing or unreadable: then the whole log is listed)."""
        try:
            raw = json.loads(self.store.read_bytes(layout.last_checkpoint_key(self.location)))
            seq = raw["seq"] if isinstance(raw, dict) else None
            return seq if isinstance(seq, int) and 1 <= seq <= layout.MAX_LOG_SEQ else 0
        except ObjectNotFound:
            return 0
        except (StorageError, ValueError, UnicodeDecodeError) as e:
            log.warning("%s: ignoring its checkpoint hint: %s", self, _describe(e))
            return 0

    def _locate(self) -> tuple[_LogListing, int, int]:
        """(listing, first entry number it covers, head): from the hint's checkpoint when the hint
        points at a checkpoint whose entry is there, else the whole log."""
        hint = self._hint()
        if hint:
            listing = self._list(hint)
            if hint in listing.checkpoints and hint in listing.entries:
                return listing, hint, listing.contiguous_end(hint)
            log.warning("%s: checkpoint hint %d has no checkpoint or entry; reading the whole log", self, hint)
        listing = self._list()
        return listing, 1, listing.contiguous_end(1)

    def head(self) -> int:
        """The highest sequence number taken, 0 for an empty log (a hint read and one listing)."""
        return self._locate()[2]

    # -- reading -----------------------------------------------------------------------------

    def read(self) -> LogSnapshot:
        """Every entry, oldest first; unreadable ones are skipped with a warning naming them."""
        listing, first, head = self._locate()
        snapshot = LogSnapshot(self.location, head=head, reads=1)
        base = self._read_checkpoint(listing, first, head, snapshot)
        if base is None and first > 1:  # no usable checkpoint from the hint on: read from the start
            listing = self._list()
            head = snapshot.head = listing.contiguous_end(1)
            base = self._read_checkpoint(listing, 1, min(head, first - 1), snapshot)  # those from the hint on failed
        if base is not None:
            snapshot.checkpoint = base.seq
            snapshot.entries = list(base.entries)
            snapshot.entry_problems = {s.seq: SkippedObject(s.uri, s.problem) for s in base.skipped}
            snapshot.skipped[:0] = snapshot.entry_problems.values()
        for seq in range(snapshot.checkpoint + 1, head + 1):
            snapshot.reads += 1
            entry = self._read_entry(seq, listing.entries[seq], snapshot)
            if entry is not None:
                snapshot.entries.append(entry)
        for seq in sorted(n for n in listing.entries if n > head + 1):
            self._skip(snapshot, listing.entries[seq], f"beyond a gap in the log (entry {head + 1} is missing), so not part of it")
        for key in listing.invalid:
            self._skip(snapshot, key, f"not a log entry name: numbers run from 1 to {layout.MAX_LOG_SEQ} in {layout.LOG_SEQ_DIGITS} digits")
        return snapshot

    def _skip(self, snapshot: LogSnapshot, key: str, problem: str, seq: int | None = None) -> None:
        uri = self.store.uri(key)
        log.warning("skipping %s: %s", uri, problem)
        skipped = SkippedObject(uri, problem)
        snapshot.skipped.append(skipped)
        if seq is not None:
            snapshot.entry_problems[seq] = skipped

    def _read_checkpoint(self, listing: _LogListing, first: int, head: int, snapshot: LogSnapshot) -> Checkpoint | None:
        """The newest checkpoint within the unbroken run that reads and validates, or None."""
        for seq in sorted((n for n in listing.checkpoints if first <= n <= head), reverse=True):
            key = listing.checkpoints[seq]
            snapshot.reads += 1
            try:
                checkpoint = _CHECKPOINT.validate_json(self.store.read_bytes(key))
            except (ValidationError, StorageError) as e:
                self._skip(snapshot, key, f"unreadable checkpoint: {_describe(e)}")
                continue
            if checkpoint.seq != seq or any(e.seq > seq for e in checkpoint.entries):
                self._skip(snapshot, key, f"checkpoint claims seq {checkpoint.seq} but is stored as {seq}")
                continue
            return checkpoint
        return None

    def _read_entry(self, seq: int, key: str, snapshot: LogSnapshot) -> LogEntry | None:
        try:
            entry = _ENTRY.validate_json(self.store.read_bytes(key))
        except ObjectNotFound:
            snapshot.transient += 1
            return None
        except StorageError as e:
            snapshot.transient += 1
            self._skip(snapshot, key, f"unreadable log entry: {_describe(e)}")
            return None
        except ValidationError as e:
            self._skip(snapshot, key, f"unreadable log entry: {_describe(e)}", seq)
            return None
        if entry.seq != seq:
            self._skip(snapshot, key, f"log entry claims seq {entry.seq} but is stored as {seq}", seq)
            return None
        return entry

    # -- appending ---------------------------------------------------------------------------

    def append_at(self, seq: int, entry: LogEntry) -> bool:
        """Compare-and-set: write ``entry`` as number ``seq`` only if nobody has; ``True`` if this
        call did. The caller read the log at ``seq - 1`` and decided on that state; ``False`` means
        someone else moved first and the decision must be made again."""
        if seq > layout.MAX_LOG_SEQ:
            raise CommitLogError(f"{self}: entry {seq} is past the largest number a log entry's name holds ({layout.MAX_LOG_SEQ})")
        entry = entry.model_copy(update={"seq": seq})
        data = entry.model_dump_json(indent=2).encode()
        key = layout.log_entry_key(self.location, seq)
        if not self.store.put_if_absent(key, data):
            return False
        # Read back: only an object holding exactly our bytes is our commit.
        if self.store.read_bytes(key) != data:
            raise CommitLogError(f"{self.store.uri(key)}: read back different bytes after a create-only write")
        if seq % CHECKPOINT_INTERVAL == 0:
            self.write_checkpoint(seq)
        return True

    def append(self, make_entry: Callable[[int], LogEntry]) -> LogEntry:
        """Append at the next free number, retrying past numbers other writers claim meanwhile
        (a commit does not depend on what came before it). Returns the entry as written."""
        seq = self.head() + 1
        for _ in range(MAX_APPEND_ATTEMPTS):
            entry = make_entry(seq)
            if self.append_at(seq, entry):
                return entry.model_copy(update={"seq": seq})
            seq = max(seq + 1, self.head() + 1)
        raise CommitLogError(f"{self}: gave up after {MAX_APPEND_ATTEMPTS} conflicting appends")

    def write_checkpoint(self, seq: int) -> bool:
        """Write the checkpoint of entries 1..``seq`` (create-only; its content is fixed by the
        entries, which never change) and move the hint to it. Best effort: a reader without it
        reads more objects, never other entries. ``False`` when not written."""
        try:
            snapshot = self.read()
            if snapshot.head < seq or snapshot.transient:
                return False
            entries = [e for e in snapshot.entries if e.seq <= seq]
            skipped = [_SkippedRecord(seq=n, uri=s.uri, problem=s.problem) for n, s in sorted(snapshot.entry_problems.items()) if n <= seq]
            data = Checkpoint(seq=seq, entries=entries, skipped=skipped).model_dump_json().encode()
            self.store.put_if_absent(layout.log_checkpoint_key(self.location, seq), data)
            if self._hint() < seq:
                self.store.write_bytes(layout.last_checkpoint_key(self.location), json.dumps({"seq": seq}).encode())
            return True
        except (StorageError, CommitLogError) as e:
            log.warning("%s: checkpoint %d not written: %s", self, seq, e)
            return False


def _describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in error.errors(include_url=False))[:500]
    return str(error)[:500]
