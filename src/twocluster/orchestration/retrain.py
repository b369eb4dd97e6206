"""When to train a new model, and on which datasets: the retrain policy.

A daily pipeline must not train a model per day (a 30-day backfill would train 30). A new model
is trained for a date when one of these holds, checked in this order:

1. the run forces it (``retrain=force``), or forbids it (``retrain=never``);
2. nothing is published yet under the alias, and the window's datasets hold
   >= ``retrain.min_new_examples`` accepted examples (until then the run only preprocesses:
   there is no model to score with);
3. the champion was trained on data up to date C, the run's date D is later than C, and
   * D - C >= ``retrain.every_days`` (the cadence), or
   * the committed datasets for the dates in (C, D] hold >= ``retrain.min_new_examples``
     accepted examples (enough new data).

A date at or before C (a backfill of history the champion has already seen) never retrains.
Everything is read from manifests and alias records in the store, so the decision is the same
whoever makes it, and a rerun of the same date makes the same decision.

The training set for date D is the newest committed dataset version of every date in
(D - ``retrain.window_days``, D].
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from twocluster.spec import PipelineSpec
from twocluster.store import layout, registry
from twocluster.store.manifest import DatasetManifest, ModelManifest, resolve_latest
from twocluster.store.storage import ObjectStore

RetrainMode = Literal["auto", "force", "never"]

class RetrainDecision(BaseModel):
    """The retrain policy's answer for one date (the decide_retrain task's result, through XCom)."""

    retrain: bool
    reason: str
    date: str
    champion_version: str | None = None
    champion_data_through: str | None = None
    new_examples: int = 0
    # False while nothing is published and nothing is trained: there is no model to score with.
    can_score: bool = True
    training_datasets: list[str] = Field(default_factory=list)  # dataset manifest URIs


def committed_datasets(store: ObjectStore, pipeline: str, first: dt.date, last: dt.date) -> dict[str, DatasetManifest]:
    """The newest committed dataset version of each date in [first, last] that has one."""
    found: dict[str, DatasetManifest] = {}
    parent = layout.datasets_prefix(pipeline)
    for folder in store.list_folders(parent):
        day = layout.date_from_folder(folder)
        if day is not None and first <= day <= last:
            latest = resolve_latest(store, layout.dataset_date_prefix(pipeline, day), DatasetManifest)
            if latest is not None:
                found[day.isoformat()] = latest.manifest
    return dict(sorted(found.items()))


def dataset_manifest_uri(store: ObjectStore, pipeline: str, date: str, version: str) -> str:
    return store.uri(layout.manifest_key(layout.dataset_version_prefix(pipeline, date, version)))


def data_through(model_manifest: ModelManifest) -> str | None:
    """The newest data date a model was trained on (from the dataset manifest URIs in its lineage)."""
    dates = [dv[0] for uri in model_manifest.lineage.inputs if (dv := layout.dated_version(uri))]
    return max(dates) if dates else None


def decide_retrain(store: ObjectStore, spec: PipelineSpec, date: str | dt.date, mode: RetrainMode = "auto",
                   alias: str | None = None) -> RetrainDecision:
    day = dt.date.fromisoformat(layout.check_date(date))
    alias = alias or spec.scoring.alias
    policy = spec.retrain
    window = committed_datasets(store, spec.name, day - dt.timedelta(days=policy.window_days - 1), day)
    training = [dataset_manifest_uri(store, spec.name, d, m.version) for d, m in window.items()]

    def decide(retrain: bool, reason: str, **kw) -> RetrainDecision:
        return RetrainDecision(retrain=retrain, reason=reason, date=day.isoformat(), training_datasets=training if retrain else [], **kw)

    if mode == "never":
        return decide(False, "retraining is disabled for this run (retrain=never)")
    champion = registry.resolve_alias(store, spec.model.name, alias)
    if mode == "force":
        return decide(True, "forced by the run's parameters (retrain=force)",
                      champion_version=champion.version if champion else None)
    if champion is None:
        # The first model waits for as much data as a retrain needs: a model trained on a day or
        # two of data would only fail the gate.
        available = sum(m.counts.accepted for m in window.values())
        if available < policy.min_new_examples:
            return decide(False, f"nothing is published as {spec.model.name}:{alias} yet, and the first model waits for "
                                 f"{policy.min_new_examples} accepted examples (committed so far: {available})",
                          new_examples=available, can_score=False)
        return decide(True, f"nothing is published as {spec.model.name}:{alias} yet; {available} accepted examples "
                            f"are committed (retrain.min_new_examples={policy.min_new_examples})", new_examples=available)

    manifest = registry.read_model_manifest(store, spec.model.name, champion.version)
    through = data_through(manifest)
    known = {"champion_version": champion.version, "champion_data_through": through}
    if through is None:
        return decide(True, f"the champion {champion.version} records no dated training data", **known)
    through_day = dt.date.fromisoformat(through)
    if day <= through_day:
        return decide(False, f"the champion {champion.version} was trained on data through {through}, which covers {day}", **known)

    newer = committed_datasets(store, spec.name, through_day + dt.timedelta(days=1), day)
    new_examples = sum(m.counts.accepted for m in newer.values())
    known["new_examples"] = new_examples
    age = (day - through_day).days
    if age >= policy.every_days:
        return decide(True, f"the champion's data is {age} days old (retrain.every_days={policy.every_days})", **known)
    if new_examples >= policy.min_new_examples:
        return decide(True, f"{new_examples} new accepted examples since {through} "
                            f"(retrain.min_new_examples={policy.min_new_examples})", **known)
    return decide(False, f"the champion's data is {age} day(s) old (< {policy.every_days}) and only {new_examples} new "
                         f"examples arrived since {through} (< {policy.min_new_examples})", **known)
