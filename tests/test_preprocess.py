from __future__ import annotations

import datetime as dt
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from twocluster import layout, sample_data
from twocluster.manifest import list_committed_versions, read_manifest, verify_files
from twocluster.preprocess import RejectRateExceeded, run_preprocess
from twocluster.storage import ObjectStore

ROOT = Path(__file__).resolve().parents[1]
DATE = dt.date(2026, 11, 18)
BAD_EXPECTED = {  # the generator's broken arrivals and the reason each must get
    "empty": "empty",
    "truncated": "truncated",
    "notaudio": "undecodable",
    "imageinaudio": "not_audio",
    "unknownlabel": "unknown_label",
    "toolong": "too_long",
}


def _arrive(store: ObjectStore, spec, date=DATE, clips=90, bad=6) -> None:
    sample_data.generate_day(store, spec, date, clips=clips, seed=11, bad_files=bad)


@pytest.fixture(scope="module")
def committed(spark, speech_spec, tmp_path_factory):
    """One date with good clips and one of each broken arrival, preprocessed once."""
    store = ObjectStore((tmp_path_factory.mktemp("pre") / "store").as_uri())
    _arrive(store, speech_spec)
    result = run_preprocess(spark, speech_spec, store, DATE, run_id="test-run", max_reject_rate=0.2)
    prefix = layout.dataset_version_prefix(speech_spec.name, DATE, result.version)
    return store, result, prefix, read_manifest(store, prefix)


def test_counts_reconcile_and_every_bad_input_is_rejected_with_its_reason(committed):
    store, result, prefix, manifest = committed
    c = manifest.counts
    assert result.status == "committed"
    assert c.input == 96 and c.accepted == 90 and c.rejected == 6
    assert sum(c.per_split.values()) == c.accepted == sum(c.per_label.values())
    rejects = pq.read_table(io.BytesIO(store.read_bytes(f"{prefix}/rejects/rejects.parquet"))).to_pylist()
    got = {r["path"].split("/")[-1].split("_")[0][5:]: r["reason"] for r in rejects}
    assert got == BAD_EXPECTED
    assert len(set(got.values())) == 6, "each kind of bad input gets its own reason"
    assert all(r["detail"] for r in rejects)
    assert c.rejected_by_reason == {reason: 1 for reason in BAD_EXPECTED.values()}
    verify_files(store, prefix, manifest)


def test_tfrecords_read_back_with_tf_data(committed, speech_spec):
    import tensorflow as tf

    store, _, prefix, manifest = committed
    fspec = manifest.feature_spec["tfrecord"]["features"]
    shape = fspec["log_mel"]["shape"]
    assert shape == [97, 40]
    parse_spec = {
        "log_mel": tf.io.FixedLenFeature(shape, tf.float32),
        "label": tf.io.FixedLenFeature([], tf.string),
        "label_id": tf.io.FixedLenFeature([], tf.int64),
        "source_id": tf.io.FixedLenFeature([], tf.string),
    }
    vocabulary = manifest.feature_spec["label_vocabulary"]
    seen: dict[str, int] = {}
    for f in manifest.files:
        if f.model_extra.get("kind") != "tfrecord":
            continue
        split = f.path.split("/")[1]
        path = store.local_path(f"{prefix}/{f.path}")
        n = 0
        for record in tf.data.TFRecordDataset([str(path)], compression_type="GZIP"):
            ex = tf.io.parse_single_example(record, parse_spec)
            assert ex["log_mel"].shape == tuple(shape)
            assert np.isfinite(ex["log_mel"].numpy()).all()
            assert vocabulary[int(ex["label_id"])] == ex["label"].numpy().decode()
            n += 1
        assert n == f.rows
        seen[split] = seen.get(split, 0) + n
    assert seen == manifest.counts.per_split


def test_parquet_holds_the_same_rows_and_prunes_by_split(committed):
    store, _, prefix, manifest = committed
    root = store.local_path(f"{prefix}/parquet")
    table = pq.read_table(root)  # hive partitioning restores the split column
    assert table.num_rows == manifest.counts.accepted
    assert {"path", "label", "label_id", "source_id", "features", "split"} <= set(table.column_names)
    test_only = pq.read_table(root, filters=[("split", "=", "test")])
    assert test_only.num_rows == manifest.counts.per_split.get("test", 0)
    # Speaker-disjoint: no source id in two splits.
    rows = table.select(["source_id", "split"]).to_pylist()
    splits_of: dict[str, set] = {}
    for r in rows:
        splits_of.setdefault(r["source_id"], set()).add(str(r["split"]))
    assert all(len(s) == 1 for s in splits_of.values())


def test_manifest_records_feature_spec_and_lineage(committed, speech_spec):
    _, result, _, manifest = committed
    assert manifest.feature_spec["features"]["log_mel"] == {"dtype": "float32", "shape": [97, 40]}
    assert manifest.feature_spec["params"]["sample_rate"] == 16000
    assert manifest.feature_spec["label_vocabulary"] == speech_spec.labels.vocabulary
    assert manifest.lineage.run_id == "test-run"
    assert manifest.lineage.inputs[0].endswith("raw/speech_commands/date=2026-11-18")
    assert manifest.lineage.model_extra["input_fingerprint"].startswith("sha256:")
    assert manifest.model_extra["ignored_files"] == 1  # the _ARRIVED.json marker


def test_rerun_with_unchanged_inputs_is_a_no_op_and_new_arrivals_make_a_new_version(committed, spark, speech_spec):
    store, first, _, _ = committed
    again = run_preprocess(spark, speech_spec, store, DATE, run_id="rerun", max_reject_rate=0.2)
    assert again.status == "unchanged" and again.version == first.version
    parent = layout.dataset_date_prefix(speech_spec.name, DATE)
    assert list_committed_versions(store, parent) == [first.version]

    late = layout.raw_date_prefix(speech_spec.name, DATE) + "/yes/late0000_nohash_0.wav"
    store.copy(layout.raw_date_prefix(speech_spec.name, DATE) + "/" + _first_good_clip(store, speech_spec), late)
    newer = run_preprocess(spark, speech_spec, store, DATE, run_id="late-arrival", max_reject_rate=0.2)
    assert newer.status == "committed" and newer.version != first.version
    assert newer.counts["input"] == first.counts["input"] + 1
    assert list_committed_versions(store, parent) == sorted([first.version, newer.version])


def _first_good_clip(store, spec) -> str:
    prefix = layout.raw_date_prefix(spec.name, DATE)
    return next(o.key[len(prefix) + 1 :] for o in store.list(prefix + "/yes") if "bad" not in o.key)


def test_too_many_rejects_fails_after_writing_the_report_and_commits_nothing(spark, speech_spec, file_store):
    _arrive(file_store, speech_spec, clips=20, bad=6)  # 6 of 26 rejected: 23%
    with pytest.raises(RejectRateExceeded, match=r"6 of 26 inputs rejected \(23.1%\), above the 5.0% allowed.*rejects report: file://"):
        run_preprocess(spark, speech_spec, file_store, DATE, run_id="strict")
    parent = layout.dataset_date_prefix(speech_spec.name, DATE)
    assert list_committed_versions(file_store, parent) == []
    reports = file_store.list(parent, suffixes=("rejects.parquet",))
    assert len(reports) == 1
    assert pq.read_table(file_store.local_path(reports[0].key)).num_rows == 6


def test_an_empty_date_commits_an_empty_dataset(spark, speech_spec, file_store):
    result = run_preprocess(spark, speech_spec, file_store, "2026-01-01", run_id="empty")
    assert result.status == "committed"
    assert result.counts["input"] == 0 and result.counts["accepted"] == 0
    manifest = read_manifest(file_store, layout.dataset_version_prefix(speech_spec.name, "2026-01-01", result.version))
    assert manifest.files == []


@pytest.mark.s3
def test_runs_against_the_s3_store(spark, speech_spec, s3_store):
    _arrive(s3_store, speech_spec, clips=40, bad=6)
    result = run_preprocess(spark, speech_spec, s3_store, DATE, run_id="s3", max_reject_rate=0.2)
    assert result.manifest_uri.startswith("s3://")
    prefix = layout.dataset_version_prefix(speech_spec.name, DATE, result.version)
    manifest = read_manifest(s3_store, prefix)
    assert (manifest.counts.input, manifest.counts.accepted, manifest.counts.rejected) == (46, 40, 6)
    verify_files(s3_store, prefix, manifest)


def _spark_submit_env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYSPARK_PYTHON": sys.executable}


def test_entry_point_help():
    out = subprocess.run([sys.executable, str(ROOT / "spark_jobs" / "preprocess.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--date" in out.stdout and "--store" in out.stdout


def test_a_killed_run_leaves_no_visible_version_and_the_rerun_succeeds(speech_spec, file_store):
    """spark-submit for real, killed with SIGKILL once it has started writing the dataset."""
    _arrive(file_store, speech_spec, clips=60, bad=1)
    cmd = [
        "spark-submit", "--master", "local[2]", str(ROOT / "spark_jobs" / "preprocess.py"),
        "--spec", str(ROOT / "pipelines" / "speech_commands.yaml"), "--date", DATE.isoformat(),
        "--store", file_store.root_uri,
    ]
    parent = layout.dataset_date_prefix(speech_spec.name, DATE)
    proc = subprocess.Popen(cmd, env=_spark_submit_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not file_store.list(parent) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert file_store.list(parent), "the killed run had written data files"
    assert list_committed_versions(file_store, parent) == []

    rerun = subprocess.run(cmd, env=_spark_submit_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    versions = list_committed_versions(file_store, parent)
    assert len(versions) == 1
    manifest = read_manifest(file_store, f"{parent}/v={versions[0]}")
    assert manifest.counts.input == 61
    verify_files(file_store, f"{parent}/v={versions[0]}", manifest)
