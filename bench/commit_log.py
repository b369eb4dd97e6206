"""Resolving an alias and a location's latest version with 10,000 commit log entries, on file://
and (when Ceph RGW is installed) s3://, with checkpoints against the same log without them.

    ours:      the log as appenders leave it: a checkpoint every CHECKPOINT_INTERVAL entries and
               the ``_last_checkpoint`` hint (read: the hint, one listing from the checkpoint on,
               the checkpoint, the entries after it)
    baseline:  the same entries without checkpoints or hint (read: one listing, every entry)

Both logs hold the same entries (written in parallel as-is, then one checkpoint for ours); each
resolve is timed cold (a new store object: no client-side cache), three times a side, and counts
object reads (GETs) through the store. Run alone: `.venv/bin/python bench/commit_log.py`.
"""

from __future__ import annotations

import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ENTRIES = 10_000
REPEATS = 3


def _counting(store):
    from twocluster.store.storage import ObjectStore

    class Counting(ObjectStore):
        reads = 0

        def read_bytes(self, key: str) -> bytes:
            Counting.reads += 1
            return super().read_bytes(key)

    return Counting(store.root_uri, store.s3_settings), Counting


def fill(store, entries: int) -> dict[str, str]:
    """An alias log and a model versions log of ``entries`` each, with checkpoints (``…-ours``)
    and without (``…-baseline``). Returns the versions the logs resolve to."""
    from twocluster.features import featurizer_for
    from twocluster.spec import default_spec_path, load_pipeline_spec
    from twocluster.store import layout
    from twocluster.store.commitlog import AliasMoved, CommitLog, VersionCommitted
    from twocluster.store.manifest import Lineage, ModelManifest, ModelMetrics, commit_version
    from twocluster.store.storage import checksum_bytes

    features = featurizer_for(load_pipeline_spec(default_spec_path("speech_commands")).featurizer).feature_spec()
    version = layout.new_version_id()
    for side in ("ours", "baseline"):
        model = f"bench-{side}"
        manifest = ModelManifest(
            version=version, created_at=dt.datetime.now(dt.UTC), files=[], model=model, feature_spec=features,
            lineage=Lineage(inputs=[], code_version="bench", run_id="bench"),
            metrics=ModelMetrics(train_accuracy=1, validation_accuracy=1, test_accuracy=1, test_loss=0, test_examples=1))
        data = manifest.to_json()
        commit_version(store, layout.model_versions_prefix(model), manifest, verify=False)
        entries_of = {
            layout.model_alias_prefix(model, "production"): lambda seq, model=model: AliasMoved(
                seq=seq, model=model, alias="production", version=version,
                decision={"authority": {"kind": "gate", "who": "bench", "gate_entry": seq}}),
            layout.model_versions_prefix(model): lambda seq, data=data: VersionCommitted(
                seq=seq, version=version, manifest_checksum=checksum_bytes(data), manifest=data.decode(), run_id="bench"),
        }
        for location, make in entries_of.items():
            start = CommitLog(store, location).head() + 1

            def put(seq: int, location=location, make=make) -> None:
                store.put_if_absent(layout.log_entry_key(location, seq), make(seq).model_dump_json().encode())

            with ThreadPoolExecutor(32) as pool:
                list(pool.map(put, range(start, entries + 1)))
            if side == "ours":
                assert CommitLog(store, location).write_checkpoint(entries)
    return {"version": version}


def _resolve(store, side: str, what: str) -> str:
    """What readers do: an alias (its log, and its target validated against the versions log),
    or a location's latest version."""
    from twocluster.store import layout, registry
    from twocluster.store.manifest import resolve_latest

    if what == "alias":
        return registry.require_alias(store, f"bench-{side}", "production").version
    return resolve_latest(store, layout.model_versions_prefix(f"bench-{side}")).version


def measure(store, label: str, expected: str) -> list[dict]:
    rows = []
    for what in ("alias", "latest"):
        result = {}
        for side in ("ours", "baseline"):
            seconds, reads = [], []
            for _ in range(REPEATS):
                counting, cls = _counting(store)
                cls.reads = 0
                t = time.perf_counter()
                found = _resolve(counting, side, what)
                seconds.append(time.perf_counter() - t)
                reads.append(cls.reads)
                assert found == expected, (side, what, found)
            result[side] = (statistics.median(seconds), max(reads), seconds)
        (ours_s, ours_reads, ours_runs), (base_s, base_reads, base_runs) = result["ours"], result["baseline"]
        rows.append({"store": label, "what": what, "entries": ENTRIES, "seconds": round(ours_s, 4), "reads": ours_reads,
                     "baseline_seconds": round(base_s, 4), "baseline_reads": base_reads, "speedup": round(base_s / ours_s, 1),
                     "runs": [round(s, 4) for s in ours_runs], "baseline_runs": [round(s, 4) for s in base_runs]})
    return rows


def run(workdir: Path, with_s3: bool = True, entries: int = ENTRIES) -> list[dict]:
    from twocluster.store.storage import ObjectStore

    global ENTRIES
    ENTRIES = entries
    store = ObjectStore((workdir / "store").as_uri())
    rows = measure(store, "file://", fill(store, entries)["version"])
    if with_s3 and shutil.which("radosgw"):
        from twocluster_devtools.local_s3 import LocalRGW

        with LocalRGW(workdir / "rgw") as rgw:
            rgw.create_bucket("bench")
            s3 = ObjectStore("s3://bench/commit-log", rgw.s3_settings)
            rows += measure(s3, "s3:// (Ceph RGW)", fill(s3, entries)["version"])
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    with tempfile.TemporaryDirectory(prefix="bench-commit-log-") as tmp:
        for row in run(Path(tmp), entries=int(sys.argv[1]) if len(sys.argv) > 1 else ENTRIES):
            print(row)
