"""The Spark batch-scoring job: a date's raw inputs scored by the *published* model.

    resolve alias -> check feature spec (before any data is read) -> list + featurize (the
    preprocessing job's own functions) -> score (pandas UDF, model loaded once per Python worker)
    -> predictions + rejects -> manifest (last)

The model is staged from the store and loaded once per Python worker (a per-process cache keyed
by model version); every output row carries the id of the load that scored it, so the job can
count and record the loads. :func:`register_model_function` exposes the same path as a Spark SQL
function for analysts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from twocluster import layout, registry
from twocluster.features import featurizer_for
from twocluster.manifest import Counts, Lineage, Manifest, ManifestFile, commit_manifest, resolve_latest
from twocluster.preprocess import featurize, list_inputs, write_rejects
from twocluster.spec import PipelineSpec
from twocluster.storage import ObjectStore
from twocluster.version import code_version

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = "predicted_label string, confidence float, top_labels array<string>, top_probabilities array<float>, load_id string"
WRITTEN_SCHEMA = "path string, bytes long, checksum string, rows long"


class ScoringError(RuntimeError):
    pass


class FeatureSpecMismatch(ScoringError):
    pass


@dataclass
class ScoringResult:
    status: str  # committed | unchanged
    pipeline: str
    date: str
    version: str
    manifest_uri: str
    model: str
    model_version: str
    counts: dict
    model_loads: int = 0
    python_workers: int = 0
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


# -- before heavy work ---------------------------------------------------------------------------


def resolve_model(store: ObjectStore, model: str, alias: str | None, version: str | None):
    """The model version to score with: a pinned version, else what the alias points at."""
    if version:
        layout.check_version(version, "model version")
        return version, registry.read_model_manifest(store, model, version)
    record = registry.require_alias(store, model, alias or "production")
    return record.version, registry.read_model_manifest(store, model, record.version)


def check_feature_spec(model_manifest: Manifest, spec: PipelineSpec) -> None:
    """The model must have been trained on exactly what this job's featurizer produces."""
    expected = featurizer_for(spec.featurizer).feature_spec()
    recorded = model_manifest.feature_spec or {}
    problems = []
    if recorded.get("kind") != expected["kind"]:
        problems.append(f"featurizer kind: model {recorded.get('kind')!r}, job {expected['kind']!r}")
    if recorded.get("features") != expected["features"]:
        problems.append(f"features (names, dtypes, shapes): model {recorded.get('features')}, job {expected['features']}")
    model_params, job_params = recorded.get("params", {}), expected["params"]
    for key in sorted(set(model_params) | set(job_params)):
        if key != "max_source_seconds" and model_params.get(key) != job_params.get(key):
            problems.append(f"featurizer.{key}: model {model_params.get(key)!r}, job {job_params.get(key)!r}")
    if problems:
        raise FeatureSpecMismatch(
            f"model {model_manifest.model_extra.get('model')} version {model_manifest.version} does not match "
            f"the pipeline's featurizer: " + "; ".join(problems)
        )


# -- the per-worker model ------------------------------------------------------------------------

_MODEL_CACHE: dict[str, tuple[object, str]] = {}  # model version -> (keras model, load id)
_MODEL_LOCK = threading.Lock()


def visible_gpus_for_task(resources: dict) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for a Spark task from ``TaskContext.resources()``: the GPU
    addresses Spark assigned to this task, or ``None`` when it was given no GPU."""
    gpu = resources.get("gpu") if resources else None
    addresses = list(getattr(gpu, "addresses", None) or [])
    return ",".join(addresses) if addresses else None


def _configure_tensorflow_for_task() -> None:
    """Pin TensorFlow to this task's GPUs and to the task's CPU share, before it initialises:
    Spark already runs one Python worker per task slot, so TF's own thread pools must not
    spread over every core (oversubscription)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    devices = visible_gpus_for_task(context.resources()) if context else None
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    cpus = int(context.cpus()) if context and hasattr(context, "cpus") else 1
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TF already initialised in this reused worker; it was configured then


def worker_model(root_uri: str, s3_settings, model: str, version: str):
    """The model for this Python worker: staged from the store and loaded on first use, then
    reused by every batch and task this worker runs."""
    with _MODEL_LOCK:
        if version not in _MODEL_CACHE:
            _configure_tensorflow_for_task()
            import keras

            from twocluster.gate import stage_model

            folder = stage_model(ObjectStore(root_uri, s3_settings), model, version, Path(tempfile.mkdtemp(prefix="model-")))
            _MODEL_CACHE[version] = (keras.models.load_model(folder / "model.keras"), f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return _MODEL_CACHE[version]


def predict_batch(model, features: np.ndarray, vocabulary: list[str], top_k: int, batch_size: int) -> pd.DataFrame:
    """Top-k predictions for a batch of features shaped [n, *feature_shape]."""
    x = features[..., None] if features.ndim == 3 else features
    logits = np.concatenate([model.predict_on_batch(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else np.zeros((0, len(vocabulary)))
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(top_k, len(vocabulary))
    top = np.argsort(-probs, axis=1)[:, :k]
    labels = np.asarray(vocabulary, dtype=object)
    return pd.DataFrame({
        "predicted_label": labels[top[:, 0]] if len(top) else [],
        "confidence": probs[np.arange(len(probs)), top[:, 0]].astype(np.float32) if len(top) else [],
        "top_labels": [list(labels[row]) for row in top],
        "top_probabilities": [probs[i, row].astype(np.float32) for i, row in enumerate(top)],
    })


def score(featurized, store: ObjectStore, model: str, version: str, vocabulary: list[str], feature_shape: list[int],
          top_k: int, inference_batch_size: int):
    """Add predictions to a featurized DataFrame (rows with features)."""
    from pyspark.sql.functions import pandas_udf

    root_uri, s3_settings = store.root_uri, store.s3_settings

    @pandas_udf(PREDICTION_SCHEMA)
    def predict_udf(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        loaded, load_id = worker_model(root_uri, s3_settings, model, version)
        for features in batches:
            x = np.stack(features.to_numpy()).astype(np.float32).reshape(len(features), *feature_shape) if len(features) else np.zeros((0, *feature_shape), np.float32)
            out = predict_batch(loaded, x, vocabulary, top_k, inference_batch_size)
            out["load_id"] = load_id
            yield out

    return featurized.withColumn("_p", predict_udf("features")).select("*", "_p.*").drop("_p", "features")


# -- writing -------------------------------------------------------------------------------------


def write_predictions(predictions, store: ObjectStore, version_prefix: str) -> list[ManifestFile]:
    """Each partition writes one Parquet file with one PUT and reports it back."""
    root_uri, s3_settings = store.root_uri, store.s3_settings

    def write_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        batch_list = list(batches)
        if not batch_list or sum(b.num_rows for b in batch_list) == 0:
            return
        table = pa.Table.from_batches(batch_list)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        rel = f"predictions/part-{uuid.uuid4().hex[:12]}.parquet"
        data = buf.getvalue()
        checksum = ObjectStore(root_uri, s3_settings).write_bytes(f"{version_prefix}/{rel}", data)
        yield pa.RecordBatch.from_pylist([{"path": rel, "bytes": len(data), "checksum": checksum, "rows": table.num_rows}])

    rows = predictions.mapInArrow(write_partition, WRITTEN_SCHEMA).collect()
    return [ManifestFile(path=r.path, bytes=r.bytes, checksum=r.checksum, rows=r.rows, kind="predictions") for r in rows]


# -- the job -------------------------------------------------------------------------------------


def run_scoring(spark, spec: PipelineSpec, store: ObjectStore, date: str | dt.date, run_id: str,
                alias: str | None = None, model_version: str | None = None) -> ScoringResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    started = time.perf_counter()
    date = layout.check_date(date)
    model = spec.model.name
    version, model_manifest = resolve_model(store, model, alias or spec.scoring.alias, model_version)
    check_feature_spec(model_manifest, spec)  # before any data is read
    vocabulary = model_manifest.model_extra.get("label_vocabulary") or model_manifest.feature_spec["label_vocabulary"]
    featurizer = featurizer_for(spec.featurizer)
    date_prefix = layout.predictions_date_prefix(spec.name, date)

    inputs, ignored, input_fingerprint = list_inputs(store, spec, date)
    fingerprint = "sha256:" + hashlib.sha256(f"{input_fingerprint}\0{model}\0{version}\0{spec.scoring.model_dump_json()}".encode()).hexdigest()
    latest = resolve_latest(store, date_prefix)
    if latest and latest[1].lineage.model_extra.get("input_fingerprint") == fingerprint:
        v, m = latest
        log.info("date %s: inputs and model unchanged since predictions %s; nothing to do", date, v)
        return ScoringResult("unchanged", spec.name, date, v, store.uri(layout.manifest_key(f"{date_prefix}/v={v}")), model, version,
                             m.counts.model_dump(), m.model_extra.get("model_loads", 0), m.model_extra.get("python_workers", 0),
                             time.perf_counter() - started)

    out_version = layout.new_version_id()
    version_prefix = layout.predictions_version_prefix(spec.name, date, out_version)
    files: list[ManifestFile] = []
    loads = workers = 0
    rejects = pd.DataFrame(columns=["path", "folder", "size", "reason", "detail"])
    accepted = 0
    if len(inputs):
        n_partitions = max(spark.sparkContext.defaultParallelism, math.ceil(len(inputs) / 500))
        featurized = featurize(spark.createDataFrame(inputs).repartition(n_partitions), spec, store, require_label=False)
        featurized = featurized.persist(StorageLevel.MEMORY_AND_DISK)
        rejects = featurized.filter("reason IS NOT NULL").drop("features").toPandas()
        scored = score(
            featurized.filter("reason IS NULL").select("path", "source_id", "features"), store, model, version, vocabulary,
            list(featurizer.shape), spec.scoring.top_k, spec.scoring.inference_batch_size,
        ).withColumns({
            "model_version": F.lit(version),
            "scored_at": F.lit(dt.datetime.now(dt.UTC).isoformat()),
            "run_id": F.lit(run_id),
        }).persist(StorageLevel.MEMORY_AND_DISK)
        load_ids = [r.load_id for r in scored.select("load_id").distinct().collect()]
        loads, workers = len(load_ids), len({lid.split("-")[0] for lid in load_ids})
        files += write_predictions(scored.drop("load_id"), store, version_prefix)
        accepted = sum(f.rows or 0 for f in files)
        scored.unpersist()
        featurized.unpersist()
    if len(rejects):
        files.append(write_rejects(rejects, store, version_prefix))
    counts = Counts(input=len(inputs), accepted=accepted, rejected=len(rejects),
                    rejected_by_reason=dict(sorted(Counter(rejects["reason"]).items())))
    manifest = Manifest(
        kind="predictions",
        version=out_version,
        created_at=dt.datetime.now(dt.UTC),
        files=sorted(files, key=lambda f: f.path),
        counts=counts,
        feature_spec=model_manifest.feature_spec,
        lineage=Lineage(
            inputs=[store.uri(layout.raw_date_prefix(spec.name, date)), store.uri(layout.model_version_prefix(model, version))],
            code_version=code_version(), run_id=run_id,
            params={"alias": alias or spec.scoring.alias, "pinned_version": model_version, "scoring": spec.scoring.model_dump()},
            input_fingerprint=fingerprint,
        ),
        pipeline=spec.name, date=date, model=model, model_version=version,
        model_loads=loads, python_workers=workers, ignored_files=ignored,
    )
    uri = commit_manifest(store, version_prefix, manifest)
    log.info("date %s: %d predictions by %s v=%s (%d model loads on %d Python workers) -> %s",
             date, accepted, model, version, loads, workers, uri)
    return ScoringResult("committed", spec.name, date, out_version, uri, model, version, counts.model_dump(), loads, workers,
                         time.perf_counter() - started)


# -- SQL -----------------------------------------------------------------------------------------


def register_model_function(spark, spec: PipelineSpec, store: ObjectStore, name: str = "predict_keyword",
                            alias: str | None = None, model_version: str | None = None) -> str:
    """Register the published model as a Spark SQL function over raw file bytes:

        spark.read.format("binaryFile").load(".../*.wav").createOrReplaceTempView("audio")
        spark.sql("SELECT path, predict_keyword(content) FROM audio")

    Returns the model version it is bound to (resolved once, so one query uses one model).
    Inputs that cannot be featurized give NULL."""
    from pyspark.sql.functions import pandas_udf

    version, manifest = resolve_model(store, spec.model.name, alias or spec.scoring.alias, model_version)
    check_feature_spec(manifest, spec)
    vocabulary = manifest.model_extra.get("label_vocabulary") or manifest.feature_spec["label_vocabulary"]
    featurizer_json, kind = spec.featurizer.model_dump_json(), spec.featurizer.kind
    root_uri, s3_settings, model = store.root_uri, store.s3_settings, spec.model.name
    batch_size = spec.scoring.inference_batch_size

    @pandas_udf("string")
    def predict_sql(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        from twocluster.preprocess import _worker_featurizer

        featurizer = _worker_featurizer(featurizer_json, kind)
        loaded, _ = worker_model(root_uri, s3_settings, model, version)
        for content in batches:
            batch = featurizer.featurize_many(list(content))
            ok = np.array([r is None for r in batch.reasons], dtype=bool)
            labels = pd.Series([None] * len(content), dtype=object)
            if ok.any():
                labels[ok] = predict_batch(loaded, batch.features[ok], vocabulary, 1, batch_size)["predicted_label"].to_numpy()
            yield labels

    spark.udf.register(name, predict_sql)
    return version
