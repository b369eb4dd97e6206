"""GPU training figures, for a machine with an NVIDIA GPU (not part of `make bench`: the
development machine has none).

1. The real trainer (``training_jobs/train.py``) on each Keras backend given (``jax``, ``torch``)
   over a store's committed datasets of one pipeline, with the pipeline spec's hyper-parameters:
   fit time, step time, examples/s and held-out test accuracy from the committed model version.
2. The input pipeline those backends use (``keras.utils.PyDataset`` over the staged Parquet copy):
   batches/s alone on one core, and feeding a fit at a large batch while ``nvidia-smi`` samples
   the GPU: examples/s and the GPU's busy share; from which the cores needed to feed a target rate.

    python bench/gpu_training.py --store file:///data/store --spec pipelines/speech_commands.yaml \\
        --backends jax torch --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class GpuSampler:
    """``nvidia-smi`` utilization samples (percent busy) while the block runs."""

    def __init__(self, period_ms: int = 100):
        self.period_ms, self.samples, self._proc = period_ms, [], None

    def __enter__(self):
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                       f"-lms={self.period_ms}"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
                self.samples.append((util, mem))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self._proc is None:
            return
        self._proc.terminate()
        self._proc.wait()

    @property
    def busy(self) -> float | None:
        return statistics.mean(u for u, _ in self.samples) / 100 if self.samples else None


def manifests(store_uri: str, pipeline: str) -> list[str]:
    root = Path(store_uri.removeprefix("file://"))
    return ["file://" + str(p) for p in sorted((root / "datasets" / pipeline).glob("date=*/v=*/_MANIFEST.json"))]


def trainer_run(backend: str, job: dict, work: Path) -> dict:
    spec_path = work / f"job-{backend}.json"
    spec_path.write_text(json.dumps(job))
    env = {**os.environ, "KERAS_BACKEND": backend}
    started = time.perf_counter()
    with GpuSampler() as gpu:
        out = subprocess.run([sys.executable, str(ROOT / "training_jobs" / "train.py"), "--job-spec", str(spec_path),
                              "--work-dir", str(work / backend)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"backend": backend, "error": out.stderr[-3000:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    m = result["metrics"]
    train_examples = m["examples"]["train"]
    steps = -(-train_examples // job["hyperparameters"]["batch_size"]) * job["hyperparameters"]["epochs"]
    return {"backend": backend, "strategy": m["strategy"], "input_format": m["input_format"], "test_accuracy": m["test_accuracy"],
            "validation_accuracy": m["validation_accuracy"], "test_examples": m["test_examples"], "fit_seconds": m["training_seconds"],
            "step_ms": 1000 * m["training_seconds"] / steps, "examples_per_s": train_examples * job["hyperparameters"]["epochs"] / m["training_seconds"],
            "process_seconds": time.perf_counter() - started, "gpu_busy_whole_process": gpu.busy, "version": result["version"]}


def feed_figures(job: dict, work: Path, batch_size: int, epochs: int) -> dict:
    """In this process (KERAS_BACKEND from the environment): the PyDataset alone, then feeding a fit."""
    import keras

    from twocluster.training import data, models

    staged = data.stage_splits(job["datasets"], ["train"], work / "feed", "parquet")
    feed = data.batches(staged, "train", batch_size, training=True, seed=1)
    n = sum(staged.rows.values())
    t = time.perf_counter()
    for _ in range(3):
        for i in range(len(feed)):
            feed[i]
        feed.on_epoch_end()
    alone = 3 * n / (time.perf_counter() - t)
    sample = data.feature_sample(data.batches(staged, "train", 256, training=False, seed=1))
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = models.build_model(job["architecture"], staged.feature_spec, len(staged.vocabulary), sample, augment=job["hyperparameters"]["augment"])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(feed, epochs=1, verbose=0)  # compile
    with GpuSampler(50) as gpu:
        t = time.perf_counter()
        model.fit(feed, epochs=epochs, verbose=0)
        seconds = time.perf_counter() - t
    return {"backend": keras.backend.backend(), "batch_size": batch_size, "train_examples": n, "pydataset_examples_per_s_one_core": alone,
            "fit_examples_per_s": n * epochs / seconds, "gpu_busy_during_fit": gpu.busy,
            "gpu_memory_mib_max": max((m for _, m in gpu.samples), default=None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--backends", nargs="+", default=["jax", "torch"])
    parser.add_argument("--feed-batch", type=int, default=1024)
    parser.add_argument("--feed-epochs", type=int, default=20)
    parser.add_argument("--work", default="/tmp/gpu-bench")
    parser.add_argument("--out", required=True)
    parser.add_argument("--feed-only", action="store_true")
    parser.add_argument("--epochs", type=int, default=None, help="override the spec's epochs (a smoke test)")
    args = parser.parse_args()
    import yaml

    spec = yaml.safe_load(Path(args.spec).read_text())
    model = spec["model"]
    job = {"run_id": f"gpu-bench-{int(time.time())}", "pipeline": spec["name"], "datasets": manifests(args.store, spec["name"]),
           "model_name": f"{model['name']}_gpu", "architecture": model.get("architecture", "keyword_cnn"), "store_uri": args.store,
           "hyperparameters": {k: model[k] for k in ("epochs", "batch_size", "learning_rate", "augment") if k in model}
           | {"learning_rate_schedule": model.get("learning_rate_schedule", "constant")}, "seed": model.get("seed", 1234)}
    if args.epochs:
        job["hyperparameters"]["epochs"] = args.epochs
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"pipeline": spec["name"], "datasets": len(job["datasets"]), "trainer": [], "feed": None}
    if not args.feed_only:
        for backend in args.backends:
            job["run_id"] = f"gpu-bench-{backend}-{int(time.time())}"
            results["trainer"].append(trainer_run(backend, job, work))
            print(json.dumps(results["trainer"][-1]), flush=True)
    if args.feed_epochs:
        results["feed"] = feed_figures(job, work, args.feed_batch, args.feed_epochs)
        print(json.dumps(results["feed"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
