"""The Spark batch-scoring job: a date's raw inputs scored by the *published* model.

    resolve alias -> check feature spec (before any data is read) -> list (driver) -> one pass
    per partition on the executors (mapInArrow): featurize (the preprocessing job's own
    functions) -> predict (model loaded once per Python worker) -> write the partition's
    predictions into staging -> report files, counts and rejects -> promote -> rejects report
    -> manifest (driver, last)

The model is staged from the store and loaded once per Python worker (a per-process cache keyed
by model version); every output row carries the id of the load that scored it, so the job can
count and record the loads. :func:`register_model_function` exposes the same path as a Spark SQL
function for analysts.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twocluster import serving
from twocluster.features import featurizer_for
from twocluster.spark.io import (
    attempt_folder,
    collect_outcomes,
    featurizing_function,
    freeze_worker_heap,
    job_fingerprint,
    list_inputs,
    map_listing,
    promote_staged,
    thaw_worker_heap,
    whole_waves,
    worker_featurizer,
    write_rejects,
)
from twocluster.spark.session import parallelism
from twocluster.spec import PipelineSpec
from twocluster.store import layout, registry, statistics
from twocluster.store.manifest import (
    Counts,
    InFlight,
    Lineage,
    ManifestError,
    ManifestFile,
    ModelManifest,
    PredictionsManifest,
    PredictionSummary,
    commit_version,
    read_manifest,
    resolve_latest,
)
from twocluster.store.storage import ObjectStore
from twocluster.version import code_hashes, code_version

# pandas is imported where it is used: Spark's Python workers never need it (2+ s of import each).

log = logging.getLogger(__name__)

# What one partition's scoring pass reports to the driver (:func:`scoring_writer`): its file
# (kind "file"), per predicted label counts (kind "label"), model loads (kind "load", the load id
# in ``label``), rejected inputs (kind "reject") and the scored features' statistics (kind
# "statistics", as JSON).
OUTCOME_SCHEMA = ("kind string, path string, staged string, bytes long, checksum string, rows long, label string, "
                  "confidence double, low long, folder string, size long, reason string, detail string, statistics string")
_OUTCOME_FIELDS = ("kind", "path", "staged", "bytes", "checksum", "rows", "label", "confidence", "low", "folder", "size", "reason",
                   "detail", "statistics")
PREDICTIONS_CODE = ("featurizer", "scoring")  # the code components a predictions fingerprint covers


class ScoringError(RuntimeError):
    pass


class FeatureSpecMismatch(ScoringError):
    pass


class FeaturizerCodeChanged(FeatureSpecMismatch):
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
    warnings: list[str] = field(default_factory=list)


# -- before heavy work ---------------------------------------------------------------------------


def resolve_model(store: ObjectStore, model: str, alias: str | None, version: str | None) -> tuple[str, ModelManifest]:
    """The model version to score with: a pinned version, else what the alias points at."""
    if version:
        layout.check_version(version, "model version")
        return version, registry.read_model_manifest(store, model, version)
    record = registry.require_alias(store, model, alias or "production")
    return record.version, registry.read_model_manifest(store, model, record.version)


def check_feature_spec(model_manifest: ModelManifest, spec: PipelineSpec) -> list[str]:
    """The model must have been trained on exactly what this job's featurizer produces (raises
    :class:`FeatureSpecMismatch`). When only the featurizer's *code* differs, the spec decides:
    ``scoring.on_featurizer_change`` error raises, warn returns the warning to record."""
    expected = featurizer_for(spec.featurizer).feature_spec()
    recorded = model_manifest.feature_spec
    problems = recorded.compatible_with(expected)
    if problems:
        raise FeatureSpecMismatch(
            f"model {model_manifest.model} version {model_manifest.version} does not match the pipeline's featurizer "
            "(model vs job): " + "; ".join(problems)
        )
    if recorded.same_code_as(expected):
        return []
    message = (f"model {model_manifest.model} version {model_manifest.version} was trained on data featurized by featurizer "
               f"code {recorded.featurizer_code[:19]}, but this job's featurizer code is {expected.featurizer_code[:19]}")
    if spec.scoring.on_featurizer_change == "error":
        raise FeaturizerCodeChanged(f"{message}; retrain on reprocessed data, or set scoring.on_featurizer_change: warn")
    log.warning("%s (scoring anyway: scoring.on_featurizer_change is warn)", message)
    return [message]


# -- the per-worker model ------------------------------------------------------------------------

# (store, model, version, scoring.runtime) -> (model, load id, staged folder), most recent last.
# A Python worker outlives its job: on a Spark Connect server the jobs of one code version share
# a session and its workers (session.connect_session), and they may score other pipelines'
# models, so the key names the model and its store, and a worker keeps the last
# MODEL_CACHE_SIZE models it used (a new version a day would otherwise pile up, with its files).
MODEL_CACHE_SIZE = 2
_MODEL_CACHE: OrderedDict[tuple[str, str, str, str], tuple[object, str, Path]] = OrderedDict()
_MODEL_LOCK = threading.Lock()


def visible_gpus_for_task(resources: dict) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for a Spark task from ``TaskContext.resources()``: the GPU
    addresses Spark assigned to this task, or ``None`` when it was given no GPU."""
    gpu = resources.get("gpu") if resources else None
    addresses = list(getattr(gpu, "addresses", None) or [])
    return ",".join(addresses) if addresses else None


def _task_slot() -> tuple[str | None, int]:
    """This Spark task's GPU addresses (``None``: no GPU) and CPU count."""
    from pyspark import TaskContext

    context = TaskContext.get()
    devices = visible_gpus_for_task(context.resources()) if context else None
    return devices, int(context.cpus()) if context and hasattr(context, "cpus") else 1


def _configure_tensorflow_for_task(devices: str | None, cpus: int) -> None:
    """Pin TensorFlow to this task's GPUs and to the task's CPU share, before it initialises:
    Spark already runs one Python worker per task slot, so TF's own thread pools must not
    spread over every core (oversubscription)."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TF already initialised in this reused worker; it was configured then


def serving_runtime(runtime: str, manifest: ModelManifest, on_gpu: bool) -> str:
    """What serves ``manifest``'s model under the spec's ``scoring.runtime``: ``onnx`` (its ONNX
    copy on ONNX Runtime, CPU) or ``keras``. ``auto`` takes the copy when there is one and the
    task has no GPU (the Spark image's ONNX Runtime is the CPU build)."""
    has_copy = any(f.path == serving.ONNX_FILE for f in manifest.files)
    if runtime == "onnx" and not has_copy:
        raise ValueError(f"scoring.runtime is onnx but {manifest.model} v={manifest.version} has no {serving.ONNX_FILE} "
                         "(trained on a backend other than TensorFlow, or its conversion failed: see the training log)")
    if runtime == "keras" or not has_copy:
        return "keras"
    return "onnx" if runtime == "onnx" or not on_gpu else "keras"


def worker_model(root_uri: str, s3_settings, model: str, version: str, runtime: str = "auto"):
    """The model for this Python worker: staged from the store and loaded on first use, then
    reused by every batch and task this worker runs. Returns (model, load id); the load id ends
    with the runtime that serves it."""
    key = (root_uri, model, version, runtime)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            _MODEL_CACHE.move_to_end(key)
            loaded, load_id, _ = _MODEL_CACHE[key]
            return loaded, load_id
        store = ObjectStore(root_uri, s3_settings)
        manifest = registry.read_model_manifest(store, model, version)
        devices, cpus = _task_slot()
        chosen = serving_runtime(runtime, manifest, on_gpu=devices is not None)
        into = Path(tempfile.mkdtemp(prefix="model-"))
        if chosen == "onnx":
            folder = registry.stage_model(store, model, version, into, only=[serving.ONNX_FILE, serving.PROBE_FILE], manifest=manifest)
            loaded = serving.OnnxModel(folder / serving.ONNX_FILE, threads=cpus)
            # Checked again here (16 examples, milliseconds): a pinned version may never have
            # passed the gate, and the Spark image's ONNX Runtime is not the gate's.
            serving.check_probe(loaded, *serving.load_probe(folder), f"{model} v={version} {serving.ONNX_FILE}")
        else:
            _configure_tensorflow_for_task(devices, cpus)
            import keras

            folder = registry.stage_model(store, model, version, into, manifest=manifest)
            loaded = keras.models.load_model(folder / "model.keras")
        load_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{chosen}"
        _MODEL_CACHE[key] = (loaded, load_id, into)
        while len(_MODEL_CACHE) > MODEL_CACHE_SIZE:
            thaw_worker_heap()
            _, (_, _, staged) = _MODEL_CACHE.popitem(last=False)
            shutil.rmtree(staged, ignore_errors=True)
        return loaded, load_id


@dataclass
class TopK:
    """A batch's top-k predictions: ``labels[i, 0]`` is row i's predicted label,
    ``probabilities[i, 0]`` its confidence."""

    labels: np.ndarray  # [n, k] str (object)
    probabilities: np.ndarray  # [n, k] float32

    @property
    def predicted_label(self) -> np.ndarray:
        return self.labels[:, 0]

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities[:, 0]

    def arrow_columns(self) -> dict[str, pa.Array]:
        """The prediction columns (``load_id`` aside), each list column over one contiguous
        buffer."""
        n, k = self.labels.shape
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        return {
            "predicted_label": pa.array(self.predicted_label, pa.string()),
            "confidence": pa.array(self.confidence, pa.float32()),
            "top_labels": pa.ListArray.from_arrays(offsets, pa.array(self.labels.reshape(-1), pa.string())),
            "top_probabilities": pa.ListArray.from_arrays(offsets, pa.array(self.probabilities.reshape(-1), pa.float32())),
        }


def predict_batch(model, features: np.ndarray, vocabulary: list[str], top_k: int, batch_size: int) -> TopK:
    """Top-k predictions for a batch of features shaped [n, *feature_shape], through the model
    ``batch_size`` rows at a time."""
    x = features[..., None] if features.ndim == 3 else features
    logits = (np.concatenate([np.asarray(model.predict_on_batch(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])
              if len(x) else np.zeros((0, len(vocabulary)), np.float32))
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(top_k, len(vocabulary))
    top = np.argsort(-probs, axis=1)[:, :k]
    return TopK(np.asarray(vocabulary, dtype=object)[top], np.take_along_axis(probs, top, axis=1).astype(np.float32))


def predicting_function(store: ObjectStore, model: str, version: str, vocabulary: list[str], feature_shape: list[int],
                        top_k: int, inference_batch_size: int, runtime: str = "auto"):
    """A function over Arrow batches of rows with features (the scoring writer's): the batch with
    ``features`` replaced by the prediction columns (:meth:`TopK.arrow_columns`) and ``load_id``."""
    root_uri, s3_settings = store.root_uri, store.worker_settings

    def predict_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        freeze_worker_heap()
        loaded, load_id = worker_model(root_uri, s3_settings, model, version, runtime)
        for batch in batches:
            n = batch.num_rows
            features = batch.column("features").flatten().to_numpy(zero_copy_only=False).reshape(n, *feature_shape)
            predictions = predict_batch(loaded, features, vocabulary, top_k, inference_batch_size)
            columns = {name: batch.column(name) for name in batch.schema.names if name != "features"}
            columns |= predictions.arrow_columns()
            columns["load_id"] = pa.array([load_id] * n, pa.string())
            yield pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))

    return predict_batches


# -- writing -------------------------------------------------------------------------------------


def scoring_writer(featurize_batches, predict_batches, store: ObjectStore, staging: str, columns: dict[str, str],
                   confidence_floor: float, feature: tuple[str, int] | None = None):
    """One partition's whole scoring pass, as the function ``mapInArrow`` runs: featurize its
    inputs, predict the accepted rows, write them as one Parquet file with one PUT into the task
    attempt's folder under ``staging``, and report (:data:`OUTCOME_SCHEMA`) the file, each
    predicted label's count, confidence sum and rows below ``confidence_floor``, the model loads
    and the rejected inputs. ``columns``: constant string columns added to every prediction
    (model version, run id, time). Nothing is cached in the JVM, and the features never return to it.
    ``feature``: (name, channels) of the features, whose statistics the task reports as it goes."""
    root_uri, s3_settings = store.root_uri, store.worker_settings

    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        outcomes: list[dict] = []
        sums = []

        def accepted() -> Iterator[pa.RecordBatch]:
            # Streamed: each featurized batch is predicted before the next is featurized, so a
            # task holds one batch of features (~16 KB a row), whatever its number of rows.
            for batch in featurize_batches(batches):
                rejected = pa.compute.is_valid(batch.column("reason"))
                for row in batch.filter(rejected).select(["path", "folder", "size", "reason", "detail"]).to_pylist():
                    outcomes.append({"kind": "reject", **row})
                kept = batch.filter(pa.compute.invert(rejected))
                if kept.num_rows:
                    if feature is not None:  # the batch's statistics, from the array being scored
                        values = kept.column("features").flatten().to_numpy(zero_copy_only=False)
                        part = statistics.partial(values.reshape(kept.num_rows, -1, feature[1]), feature[0], feature[0])
                        sums[:] = [sums[0].merge(part) if sums else part]
                    yield kept.select(["path", "source_id", "features"])

        predicted = [b for b in predict_batches(accepted()) if b.num_rows]
        if predicted:
            table = pa.Table.from_batches(predicted)
            for load_id in set(table["load_id"].to_pylist()):
                outcomes.append({"kind": "load", "label": load_id})
            table = table.drop_columns(["load_id"])
            for name, value in columns.items():
                table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
            confidence = table["confidence"].to_numpy()
            labels = np.asarray(table["predicted_label"].to_pylist(), dtype=object)
            for label in sorted(set(labels)):
                mine = labels == label
                outcomes.append({"kind": "label", "label": label, "rows": int(mine.sum()),
                                 "confidence": float(confidence[mine].sum()), "low": int((confidence[mine] < confidence_floor).sum())})
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            context = TaskContext.get()
            rel = f"predictions/part-{context.partitionId() if context else 0:05d}.parquet"
            staged = f"{staging}/{attempt_folder()}/{rel}"
            data = buf.getvalue()
            checksum = ObjectStore(root_uri, s3_settings).write_bytes(staged, data)
            outcomes.append({"kind": "file", "path": rel, "staged": staged, "bytes": len(data), "checksum": checksum,
                             "rows": table.num_rows})
        if sums:
            outcomes.append({"kind": "statistics", "statistics": sums[0].model_dump_json()})
        if outcomes:
            yield pa.RecordBatch.from_pylist([{k: o.get(k) for k in _OUTCOME_FIELDS} for o in outcomes])

    return score_partition


def scoring_statistics(store: ObjectStore, outcomes, model_manifest, version: str) -> statistics.VersionStatistics | None:
    """The scored features' statistics (the tasks' parts merged) and their skew against the
    model's training data: the training splits' statistics of the dataset versions in its
    lineage, combined (versions written before statistics existed are left out; none: no skew)."""
    scored = statistics.merge([statistics.sums_from_json(o.statistics) for o in outcomes if o.kind == "statistics" and o.statistics])
    if scored is None:
        return None
    baseline, used = statistics.training_statistics(store, model_manifest.lineage.inputs)
    skew = None
    if baseline is not None and len(baseline.channels) == len(scored.channels):
        per_channel = statistics.channel_skew(scored, baseline)
        skew = statistics.Skew(model_version=version, training_versions=used, feature_skew=max(per_channel), per_channel=per_channel)
    return statistics.VersionStatistics(overall=scored, skew=skew)


# -- the job -------------------------------------------------------------------------------------


def scoring_partitions(rows: int, parallelism: int, rows_per_partition: int = 5000) -> int:
    """How many tasks score ``rows`` inputs: at most about ``rows_per_partition`` each (a task's
    predictions are one Parquet file, ~100 bytes a row; its features are streamed through the
    model a batch at a time), in :func:`whole_waves` of the cluster's cores. Not smaller: a
    Python task costs 60-100 ms of wall time before its first row (measured on local[2]: an empty
    ``mapInArrow`` over 6 tasks 0.43-0.66 s, over 20 0.7 s), a task of 5,000 rows does ~3 s of
    work; predicting 9,600 featurized clips (bench score figure, same run) ran at 3,900-4,500
    clips/s in 6 tasks and 5,600-7,100 in 2 (was 500 rows a task, then 2,000)."""
    return whole_waves(math.ceil(rows / rows_per_partition), parallelism)


def run_scoring(spark, spec: PipelineSpec, store: ObjectStore, date: str | dt.date, run_id: str,
                alias: str | None = None, model_version: str | None = None) -> ScoringResult:
    started = time.perf_counter()
    date = layout.check_date(date)
    model = spec.model.name
    version, model_manifest = resolve_model(store, model, alias or spec.scoring.alias, model_version)
    warnings = check_feature_spec(model_manifest, spec)  # before any data is read
    serving_runtime(spec.scoring.runtime, model_manifest, on_gpu=False)  # a runtime the version cannot have fails here
    date_prefix = layout.predictions_date_prefix(spec.name, date)

    inputs, ignored, listed = list_inputs(store, spec, date)
    fingerprint = job_fingerprint(listed, model, version, spec.featurizer.model_dump_json(), spec.scoring.model_dump_json(),
                                  code=PREDICTIONS_CODE)
    latest = resolve_latest(store, date_prefix, PredictionsManifest, verify_checksums=True)
    if latest and latest.manifest.lineage.input_fingerprint == fingerprint:
        m = latest.manifest
        log.info("date %s: inputs, model and code unchanged since predictions %s; nothing to do", date, latest.version)
        return ScoringResult("unchanged", spec.name, date, latest.version, latest.manifest_uri, model, version,
                             m.counts.model_dump(), m.model_loads, m.python_workers, time.perf_counter() - started)

    out_version = layout.new_version_id()
    with InFlight(store, date_prefix, out_version, run_id):
        return _score_and_commit(spark, spec, store, date, run_id, alias, model_version, version, model_manifest, inputs,
                                 ignored, fingerprint, out_version, warnings, started)


def _score_and_commit(spark, spec, store, date, run_id, alias, model_version, version, model_manifest, inputs, ignored,
                      fingerprint, out_version, warnings, started) -> ScoringResult:
    model = spec.model.name
    featurizer = featurizer_for(spec.featurizer)
    date_prefix = layout.predictions_date_prefix(spec.name, date)
    version_prefix = layout.predictions_version_prefix(spec.name, date, out_version)
    staging = layout.staging_prefix(date_prefix, out_version)
    files: list[ManifestFile] = []
    loads = workers = 0
    runtimes: list[str] = []
    summary = PredictionSummary(confidence_floor=spec.scoring.confidence_floor)
    import pandas as pd

    rejects = pd.DataFrame(columns=["path", "folder", "size", "reason", "detail"])
    accepted = 0
    if len(inputs):
        n_partitions = scoring_partitions(len(inputs), parallelism(spark))
        floor = spec.scoring.confidence_floor
        score_partition = scoring_writer(
            featurizing_function(spec, store, require_label=False),
            predicting_function(store, model, version, model_manifest.label_vocabulary, list(featurizer.shape), spec.scoring.top_k,
                                spec.scoring.inference_batch_size, spec.scoring.runtime),
            store, staging, {"model_version": version, "scored_at": dt.datetime.now(dt.UTC).isoformat(), "run_id": run_id}, floor,
            feature=(featurizer.feature_name, featurizer.shape[-1]))
        # One pass: each task featurizes, predicts and writes its partition; only file names,
        # counts and rejects come back (caching the featurized rows ran the JVM out of memory).
        outcomes = collect_outcomes(map_listing(spark, inputs, n_partitions, score_partition, OUTCOME_SCHEMA,
                                                spec.scoring.arrow_batch_size))
        reject_rows = [o.asDict() for o in outcomes if o.kind == "reject"]
        if reject_rows:
            rejects = pd.DataFrame(reject_rows, columns=list(rejects.columns)).sort_values("path", ignore_index=True)
        by_label: dict[str, list] = {}
        for o in outcomes:
            if o.kind == "label":
                n, conf, low = by_label.get(o.label, (0, 0.0, 0))
                by_label[o.label] = (n + o.rows, conf + o.confidence, low + o.low)
        n_scored = sum(n for n, _, _ in by_label.values())
        summary = PredictionSummary(
            predicted_labels={label: n for label, (n, _, _) in sorted(by_label.items())},
            mean_confidence=round(sum(c for _, c, _ in by_label.values()) / n_scored, 6) if n_scored else None,
            confidence_floor=floor, below_confidence_floor=sum(low for _, _, low in by_label.values()))
        load_ids = {o.label for o in outcomes if o.kind == "load"}
        loads, workers = len(load_ids), len({lid.split("-")[0] for lid in load_ids})
        runtimes = sorted({lid.rsplit("-", 1)[1] for lid in load_ids})
        written = [o for o in outcomes if o.kind == "file"]
        files += [ManifestFile(path=r.path, bytes=r.bytes, checksum=r.checksum, rows=r.rows, kind="predictions") for r in written]
        promote_staged(store, files, {r.path: r.staged for r in written}, version_prefix, staging)
        scored_statistics = scoring_statistics(store, outcomes, model_manifest, version)
        if scored_statistics is not None:
            if scored_statistics.skew is not None:
                training_labels: Counter[str] = Counter()
                for uri in model_manifest.lineage.inputs:
                    folder = statistics.key_in(store, uri.rsplit("/", 1)[0])
                    try:
                        training_labels.update(read_manifest(store, folder).counts.per_label if folder else {})
                    except ManifestError:
                        continue
                scored_statistics.skew.label_distance = statistics.l_infinity(summary.predicted_labels, dict(training_labels))
            files.append(statistics.write(scored_statistics, store, version_prefix))
        accepted = sum(f.rows or 0 for f in files)
        if accepted != n_scored:
            raise RuntimeError(f"wrote {accepted} predictions but scored {n_scored}; not committing")
    if len(rejects):
        files.append(write_rejects(rejects, store, version_prefix))
    counts = Counts(input=len(inputs), accepted=accepted, rejected=len(rejects),
                    rejected_by_reason=dict(sorted(Counter(rejects["reason"]).items())))
    manifest = PredictionsManifest(
        version=out_version,
        created_at=dt.datetime.now(dt.UTC),
        files=sorted(files, key=lambda f: f.path),
        counts=counts,
        feature_spec=featurizer.feature_spec(label_vocabulary=model_manifest.label_vocabulary),
        lineage=Lineage(
            inputs=[store.uri(layout.raw_date_prefix(spec.name, date)), store.uri(layout.model_version_prefix(model, version))],
            code_version=code_version(), code={c: code_hashes()[c] for c in (*PREDICTIONS_CODE, "package")}, run_id=run_id,
            params={"alias": alias or spec.scoring.alias, "pinned_version": model_version, "scoring": spec.scoring.model_dump(),
                    "warnings": warnings},
            input_fingerprint=fingerprint,
        ),
        pipeline=spec.name, date=date, model=model, model_version=version,
        model_loads=loads, python_workers=workers, model_runtimes=runtimes, ignored_files=sum(ignored.values()), ignored_by_reason=ignored, summary=summary,
        seconds={"total": round(time.perf_counter() - started, 3)},
    )
    uri = commit_version(store, date_prefix, manifest)
    log.info("date %s: %d predictions by %s v=%s (%d model loads on %d Python workers, %s) -> %s",
             date, accepted, model, version, loads, workers, "+".join(runtimes) or "no load", uri)
    return ScoringResult("committed", spec.name, date, out_version, uri, model, version, counts.model_dump(), loads, workers,
                         time.perf_counter() - started, warnings=warnings)


# -- SQL -----------------------------------------------------------------------------------------


def register_model_function(spark, spec: PipelineSpec, store: ObjectStore, name: str = "predict_keyword",
                            alias: str | None = None, model_version: str | None = None) -> str:
    """Register the published model as a Spark SQL function over raw file bytes:

        spark.read.format("binaryFile").load(".../*.wav").createOrReplaceTempView("audio")
        spark.sql("SELECT path, predict_keyword(content) FROM audio")

    Returns the model version it is bound to (resolved once, so one query uses one model).
    Inputs that cannot be featurized give NULL, and so do inputs the spec's ``inputs`` limits
    refuse (over ``max_bytes``, a container, sample rate, channel count or duration it does not
    allow: judged from the header, before decoding), as the scoring job refuses them."""
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    version, manifest = resolve_model(store, spec.model.name, alias or spec.scoring.alias, model_version)
    check_feature_spec(manifest, spec)
    vocabulary = manifest.label_vocabulary
    featurizer_json, kind = spec.featurizer.model_dump_json(), spec.featurizer.kind
    root_uri, s3_settings, model = store.root_uri, store.worker_settings, spec.model.name
    batch_size, runtime = spec.scoring.inference_batch_size, spec.scoring.runtime
    input_limits = spec.inputs
    serving_runtime(runtime, manifest, on_gpu=False)  # a runtime the version cannot have fails here, not in a task

    def predict_sql(batches):
        freeze_worker_heap()
        featurizer = worker_featurizer(featurizer_json, kind)
        loaded, _ = worker_model(root_uri, s3_settings, model, version, runtime)
        for content in batches:
            blobs = [c if c is not None and len(c) <= input_limits.max_bytes else None for c in content]
            batch = featurizer.featurize_many(blobs, None, input_limits)
            ok = np.array([r is None for r in batch.reasons], dtype=bool)
            labels = pd.Series([None] * len(content), dtype=object)
            if ok.any():
                labels[ok] = predict_batch(loaded, batch.features[ok], vocabulary, 1, batch_size).predicted_label
            yield labels

    # The UDF's kind comes from its type hints, resolved here (pandas is imported in this
    # function only, not where the module's annotations are evaluated).
    predict_sql.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.Series]}
    spark.udf.register(name, pandas_udf(predict_sql, "string"))
    return version
