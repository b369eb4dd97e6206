"""`twocluster migrate`: bring a store written before commit logs existed to the log layout.

Before, a version was visible when its ``_MANIFEST.json`` existed, "latest" was the newest by the
manifest's ``created_at``, and aliases were folders of ``<time>-<version>.json`` records ordered by
``published_at``. Readers of the log layout refuse such a location with a message naming this
command rather than treating it as empty (which would retrain and reprocess everything).

Per location whose log is empty: each pre-log manifest is rewritten in the typed format (the
featurizer code of old data is unknown and recorded as such, so scoring under
``on_featurizer_change: error`` asks for a retrain on reprocessed data), then committed to the log
in the old order (by ``created_at``: the only order the old layout had, so "latest" does not change
by migrating). Manifests that do not convert are reported and left out. Alias records become alias
log entries in ``published_at`` order; the old record files stay where they are, unread. Locations
that already have a log are skipped: running it twice is a no-op. Dry run unless ``apply``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

from pydantic import ValidationError

from twocluster.store import layout
from twocluster.store.commitlog import AliasMoved, CommitLog, VersionCommitted
from twocluster.store.manifest import _MANIFEST, ManifestError
from twocluster.store.storage import ObjectStore, StorageError, checksum_bytes

log = logging.getLogger(__name__)

UNKNOWN_CODE = "sha256:" + "0" * 64


@dataclass
class MigrationReport:
    locations: list[dict] = field(default_factory=list)  # {location, versions: [..]}
    aliases: list[dict] = field(default_factory=list)  # {model, alias, versions: [..]}
    problems: list[dict] = field(default_factory=list)  # {uri, problem}


def convert_manifest(raw: dict) -> dict:
    """A pre-log manifest as a typed one (raises ValueError if it does not fit)."""
    out = dict(raw)
    out["format_version"] = 2
    feature_spec = dict(out.get("feature_spec") or {})
    feature_spec.setdefault("featurizer_code", UNKNOWN_CODE)
    if "label_vocabulary" in out:
        feature_spec.setdefault("label_vocabulary", out.pop("label_vocabulary"))
    out["feature_spec"] = feature_spec
    lineage = dict(out.get("lineage") or {})
    lineage.setdefault("code", {})
    out["lineage"] = lineage
    if out.get("kind") == "model":
        out["metrics"] = {k: v for k, v in (out.get("metrics") or {}).items()
                          if k in ("train_accuracy", "validation_accuracy", "test_accuracy", "test_loss", "test_examples", "training_seconds")}
    try:
        return json.loads(_MANIFEST.validate_python(out).model_dump_json(exclude_none=True))
    except ValidationError as e:
        raise ValueError(str(e).replace("\n", " ")[:400]) from None


def _locations(store: ObjectStore) -> list[str]:
    found = []
    for kind in ("datasets", "predictions"):
        for pipeline in store.list_folders(kind):
            found += [f"{kind}/{pipeline}/{d}" for d in store.list_folders(f"{kind}/{pipeline}") if d.startswith("date=")]
    found += [f"models/{m}/versions" for m in store.list_folders("models")]
    return found


def migrate(store: ObjectStore, apply: bool = False) -> MigrationReport:
    report = MigrationReport()
    for location in _locations(store):
        if CommitLog(store, location).head():
            continue
        legacy = []
        for folder in store.list_folders(location):
            version = layout.version_from_folder(folder)
            key = layout.manifest_key(f"{location}/{folder}")
            if version is None or not store.exists(key):
                continue
            try:
                raw = json.loads(store.read_bytes(key))
                if "format_version" in raw:
                    continue  # already typed (written by a log-layout writer that died before its commit)
                converted = convert_manifest(raw)
                created = dt.datetime.fromisoformat(converted["created_at"])
            except (ValueError, StorageError, ManifestError, KeyError) as e:
                report.problems.append({"uri": store.uri(key), "problem": f"not migrated: {e}"})
                continue
            legacy.append((created, version, key, converted))
        if not legacy:
            continue
        legacy.sort(key=lambda item: (item[0], item[1]))
        report.locations.append({"location": store.uri(location), "versions": [v for _, v, _, _ in legacy]})
        if apply:
            for _, version, key, converted in legacy:
                data = (json.dumps(converted, indent=2) + "\n").encode()
                store.write_bytes(key, data)
                checksum = checksum_bytes(data)
                CommitLog(store, location).append(lambda seq, v=version, c=checksum, r=converted["lineage"]["run_id"], d=data:
                                                  VersionCommitted(seq=seq, version=v, manifest_checksum=c, run_id=r,
                                                                   manifest=d.decode()))
    for model in store.list_folders("models"):
        for alias in store.list_folders(layout.model_aliases_prefix(model)):
            location = layout.model_alias_prefix(model, alias)
            if CommitLog(store, location).head():
                continue
            records = []
            for obj in store.list(location, recursive=False, suffixes=(".json",)):
                try:
                    raw = json.loads(store.read_bytes(obj.key))
                    records.append((dt.datetime.fromisoformat(raw["published_at"]), raw, obj.key))
                except (ValueError, KeyError, TypeError, StorageError) as e:
                    report.problems.append({"uri": store.uri(obj.key), "problem": f"alias record not migrated: {e}"})
            if not records:
                continue
            try:
                records.sort(key=lambda r: r[0])
            except TypeError:  # naive and aware timestamps mixed: fall back to the names
                records.sort(key=lambda r: r[2])
            report.aliases.append({"model": model, "alias": alias, "versions": [r[1].get("version") for r in records]})
            if apply:
                for _, raw, key in records:
                    try:
                        entry = AliasMoved(seq=1, model=model, alias=alias, version=raw["version"],
                                           previous_version=raw.get("previous_version"), reason=raw.get("reason", "") + " (migrated)")
                    except ValidationError as e:
                        report.problems.append({"uri": store.uri(key), "problem": f"alias record not migrated: {e.errors()[0]['msg']}"})
                        continue
                    CommitLog(store, location).append(lambda seq, e=entry: e.model_copy(update={"seq": seq}))
    return report
