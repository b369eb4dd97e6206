"""daily_job_warm / daily_job_cold (issue 37): a day's preprocessing job end to end, as a user
feels it, against the loop a user would write instead.

* **the loop**: one process, imports included (the interpreter's start to its exit): soundfile
  and ``librosa.feature.melspectrogram`` per clip (the spec's log-mel parameters), each clip's
  ``tf.train.Example`` written with ``tf.io.TFRecordWriter``, one Parquet file with pyarrow;
* **cold**: ``spark-submit spark_jobs/preprocess.py`` (local[2]) as the pipeline's operator
  starts it (:mod:`twocluster.spark.launch`), from the command to its exit;
* **warm**: the same job as a Spark Connect client of a long-lived server (the deployment whose
  Spark is already started, as the ``dag_run`` figure measures), from the command to its exit.

Each run reads one day's arrivals from a store of its own, so the job does its full work (a
store holding that day's committed version would find nothing to do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "pipelines" / "speech_commands.yaml"

USER_LOOP = r"""
import json, pathlib, sys
import numpy as np, soundfile as sf, librosa, pyarrow as pa, pyarrow.parquet as pq, tensorflow as tf

raw, out, s = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), json.loads(sys.argv[3])
samples = int(s["sample_rate"] * s["clip_seconds"])
files = sorted(raw.rglob("*.wav"))
features, labels, paths = [], [], []
with tf.io.TFRecordWriter(str(out / "day.tfrecord")) as writer:
    for path in files:
        audio, rate = sf.read(path, dtype="float32")
        if audio.ndim > 1:
            audio = audio[:, 0]
        audio = np.pad(audio[:samples], (0, max(0, samples - len(audio))))
        mel = librosa.feature.melspectrogram(y=audio, sr=rate, n_fft=s["fft_length"], hop_length=s["frame_step"],
                                             win_length=s["frame_length"], n_mels=s["num_mel_bins"], fmin=s["lower_edge_hz"],
                                             fmax=s["upper_edge_hz"], center=False, power=2.0)
        log_mel = np.log(mel + s["log_offset"]).T.astype(np.float32)
        label, rel = path.parent.name, str(path.relative_to(raw))
        writer.write(tf.train.Example(features=tf.train.Features(feature={
            "log_mel": tf.train.Feature(float_list=tf.train.FloatList(value=log_mel.ravel())),
            "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.encode()])),
            "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rel.encode()]))})).SerializeToString())
        features.append(log_mel.ravel())
        labels.append(label)
        paths.append(rel)
pq.write_table(pa.table({"log_mel": pa.array(features, pa.list_(pa.float32())), "label": labels, "path": paths}),
               out / "day.parquet")
print(len(files))
"""


def user_loop_seconds(raw_folder: Path, out: Path, featurizer_json: str) -> tuple[float, int]:
    """(seconds from the interpreter's start to its exit, clips) of the loop a user would write."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", USER_LOOP, str(raw_folder), str(out), featurizer_json],
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"the user's loop failed:\n{done.stderr[-3000:]}")
    return seconds, int(done.stdout.split()[-1])


def _job(store_uri: str, day: str, command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds from the command to its exit, seconds of the job's one featurize-and-write pass
    as the job itself reports it: what is left is the job's fixed cost)."""
    started = time.perf_counter()
    done = subprocess.run([*command, "--spec", str(SPEC), "--date", day, "--store", store_uri], capture_output=True, text=True,
                          env={**os.environ, "PYSPARK_PYTHON": sys.executable, **env})
    seconds = time.perf_counter() - started
    if done.returncode or '"committed"' not in done.stdout:
        raise RuntimeError(f"the preprocessing job did not commit ({done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])["timings"]["featurize"]


def cold_job_seconds(store_uri: str, day: str, archives: Path | None = None) -> tuple[float, float]:
    """A spark-submit of the job, started as the operator starts a local driver."""
    from spark_start import spark_submit

    from twocluster.spark.launch import quick_start

    with quick_start("local[2]", archives) as conf:
        return _job(store_uri, day, [*spark_submit("local[2]", conf), str(ROOT / "spark_jobs" / "preprocess.py")], {})


def warm_job_seconds(store_uri: str, day: str, spark_remote: str) -> tuple[float, float]:
    """The job as a Spark Connect client of a running server (``SPARK_REMOTE``), as the operator runs it there."""
    return _job(store_uri, day, [sys.executable, str(ROOT / "spark_jobs" / "preprocess.py")], {"SPARK_REMOTE": spark_remote})
