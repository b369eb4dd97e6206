"""Is a date's raw folder complete? The completeness policy of a pipeline spec (``arrivals``),
as a pure decision over one listing, so the DAG's rescheduling sensor, the CLI and the tests share
it.

A source that can writes ``_ARRIVED.json`` after its last file (the marker); one that cannot is
judged by a quiet listing: nothing new or changed for ``quiet_minutes``, measured with the
store's clock (object modification times against a probe written now), never the worker's. The
deadline is a timeout on the worker's clock: it decides only when to stop waiting.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from twocluster.spec import PipelineSpec
from twocluster.store import layout
from twocluster.store.storage import ObjectStore


class ArrivalsIncomplete(RuntimeError):
    """The deadline passed with the date still incomplete, and the spec says fail."""


@dataclass(frozen=True)
class Arrived:
    """A date's raw folder as listed: its files (the marker aside) and whether the marker is there."""

    files: int
    bytes: int
    marker: bool
    newest_mtime_ns: int | None


def arrived(store: ObjectStore, pipeline: str, date: str | dt.date) -> Arrived:
    prefix = layout.raw_date_prefix(pipeline, date)
    objects = store.list(prefix)
    data = [o for o in objects if o.key != f"{prefix}/{layout.ARRIVED_MARKER}"]
    return Arrived(len(data), sum(o.size for o in data), len(data) < len(objects),
                   max((o.mtime_ns or 0 for o in data), default=None))


class ArrivalDecision(BaseModel):
    """Whether a date's raw folder may go in (the wait_for_arrivals sensor's result, through XCom)."""

    model_config = ConfigDict(frozen=True)

    proceed: bool
    complete: bool
    files: int
    bytes: int
    reason: str


def deadline_of(spec: PipelineSpec, date: str | dt.date) -> dt.datetime:
    day = dt.date.fromisoformat(layout.check_date(date))
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC) + dt.timedelta(hours=spec.arrivals.deadline_hours)


def decide(store: ObjectStore, spec: PipelineSpec, date: str | dt.date, now: dt.datetime | None = None,
           store_now_ns: int | None = None) -> ArrivalDecision:
    """Proceed (complete or, past the deadline, incomplete where allowed), wait, or raise
    :class:`ArrivalsIncomplete`. ``now`` (the worker's clock) is compared with the deadline only;
    ``store_now_ns`` (the store's clock, probed when the policy is ``quiet`` and not given) with
    object modification times."""
    policy = spec.arrivals
    prefix = layout.raw_date_prefix(spec.name, date)
    listed = arrived(store, spec.name, date)
    files, size = listed.files, listed.bytes
    if policy.completeness == "none":
        return ArrivalDecision(proceed=True, complete=True, files=files, bytes=size, reason="the spec does not wait for arrivals")
    if policy.completeness == "marker":
        if listed.marker:
            return ArrivalDecision(proceed=True, complete=True, files=files, bytes=size, reason=f"{layout.ARRIVED_MARKER} is there")
        waiting = f"no {layout.ARRIVED_MARKER} in {store.uri(prefix)} ({files} files so far)"
    else:
        if store_now_ns is None:
            from twocluster.store.gc import store_now_ns as probe

            store_now_ns = probe(store)
        newest = listed.newest_mtime_ns
        quiet_ns = int(policy.quiet_minutes * 60e9)
        if newest is not None and store_now_ns - newest >= quiet_ns:
            return ArrivalDecision(proceed=True, complete=True, files=files, bytes=size, reason=f"no change for {policy.quiet_minutes:g} minutes")
        waiting = (f"{store.uri(prefix)} is empty" if newest is None else
                   f"{store.uri(prefix)} changed {(store_now_ns - newest) / 60e9:.1f} minutes ago ({files} files); "
                   f"waiting for {policy.quiet_minutes:g} quiet minutes")
    now = now or dt.datetime.now(dt.UTC)
    deadline = deadline_of(spec, date)
    if now < deadline:
        return ArrivalDecision(proceed=False, complete=False, files=files, bytes=size, reason=f"{waiting}; deadline {deadline:%Y-%m-%d %H:%M} UTC")
    if policy.on_deadline == "commit_incomplete" and files:
        return ArrivalDecision(proceed=True, complete=False, files=files, bytes=size, reason=f"deadline {deadline:%Y-%m-%d %H:%M} UTC passed: {waiting}; "
                                                         "committing what arrived, marked incomplete")
    raise ArrivalsIncomplete(f"{spec.name} {layout.check_date(date)}: arrivals incomplete at the deadline "
                             f"({deadline:%Y-%m-%d %H:%M} UTC): {waiting}")
