"""The GPU cluster's training job: a job spec -> a committed model version. It reads top to bottom:

    data (validate, stage, batch) -> model (spec.architecture) -> compile -> fit (resumable)
    -> evaluate -> export -> commit

It shares nothing with Spark but the object store and the job spec
(:class:`twocluster.store.jobspec.TrainingJobSpec`), and runs on any Keras 3 backend
(``KERAS_BACKEND``): TensorFlow reads the TFRecords with tf.data, JAX and PyTorch read the
Parquet copy (:mod:`twocluster.training.data`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twocluster import serving
from twocluster.store import layout, registry
from twocluster.store.jobspec import TrainingJobSpec
from twocluster.store.manifest import InFlight, Lineage, ManifestFile, ModelManifest, ModelMetrics, commit_version
from twocluster.store.storage import ObjectStore
from twocluster.training import checkpoints, data, models, report
from twocluster.training.augment import with_augmentation
from twocluster.training.distribute import choose_distribution, is_chief, tf_config
from twocluster.version import code_hashes, code_version

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainingResult:
    status: str  # trained | already_trained | worker_done (a non-chief worker: committed nothing)
    model: str
    version: str
    manifest_uri: str
    metrics: dict
    resumed_from_epoch: int = 0
    seconds: float = 0.0


def checkpoint_prefix(spec: TrainingJobSpec, fingerprint: str | None = None) -> str:
    """Where a run's checkpoints live: per run *and inputs*, so a run id reused with other
    datasets, code or hyper-parameters never resumes the other inputs' weights."""
    fingerprint = fingerprint or spec.fingerprint()
    return f"{layout.model_run_prefix(spec.model_name, spec.run_id)}/inputs={fingerprint.removeprefix('sha256:')[:16]}"


def run_training(spec: TrainingJobSpec, work_dir: Path | None = None) -> TrainingResult:
    """Train, evaluate and commit one model version. Rerunning a run resumes from its last
    checkpoint; rerunning a finished run returns its version without training again."""
    started = time.perf_counter()
    store = ObjectStore(spec.store_uri)
    fingerprint = spec.fingerprint()
    done = registry.find_version_of_run(store, spec.model_name, spec.run_id, fingerprint)
    if done is not None:
        log.info("run %s already produced %s version %s", spec.run_id, spec.model_name, done.version)
        return TrainingResult("already_trained", spec.model_name, done.version, done.manifest_uri, done.manifest.metrics.model_dump())
    work_dir = Path(work_dir or os.environ.get("TWOCLUSTER_WORK_DIR") or tempfile.gettempdir()) / "twocluster-train"

    try:
        architecture = models.module_for(spec.architecture)
    except models.ArchitectureError as e:
        raise TrainingError(str(e)) from None
    import keras

    # -- data
    splits = {"train": spec.train_split, "validation": spec.validation_split, "test": spec.test_split}
    try:
        # auto: the Arrow copy where every dataset has one (data.feed_format); validates the manifests first
        staged = data.stage_splits(spec.datasets, list(splits.values()), work_dir / "datasets", spec.input_format)
    except data.DataError as e:
        raise TrainingError(str(e)) from None
    data.prune_stage_cache(work_dir / "datasets", keep=set(staged.dataset_versions))
    keras.utils.set_random_seed(spec.seed)
    distribution = choose_distribution()
    chief = is_chief(tf_config())
    hp = spec.hyperparameters
    global_batch = hp.batch_size * distribution.replicas
    train = data.batches(staged, spec.train_split, global_batch, training=True, seed=spec.seed, shuffle_buffer=hp.shuffle_buffer)
    evaluation = {name: data.batches(staged, split, global_batch, training=False, seed=spec.seed) for name, split in splits.items()}
    sample = data.feature_sample(evaluation["train"])

    # -- model
    with distribution.scope():
        try:
            model = architecture.build(staged.feature_spec, len(staged.vocabulary), sample, augment=hp.augment)
        except models.ArchitectureError as e:
            raise TrainingError(f"{spec.datasets[0]}: {e}") from None
        # What trains: the model behind the module's training-only augmentation; what is exported: the model.
        trained = with_augmentation(model, models.augmentation_for(architecture, staged.feature_spec) if hp.augment else [])
        trained.compile(optimizer=keras.optimizers.Adam(hp.learning_rate),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    # -- fit, resuming from the run's last checkpoint on the store
    run_prefix = checkpoint_prefix(spec, fingerprint)
    backup_dir = work_dir / "runs" / run_prefix.replace("/", "_")
    shutil.rmtree(backup_dir, ignore_errors=True)
    backup_dir.mkdir(parents=True)
    resumed_from = checkpoints.restore_checkpoint(store, run_prefix, backup_dir)
    if resumed_from:
        log.info("resuming run %s from epoch %d (checkpoint in %s)", spec.run_id, resumed_from, store.uri(run_prefix))
    callbacks = [
        keras.callbacks.BackupAndRestore(str(backup_dir / "backup"), delete_checkpoint=False),
        keras.callbacks.CSVLogger(str(backup_dir / "history.csv"), append=True),
        checkpoints.checkpoint_sync_callback(store, run_prefix, backup_dir, chief),
    ]
    if hp.learning_rate_schedule == "cosine":
        callbacks.append(keras.callbacks.LearningRateScheduler(_cosine(hp.learning_rate, hp.epochs)))
    fit_started = time.perf_counter()
    trained.fit(train, validation_data=evaluation["validation"], epochs=hp.epochs, callbacks=callbacks, verbose=2)
    fit_seconds = time.perf_counter() - fit_started
    if not chief:
        # A non-chief worker's share of the job ends with the fit: the chief evaluates and commits.
        log.info("worker %s finished its share of run %s; the chief commits the model", tf_config().get("task"), spec.run_id)
        return TrainingResult("worker_done", spec.model_name, "", "", {}, resumed_from, time.perf_counter() - started)

    # -- evaluate
    metrics = report.evaluate(trained, evaluation, staged.vocabulary)
    metrics.update(training_seconds=round(fit_seconds, 1), epochs=hp.epochs, resumed_from_epoch=resumed_from,
                   strategy=distribution.name, examples=staged.rows, backend=keras.backend.backend(), input_format=staged.format)
    log.info("test accuracy %.3f, validation accuracy %.3f", metrics["test_accuracy"], metrics["validation_accuracy"])

    # -- export and commit
    version = layout.new_version_id()
    out = work_dir / "export" / version
    out.mkdir(parents=True)
    export(model, out, sample[:16], metrics, staged, spec, backup_dir / "history.csv")
    manifest = dict(
        version=version,
        created_at=dt.datetime.now(dt.UTC),
        feature_spec=staged.feature_spec,
        lineage=Lineage(
            inputs=spec.datasets, code_version=code_version(), run_id=spec.run_id, dataset_versions=staged.dataset_versions,
            input_fingerprint=fingerprint,
            code={"trainer": code_hashes()["trainer"], "package": code_hashes()["package"]},
            params={"architecture": spec.architecture, "hyperparameters": hp.model_dump(), "seed": spec.seed,
                    "strategy": distribution.name, "backend": keras.backend.backend()},
        ),
        model=spec.model_name,
        metrics=ModelMetrics(**{k: metrics[k] for k in ModelMetrics.model_fields if k in metrics}),
        seconds={"fit": round(fit_seconds, 2), "total": round(time.perf_counter() - started, 2)},
    )
    uri = commit_model(store, spec.model_name, manifest, out, spec.run_id)
    shutil.rmtree(out, ignore_errors=True)
    return TrainingResult("trained", spec.model_name, version, uri, metrics, resumed_from, time.perf_counter() - started)


def _cosine(peak: float, epochs: int):
    import math

    return lambda epoch, lr: peak * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def export(model, out: Path, probe: np.ndarray, metrics: dict, staged: data.StagedData, spec: TrainingJobSpec, history: Path) -> None:
    """The version folder's files: the model (``model.keras``, loadable by any backend; on
    TensorFlow a SavedModel too, and the ONNX serving copy the scoring workers use:
    :mod:`twocluster.serving`), a fixed batch with the trained model's logits (the gate reloads
    the model and its copy, and both must reproduce them), metrics, specs, history and curves."""
    import keras

    model.save(out / "model.keras")
    logits = np.asarray(model.predict(probe, verbose=0))
    np.savez(out / serving.PROBE_FILE, inputs=probe, logits=logits)
    if keras.backend.backend() == "tensorflow":
        model.export(str(out / "saved_model"), format="tf_saved_model", verbose=False)
        export_onnx(model, out / serving.ONNX_FILE, probe, logits)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "feature_spec.json").write_text(staged.feature_spec.model_dump_json(indent=2))
    (out / "labels.json").write_text(json.dumps(staged.vocabulary))
    (out / "job_spec.json").write_text(spec.model_dump_json(indent=2))
    shutil.copy(history, out / "history.csv")
    report.plot_history(out / "history.csv", out / "training_curves.png")


def export_onnx(model, path: Path, probe_inputs: np.ndarray, probe_logits: np.ndarray) -> bool:
    """Write ``model`` (a Keras model on the TensorFlow backend) as ONNX to ``path`` and check it
    reproduces ``probe_logits``. Returns False, leaving no file, when the model does not convert
    or the copy disagrees: the version is then served by Keras alone.

    The model's inference function is frozen into a graph first (every variable and captured
    tensor a constant: Keras' ``Normalization`` keeps its adapted statistics as captured tensors,
    which ``tf2onnx.convert.from_function`` leaves as unfed graph inputs)."""
    try:
        import tensorflow as tf
        import tf2onnx
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        shape = (None, *tuple(model.inputs[0].shape[1:]))
        function = tf.function(lambda x: model(x, training=False))
        frozen = convert_variables_to_constants_v2(function.get_concrete_function(tf.TensorSpec(shape, tf.float32, name="features")))
        tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
                                       output_names=[t.name for t in frozen.outputs], opset=serving.ONNX_OPSET, output_path=str(path))
        serving.check_probe(serving.OnnxModel(path, threads=1), probe_inputs, probe_logits, f"{path.name} (just converted)")
    except Exception as e:  # no converter, or any converter or runtime failure: no serving copy, Keras serves
        path.unlink(missing_ok=True)
        log.warning("no ONNX serving copy: %s: %s", type(e).__name__, str(e)[:500])
        return False
    return True


def commit_model(store: ObjectStore, model: str, fields: dict, out: Path, run_id: str) -> str:
    """Upload the version folder ``out``, then commit its manifest (``fields`` plus the files;
    the heartbeat keeps garbage collection off the folder while it is uploaded)."""
    prefix = layout.model_version_prefix(model, fields["version"])
    with InFlight(store, layout.model_versions_prefix(model), fields["version"], run_id):
        local = {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*")) if p.is_file()}
        sums = store.upload_many([(p, f"{prefix}/{rel}") for rel, p in local.items()])
        files = [ManifestFile(path=rel, bytes=p.stat().st_size, checksum=sums[f"{prefix}/{rel}"]) for rel, p in local.items()]
        return commit_version(store, layout.model_versions_prefix(model), ModelManifest(**fields, files=files))
