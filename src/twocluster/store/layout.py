"""The storage layout (DESIGN.md, contract 2): the one place that knows where things live.

Every key is built from validated parts, so a pipeline name, date, version or alias that came
from a user (an Airflow param, a CLI flag) can never escape its folder.

    raw/<pipeline>/date=<YYYY-MM-DD>/...
    datasets/<pipeline>/date=<YYYY-MM-DD>/v=<version>/{parquet/,tfrecords/<split>/,rejects/,_MANIFEST.json}
    models/<model>/versions/v=<version>/{...,_MANIFEST.json}
    models/<model>/aliases/<alias>/_log/<seq>.json
    predictions/<pipeline>/date=<YYYY-MM-DD>/v=<version>/{...,_MANIFEST.json}

An *output location* is a folder of versions (a dataset date, a predictions date, a model's
``versions/``) or an alias. Each has its own commit log (``<location>/_log/<seq>.json``, see
:mod:`twocluster.store.commitlog`), and the writers' scratch space next to the versions:

    <location>/_staging/v=<version>/<attempt>/...   task attempts' files, promoted at commit
    <location>/_inflight/<version>.json             a running writer's heartbeat (for GC)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

MANIFEST_NAME = "_MANIFEST.json"
VERSION_FOLDER_PREFIX = "v="
LOG_FOLDER = "_log"
STAGING_FOLDER = "_staging"
INFLIGHT_FOLDER = "_inflight"
ARRIVED_MARKER = "_ARRIVED.json"  # written last by an arrival, in the raw date folder
LOG_SEQ_DIGITS = 20  # as Delta Lake's _delta_log: names sort in commit order
MAX_LOG_SEQ = 10**LOG_SEQ_DIGITS - 1  # the largest number a log entry's name can hold
LAST_CHECKPOINT = "_last_checkpoint"  # a hint: the newest checkpoint's number (Delta Lake's name)
CHECKPOINT_SUFFIX = ".checkpoint.json"

# Also the JSON-schema patterns of the DAGs' params, so the UI refuses what the layout would.
# ASCII classes only ("\d" also matches full-width and other Unicode digits), and matched whole
# (Python's "$" also matches before a trailing newline: "production\n" would pass re.match).
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
# Sortable by time, unique across concurrent writers: 20261122T013000Z-1a2b3c4d
VERSION_PATTERN = r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$"
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN, re.ASCII)
_VERSION_RE = re.compile(VERSION_PATTERN, re.ASCII)
_DATE_RE = re.compile(DATE_PATTERN, re.ASCII)


class LayoutError(ValueError):
    """A name, date or version that cannot be part of a store key."""


def check_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise LayoutError(
            f"{what} {value!r} is not allowed: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def is_valid_name(value: str) -> bool:
    """Whether ``value`` could name a pipeline, model or alias (:func:`check_name` without the
    error: for readers that list what others wrote)."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def check_date(value: str | dt.date, what: str = "date") -> str:
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        return value.isoformat()
    try:
        if not _DATE_RE.fullmatch(value):
            raise ValueError
        return dt.date.fromisoformat(value).isoformat()
    except (TypeError, ValueError):
        raise LayoutError(f"{what} {value!r} is not a date in YYYY-MM-DD form") from None


def check_version(value: str, what: str = "version") -> str:
    if not isinstance(value, str) or not _VERSION_RE.fullmatch(value):
        raise LayoutError(f"{what} {value!r} is not a version id like 20261122T013000Z-1a2b3c4d")
    return value


def new_version_id(now: dt.datetime | None = None) -> str:
    """A fresh version id: UTC time (so ids sort by creation) plus random bits (so two writers
    starting in the same second never share a prefix)."""
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def version_folder(version: str) -> str:
    return VERSION_FOLDER_PREFIX + check_version(version)


def version_from_folder(folder: str) -> str | None:
    """The version id of a ``v=<version>`` folder name, or None if it is not one."""
    if not folder.startswith(VERSION_FOLDER_PREFIX):
        return None
    candidate = folder[len(VERSION_FOLDER_PREFIX) :]
    return candidate if _VERSION_RE.fullmatch(candidate) else None


# -- raw arrivals --------------------------------------------------------------------------------


def raw_date_prefix(pipeline: str, date: str | dt.date) -> str:
    return f"raw/{check_name(pipeline, 'pipeline')}/date={check_date(date)}"


# -- datasets ------------------------------------------------------------------------------------


def datasets_prefix(pipeline: str) -> str:
    return f"datasets/{check_name(pipeline, 'pipeline')}"


def dataset_date_prefix(pipeline: str, date: str | dt.date) -> str:
    return f"{datasets_prefix(pipeline)}/date={check_date(date)}"


def dataset_version_prefix(pipeline: str, date: str | dt.date, version: str) -> str:
    return f"{dataset_date_prefix(pipeline, date)}/{version_folder(version)}"


# -- models --------------------------------------------------------------------------------------


def model_versions_prefix(model: str) -> str:
    return f"models/{check_name(model, 'model')}/versions"


def model_version_prefix(model: str, version: str) -> str:
    return f"{model_versions_prefix(model)}/{version_folder(version)}"


def model_aliases_prefix(model: str) -> str:
    return f"models/{check_name(model, 'model')}/aliases"


def model_alias_prefix(model: str, alias: str) -> str:
    return f"{model_aliases_prefix(model)}/{check_name(alias, 'alias')}"


# -- predictions ---------------------------------------------------------------------------------


def predictions_prefix(pipeline: str) -> str:
    return f"predictions/{check_name(pipeline, 'pipeline')}"


def predictions_date_prefix(pipeline: str, date: str | dt.date) -> str:
    return f"{predictions_prefix(pipeline)}/date={check_date(date)}"


def predictions_version_prefix(pipeline: str, date: str | dt.date, version: str) -> str:
    return f"{predictions_date_prefix(pipeline, date)}/{version_folder(version)}"


def manifest_key(version_prefix: str) -> str:
    return f"{version_prefix.rstrip('/')}/{MANIFEST_NAME}"


# -- commit logs and writers' scratch space ------------------------------------------------------


def log_prefix(location: str) -> str:
    return f"{location.rstrip('/')}/{LOG_FOLDER}"


def _check_seq(seq: int) -> int:
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_LOG_SEQ:
        raise LayoutError(f"commit log sequence number {seq!r} must be an integer from 1 to {MAX_LOG_SEQ}")
    return seq


def log_entry_key(location: str, seq: int) -> str:
    return f"{log_prefix(location)}/{_check_seq(seq):0{LOG_SEQ_DIGITS}d}.json"


def log_checkpoint_key(location: str, seq: int) -> str:
    """The checkpoint of a log's entries 1..``seq`` (it sorts just before entry ``seq``)."""
    return f"{log_prefix(location)}/{_check_seq(seq):0{LOG_SEQ_DIGITS}d}{CHECKPOINT_SUFFIX}"


def last_checkpoint_key(location: str) -> str:
    """The hint naming a log's newest checkpoint. Next to ``_log/``, not in it: it is rewritten,
    and everything in ``_log/`` is create-only (the stack's bucket policy denies overwrites there)."""
    return f"{location.rstrip('/')}/{LAST_CHECKPOINT}"


def _seq_of(stem: str) -> int | None:
    if len(stem) != LOG_SEQ_DIGITS or not stem.isascii() or not stem.isdigit():
        return None
    seq = int(stem)
    return seq if seq >= 1 else None


def log_seq_from_name(name: str) -> int | None:
    """The sequence number of a log entry's object name, or None if it is not one."""
    stem, dot, ext = name.partition(".")
    return _seq_of(stem) if ext == "json" else None


def log_checkpoint_seq_from_name(name: str) -> int | None:
    """The sequence number a checkpoint object's name covers up to, or None if it is not one."""
    return _seq_of(name[: -len(CHECKPOINT_SUFFIX)]) if name.endswith(CHECKPOINT_SUFFIX) else None


def looks_like_log_entry(name: str) -> bool:
    """A name in a ``_log/`` folder that tries to be an entry (digits and ``.json``) but is not a
    valid one: 21 digits, 0, ... Reported, never part of the log."""
    stem, dot, ext = name.partition(".")
    return ext == "json" and stem.isascii() and stem.isdigit() and log_seq_from_name(name) is None


def is_log_entry_key(key: str) -> bool:
    parts = key.strip("/").split("/")
    return len(parts) >= 2 and parts[-2] == LOG_FOLDER and log_seq_from_name(parts[-1]) is not None


def is_commit_record(key: str) -> bool:
    """A log entry or a committed version's manifest: objects written once (create-only) and never
    changed, which a reader may cache by key, size and modification time."""
    parts = key.strip("/").split("/")
    is_checkpoint = len(parts) >= 2 and parts[-2] == LOG_FOLDER and log_checkpoint_seq_from_name(parts[-1]) is not None
    return is_log_entry_key(key) or is_checkpoint or (len(parts) >= 2 and parts[-1] == MANIFEST_NAME
                                     and parts[-2].startswith(VERSION_FOLDER_PREFIX) and STAGING_FOLDER not in parts)


def staging_prefix(location: str, version: str) -> str:
    """Where the task attempts of a version's writer put their files before the commit promotes
    the winning attempt's files into the version folder."""
    return f"{location.rstrip('/')}/{STAGING_FOLDER}/{version_folder(version)}"


def inflight_key(location: str, version: str) -> str:
    return f"{location.rstrip('/')}/{INFLIGHT_FOLDER}/{check_version(version)}.json"


DATE_FOLDER_PREFIX = "date="


def date_from_folder(folder: str) -> dt.date | None:
    """The date of a ``date=<YYYY-MM-DD>`` folder name, or None if it is not one."""
    if not folder.startswith(DATE_FOLDER_PREFIX):
        return None
    try:
        return dt.date.fromisoformat(check_date(folder[len(DATE_FOLDER_PREFIX) :]))
    except (LayoutError, ValueError):
        return None


_DATED_VERSION = re.compile(r"/date=([0-9]{4}-[0-9]{2}-[0-9]{2})/v=([^/]+)/")


def dated_version(uri: str) -> tuple[str, str] | None:
    """``(date, version)`` of a key or URI inside a ``date=<date>/v=<version>/`` folder (a dataset
    or predictions manifest URI in a lineage), or None."""
    match = _DATED_VERSION.search(uri)
    return match.groups() if match and _VERSION_RE.fullmatch(match.group(2)) else None


def safe_id(raw: str, *, limit: int = 128, allowed: str = r"A-Za-z0-9_.:+-") -> str:
    """``raw`` as an id of at most ``limit`` characters from ``allowed``, injective: when
    characters had to be replaced or the id cut, a digest of the whole original is appended, so two
    ids that differ anywhere (after the 128th character, or only in a replaced character) never
    map to the same result."""
    cleaned = re.sub(f"[^{allowed}]", "-", raw)
    if cleaned == raw and len(raw) <= limit and raw[:1].isalnum():
        return raw
    head = cleaned if cleaned[:1].isalnum() else "x" + cleaned
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{head[: limit - len(digest) - 1]}-{digest}"


def run_key(run_id: str) -> str:
    """A training run id as one key segment (checkpoints and job specs are stored under it)."""
    return safe_id(run_id, allowed=r"A-Za-z0-9_.-")


def model_gate_prefix(model: str) -> str:
    """The log of every gate decision on the model's versions."""
    return f"models/{check_name(model, 'model')}/gate"


def model_runs_prefix(model: str) -> str:
    return f"models/{check_name(model, 'model')}/runs"


def model_run_prefix(model: str, run_id: str) -> str:
    """One training run's checkpoints."""
    return f"{model_runs_prefix(model)}/{run_key(run_id)}"


def jobs_prefix(model: str) -> str:
    return f"jobs/{check_name(model, 'model')}"
