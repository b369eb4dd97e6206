from __future__ import annotations

import datetime as dt
import glob
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from twocluster.features import featurizer_for
from twocluster.spark.preprocess import run_preprocess
from twocluster.spark.scoring import (
    FeatureSpecMismatch,
    FeaturizerCodeChanged,
    predict_batch,
    register_model_function,
    run_scoring,
    scoring_partitions,
    visible_gpus_for_task,
)
from twocluster.spark.session import gpu_executor_settings
from twocluster.store import layout, registry
from twocluster.store.jobspec import TrainingJobSpec
from twocluster.store.manifest import read_manifest, unlisted_files, verify_files
from twocluster.store.storage import ObjectStore
from twocluster.training.gate import gate_and_publish
from twocluster.training.trainer import run_training
from twocluster_demo import sample_data

TRAIN_DATE, SCORE_DATE = dt.date(2026, 11, 10), dt.date(2026, 11, 11)
ALSA = sorted(glob.glob("/usr/share/sounds/alsa/*.wav"))


@pytest.fixture(scope="module")
def published(spark, speech_spec, tmp_path_factory):
    """A store with a trained, published model and a new date (with broken files) to score."""
    store = ObjectStore((tmp_path_factory.mktemp("score") / "store").as_uri())
    sample_data.generate_day(store, speech_spec, TRAIN_DATE, clips=300, seed=31)
    dataset = run_preprocess(spark, speech_spec, store, TRAIN_DATE, run_id="score-tests")
    job = TrainingJobSpec(run_id="score-tests", pipeline="speech_commands", datasets=[dataset.manifest_uri], model_name="kws_cnn",
                          store_uri=store.root_uri, hyperparameters={"epochs": 4, "batch_size": 32})
    trained = run_training(job, tmp_path_factory.mktemp("work"))
    assert gate_and_publish(store, "kws_cnn", trained.version, "production", 0.0, 1.0).published
    sample_data.generate_day(store, speech_spec, SCORE_DATE, clips=60, seed=32, bad_files=6)
    return store, trained.version


def _predictions(store: ObjectStore, result):
    prefix = layout.predictions_version_prefix("speech_commands", result.date, result.version)
    manifest = read_manifest(store, prefix)
    table = pq.read_table(store.local_path(f"{prefix}/predictions")) if store.local_path() else None
    return prefix, manifest, table


def test_predictions_match_model_predict_outside_spark(spark, speech_spec, published):
    store, model_version = published
    result = run_scoring(spark, speech_spec, store, SCORE_DATE, run_id="t1")
    prefix, manifest, table = _predictions(store, result)
    c = manifest.counts
    assert (c.input, c.accepted, c.rejected) == (66, 61, 5)  # the unknown-label file is scored, not rejected
    assert manifest.model_version == model_version
    verify_files(store, prefix, manifest)
    assert unlisted_files(store, prefix, manifest) == []
    assert manifest.model_runtimes == ["onnx"]  # the version's ONNX copy served it; the reference below is Keras
    rows = {r["path"]: r for r in table.to_pylist()}
    assert {"path", "predicted_label", "confidence", "top_labels", "top_probabilities", "model_version", "scored_at", "run_id"} <= set(table.column_names)

    # The same clips featurized and predicted without Spark.
    featurizer = featurizer_for(speech_spec.featurizer)
    model_dir = store.local_path(layout.model_version_prefix("kws_cnn", model_version))
    model = keras.models.load_model(model_dir / "model.keras")
    raw = layout.raw_date_prefix("speech_commands", SCORE_DATE)
    paths = sorted(rows)
    batch = featurizer.featurize_many([store.read_bytes(f"{raw}/{p}") for p in paths])
    expected = predict_batch(model, batch.features, speech_spec.labels.vocabulary, 3, 32)
    for i, p in enumerate(paths):
        assert rows[p]["predicted_label"] == expected.predicted_label[i]
        assert rows[p]["top_labels"] == list(expected.labels[i])
        assert np.allclose(rows[p]["top_probabilities"], expected.probabilities[i], atol=1e-4)
        assert rows[p]["model_version"] == model_version and rows[p]["run_id"] == "t1"
    rejects = pq.read_table(store.local_path(f"{prefix}/rejects/rejects.parquet")).to_pylist()
    assert {r["reason"] for r in rejects} == {"empty", "truncated", "undecodable", "not_audio", "too_long"}

    again = run_scoring(spark, speech_spec, store, SCORE_DATE, run_id="t2")
    assert again.status == "unchanged" and again.version == result.version


@pytest.mark.parametrize(("rows", "parallelism", "expected"), [(0, 2, 2), (600, 2, 2), (9_600, 2, 2), (12_000, 2, 4), (9_600, 8, 8), (100_000, 8, 24)])
def test_scoring_tasks_come_in_whole_waves_of_the_cores(rows, parallelism, expected):
    assert scoring_partitions(rows, parallelism) == expected


def test_the_model_loads_at_most_once_per_python_worker(spark, speech_spec, published):
    store, _ = published
    small_batches = speech_spec.model_copy(update={"scoring": speech_spec.scoring.model_copy(update={"arrow_batch_size": 4})})
    sample_data.generate_day(store, speech_spec, dt.date(2026, 11, 12), clips=120, seed=33)
    result = run_scoring(spark, small_batches, store, dt.date(2026, 11, 12), run_id="loads")  # ~16 batches per task
    _, manifest, _ = _predictions(store, result)
    assert manifest.counts.accepted == 120
    assert 1 <= result.model_loads <= result.python_workers <= 2, (result.model_loads, result.python_workers)
    assert manifest.model_loads == result.model_loads


def test_scoring_makes_one_pass_and_caches_nothing_in_the_jvm(spark, speech_spec, published, monkeypatch):
    """Caching the featurized and the scored rows ran the 1 GB driver heap out of memory in the
    columnar cache builder at 38,400 clips (bench scale figure): one pass, nothing cached."""
    store, _ = published

    def refuse(self, *args, **kwargs):
        raise AssertionError("run_scoring cached a DataFrame in the JVM")

    frame_class = type(spark.range(1))
    monkeypatch.setattr(frame_class, "persist", refuse)
    monkeypatch.setattr(frame_class, "cache", refuse)
    monkeypatch.setattr(type(spark), "createDataFrame", refuse)  # the listing travels in the closure (map_listing)
    sample_data.generate_day(store, speech_spec, dt.date(2026, 11, 16), clips=40, seed=34, bad_files=3)
    result = run_scoring(spark, speech_spec, store, dt.date(2026, 11, 16), run_id="one-pass")
    _, manifest, table = _predictions(store, result)
    assert manifest.counts.input == manifest.counts.accepted + manifest.counts.rejected == 43
    assert table.num_rows == manifest.counts.accepted == sum(manifest.summary.predicted_labels.values())
    assert spark.sparkContext._jsc.getPersistentRDDs().isEmpty()


WORKER_LOAD = """
import json, sys
import numpy as np
from twocluster.spark.scoring import worker_model
root_uri, version, runtime, probe_path = sys.argv[1:]
model, load_id = worker_model(root_uri, None, "kws_cnn", version, runtime)
probe = np.load(probe_path)
logits = model.predict_on_batch(probe["inputs"])
print(json.dumps({"load_id": load_id, "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
                  "worst": float(np.max(np.abs(logits - probe["logits"])))}))
"""


@pytest.mark.parametrize("runtime", ["auto", "keras"])
def test_a_scoring_worker_serves_the_onnx_copy_without_importing_tensorflow(published, runtime, tmp_path):
    """A fresh Python worker imported TensorFlow to load the Keras model: 15-22 s and ~800 MB per
    worker here, most of a daily scoring job. The ONNX copy needs neither TensorFlow nor Keras
    and reproduces the trainer's logits; ``runtime: keras`` still loads the Keras model."""
    import json
    import subprocess
    import sys

    store, version = published
    probe = store.local_path(f"{layout.model_version_prefix('kws_cnn', version)}/load_test.npz")
    out = subprocess.run([sys.executable, "-c", WORKER_LOAD, store.root_uri, version, runtime, str(probe)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["worst"] < 1e-3
    if runtime == "auto":
        assert loaded["load_id"].endswith("-onnx") and not loaded["tensorflow"] and not loaded["keras"], loaded
    else:
        assert loaded["load_id"].endswith("-keras") and loaded["tensorflow"], loaded


def test_a_worker_keeps_each_stores_model_apart_and_only_the_last_few(published, tmp_path):
    """On a Spark Connect server a Python worker outlives its job (its session is shared) and
    may score another pipeline's model: the cache keyed a model by (version, runtime) alone, so
    another store's model of the same version got this one's, and it kept every model it ever
    loaded, with its staged files."""
    import shutil

    from twocluster.spark import scoring

    store, version = published
    other = ObjectStore((tmp_path / "other").as_uri())
    prefix = layout.model_versions_prefix("kws_cnn")  # the versions and their commit log
    shutil.copytree(store.local_path(prefix), other.local_path(prefix))
    scoring._MODEL_CACHE.clear()
    _, first = scoring.worker_model(store.root_uri, None, "kws_cnn", version, "onnx")
    _, elsewhere = scoring.worker_model(other.root_uri, None, "kws_cnn", version, "onnx")
    assert elsewhere != first, "another store's model was served from this one's cache entry"
    assert scoring.worker_model(store.root_uri, None, "kws_cnn", version, "onnx")[1] == first  # reused
    staged = [entry[2] for entry in scoring._MODEL_CACHE.values()]
    scoring.worker_model(other.root_uri, None, "kws_cnn", version, "keras")
    assert len(scoring._MODEL_CACHE) == scoring.MODEL_CACHE_SIZE == 2
    assert (other.root_uri, "kws_cnn", version, "onnx") not in scoring._MODEL_CACHE  # the least recently used
    assert [p.exists() for p in staged] == [False, True]


def test_a_model_evicted_from_a_workers_cache_is_collected_though_its_heap_was_frozen(spark, published):
    """A worker's tasks freeze what it holds (``freeze_worker_heap``); a frozen object held in a
    reference cycle, as a Keras model is, would never be collected once dropped. Evicting a model
    from the worker's cache thaws the heap first, so the daemon's collection after the task
    frees it. Here the oldest entry is an object in a cycle standing for such a model."""
    import pyarrow as pa

    store, version = published
    root_uri = store.root_uri

    def evict_in_a_task(batches):
        import gc
        import tempfile
        import weakref
        from pathlib import Path

        from twocluster.spark import scoring
        from twocluster.spark.io import freeze_worker_heap

        class CyclicModel:
            def __init__(self):
                self.me = self

        for _ in batches:
            pass
        scoring._MODEL_CACHE.clear()
        model = CyclicModel()
        alive = weakref.ref(model)
        scoring._MODEL_CACHE[("elsewhere", "old", "v0", "keras")] = (model, "old-load", Path(tempfile.mkdtemp()))
        del model
        freeze_worker_heap()  # as the next task's start does
        scoring.worker_model(root_uri, None, "kws_cnn", version, "onnx")
        scoring.worker_model(root_uri, None, "kws_cnn", version, "auto")  # a second entry: the oldest goes
        gc.collect()  # as the daemon does after the task
        yield pa.RecordBatch.from_pydict({"evicted": [("elsewhere", "old", "v0", "keras") not in scoring._MODEL_CACHE],
                                          "collected": [alive() is None]})

    [row] = spark.range(0, 1, 1, 1).mapInArrow(evict_in_a_task, "evicted boolean, collected boolean").collect()
    assert row.evicted and row.collected, row


def test_the_runtime_follows_the_spec_the_version_and_the_task(speech_spec, published):
    from twocluster import serving
    from twocluster.spark.scoring import serving_runtime

    store, version = published
    manifest = registry.read_model_manifest(store, "kws_cnn", version)
    assert serving.ONNX_FILE in {f.path for f in manifest.files}
    assert serving_runtime("auto", manifest, on_gpu=False) == "onnx"
    assert serving_runtime("auto", manifest, on_gpu=True) == "keras"  # the Spark image's ONNX Runtime is the CPU build
    assert serving_runtime("onnx", manifest, on_gpu=True) == "onnx"
    assert serving_runtime("keras", manifest, on_gpu=False) == "keras"
    # A worker caches one model per version and runtime: a second runtime in the same worker (a SQL
    # function registered with another spec, say) does not get the first one's model.
    from twocluster.spark.scoring import worker_model

    assert worker_model(store.root_uri, None, "kws_cnn", version, "onnx")[1].endswith("-onnx")
    assert worker_model(store.root_uri, None, "kws_cnn", version, "keras")[1].endswith("-keras")
    without = manifest.model_copy(update={"files": [f for f in manifest.files if f.path != serving.ONNX_FILE]})
    assert serving_runtime("auto", without, on_gpu=False) == "keras"
    with pytest.raises(ValueError, match=f"runtime is onnx but kws_cnn v={version} has no model.onnx"):
        serving_runtime("onnx", without, on_gpu=False)


def test_nothing_published_is_a_clear_error(spark, speech_spec, file_store):
    with pytest.raises(registry.RegistryError, match="nothing is published as kws_cnn:production"):
        run_scoring(spark, speech_spec, file_store, SCORE_DATE, run_id="none")


def test_feature_spec_mismatch_fails_before_reading_data(spark, speech_spec, published):
    store, _ = published
    other = speech_spec.model_copy(update={"featurizer": speech_spec.featurizer.model_copy(update={"num_mel_bins": 64})})
    missing_date = dt.date(2030, 1, 1)  # no data at all: the error must come first
    with pytest.raises(FeatureSpecMismatch, match=r"features \(names, dtypes, shapes\).*\[97, 40\].*\[97, 64\].*featurizer.num_mel_bins: 40 vs 64"):
        run_scoring(spark, other, store, missing_date, run_id="mismatch")
    assert not store.list(layout.predictions_date_prefix("speech_commands", missing_date))


def test_a_featurizer_code_change_refuses_or_warns_per_spec(spark, speech_spec, published, monkeypatch):
    """Defect 4: the job's featurizer code differs from the one the model's data was made with."""
    import twocluster.features as features

    store, model_version = published
    changed = {**features.code_hashes(), "featurizer": "sha256:" + "f" * 64}
    monkeypatch.setattr(features, "code_hashes", lambda: changed)
    date = dt.date(2026, 11, 14)
    with pytest.raises(FeaturizerCodeChanged, match=f"model kws_cnn version {model_version} was trained on data featurized by"):
        run_scoring(spark, speech_spec, store, date, run_id="code-changed")
    assert not store.list(layout.predictions_date_prefix("speech_commands", date))
    lenient = speech_spec.model_copy(update={"scoring": speech_spec.scoring.model_copy(update={"on_featurizer_change": "warn"})})
    sample_data.generate_day(store, speech_spec, date, clips=10, seed=34)
    result = run_scoring(spark, lenient, store, date, run_id="code-changed")
    assert result.status == "committed" and "featurizer code" in result.warnings[0]
    _, manifest, _ = _predictions(store, result)
    assert manifest.lineage.params["warnings"] == result.warnings


@pytest.mark.skipif(not ALSA, reason="alsa-utils is not installed (make test installs it)")
def test_real_recordings_from_alsa_utils_are_scored(spark, speech_spec, published):
    store, _ = published
    date = dt.date(2026, 11, 13)
    for path in ALSA:  # 48 kHz human speech, 1.3-1.5 s
        store.write_bytes(f"{layout.raw_date_prefix('speech_commands', date)}/alsa/{Path(path).name}", Path(path).read_bytes())
    result = run_scoring(spark, speech_spec, store, date, run_id="alsa")
    assert result.counts["input"] == len(ALSA) and result.counts["accepted"] == len(ALSA) and result.counts["rejected"] == 0


@pytest.mark.s3
def test_scoring_runs_against_the_s3_store(spark, speech_spec, published, s3_store):
    store, model_version = published
    for obj in store.list("models/kws_cnn"):  # publish the same model into the S3 store
        if "/runs/" not in obj.key:
            s3_store.write_bytes(obj.key, store.read_bytes(obj.key))
    sample_data.generate_day(s3_store, speech_spec, SCORE_DATE, clips=30, seed=34, bad_files=2)
    result = run_scoring(spark, speech_spec, s3_store, SCORE_DATE, run_id="s3")
    assert result.manifest_uri.startswith("s3://") and result.model_version == model_version
    prefix = layout.predictions_version_prefix("speech_commands", SCORE_DATE, result.version)
    manifest = read_manifest(s3_store, prefix)
    assert (manifest.counts.input, manifest.counts.accepted + manifest.counts.rejected) == (32, 32)
    verify_files(s3_store, prefix, manifest)


def test_the_model_as_a_spark_sql_function(spark, speech_spec, published, tmp_path):
    store, model_version = published
    raw = layout.raw_date_prefix("speech_commands", SCORE_DATE)
    folder = store.local_path(raw)
    assert register_model_function(spark, speech_spec, store) == model_version
    spark.read.format("binaryFile").option("pathGlobFilter", "*.wav").option("recursiveFileLookup", "true") \
        .load(str(folder)).createOrReplaceTempView("audio")
    rows = spark.sql("SELECT path, predict_keyword(content) AS keyword FROM audio").collect()
    # Spark's file source hides folders starting with "_" (Hadoop's convention: _silence_/ is not
    # read) and skips zero-byte files.
    visible = [p for p in folder.rglob("*.wav") if not p.parent.name.startswith("_") and p.stat().st_size]
    assert len(rows) == len(visible)
    labelled = [r for r in rows if r.keyword is not None]
    broken = [p for p in visible if p.name.startswith("bad") and "unknownlabel" not in p.name]
    assert len(broken) == 4
    assert len(labelled) == len(visible) - len(broken) and all(r.keyword in speech_spec.labels.vocabulary for r in labelled)
    assert all(r.keyword is None for r in rows if "/bad" in r.path and "unknownlabel" not in r.path)
    # The spec's input limits apply in SQL too: over max_bytes, or a sample rate it does not allow,
    # is NULL (before, both were decoded, resampled and labelled).
    limited = speech_spec.model_copy(update={"inputs": speech_spec.inputs.model_copy(update={"max_bytes": 60_000})})
    odd = tmp_path / "odd"
    odd.mkdir()
    ok = next(p for p in visible if not p.name.startswith("bad"))
    (odd / "ok.wav").write_bytes(ok.read_bytes())
    t = np.arange(48_000) / 48_000
    sf.write(odd / "large_48k.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 48_000, subtype="PCM_16")  # 96 KB
    sf.write(odd / "rate_300k.wav", 0.3 * np.sin(2 * np.pi * 440 * t[:15_000]), 300_000, subtype="PCM_16")  # 30 KB
    register_model_function(spark, limited, store, name="predict_limited")
    spark.read.format("binaryFile").load(str(odd)).createOrReplaceTempView("odd_audio")
    keywords = {r.path.rsplit("/", 1)[1]: r.keyword for r in spark.sql("SELECT path, predict_limited(content) AS keyword FROM odd_audio").collect()}
    assert keywords["ok.wav"] is not None and keywords["large_48k.wav"] is None and keywords["rate_300k.wav"] is None, keywords


def test_gpu_selection_for_spark_tasks():
    """No GPU here: the executor settings and the address -> CUDA_VISIBLE_DEVICES logic only."""
    from pyspark.resource import ResourceInformation

    assert visible_gpus_for_task({"gpu": ResourceInformation("gpu", ["1", "3"])}) == "1,3"
    assert visible_gpus_for_task({"gpu": ResourceInformation("gpu", [])}) is None
    assert visible_gpus_for_task({}) is None
    conf = gpu_executor_settings(gpus_per_executor=2, gpus_per_task=0.5)
    assert conf["spark.executor.resource.gpu.amount"] == "2" and conf["spark.task.resource.gpu.amount"] == "0.5"
    assert conf["spark.executor.resource.gpu.discoveryScript"].endswith("get_gpus_resources.sh")


def test_a_day_recorded_at_another_sample_rate_skews_from_the_training_data_and_fails_the_health_check(spark, speech_spec, published):
    """Issue 35: every predictions version describes its features (statistics.json) and how far
    they lie from its model's training data (Jensen-Shannon per mel bin, L-infinity on the
    labels); a day recorded at 8 kHz (the same clips: nothing above 4 kHz), is past the spec's
    monitoring.max_feature_skew, shown per date and failing the health check, and the same day
    recorded as usual is not. (Its own dates: other tests add recordings to SCORE_DATE.)"""
    import io as _io

    import soxr

    from twocluster.ops.monitoring import health_problems, pipeline_overview
    from twocluster.store import statistics

    store, model_version = published
    normal_date, shifted_date = dt.date(2026, 11, 14), dt.date(2026, 11, 15)
    sample_data.generate_day(store, speech_spec, normal_date, clips=60, seed=33)
    source, target = layout.raw_date_prefix("speech_commands", normal_date), layout.raw_date_prefix("speech_commands", shifted_date)
    for obj in store.list(source):
        data = store.read_bytes(obj.key)
        try:
            audio, rate = sf.read(_io.BytesIO(data), dtype="float32")
            buf = _io.BytesIO()
            sf.write(buf, soxr.resample(audio, rate, 8000), 8000, subtype="PCM_16", format="WAV")
            data = buf.getvalue()
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
            pass  # the arrival marker, as it was
        store.write_bytes(target + obj.key[len(source):], data)
    normal = run_scoring(spark, speech_spec, store, normal_date, run_id="skew-normal")
    shifted = run_scoring(spark, speech_spec, store, shifted_date, run_id="skew-shifted")
    skew = {d: statistics.read(store, layout.predictions_version_prefix("speech_commands", d, r.version)).skew
            for d, r in ((normal_date, normal), (shifted_date, shifted))}
    limit = speech_spec.monitoring.max_feature_skew
    assert skew[normal_date].model_version == model_version and len(skew[normal_date].per_channel) == 40
    # Another day of other speakers measured ~0.1 from the training day; the 8 kHz copy of it ~0.4.
    assert skew[normal_date].feature_skew < limit < skew[shifted_date].feature_skew, skew
    assert skew[normal_date].label_distance is not None and skew[normal_date].training_versions
    overview = pipeline_overview(store, speech_spec, today=shifted_date)
    rows = {r.date: r for r in overview.dates}
    assert rows[shifted_date].predictions.feature_skew == pytest.approx(skew[shifted_date].feature_skew, abs=1e-4)
    assert any("feature skew" in p for p in rows[shifted_date].problems)
    assert not any("feature skew" in p for p in rows[normal_date].problems)
    (problem,) = [p for p in health_problems(overview) if "feature skew" in p]
    assert str(shifted_date) in problem and str(normal_date) not in problem
