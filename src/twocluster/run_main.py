"""`make run`: the main job on the embedded default (local folder store, local Spark, local
training backend).

Built so far: the sample-data arrivals, the Spark preprocessing job (run here for every arrived
date in one local Spark session), and the training job with its gate, each run as its own OS
process through the same entry points the local training backend uses, communicating only
through the store and a JSON job spec, then Spark batch scoring of the latest date with the
published model. The Airflow DAG lands on top of this, and `make run` will then run the whole
DAG for the latest date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from twocluster import layout, sample_data
from twocluster.jobspec import Hyperparameters, TrainingJobSpec
from twocluster.preprocess import run_preprocess
from twocluster.scoring import run_scoring
from twocluster.sparkutil import get_spark
from twocluster.spec import default_spec_path, load_pipeline_spec
from twocluster.storage import ObjectStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(default_spec_path()))
    parser.add_argument("--store", default=None, help="store URI (default: $TWOCLUSTER_STORE_URI)")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--clips-per-day", type=int, default=600)
    parser.add_argument("--master", default="local[*]", help="Spark master (default: %(default)s)")
    args = parser.parse_args(argv)

    spec = load_pipeline_spec(args.spec)
    store = ObjectStore(spec.resolve_store_uri(args.store))
    started = time.perf_counter()
    reports = sample_data.generate(
        store, spec, sample_data.arrival_dates(args.days), args.clips_per_day, seed=0, bad_files_per_day=2
    )
    print(f"\n== {spec.name}: sample data in {store.root_uri}")
    for r in reports:
        labels = ", ".join(f"{k}={v}" for k, v in r.per_label.items())
        state = "already there" if r.skipped else "generated"
        print(f"  {r.date}: {r.clips} clips + {r.bad_files} broken files, {r.bytes / 1e6:.1f} MB ({state})")
        print(f"    {labels}")
    print(f"  took {time.perf_counter() - started:.1f}s")

    print(f"\n== {spec.name}: Spark preprocessing (local Spark, {args.master})")
    spark = get_spark(f"make-run-{spec.name}", master=args.master)
    manifests: list[str] = []
    try:
        for r in reports:
            result = run_preprocess(spark, spec, store, r.date, run_id=f"make-run-{r.date}")
            c = result.counts
            print(
                f"  {r.date}: {result.status} dataset v={result.version}: input {c['input']} = accepted {c['accepted']} "
                f"+ rejected {c['rejected']} {c['rejected_by_reason'] or ''}; splits {c['per_split']} ({result.seconds:.1f}s)"
            )
            print(f"    {result.manifest_uri}")
            manifests.append(result.manifest_uri)
    finally:
        spark.stop()

    run_id = f"make-run-{reports[-1].date}-{len(manifests)}d"
    print(f"\n== {spec.model.name}: training on {len(manifests)} dataset(s) (local backend: a separate process)")
    job = TrainingJobSpec(
        run_id=run_id, pipeline=spec.name, datasets=manifests, model_name=spec.model.name, store_uri=store.root_uri,
        hyperparameters=Hyperparameters(epochs=spec.model.epochs, batch_size=spec.model.batch_size,
                                         learning_rate=spec.model.learning_rate, augment=spec.model.augment),
        seed=spec.model.seed, resources={"gpus": 0},
    )
    job_key = f"jobs/{spec.model.name}/{run_id}.json"
    store.write_bytes(job_key, job.model_dump_json(indent=2).encode())
    trained = _run_json([sys.executable, str(ROOT / "training_jobs" / "train.py"), "--job-spec", store.uri(job_key)])
    m = trained["metrics"]
    print(f"  {trained['status']} {trained['model']} v={trained['version']} in {trained['seconds']:.0f}s: "
          f"test accuracy {m['test_accuracy']:.3f} (validation {m['validation_accuracy']:.3f}, train {m['train_accuracy']:.3f}, "
          f"{m['test_examples']} test clips from held-out speakers)")
    print(f"    {trained['manifest_uri']}")

    gate = spec.model.gate
    decision = _run_json(
        [sys.executable, str(ROOT / "training_jobs" / "publish.py"), "--store", store.root_uri, "--model", spec.model.name,
         "--version", trained["version"], "--alias", spec.scoring.alias,
         "--min-test-accuracy", str(gate.min_test_accuracy), "--max-regression", str(gate.max_regression)],
        ok_codes=(0, 3),
    )
    verdict = "published" if decision["published"] else "NOT published"
    print(f"  gate: {verdict} as {spec.model.name}:{spec.scoring.alias}: {decision['reason']}")
    print(f"    {store.uri(layout.model_alias_prefix(spec.model.name, spec.scoring.alias))}")

    latest = reports[-1].date
    print(f"\n== {spec.name}: Spark batch scoring of {latest} with {spec.model.name}:{spec.scoring.alias}")
    spark = get_spark(f"make-run-score-{spec.name}", arrow_batch_rows=spec.scoring.arrow_batch_size, master=args.master)
    try:
        scored = run_scoring(spark, spec, store, latest, run_id=f"make-run-score-{latest}")
    finally:
        spark.stop()
    c = scored.counts
    print(f"  {scored.status} predictions v={scored.version} by model v={scored.model_version}: input {c['input']} = "
          f"scored {c['accepted']} + rejected {c['rejected']} {c['rejected_by_reason'] or ''}; "
          f"{scored.model_loads} model load(s) on {scored.python_workers} Python worker(s)")
    print(f"    {scored.manifest_uri}")
    print("\nNot built yet: the Airflow DAG. Once it lands, `make run` runs the whole DAG for the latest date.")
    return 0


ROOT = Path(__file__).resolve().parents[2]


def _run_json(cmd: list[str], ok_codes: tuple[int, ...] = (0,)) -> dict:
    """Run an entry point as its own process (as the local backend does); return its JSON line."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode not in ok_codes:
        raise SystemExit(f"{Path(cmd[1]).name} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
