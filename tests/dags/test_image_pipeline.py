"""The second pipeline kind end to end through the same DAG factory: real handwritten digit
images (scikit-learn's scanned set) in the folder-per-label layout -> the image featurizer ->
the image_cnn model module -> gate -> publish -> scoring, by `airflow dags test` with real
spark-submit, the local training backend and a local folder as the store."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import yaml

from twocluster.spec import load_pipeline_spec
from twocluster.store import layout, registry
from twocluster.store.manifest import read_manifest, scan_location
from twocluster.store.storage import ObjectStore
from twocluster_demo import sample_images
from twocluster_devtools.airflow_local import REPO_ROOT, airflow, airflow_env, prepare

pytestmark = pytest.mark.slow
DATE = dt.date(2026, 10, 12)
DAG_ID = "digits_e2e"


def test_an_image_pipeline_preprocesses_trains_publishes_and_scores(tmp_path):
    data = yaml.safe_load((REPO_ROOT / "pipelines" / "digits.yaml").read_text())
    data.update(name=DAG_ID, start_date=DATE.isoformat(), end_date=DATE.isoformat())
    data["model"].update(epochs=8, gate={"min_test_accuracy": 0.5, "max_regression": 1.0})
    spec_path = tmp_path / f"{DAG_ID}.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text('"""Airflow DAG for the test."""\nfrom twocluster.orchestration.dag_factory import build_pipeline_dag\n\n'
                                       f"dag = build_pipeline_dag({str(spec_path)!r})\n")
    spec = load_pipeline_spec(spec_path)
    store = ObjectStore((tmp_path / "store").as_uri())
    (arrived,) = sample_images.generate(store, spec, [DATE], 900, seed=3, bad_files_per_day=3)
    env = airflow_env(tmp_path / "airflow", store.root_uri, dags_folder=dags, spark_master="local[2]")
    env["TWOCLUSTER_WORK_DIR"] = str(tmp_path / "work")
    prepare(env)
    log_path = tmp_path / "dags-test.log"
    with log_path.open("w") as out:
        result = airflow(env, "dags", "test", DAG_ID, DATE.isoformat(), "-c", json.dumps({"date": DATE.isoformat(), "retrain": "force"}),
                         stdout=out, stderr=out, timeout=900)
    log = log_path.read_text(errors="replace")
    assert result.returncode == 0 and "state=success" in [ln for ln in log.splitlines() if "DagRun Finished" in ln][-1], log[-5000:]

    (dataset_version,) = [v.version for v in scan_location(store, layout.dataset_date_prefix(spec.name, DATE)).versions]
    dataset = read_manifest(store, layout.dataset_version_prefix(spec.name, DATE, dataset_version))
    assert dataset.counts.input == arrived.clips + arrived.bad_files == 903
    assert dataset.counts.accepted == 900 and dataset.counts.rejected == 3, dataset.counts
    # A truncated PNG, random bytes and a JPEG named .png.
    assert dataset.counts.rejected_by_reason == {"undecodable": 2, "wrong_format": 1}, dataset.counts
    assert dataset.feature_spec.feature_shape == [32, 32, 1] and dataset.feature_spec.feature_name == "image"

    alias = registry.resolve_alias(store, spec.model.name, "production")
    model = registry.read_model_manifest(store, spec.model.name, alias.version)
    assert model.lineage.params["architecture"] == "image_cnn"
    # Ten classes, 8 epochs on ~630 training images: far above chance (0.1); `make run-images`
    # trains on the whole set and is held to the spec's 0.97.
    assert model.metrics.test_accuracy > 0.8, model.metrics

    (pred_version,) = [v.version for v in scan_location(store, layout.predictions_date_prefix(spec.name, DATE)).versions]
    predictions = read_manifest(store, layout.predictions_version_prefix(spec.name, DATE, pred_version))
    assert predictions.model_version == alias.version
    assert predictions.counts.input == 903 and predictions.counts.accepted == 900
