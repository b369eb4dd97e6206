"""The model registry on the object store: model versions and published aliases.

    models/<model>/versions/v=<version>/   a committed model (manifest last)
    models/<model>/aliases/<alias>/<UTC time>-<version>.json   create-only alias records

Moving an alias writes a new record, never overwrites one, so history is kept and two
publishers cannot clobber each other. The alias resolves to the newest *valid* record: one whose
model version is committed. Scoring only ever loads through an alias (or a pinned version).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets

from pydantic import BaseModel, ConfigDict

from twocluster import layout
from twocluster.manifest import Manifest, ManifestError, read_manifest
from twocluster.storage import ObjectStore


class RegistryError(LookupError):
    pass


class AliasRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    alias: str
    version: str
    published_at: dt.datetime
    reason: str = ""
    previous_version: str | None = None


def model_version_prefix(model: str, version: str) -> str:
    return layout.model_version_prefix(model, version)


def read_model_manifest(store: ObjectStore, model: str, version: str) -> Manifest:
    manifest = read_manifest(store, layout.model_version_prefix(model, version))
    if manifest.kind != "model":
        raise ManifestError(f"{store.uri(layout.model_version_prefix(model, version))} is a {manifest.kind}, not a model")
    return manifest


def publish_alias(store: ObjectStore, model: str, alias: str, version: str, reason: str = "", **extra) -> AliasRecord:
    """Point ``alias`` at a committed model version with a new create-only record."""
    read_model_manifest(store, model, version)  # refuse to publish what is not committed
    current = resolve_alias(store, model, alias)
    now = dt.datetime.now(dt.UTC)
    record = AliasRecord(
        model=model, alias=alias, version=version, published_at=now, reason=reason,
        previous_version=current.version if current else None, **extra,
    )
    # Time-ordered names; the random part keeps two publishers in one microsecond apart.
    key = f"{layout.model_alias_prefix(model, alias)}/{now:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}-{version}.json"
    if not store.put_if_absent(key, record.model_dump_json(indent=2).encode()):
        raise RegistryError(f"{store.uri(key)}: alias record already exists")
    return record


def alias_history(store: ObjectStore, model: str, alias: str) -> list[AliasRecord]:
    """All records of an alias, oldest first (unreadable records are skipped)."""
    records = []
    for obj in store.list(layout.model_alias_prefix(model, alias), suffixes=(".json",)):
        try:
            records.append(AliasRecord.model_validate(json.loads(store.read_bytes(obj.key))))
        except (ValueError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda r: r.published_at)


def resolve_alias(store: ObjectStore, model: str, alias: str) -> AliasRecord | None:
    """The newest record whose model version is committed, or ``None`` if nothing valid was
    ever published."""
    for record in reversed(alias_history(store, model, alias)):
        try:
            read_model_manifest(store, model, record.version)
        except ManifestError:
            continue
        return record
    return None


def require_alias(store: ObjectStore, model: str, alias: str) -> AliasRecord:
    record = resolve_alias(store, model, alias)
    if record is None:
        raise RegistryError(
            f"nothing is published as {model}:{alias} in {store.uri(layout.model_alias_prefix(model, alias))}; "
            "train and publish a model first"
        )
    return record
