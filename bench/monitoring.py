"""The ops page's read time on a year of history: 365 dates x (dataset + predictions) and 50 model
versions with an alias moved along them, on file:// and (when Ceph RGW is installed) s3://.

    ours:      twocluster.ops.monitoring.pipeline_overview with a 365-day window, cold (empty cache) and
               warm (a reload after one more commit)
    baseline:  the same locations read one after another without the cache (what a reader that
               simply walks the logs, like `twocluster status`, does)

Run alone: `.venv/bin/python bench/monitoring.py`; `make bench` includes it.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

DATES, MODELS = 365, 50
START = dt.date(2025, 11, 1)


def fill(store, spec) -> list[str]:
    """A year of committed datasets and predictions, and 50 model versions, written in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from twocluster.store import layout, registry
    from twocluster.store.featurespec import FeatureSpec, TensorSpec
    from twocluster.store.manifest import (
        Counts,
        DatasetManifest,
        Lineage,
        ManifestFile,
        ModelManifest,
        ModelMetrics,
        PredictionsManifest,
        PredictionSummary,
        commit_version,
    )
    from twocluster.store.storage import checksum_bytes

    features = FeatureSpec(kind="log_mel", features={"log_mel": TensorSpec(dtype="float32", shape=[97, 40])}, params={},
                           featurizer_code="sha256:" + "1" * 64, label_vocabulary=["yes", "no"])
    now = dt.datetime.now(dt.UTC)
    lineage = Lineage(code_version="bench", run_id="bench")

    def file(prefix: str, rel: str) -> ManifestFile:
        data = b"x" * 64
        store.write_bytes(f"{prefix}/{rel}", data)
        return ManifestFile(path=rel, bytes=len(data), checksum=checksum_bytes(data), rows=1)

    def dataset(i: int) -> str:
        day = START + dt.timedelta(days=i)
        version = layout.new_version_id()
        prefix = layout.dataset_version_prefix(spec.name, day, version)
        commit_version(store, layout.dataset_date_prefix(spec.name, day), DatasetManifest(
            version=version, created_at=now, files=[file(prefix, "parquet/part-00000.parquet")], feature_spec=features,
            counts=Counts(input=602, accepted=600, rejected=2, per_label={"yes": 300, "no": 300}, rejected_by_reason={"truncated": 2}),
            lineage=lineage, pipeline=spec.name, date=day, seconds={"featurize": 3.0, "write": 1.0}))
        return store.uri(layout.manifest_key(prefix))

    with ThreadPoolExecutor(16) as pool:
        uris = list(pool.map(dataset, range(DATES)))
    versions = []
    for m in range(MODELS):
        version = layout.new_version_id()
        prefix = layout.model_version_prefix(spec.model.name, version)
        commit_version(store, layout.model_versions_prefix(spec.model.name), ModelManifest(
            version=version, created_at=now, files=[file(prefix, "model.keras")], model=spec.model.name, feature_spec=features,
            lineage=Lineage(inputs=uris[max(0, m * 7 - 28):m * 7 + 1], code_version="bench", run_id=f"bench-{m}"),
            metrics=ModelMetrics(train_accuracy=0.99, validation_accuracy=0.95, test_accuracy=0.9 + m / 1000, test_loss=0.2, test_examples=60)))
        registry.record_gate_decision(store, spec.model.name, version, "production", "passed", "bench", run_id="bench")
        registry.move_alias(store, spec.model.name, "production", version, expected=registry.read_alias(store, spec.model.name, "production"),
                            who="bench")
        versions.append(version)

    def predictions(i: int) -> None:
        day = START + dt.timedelta(days=i)
        version = layout.new_version_id()
        prefix = layout.predictions_version_prefix(spec.name, day, version)
        commit_version(store, layout.predictions_date_prefix(spec.name, day), PredictionsManifest(
            version=version, created_at=now, files=[file(prefix, "predictions/part-00000.parquet")], feature_spec=features,
            counts=Counts(input=602, accepted=601, rejected=1), lineage=lineage, pipeline=spec.name, date=day,
            model=spec.model.name, model_version=versions[min(i // 7, MODELS - 1)],
            summary=PredictionSummary(predicted_labels={"yes": 320, "no": 281}, mean_confidence=0.8, confidence_floor=0.5,
                                      below_confidence_floor=40)))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(predictions, range(DATES)))
    return uris


def measure(store, spec, label: str) -> dict:
    from twocluster.ops.monitoring import _COMMIT_RECORDS, CACHE, pipeline_overview
    from twocluster.store import layout
    from twocluster.store.manifest import scan_location

    today = START + dt.timedelta(days=DATES - 1)
    CACHE._entries.clear()
    _COMMIT_RECORDS.clear()
    t = time.perf_counter()
    overview = pipeline_overview(store, spec, today=today, window_days=DATES)
    cold = time.perf_counter() - t
    assert len(overview.dates) == DATES and len(overview.models) == MODELS and all(d.predictions for d in overview.dates)
    t = time.perf_counter()
    pipeline_overview(store, spec, today=today, window_days=DATES)
    warm = time.perf_counter() - t
    CACHE._entries.clear()
    _COMMIT_RECORDS.clear()
    t = time.perf_counter()
    pipeline_overview(store, spec, today=today)
    cold_default_window = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(DATES):
        day = START + dt.timedelta(days=i)
        scan_location(store, layout.dataset_date_prefix(spec.name, day))
        scan_location(store, layout.predictions_date_prefix(spec.name, day))
    scan_location(store, layout.model_versions_prefix(spec.model.name))
    serial = time.perf_counter() - t
    return {"store": label, "cold_s": round(cold, 3), "warm_s": round(warm, 3),
            "cold_default_window_s": round(cold_default_window, 3), "default_window_days": spec.monitoring.window_days, "serial_baseline_s": round(serial, 3),
            "speedup_cold": round(serial / cold, 2)}


def run(workdir: Path, with_s3: bool = True) -> list[dict]:
    from twocluster.spec import default_spec_path, load_pipeline_spec
    from twocluster.store.storage import ObjectStore

    spec = load_pipeline_spec(default_spec_path("speech_commands"))
    spec = spec.model_copy(update={"start_date": START, "end_date": START + dt.timedelta(days=DATES - 1)})
    results = []
    store = ObjectStore((workdir / "store").as_uri())
    fill(store, spec)
    results.append(measure(store, spec, "file://"))
    if with_s3 and shutil.which("radosgw"):
        from twocluster_devtools.local_s3 import LocalRGW

        with LocalRGW(workdir / "rgw") as rgw:
            rgw.create_bucket("bench")
            s3 = ObjectStore("s3://bench/monitoring", rgw.s3_settings)
            fill(s3, spec)
            results.append(measure(s3, spec, "s3:// (Ceph RGW)"))
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as tmp:
        for row in run(Path(tmp)):
            print(row)
