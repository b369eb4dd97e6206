"""The GPU cluster's training job: dataset manifests -> staged TFRecords -> tf.data -> Keras ->
a committed model version. Reads top to bottom like a Keras example:

    validate + stage data  ->  input pipeline  ->  model  ->  fit (resumable)  ->  evaluate  ->  export

It shares nothing with Spark but the object store and the job spec
(:class:`twocluster.store.jobspec.TrainingJobSpec`). TensorFlow cannot open ``s3://`` (that moved to
tensorflow-io, which does not load against TF 2.21), so the shards are staged to local disk,
verified against the manifest's checksums and cached by dataset version.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twocluster.store import layout, registry
from twocluster.store.featurespec import FeatureSpec
from twocluster.store.jobspec import TrainingJobSpec
from twocluster.store.manifest import (
    DatasetManifest,
    InFlight,
    Lineage,
    ManifestError,
    ManifestFile,
    ModelManifest,
    ModelMetrics,
    commit_version,
    resolve_version,
)
from twocluster.store.storage import ObjectStore, split_uri
from twocluster.version import code_hashes, code_version

log = logging.getLogger(__name__)

CHECKPOINT_POINTER = "LATEST.json"
EPOCH_COMPLETE = "_COMPLETE.json"  # written into an epoch's checkpoint folder after its files
STAGE_CACHE_MAX_AGE_SECONDS = 7 * 86400  # staged datasets no job used for a week are evicted


class TrainingError(RuntimeError):
    pass


# -- data: validate, stage, verify -----------------------------------------------------------------


@dataclass
class StagedData:
    feature_spec: FeatureSpec
    files: dict[str, list[str]]  # split -> local TFRecord paths
    rows: dict[str, int]
    dataset_versions: list[str] = field(default_factory=list)
    featurizer_code: list[str] = field(default_factory=list)  # distinct hashes across the datasets

    @property
    def feature_name(self) -> str:
        return self.feature_spec.feature_name

    @property
    def feature_shape(self) -> list[int]:
        return self.feature_spec.feature_shape

    @property
    def vocabulary(self) -> list[str]:
        return self.feature_spec.label_vocabulary

    @property
    def compression(self) -> str:
        return self.feature_spec.tfrecord.compression


def open_dataset_manifest(uri: str) -> tuple[ObjectStore, DatasetManifest]:
    """A dataset by its manifest URI, only if it is committed in its date's log (not removed, the
    manifest unchanged since the commit). Returns a store rooted at the version folder."""
    folder, name = split_uri(uri)
    location, version_folder = split_uri(folder)
    version = layout.version_from_folder(version_folder)
    if name != layout.MANIFEST_NAME or version is None:
        raise TrainingError(f"{uri}: not a dataset manifest URI (.../v=<version>/{layout.MANIFEST_NAME})")
    committed = resolve_version(ObjectStore(location), "", version, DatasetManifest)
    manifest = committed.manifest
    if manifest.feature_spec.tfrecord is None:
        raise TrainingError(f"{uri}: the manifest records no TFRecord feature spec")
    return ObjectStore(folder), manifest


def load_dataset_manifests(uris: list[str], splits: list[str]) -> list[tuple[ObjectStore, DatasetManifest]]:
    """Read and cross-check every dataset manifest before anything is downloaded."""
    loaded = [open_dataset_manifest(uri) for uri in uris]
    first_uri, first = uris[0], loaded[0][1].feature_spec
    for uri, (_, m) in zip(uris[1:], loaded[1:], strict=True):
        problems = first.compatible_with(m.feature_spec)
        if m.feature_spec.tfrecord != first.tfrecord or m.feature_spec.label_vocabulary != first.label_vocabulary:
            problems.append("TFRecord layout or label vocabulary")
        if problems:
            raise TrainingError(f"{uri}: feature spec differs from {first_uri}'s ({'; '.join(problems)}); datasets cannot be mixed")
        if not m.feature_spec.same_code_as(first):
            raise TrainingError(
                f"{uri} was featurized by other featurizer code ({m.feature_spec.featurizer_code[:19]}) than {first_uri} "
                f"({first.featurizer_code[:19]}); reprocess the older dates of the window before training on them together"
            )
    for split in splits:
        if sum(m.counts.per_split.get(split, 0) for _, m in loaded) == 0:
            raise TrainingError(f"no examples in split {split!r} across {len(loaded)} dataset(s) {uris}")
    return loaded


def stage_splits(uris: list[str], splits: list[str], cache_dir: Path, max_workers: int = 8) -> StagedData:
    """Download the TFRecord shards of ``splits`` that the manifests list, in parallel, verifying
    each checksum. Shards already in ``cache_dir`` with a matching checksum are not fetched again
    (a retry or a resumed run on the same node starts at once)."""
    loaded = load_dataset_manifests(uris, splits)
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    started, fetched_bytes, reused = time.perf_counter(), 0, 0
    for store, manifest in loaded:
        todo = []
        for f in manifest.tfrecord_files(splits):
            local = cache_dir / manifest.version / f.path
            files.setdefault(f.split, []).append(str(local))
            rows[f.split] = rows.get(f.split, 0) + (f.rows or 0)
            marker = local.with_name(local.name + ".sha256")
            if local.exists() and marker.exists() and marker.read_text() == f.checksum and local.stat().st_size == f.bytes:
                reused += 1
                continue
            todo.append((f, local, marker))
        for (key, checksum), (f, local, marker) in zip(
            store.download_many([(f.path, local) for f, local, _ in todo], max_workers=max_workers), todo, strict=True
        ):
            if checksum != f.checksum:
                local.unlink(missing_ok=True)
                raise ManifestError(f"{store.uri(key)}: checksum {checksum} does not match the manifest's {f.checksum}")
            marker.write_text(checksum)
            fetched_bytes += f.bytes
        if (cache_dir / manifest.version).exists():
            os.utime(cache_dir / manifest.version)  # recently used: kept by prune_stage_cache
    log.info("staged %d shards (%.1f MB fetched, %d reused from %s) in %.1fs", sum(map(len, files.values())),
             fetched_bytes / 1e6, reused, cache_dir, time.perf_counter() - started)
    return StagedData(
        feature_spec=loaded[0][1].feature_spec,
        files={s: sorted(v) for s, v in files.items()},
        rows=rows,
        dataset_versions=[m.version for _, m in loaded],
        featurizer_code=sorted({m.feature_spec.featurizer_code for _, m in loaded}),
    )


def stage_datasets(spec: TrainingJobSpec, cache_dir: Path, max_workers: int = 8) -> StagedData:
    """The job's train, validation and test shards (see :func:`stage_splits`)."""
    return stage_splits(spec.datasets, [spec.train_split, spec.validation_split, spec.test_split], cache_dir, max_workers)


def prune_stage_cache(cache_dir: Path, keep: set[str], max_age_seconds: float) -> list[Path]:
    """Remove staged dataset versions not in ``keep`` that no job has used for ``max_age_seconds``
    (the trainer's local cache would otherwise grow by a dataset per day forever)."""
    removed = []
    if not cache_dir.is_dir():
        return removed
    now = time.time()
    for entry in cache_dir.iterdir():
        if entry.is_dir() and entry.name not in keep and now - entry.stat().st_mtime > max_age_seconds:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# -- input pipeline ------------------------------------------------------------------------------


def make_dataset(data: StagedData, split: str, batch_size: int, *, training: bool, seed: int,
                 augment: bool = False, shuffle_buffer: int = 4096):
    """tf.data over staged shards: parallel interleave, parallel parse, cache, shuffle, batch,
    (augment), prefetch."""
    import tensorflow as tf

    files = data.files.get(split, [])
    if not files:
        raise TrainingError(f"no staged shards for split {split!r}")
    tfrecord = data.feature_spec.tfrecord
    parse_spec = tfrecord.parse_spec([data.feature_name, "label_id"])
    compression = tfrecord.compression_type

    def parse(record):
        ex = tf.io.parse_single_example(record, parse_spec)
        return tf.expand_dims(ex[data.feature_name], -1), ex["label_id"]

    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
        cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training,
    )
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and augment:
        ds = ds.map(lambda x, y: (_spec_augment(x, seed), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _spec_augment(batch, seed: int, max_time: int = 12, max_freq: int = 6):
    """SpecAugment-style masking: one random time band and one frequency band per batch,
    filled with the batch mean (log-mel values are far from zero)."""
    import tensorflow as tf

    shape = tf.shape(batch)
    frames, mels = shape[1], shape[2]
    t0 = tf.random.uniform([], 0, frames - max_time, dtype=tf.int32)
    t = tf.random.uniform([], 0, max_time, dtype=tf.int32)
    f0 = tf.random.uniform([], 0, mels - max_freq, dtype=tf.int32)
    f = tf.random.uniform([], 0, max_freq, dtype=tf.int32)
    time_mask = tf.logical_and(tf.range(frames) >= t0, tf.range(frames) < t0 + t)
    freq_mask = tf.logical_and(tf.range(mels) >= f0, tf.range(mels) < f0 + f)
    mask = tf.logical_or(time_mask[:, None], freq_mask[None, :])[None, :, :, None]
    return tf.where(mask, tf.reduce_mean(batch), batch)


# -- hardware ------------------------------------------------------------------------------------


def strategy_kind(num_gpus: int, tf_config: dict) -> str:
    """Which distribution strategy fits the visible devices and cluster (pure, for tests)."""
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) > 1:
        return "multi_worker_mirrored"
    if num_gpus > 1:
        return "mirrored"
    if num_gpus == 1:
        return "one_gpu"
    return "cpu"


def is_chief(tf_config: dict) -> bool:
    """The one worker of a multi-worker job that writes: syncs checkpoints to the store and
    commits the model version (TensorFlow's rule: the ``chief`` task, else worker 0). The others
    train their share and write nothing shared (two committers would publish two versions of one
    run, and their checkpoint uploads would interleave)."""
    task = tf_config.get("task") or {}
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in tf_config.get("cluster", {})


def choose_strategy():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    kind = strategy_kind(len(gpus), json.loads(os.environ.get("TF_CONFIG", "{}")))
    if kind == "multi_worker_mirrored":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif kind == "one_gpu":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0")
    else:
        log.warning("no GPU found (CUDA_VISIBLE_DEVICES=%r): training on the CPU", os.environ.get("CUDA_VISIBLE_DEVICES"))
        strategy = tf.distribute.get_strategy()
    if gpus:
        import keras

        # Tensor cores: float16 compute, float32 variables; the output layer stays float32.
        keras.mixed_precision.set_global_policy("mixed_float16")
    log.info("distribution: %s, %d replica(s), GPUs: %s", kind, strategy.num_replicas_in_sync, [g.name for g in gpus])
    return strategy, kind


# -- model ---------------------------------------------------------------------------------------


def build_model(input_shape: list[int], num_classes: int, normalization_sample: np.ndarray):
    """A compact keyword-spotting CNN over log-mel spectrograms [frames, mels, 1].

    Temporal convolutions with the mel bins as channels (as in TC-ResNet / DS-CNN keyword
    spotters), then global *max* pooling over time: a keyword occupies a fraction of the clip at
    a varying offset, and averaging over the silent rest dilutes it. BatchNorm uses momentum 0.9
    so its moving statistics settle within the few hundred steps a small dataset gives (with the
    default 0.99 the inference-mode model collapses to chance on small data)."""
    import keras
    from keras import layers

    frames, mels = input_shape
    norm = layers.Normalization(axis=-2, name="mel_normalization")  # per mel bin
    norm.adapt(normalization_sample)
    inputs = keras.Input(shape=(frames, mels, 1), name="log_mel")
    x = layers.Reshape((frames, mels))(norm(inputs))
    for filters, kernel in ((64, 5), (128, 5), (128, 3)):
        x = layers.Conv1D(filters, kernel, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling1D(2)(x)
    x = layers.GlobalMaxPooling1D()(x)
    x = layers.Dropout(0.3)(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="kws_cnn")


# -- checkpoints on the store ---------------------------------------------------------------------


def run_prefix(model: str, run_id: str) -> str:
    return f"{layout.model_runs_prefix(model)}/{layout.run_key(run_id)}"


def _complete_epochs(store: ObjectStore, prefix: str) -> list[int]:
    """Epoch folders whose upload finished (their marker is written after their files)."""
    epochs = []
    for obj in store.list(prefix):
        rel = obj.key[len(prefix) + 1 :]
        folder, _, name = rel.partition("/")
        if name == EPOCH_COMPLETE and folder.startswith("epoch=") and folder[6:].isdigit():
            epochs.append(int(folder[6:]))
    return sorted(epochs)


def last_checkpoint_epoch(store: ObjectStore, prefix: str) -> int:
    """The epoch of the run's last checkpoint (0: none). The pointer says; an unreadable pointer
    (cut short by a crash mid-write, or hand-edited) is not a reason to fail every retry: the
    newest epoch folder whose upload completed is used instead, with a warning."""
    key = f"{prefix}/{CHECKPOINT_POINTER}"
    try:
        pointer = json.loads(store.read_bytes(key))
        epoch = int(pointer["epoch"])
        if epoch < 1:
            raise ValueError(f"epoch {epoch}")
        return epoch
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as e:
        complete = _complete_epochs(store, prefix)
        log.warning("checkpoint pointer %s is unreadable (%s); resuming from the newest complete epoch folder: %s",
                    store.uri(key), e, complete[-1] if complete else "none, starting over")
        return complete[-1] if complete else 0


def restore_checkpoint(store: ObjectStore, prefix: str, backup_dir: Path) -> int:
    """Bring the run's last checkpoint from the store into ``backup_dir``; returns its epoch
    (0 if the run has none)."""
    epoch = last_checkpoint_epoch(store, prefix)
    if not epoch:
        return 0
    epoch_prefix = f"{prefix}/epoch={epoch:04d}"
    for obj in store.list(epoch_prefix):
        if obj.key.rsplit("/", 1)[-1] != EPOCH_COMPLETE:
            store.download_file(obj.key, backup_dir / obj.key[len(epoch_prefix) + 1 :])
    return epoch


def _checkpoint_sync_callback(store: ObjectStore, prefix: str, backup_dir: Path, chief: bool = True):
    import keras

    class CheckpointSync(keras.callbacks.Callback):
        """After BackupAndRestore wrote the epoch's backup locally, copy it to the store under
        its own epoch folder, mark the folder complete, then move the pointer (so a reader never
        sees half a checkpoint). Only the chief of a multi-worker job writes."""

        def on_epoch_end(self, epoch, logs=None):
            if not chief:
                return
            epoch_prefix = f"{prefix}/epoch={epoch + 1:04d}"
            for path in sorted(backup_dir.rglob("*")):
                if path.is_file():
                    store.upload_file(path, f"{epoch_prefix}/{path.relative_to(backup_dir).as_posix()}")
            store.write_bytes(f"{epoch_prefix}/{EPOCH_COMPLETE}", json.dumps({"epoch": epoch + 1}).encode())
            store.write_bytes(f"{prefix}/{CHECKPOINT_POINTER}", json.dumps({"epoch": epoch + 1}).encode())

    return CheckpointSync()


# -- evaluation and export -----------------------------------------------------------------------


def evaluate(model, datasets: dict, vocabulary: list[str]) -> dict:
    import tensorflow as tf

    metrics: dict = {}
    for split, ds in datasets.items():
        loss, acc = model.evaluate(ds, verbose=0)
        metrics[f"{split}_loss"], metrics[f"{split}_accuracy"] = float(loss), float(acc)
    labels, preds = [], []
    for x, y in datasets["test"]:
        preds.append(tf.argmax(model(x, training=False), axis=-1).numpy())
        labels.append(y.numpy())
    y_true, y_pred = np.concatenate(labels), np.concatenate(preds)
    n = len(vocabulary)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    support = confusion.sum(axis=1)
    metrics["confusion_matrix"] = {"labels": vocabulary, "rows_true_cols_predicted": confusion.tolist()}
    metrics["per_class_recall"] = {
        label: (float(confusion[i, i] / support[i]) if support[i] else None) for i, label in enumerate(vocabulary)
    }
    metrics["test_examples"] = int(len(y_true))
    return metrics


def plot_history(history_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [float(r[metric]) for r in rows], label=f"train {metric}")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# -- the job -------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    status: str  # trained | already_trained | worker_done (a non-chief worker: committed nothing)
    model: str
    version: str
    manifest_uri: str
    metrics: dict
    resumed_from_epoch: int = 0
    seconds: float = 0.0


def run_training(spec: TrainingJobSpec, work_dir: Path | None = None) -> TrainingResult:
    """Train, evaluate and commit one model version. Rerunning a run resumes from its last
    checkpoint; rerunning a finished run returns its version without training again."""
    started = time.perf_counter()
    store = ObjectStore(spec.store_uri)
    done = registry.find_version_of_run(store, spec.model_name, spec.run_id)
    if done is not None:
        log.info("run %s already produced %s version %s", spec.run_id, spec.model_name, done.version)
        return TrainingResult("already_trained", spec.model_name, done.version, done.manifest_uri, done.manifest.metrics.model_dump())

    work_dir = Path(work_dir or os.environ.get("TWOCLUSTER_WORK_DIR") or tempfile.gettempdir()) / "twocluster-train"
    data = stage_datasets(spec, work_dir / "datasets")  # validates the manifests first
    prune_stage_cache(work_dir / "datasets", keep=set(data.dataset_versions), max_age_seconds=STAGE_CACHE_MAX_AGE_SECONDS)

    import keras

    keras.utils.set_random_seed(spec.seed)
    strategy, strategy_name = choose_strategy()
    chief = is_chief(json.loads(os.environ.get("TF_CONFIG") or "{}"))
    hp = spec.hyperparameters
    global_batch = hp.batch_size * strategy.num_replicas_in_sync
    train_ds = make_dataset(data, spec.train_split, global_batch, training=True, seed=spec.seed, augment=hp.augment, shuffle_buffer=hp.shuffle_buffer)
    eval_sets = {
        name: make_dataset(data, split, global_batch, training=False, seed=spec.seed)
        for name, split in (("train", spec.train_split), ("validation", spec.validation_split), ("test", spec.test_split))
    }
    sample = np.concatenate([x.numpy() for x, _ in eval_sets["train"].take(20)])

    ckpt_prefix = run_prefix(spec.model_name, spec.run_id)
    backup_dir = work_dir / "runs" / ckpt_prefix.replace("/", "_")
    shutil.rmtree(backup_dir, ignore_errors=True)
    backup_dir.mkdir(parents=True)
    resumed_from = restore_checkpoint(store, ckpt_prefix, backup_dir)
    if resumed_from:
        log.info("resuming run %s from epoch %d (checkpoint in %s)", spec.run_id, resumed_from, store.uri(ckpt_prefix))

    with strategy.scope():
        model = build_model(data.feature_shape, len(data.vocabulary), sample)
        model.compile(
            optimizer=keras.optimizers.Adam(hp.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    callbacks = [
        keras.callbacks.BackupAndRestore(str(backup_dir / "backup"), delete_checkpoint=False),
        keras.callbacks.CSVLogger(str(backup_dir / "history.csv"), append=True),
        _checkpoint_sync_callback(store, ckpt_prefix, backup_dir, chief),
    ]
    fit_started = time.perf_counter()
    model.fit(train_ds, validation_data=eval_sets["validation"], epochs=hp.epochs, callbacks=callbacks, verbose=2)
    fit_seconds = time.perf_counter() - fit_started

    if not chief:
        # A non-chief worker's share of the job ends with the fit: the chief evaluates and commits.
        log.info("worker %s finished its share of run %s; the chief commits the model", os.environ.get("TF_CONFIG"), spec.run_id)
        return TrainingResult("worker_done", spec.model_name, "", "", {}, resumed_from, time.perf_counter() - started)
    metrics = evaluate(model, eval_sets, data.vocabulary)
    metrics.update(training_seconds=round(fit_seconds, 1), epochs=hp.epochs, resumed_from_epoch=resumed_from,
                   strategy=strategy_name, examples=data.rows)
    log.info("test accuracy %.3f, validation accuracy %.3f", metrics["test_accuracy"], metrics["validation_accuracy"])

    version = layout.new_version_id()
    version_prefix = layout.model_version_prefix(spec.model_name, version)
    out = work_dir / "export" / version
    out.mkdir(parents=True)
    model.save(out / "model.keras")
    model.export(str(out / "saved_model"), format="tf_saved_model", verbose=False)
    # A fixed batch and the trained model's outputs on it: the gate reloads the exported model
    # and must reproduce them.
    probe = sample[:16]
    np.savez(out / "load_test.npz", inputs=probe, logits=model.predict(probe, verbose=0))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "feature_spec.json").write_text(data.feature_spec.model_dump_json(indent=2))
    (out / "labels.json").write_text(json.dumps(data.vocabulary))
    (out / "job_spec.json").write_text(spec.model_dump_json(indent=2))
    shutil.copy(backup_dir / "history.csv", out / "history.csv")
    plot_history(out / "history.csv", out / "training_curves.png")

    # The heartbeat keeps garbage collection off the version folder while it is uploaded.
    with InFlight(store, layout.model_versions_prefix(spec.model_name), version, spec.run_id):
        local_files = [p for p in sorted(out.rglob("*")) if p.is_file()]
        sums = store.upload_many([(p, f"{version_prefix}/{p.relative_to(out).as_posix()}") for p in local_files])
        files = [
            ManifestFile(path=p.relative_to(out).as_posix(), bytes=p.stat().st_size, checksum=sums[f"{version_prefix}/{p.relative_to(out).as_posix()}"])
            for p in local_files
        ]
        manifest = ModelManifest(
            version=version,
            created_at=dt.datetime.now(dt.UTC),
            files=files,
            feature_spec=data.feature_spec,
            lineage=Lineage(
                inputs=spec.datasets,
                code_version=code_version(),
                code={"trainer": code_hashes()["trainer"], "package": code_hashes()["package"]},
                run_id=spec.run_id,
                params={"hyperparameters": hp.model_dump(), "seed": spec.seed, "strategy": strategy_name},
                dataset_versions=data.dataset_versions,
            ),
            model=spec.model_name,
            metrics=ModelMetrics(**{k: metrics[k] for k in ModelMetrics.model_fields if k in metrics}),
            seconds={"fit": round(fit_seconds, 2), "total": round(time.perf_counter() - started, 2)},
        )
        uri = commit_version(store, layout.model_versions_prefix(spec.model_name), manifest)
    shutil.rmtree(out, ignore_errors=True)
    return TrainingResult("trained", spec.model_name, version, uri, metrics, resumed_from, time.perf_counter() - started)
