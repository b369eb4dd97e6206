"""Gate and publish: the step between training and serving.

Loads the new model version back from the store exactly as a consumer would, checks that it
reproduces the trainer's outputs on a recorded batch (a load test), compares its test metrics
with an absolute floor and with the current champion, and only then moves the alias. A model
that fails any check is not published, and the decision says why.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from twocluster import layout, registry
from twocluster.manifest import ManifestError, verify_files
from twocluster.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class GateDecision:
    published: bool
    model: str
    version: str
    alias: str
    reason: str
    test_accuracy: float | None = None
    champion_version: str | None = None
    champion_test_accuracy: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def stage_model(store: ObjectStore, model: str, version: str, into: Path) -> Path:
    """Download a committed model version (every file verified against its manifest)."""
    prefix = layout.model_version_prefix(model, version)
    manifest = registry.read_model_manifest(store, model, version)
    folder = into / version
    for f, (key, checksum) in zip(
        manifest.files, store.download_many([(f"{prefix}/{f.path}", folder / f.path) for f in manifest.files]), strict=True
    ):
        if checksum != f.checksum:
            raise ManifestError(f"{store.uri(key)}: checksum {checksum} does not match the manifest's {f.checksum}")
    return folder


def load_test(model_dir: Path, atol: float = 1e-3) -> None:
    """The exported model must load and reproduce the trainer's logits on the recorded batch."""
    import keras

    model = keras.models.load_model(model_dir / "model.keras")
    probe = np.load(model_dir / "load_test.npz")
    logits = model.predict(probe["inputs"], verbose=0)
    if logits.shape != probe["logits"].shape or not np.all(np.isfinite(logits)):
        raise ValueError(f"the model returned {logits.shape} outputs, expected finite {probe['logits'].shape}")
    worst = float(np.max(np.abs(logits - probe["logits"])))
    if worst > atol:
        raise ValueError(f"the reloaded model's logits differ from the trainer's by up to {worst:.2e}")


def gate_and_publish(
    store: ObjectStore,
    model: str,
    version: str,
    alias: str,
    min_test_accuracy: float,
    max_regression: float,
) -> GateDecision:
    def refuse(reason: str, **kw) -> GateDecision:
        log.warning("not publishing %s version %s as %r: %s", model, version, alias, reason)
        return GateDecision(False, model, version, alias, reason, **kw)

    try:
        manifest = registry.read_model_manifest(store, model, version)
        verify_files(store, layout.model_version_prefix(model, version), manifest)
        with tempfile.TemporaryDirectory(prefix="gate-") as tmp:
            load_test(stage_model(store, model, version, Path(tmp)))
    except Exception as e:  # noqa: BLE001 - any failure to load means "do not publish"
        return refuse(f"the model failed its load test: {e}")

    accuracy = float(manifest.model_extra.get("metrics", {}).get("test_accuracy", float("nan")))
    if not accuracy >= min_test_accuracy:
        return refuse(f"test accuracy {accuracy:.3f} is below the floor {min_test_accuracy:.3f}", test_accuracy=accuracy)

    champion = registry.resolve_alias(store, model, alias)
    champion_accuracy = None
    if champion is not None:
        if champion.version == version:
            return GateDecision(True, model, version, alias, "already published", accuracy, version, accuracy)
        champion_manifest = registry.read_model_manifest(store, model, champion.version)
        champion_accuracy = float(champion_manifest.model_extra.get("metrics", {}).get("test_accuracy", 0.0))
        if accuracy < champion_accuracy - max_regression:
            return refuse(
                f"test accuracy {accuracy:.3f} is more than {max_regression:.3f} below the champion "
                f"{champion.version}'s {champion_accuracy:.3f}",
                test_accuracy=accuracy, champion_version=champion.version, champion_test_accuracy=champion_accuracy,
            )
    reason = f"test accuracy {accuracy:.3f} >= floor {min_test_accuracy:.3f}" + (
        f" and within {max_regression:.3f} of the champion's {champion_accuracy:.3f}" if champion else " (first model)"
    )
    registry.publish_alias(store, model, alias, version, reason=reason, test_accuracy=accuracy)
    log.info("published %s version %s as %r: %s", model, version, alias, reason)
    return GateDecision(True, model, version, alias, reason, accuracy, champion.version if champion else None, champion_accuracy)
