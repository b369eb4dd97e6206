"""The measurements behind the benchmark goals that two cores cannot meet (issue 17): what a
figure's two sides cost per clip or per task, outside Spark and inside it, so a missed goal
shows its ceiling instead of an excuse.

    .venv/bin/python bench/ceilings.py     # ~3 minutes; prints one line per measurement

* featurization, per clip in one process: fetch, decode, the log-mel transform one clip at a
  time and in batches, the row UDF's whole path (with ``tolist()``, what a row UDF returns),
  librosa's mel spectrogram for reference; the loop's CPU time / wall time (NumPy's BLAS
  threads) and the same loop with one BLAS thread;
* two plain processes featurizing (multiprocessing, one BLAS thread each): the two-core
  ceiling of the featurize figure's Spark side;
* Spark's cost per Python task: an empty ``mapInArrow`` over 2 / 6 / 20 / 60 tasks on local[2];
* ONNX Runtime on the bench's own trained model, one and two threads, batches of 64 and 256;
* Airflow's own share of the dag_run figure: `airflow dags test` of a DAG of 11 tasks that do
  nothing (the pipeline DAG's count on a daily run), on the same embedded installation.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _per_clip_ms(fn, clips: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / clips * 1e3


def featurize_share(args: tuple[str, str, list[str]]) -> int:
    """One plain process's loop over its share of the files, as the loop a user would write
    (fetch, then featurize batches of 64): the clips it did. Run in :func:`plain_processes`."""
    root_uri, featurizer_json, keys = args
    from twocluster.spark.io import worker_featurizer
    from twocluster.store.storage import ObjectStore

    featurizer, store = worker_featurizer(featurizer_json, "log_mel"), ObjectStore(root_uri)
    for i in range(0, len(keys), 64):
        featurizer.featurize_many([store.read_bytes(k) for k in keys[i : i + 64]])
    return len(keys)


def predict_share(args: tuple[str, str, str, list[str], list[int], int, int, int, str]) -> int:
    """One plain process's pass of the scoring job's predicting function (its model loaded once
    per process, as per Python worker) over one saved featurized partition, in the job's Arrow
    batches: the rows it predicted. Run in :func:`plain_processes`."""
    root_uri, model, version, vocabulary, shape, top_k, inference_batch_size, batch_rows, path = args
    import pyarrow as pa

    from twocluster.spark.scoring import predicting_function
    from twocluster.store.storage import ObjectStore

    predict_batches = predicting_function(ObjectStore(root_uri), model, version, vocabulary, shape, top_k, inference_batch_size)
    table = pa.ipc.open_file(pa.memory_map(path)).read_all().select(["path", "source_id", "features"])
    return sum(b.num_rows for b in predict_batches(iter(table.to_batches(max_chunksize=batch_rows))))


@contextlib.contextmanager
def plain_processes(count: int = 2):
    """``count`` fresh Python processes (spawned, not forked from this one's Spark and threads),
    with one BLAS thread each, as PySpark gives its Python workers: the two-core ceiling of a
    Spark job's Python side, without Spark."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited at spawn
    try:
        pool = get_context("spawn").Pool(count)
    finally:
        del os.environ["OMP_NUM_THREADS"]
    with pool:
        yield pool


def featurization(ctx) -> None:
    import threadpoolctl

    from twocluster.spark.io import list_inputs

    inputs, _, _ = list_inputs(ctx.store, ctx.spec, ctx.date)
    every_key = inputs["key"].to_pylist()
    keys = every_key[:2400]
    f, store, n = ctx.featurizer, ctx.store, len(keys)
    blobs = [store.read_bytes(k) for k in keys]
    clips = np.stack([f.read(b) for b in blobs])

    def loop():
        for i in range(0, n, 64):
            f.featurize_many([store.read_bytes(k) for k in keys[i : i + 64]])

    print(f"featurization, ms per clip in one process ({n} clips):")
    print(f"  fetch                        {_per_clip_ms(lambda: [store.read_bytes(k) for k in keys], n):.3f}")
    print(f"  decode                       {_per_clip_ms(lambda: [f.read(b) for b in blobs], n):.3f}")
    print(f"  transform, batches of 64     {_per_clip_ms(lambda: [f.transform(clips[i:i + 64]) for i in range(0, n, 64)], n):.3f}")
    print(f"  transform, one clip a call   {_per_clip_ms(lambda: [f.transform(clips[i:i + 1]) for i in range(n)], n):.3f}")
    print(f"  the loop (fetch + featurize, batches of 64)  {_per_clip_ms(loop, n):.3f}")
    row = _per_clip_ms(lambda: [f.featurize_many([store.read_bytes(k)]).features[0].reshape(-1).tolist() for k in keys], n)
    print(f"  a row UDF's path (one clip, tolist())        {row:.3f}")
    try:
        import librosa

        s = ctx.spec.featurizer

        def with_librosa(b):
            mel = librosa.feature.melspectrogram(y=f.read(b), sr=s.sample_rate, n_fft=s.fft_length, hop_length=s.frame_step,
                                                 win_length=s.frame_length, n_mels=s.num_mel_bins, fmin=s.lower_edge_hz,
                                                 fmax=s.upper_edge_hz, center=False, power=2.0)
            return np.log(mel + s.log_offset)

        with_librosa(blobs[0])
        print(f"  librosa: decode + mel spectrogram            {_per_clip_ms(lambda: [with_librosa(b) for b in blobs], n, 2):.3f}")
    except ImportError:
        print("  librosa: not installed")
    with threadpoolctl.threadpool_limits(1):
        print(f"  the loop, one BLAS thread                    {_per_clip_ms(loop, n):.3f}")
    cpu, wall = time.process_time(), time.perf_counter()
    loop()
    print(f"  the loop's CPU time / wall time: {(time.process_time() - cpu) / (time.perf_counter() - wall):.2f} "
          f"(BLAS threads: {[i['num_threads'] for i in threadpoolctl.threadpool_info()]})")
    share = [(store.root_uri, ctx.spec.featurizer.model_dump_json(), every_key[k::2]) for k in range(2)]
    with plain_processes(2) as pool:
        pool.map(featurize_share, share)  # warm: imports, page cache
        walls = []
        for _ in range(3):
            t = time.perf_counter()
            pool.map(featurize_share, share)
            walls.append(time.perf_counter() - t)
    print(f"  two plain processes, one BLAS thread each, {len(every_key)} clips: {[round(len(every_key) / w) for w in walls]} clips/s (3 runs)")


def spark_task_cost(ctx) -> None:
    def passthrough(batches):
        yield from batches

    print("Spark, an empty mapInArrow on local[2] (ms per job, best of 3):")
    for tasks in (2, 6, 20, 60):
        frame = ctx.spark.range(0, tasks, 1, tasks).mapInArrow(passthrough, "id long")
        frame.collect()
        best = min(_timed_ms(frame.collect) for _ in range(3))
        print(f"  {tasks:3d} tasks: {best:6.0f} ms")


def _timed_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def onnx_runtime(ctx) -> None:
    from twocluster import serving
    from twocluster.store.registry import stage_model

    name, version = ctx.model_version
    folder = stage_model(ctx.store, name, version, ctx.workdir / "onnx", only=[serving.ONNX_FILE, serving.PROBE_FILE])
    x = np.random.default_rng(0).standard_normal((4096, *ctx.featurizer.shape)).astype(np.float32)
    print("ONNX Runtime on the bench's model (clips/s):")
    for threads in (1, 2):
        model = serving.OnnxModel(folder / serving.ONNX_FILE, threads=threads)
        for batch in (64, 256):
            model.predict_on_batch(x[:batch])
            t = time.perf_counter()
            for i in range(0, len(x), batch):
                model.predict_on_batch(x[i : i + batch])
            print(f"  {threads} thread(s), batches of {batch}: {len(x) / (time.perf_counter() - t):,.0f}")


FLOOR_DAG = '''"""11 tasks that do nothing: what `airflow dags test` costs before any work."""
import datetime as dt

from airflow.sdk import DAG, task

with DAG(dag_id="floor", schedule=None, start_date=dt.datetime(2026, 1, 1), catchup=False):
    @task
    def step(i: int, previous=None) -> int:
        return i

    previous = None
    for i in range(11):
        previous = step.override(task_id=f"t{i}")(i, previous)
'''


def floor_airflow(workdir: Path, root_uri: str) -> dict[str, str]:
    """The environment of an embedded Airflow (the pipeline's installation) whose only DAG has
    11 tasks that do nothing (the pipeline DAG's count on a daily run), prepared."""
    from twocluster_devtools.airflow_local import airflow_env, prepare

    dags = workdir / "floor-dags"
    dags.mkdir(exist_ok=True)
    (dags / "floor.py").write_text(FLOOR_DAG)
    env = airflow_env(workdir / "floor-airflow", root_uri, dags_folder=dags)
    prepare(env)
    return env


def airflow_floor_walls(env: dict[str, str], runs: int = 3) -> list[float]:
    """Wall seconds of ``runs`` `airflow dags test` runs of the no-op DAG (:func:`floor_airflow`):
    what any daily run pays Airflow before its work."""
    import subprocess

    from twocluster_devtools.airflow_local import airflow

    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        airflow(env, "dags", "test", "floor", check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
    return walls


def airflow_floor(ctx) -> None:
    import subprocess

    from twocluster_devtools.airflow_local import airflow

    env = floor_airflow(ctx.workdir, ctx.store.root_uri)
    walls = airflow_floor_walls(env)
    t = time.perf_counter()
    airflow(env, "version", check=True, stdout=subprocess.DEVNULL)
    print(f"Airflow: `airflow dags test` of 11 no-op tasks {[round(w, 1) for w in walls]} s; `airflow version` {time.perf_counter() - t:.1f} s")


def main() -> int:
    from run import BenchContext

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory(prefix="bench-ceilings-") as tmp:
        ctx = BenchContext(Path(tmp), clips=600, repeats=1, quick=True, copies=8)
        try:
            featurization(ctx)
            spark_task_cost(ctx)
            onnx_runtime(ctx)
            airflow_floor(ctx)
        finally:
            ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
