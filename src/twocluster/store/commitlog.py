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


class GateDecided(_Entry):
    """A gate's decision on a model version, whatever it was (``models/<model>/gate/_log``): the
    record the monitoring page shows next to every version, refusals included."""

    op: Literal["gate"] = "gate"
    model: str
    alias: str
    version: str = Field(pattern=layout.VERSION_PATTERN)
    outcome: Literal["published", "already_published", "refused"]
    reason: str
    numbers: dict[str, Any] = Field(default_factory=dict)


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
    read, and ``head``, the highest sequence number taken (readable or not)."""

    location: str
    entries: list[LogEntry] = field(default_factory=list)
    skipped: list[SkippedObject] = field(default_factory=list)
    head: int = 0

    def newest_first(self) -> Iterator[LogEntry]:
        return reversed(self.entries)


class CommitLog:
    """The commit log of one output location (a folder of versions, or an alias)."""

    def __init__(self, store: ObjectStore, location: str):
        self.store = store
        self.location = location.rstrip("/")

    def __repr__(self) -> str:
        return f"CommitLog({self.store.uri(layout.log_prefix(self.location))!r})"

    def _numbers(self) -> list[tuple[int, str]]:
        prefix = layout.log_prefix(self.location)
        found = []
        for obj in self.store.list(prefix, recursive=False):
            seq = layout.log_seq_from_name(obj.key.rsplit("/", 1)[-1])
            if seq is not None:
                found.append((seq, obj.key))
        return sorted(found)

    def head(self) -> int:
        """The highest sequence number taken, 0 for an empty log (one listing, no reads)."""
        numbers = self._numbers()
        return numbers[-1][0] if numbers else 0

    def read(self) -> LogSnapshot:
        """Every entry, oldest first; unreadable ones are skipped with a warning naming them."""
        snapshot = LogSnapshot(self.location)
        for seq, key in self._numbers():
            snapshot.head = seq
            entry = self._read_entry(seq, key, snapshot.skipped)
            if entry is not None:
                snapshot.entries.append(entry)
        return snapshot

    def _read_entry(self, seq: int, key: str, skipped: list[SkippedObject]) -> LogEntry | None:
        uri = self.store.uri(key)
        try:
            entry = _ENTRY.validate_json(self.store.read_bytes(key))
        except ObjectNotFound:
            return None
        except (ValidationError, StorageError) as e:
            problem = _describe(e)
            log.warning("skipping commit log entry %s: %s", uri, problem)
            skipped.append(SkippedObject(uri, f"unreadable log entry: {problem}"))
            return None
        if entry.seq != seq:
            log.warning("skipping commit log entry %s: it says seq %d", uri, entry.seq)
            skipped.append(SkippedObject(uri, f"log entry claims seq {entry.seq} but is stored as {seq}"))
            return None
        return entry

    def append_at(self, seq: int, entry: LogEntry) -> bool:
        """Compare-and-set: write ``entry`` as number ``seq`` only if nobody has; ``True`` if this
        call did. The caller read the log at ``seq - 1`` and decided on that state; ``False`` means
        someone else moved first and the decision must be made again."""
        entry = entry.model_copy(update={"seq": seq})
        data = entry.model_dump_json(indent=2).encode()
        key = layout.log_entry_key(self.location, seq)
        if not self.store.put_if_absent(key, data):
            return False
        # Read back: only an object holding exactly our bytes is our commit.
        if self.store.read_bytes(key) != data:
            raise CommitLogError(f"{self.store.uri(key)}: read back different bytes after a create-only write")
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


def _describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in error.errors(include_url=False))[:500]
    return str(error)[:500]
