"""Garbage collection of the store: what no reader can reach and no writer is still writing.

Candidates, each with the reason it may go:

* version folders never committed (a killed or failed writer), and staging areas of task attempts;
* committed versions beyond the newest ``keep_versions`` of a date or model, unless referenced;
  they are first retired with a ``remove`` entry in their commit log, then deleted;
* stray files inside committed version folders (not listed by the manifest);
* checkpoints and job specs of training runs that committed their model version;
* heartbeats of writers that stopped beating.

Never deleted: anything younger than the grace period or whose writer's heartbeat is live; a model
version any alias points or pointed at; a dataset version in the lineage of such a model; the newest
``keep_versions`` valid versions of every location; versions whose commit entry does not validate
(they are reported by ``twocluster status`` for a person to look at). Ages come from the store's
own clock (object modification times, against a probe object written now), not from the host
running GC.

:func:`plan_gc` only reads (and writes the clock probe); :func:`apply_gc` deletes what a plan lists.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import asdict, dataclass, field

from twocluster.store import layout, registry
from twocluster.store.commitlog import CommitLog, VersionCommitted, VersionRemoved
from twocluster.store.manifest import scan_location, standing
from twocluster.store.storage import ObjectStore

log = logging.getLogger(__name__)



@dataclass
class Deletion:
    prefix: str  # a folder (everything under it goes) or one object key
    what: str
    reason: str
    objects: int = 0
    bytes: int = 0
    retire: tuple[str, str] | None = None  # (location, version): append a remove entry first
    unless_committed: tuple[str, str] | None = None  # (location, version): re-checked right before deleting


@dataclass
class GcPlan:
    store_uri: str
    grace_hours: float
    keep_versions: int
    deletions: list[Deletion] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)  # notable things left alone, and why
    left_alone: list[dict] = field(default_factory=list)  # planned, but no longer deletable when applied

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.deletions)

    def as_dict(self) -> dict:
        return {"store": self.store_uri, "grace_hours": self.grace_hours, "keep_versions": self.keep_versions,
                "bytes": self.bytes, "deletions": [asdict(d) for d in self.deletions], "kept": self.kept,
                "left_alone": self.left_alone}


def store_now_ns(store: ObjectStore) -> int:
    """The store's clock: the modification time of a probe object written now."""
    key = f"_gc/clock-{uuid.uuid4().hex}"
    store.write_bytes(key, b"")
    try:
        return next(o.mtime_ns for o in store.list("_gc", recursive=False) if o.key == key)
    finally:
        store.delete(key)


class _Planner:
    def __init__(self, store: ObjectStore, keep_versions: int, grace: dt.timedelta):
        self.store = store
        self.keep_versions = keep_versions
        self.now_ns = store_now_ns(store)
        self.grace_ns = int(grace.total_seconds() * 1e9)
        self.plan = GcPlan(store.root_uri, grace.total_seconds() / 3600, keep_versions)

    def young(self, objects) -> bool:
        return any(o.mtime_ns is not None and self.now_ns - o.mtime_ns < self.grace_ns for o in objects)

    def delete(self, prefix: str, objects, what: str, reason: str, retire: tuple[str, str] | None = None,
               unless_committed: tuple[str, str] | None = None) -> None:
        if not objects and retire is None:
            return
        self.plan.deletions.append(Deletion(prefix, what, reason, len(objects), sum(o.size for o in objects), retire, unless_committed))

    def keep(self, uri: str, reason: str) -> None:
        self.plan.kept.append({"uri": uri, "reason": reason})

    def live_writers(self, location: str) -> set[str]:
        """Versions whose writer's heartbeat is younger than the grace period; stale heartbeats go."""
        live = set()
        for marker in self.store.list(f"{location}/{layout.INFLIGHT_FOLDER}", recursive=False):
            version = marker.key.rsplit("/", 1)[-1].removesuffix(".json")
            if self.young([marker]):
                live.add(version)
            else:
                self.delete(marker.key, [marker], "heartbeat", "the writer stopped beating longer ago than the grace period")
        return live

    def location(self, location: str, protected: set[str], what: str) -> list:
        """Plan one location (a dataset or predictions date, or a model's versions)."""
        state = scan_location(self.store, location)
        entries = CommitLog(self.store, location).read().entries
        in_log = {e.version for e in entries if isinstance(e, VersionCommitted)}
        removed = {v for v, e in standing(entries).items() if isinstance(e, VersionRemoved)}
        live = self.live_writers(location)
        valid = [v.version for v in state.versions]
        keep_newest = set(valid[-self.keep_versions:])

        for folder in self.store.list_folders(location):
            version = layout.version_from_folder(folder)
            if version is None:
                continue
            prefix = f"{location}/{folder}"
            objects = self.store.list(prefix)
            if version in removed:
                self.delete(prefix, objects, what, "retired by an earlier gc (files left behind)")
            elif version not in in_log:
                if version in live:
                    self.keep(self.store.uri(prefix), "uncommitted, but its writer's heartbeat is live")
                elif self.young(objects):
                    self.keep(self.store.uri(prefix), "uncommitted, younger than the grace period")
                else:
                    self.delete(prefix, objects, what, "never committed: an abandoned write", unless_committed=(location, version))
            elif version not in valid:
                self.keep(self.store.uri(prefix), "its commit does not validate (see twocluster status); left for a person")
            elif version in keep_newest:
                committed = state.find(version)
                listed = {f.path for f in committed.manifest.files} | {layout.MANIFEST_NAME}
                strays = [o for o in objects if o.key[len(prefix) + 1:] not in listed]
                for stray in strays:
                    if not self.young([stray]):
                        self.delete(stray.key, [stray], f"{what} stray file", "inside a committed version but not in its manifest")
            elif version in protected:
                self.keep(self.store.uri(prefix), "referenced by a published model or an alias")
            else:
                self.delete(prefix, objects, what, f"older than the newest {self.keep_versions} committed versions",
                            retire=(location, version))

        for folder in self.store.list_folders(f"{location}/{layout.STAGING_FOLDER}"):
            version = layout.version_from_folder(folder)
            prefix = f"{location}/{layout.STAGING_FOLDER}/{folder}"
            objects = self.store.list(prefix)
            if version in live or self.young(objects):
                self.keep(self.store.uri(prefix), "staging area of a writer that may still be running")
            else:
                self.delete(prefix, objects, f"{what} staging", "task attempts' files of a finished or abandoned write")
        return state.versions


def plan_gc(store: ObjectStore, *, keep_versions: int = 3, grace: dt.timedelta = dt.timedelta(hours=24)) -> GcPlan:
    planner = _Planner(store, keep_versions, grace)
    protected_datasets: set[tuple[str, str]] = set()  # (date, version)

    for model in registry.model_names(store):
        published = registry.published_versions(store, model)
        versions = planner.location(layout.model_versions_prefix(model), set(published), "model version")
        finished_runs = set()
        for committed in versions:
            finished_runs.add(layout.run_key(committed.manifest.lineage.run_id))
            if committed.version in published:
                protected_datasets |= {dv for uri in committed.manifest.lineage.inputs if (dv := layout.dated_version(uri))}
        for run in store.list_folders(layout.model_runs_prefix(model)):
            prefix = f"{layout.model_runs_prefix(model)}/{run}"
            objects = store.list(prefix)
            if run in finished_runs and not planner.young(objects):
                planner.delete(prefix, objects, "training checkpoints", "the run committed its model version")
        for job in store.list(layout.jobs_prefix(model), recursive=False):
            run = job.key.rsplit("/", 1)[-1].removesuffix(".json")
            if run in finished_runs and not planner.young([job]):
                planner.delete(job.key, [job], "training job spec", "the run committed its model version (a copy is in it)")

    for kind in ("datasets", "predictions"):
        for pipeline in store.list_folders(kind):
            for folder in store.list_folders(f"{kind}/{pipeline}"):
                if not folder.startswith("date="):
                    continue
                date = folder[len("date="):]
                location = f"{kind}/{pipeline}/{folder}"
                protected = {v for d, v in protected_datasets if d == date} if kind == "datasets" else set()
                planner.location(location, protected, kind.rstrip("s") if kind == "datasets" else kind)
    return planner.plan


def _protected(store: ObjectStore, location: str, version: str) -> str | None:
    """Why ``version`` of ``location`` must stay, read now: a model version an alias points or
    pointed at, or a dataset version such a model was trained on."""
    parts = location.split("/")
    if parts[0] == "models":
        model = parts[1]
        aliases = registry.published_versions(store, model).get(version)
        return f"alias {', '.join(aliases)} pointed at it" if aliases else None
    if parts[0] == "datasets":
        for model in registry.model_names(store):
            published = registry.published_versions(store, model)
            for committed in registry.model_versions(store, model).versions:
                if committed.version in published and any(
                        (dv := layout.dated_version(uri)) and dv[1] == version for uri in committed.manifest.lineage.inputs):
                    return f"the published {model} version {committed.version} was trained on it"
    return None


def apply_gc(store: ObjectStore, plan: GcPlan) -> int:
    """Delete what ``plan`` lists and what is still deletable now; returns the number of objects
    deleted. Everything the plan checked is checked again first (a fresh plan with the same
    settings: aliases and their histories, lineage, heartbeats, commits, ages), so what changed
    since the plan (an alias moved to a version, a writer came back) is left alone and reported in
    ``plan.left_alone``. A committed version is retired with a tombstone (a ``remove`` entry, which
    the registry refuses to point an alias at) and its protection read once more after it: an
    alias that moved to it in between makes gc restore it (commit it again) and keep its files."""
    fresh = plan_gc(store, keep_versions=plan.keep_versions, grace=dt.timedelta(hours=plan.grace_hours))
    still = {(d.prefix, d.retire) for d in fresh.deletions}
    deleted = 0
    for d in plan.deletions:
        if (d.prefix, d.retire) not in still:
            why = next((k["reason"] for k in fresh.kept if k["uri"] == store.uri(d.prefix)), "it is no longer in a fresh plan")
            _leave(store, plan, d, f"changed since the plan: {why}")
            continue
        if d.unless_committed is not None:
            location, version = d.unless_committed
            if any(isinstance(e, VersionCommitted) and e.version == version for e in CommitLog(store, location).read().entries):
                _leave(store, plan, d, "committed after the plan was made")
                continue
        if d.retire is not None:
            location, version = d.retire
            log_ = CommitLog(store, location)
            log_.append(lambda seq, v=version, r=d.reason: VersionRemoved(seq=seq, version=v, reason=f"gc: {r}", run_id="twocluster-gc"))
            if (why := _protected(store, location, version)) is not None:
                _restore(store, location, version)
                _leave(store, plan, d, f"{why} while gc retired it; restored")
                continue
        keys = [d.prefix] if store.exists(d.prefix) else [o.key for o in store.list(d.prefix)]
        for key in keys:
            store.delete(key)
            deleted += 1
        store.remove_empty_folders(d.prefix.rsplit("/", 1)[0] if len(keys) == 1 and keys[0] == d.prefix else d.prefix)
        log.info("gc: deleted %s (%s: %s)", store.uri(d.prefix), d.what, d.reason)
    return deleted


def _leave(store: ObjectStore, plan: GcPlan, d: Deletion, reason: str) -> None:
    log.warning("gc: left %s alone: %s", store.uri(d.prefix), reason)
    plan.left_alone.append({"uri": store.uri(d.prefix), "reason": reason})


def _restore(store: ObjectStore, location: str, version: str) -> None:
    """Commit a retired version again, with its original commit's manifest (its files are all
    still there: gc deletes only after the re-check)."""
    original = next(e for e in CommitLog(store, location).read().entries if isinstance(e, VersionCommitted) and e.version == version)
    CommitLog(store, location).append(lambda seq: original.model_copy(update={"seq": seq, "run_id": "twocluster-gc-restore",
                                                                               "commit_id": uuid.uuid4().hex}))
