"""Gate and publish: the step between training and serving.

Loads the new model version back from the store exactly as a consumer would (every file verified
against its manifest's checksums), checks that it reproduces the trainer's outputs on a recorded
batch (a load test), evaluates it **and the current champion on the same test data** (the
candidate's test split), compares with an absolute floor and with the champion, and only then
moves the alias, as a compare-and-set on the alias's commit log: if another gate (a backfill next
to a manual run, the DAG next to ``training_jobs/publish.py``) moved it in between, the decision
is made again against the new champion. The result is read back: ``published`` is true only if
the alias now points at this version because of this call.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from twocluster import serving
from twocluster.store import layout, registry
from twocluster.store.commitlog import CommitLog, GateDecided
from twocluster.store.storage import ObjectStore
from twocluster.training import data, report

log = logging.getLogger(__name__)

MAX_DECISIONS = 10  # re-decisions after lost compare-and-sets before giving up

Outcome = Literal["published", "already_published", "refused"]


class GateError(RuntimeError):
    pass


@dataclass
class GateDecision:
    outcome: Outcome
    model: str
    version: str
    alias: str
    reason: str
    test_accuracy: float | None = None  # measured now, on the candidate's test split
    recorded_test_accuracy: float | None = None  # what the trainer recorded
    test_examples: int | None = None
    champion_version: str | None = None
    champion_test_accuracy: float | None = None  # measured now, on the same data
    champion_recorded_test_accuracy: float | None = None
    alias_entry: int | None = None  # the alias log entry this gate wrote or found
    decisions: int = 0  # how many times it decided (more than 1: it lost a race and re-decided)

    @property
    def published(self) -> bool:
        return self.outcome == "published"

    def as_dict(self) -> dict:
        return {**asdict(self), "published": self.published}

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


def load_model(model_dir: Path):
    import keras

    return keras.models.load_model(model_dir / "model.keras")


def load_test(model, model_dir: Path, atol: float = serving.PROBE_ATOL) -> None:
    """The exported model must load and reproduce the trainer's logits on the recorded batch; so
    must its ONNX serving copy, when the version has one (the scoring workers serve that copy)."""
    inputs, logits = serving.load_probe(model_dir)
    serving.check_probe(model, inputs, logits, "the reloaded model", atol)
    if (model_dir / serving.ONNX_FILE).exists():
        serving.check_probe(serving.OnnxModel(model_dir / serving.ONNX_FILE), inputs, logits, f"its serving copy {serving.ONNX_FILE}", atol)


def accuracy_on(model, staged, split: str, batch_size: int = 256) -> tuple[float, int]:
    """Top-1 accuracy of a Keras model on a staged split (:class:`twocluster.training.data.StagedData`)."""
    y_true, y_pred = report.predict_labels(model, data.batches(staged, split, batch_size, training=False, seed=0))
    if len(y_true) == 0:
        raise GateError(f"the {split!r} split is empty")
    return float(np.mean(y_true == y_pred)), len(y_true)


def gate_and_publish(
    store: ObjectStore,
    model: str,
    version: str,
    alias: str,
    min_test_accuracy: float,
    max_regression: float,
    *,
    run_id: str = "",
    test_split: str = "test",
    before_move: Callable[[registry.AliasState], None] | None = None,
) -> GateDecision:
    """Decide whether ``version`` replaces the champion under ``alias``, and move the alias if so.

    ``before_move`` is called with the alias state the decision was made on, just before the
    compare-and-set (tests use it to line two gates up)."""

    def decision(outcome: Outcome, reason: str, **kw) -> GateDecision:
        (log.info if outcome != "refused" else log.warning)("%s %s version %s as %r: %s", outcome, model, version, alias, reason)
        made = GateDecision(outcome, model, version, alias, reason, **kw)
        numbers = {k: v for k, v in made.as_dict().items() if k not in ("outcome", "model", "version", "alias", "reason", "published")}
        CommitLog(store, layout.model_gate_prefix(model)).append(lambda seq: GateDecided(
            seq=seq, model=model, alias=alias, version=version, outcome=outcome, reason=reason, numbers=numbers, run_id=run_id))
        return made

    with tempfile.TemporaryDirectory(prefix="gate-") as tmp:
        tmp_dir = Path(tmp)
        try:
            candidate_manifest = registry.read_model_manifest(store, model, version, verify_checksums=True)
            model_dir = registry.stage_model(store, model, version, tmp_dir / "models")
            candidate = load_model(model_dir)
            load_test(candidate, model_dir)
        except Exception as e:  # noqa: BLE001 - any failure to load means "do not publish"
            return decision("refused", f"the model failed its load test: {e}")
        recorded = candidate_manifest.metrics.test_accuracy
        # The candidate's own test split is the common ground: the champion is measured on it too.
        try:
            # Read with the gate's own store settings (Airflow's identity), not whatever AWS_* the
            # worker's environment holds (none on the stack's scheduler: it went to AWS).
            test_data = data.stage_splits(candidate_manifest.lineage.inputs, [test_split], tmp_dir / "data", data.input_format_for_backend(),
                                          settings=store.s3_settings)
            accuracy, examples = accuracy_on(candidate, test_data, test_split)
        except Exception as e:  # noqa: BLE001 - no trustworthy measurement means "do not publish"
            return decision("refused", f"its test data could not be read and verified: {e}")
        numbers = {"test_accuracy": accuracy, "recorded_test_accuracy": recorded, "test_examples": examples}
        if not accuracy >= min_test_accuracy:
            return decision("refused", f"test accuracy {accuracy:.3f} is below the floor {min_test_accuracy:.3f}", **numbers)

        champions: dict[str, tuple[float | None, float | None, str]] = {}  # version -> (measured, recorded, note)
        for attempt in range(1, MAX_DECISIONS + 1):
            state = registry.read_alias(store, model, alias)
            if state.version == version:
                return decision("already_published", f"{model}:{alias} already points at {version} (entry {state.current.seq})",
                                alias_entry=state.current.seq, decisions=attempt, **numbers)
            champion = state.version
            if champion is not None and champion not in champions:
                champions[champion] = _measure_champion(store, model, champion, candidate_manifest, test_data, test_split, tmp_dir)
            measured, champion_recorded, note = champions.get(champion, (None, None, ""))
            about_champion = {"champion_version": champion, "champion_test_accuracy": measured,
                              "champion_recorded_test_accuracy": champion_recorded}
            if measured is not None and accuracy < measured - max_regression:
                return decision("refused", f"test accuracy {accuracy:.3f} is more than {max_regression:.3f} below the champion "
                                           f"{champion}'s {measured:.3f} on the same {examples} test examples",
                                decisions=attempt, **numbers, **about_champion)
            if champion is None:
                reason = f"test accuracy {accuracy:.3f} >= floor {min_test_accuracy:.3f} (first model)"
            elif measured is None:
                reason = f"test accuracy {accuracy:.3f} >= floor {min_test_accuracy:.3f}; {note}"
            else:
                reason = (f"test accuracy {accuracy:.3f} >= floor {min_test_accuracy:.3f} and within {max_regression:.3f} of the "
                          f"champion {champion}'s {measured:.3f} on the same {examples} test examples")
            if before_move is not None:
                before_move(state)
            try:
                entry = registry.move_alias(store, model, alias, version, expected=state, reason=reason, run_id=run_id,
                                            decision={**numbers, **about_champion})
            except registry.AliasConflict:
                log.info("%s:%s moved while gating %s; deciding again", model, alias, version)
                continue
            # Read back: report published only if the alias resolves to this version now.
            after = registry.read_alias(store, model, alias)
            if after.current is None or after.current.seq < entry.seq:
                raise GateError(f"{model}:{alias}: wrote entry {entry.seq} for {version} but the alias reads {after.version}")
            return decision("published", reason, alias_entry=entry.seq, decisions=attempt, **numbers, **about_champion)
    raise GateError(f"{model}:{alias} kept moving while gating {version}; gave up after {MAX_DECISIONS} decisions")


def _measure_champion(store: ObjectStore, model: str, champion: str, candidate_manifest, test_data, test_split: str,
                      tmp_dir: Path) -> tuple[float | None, float | None, str]:
    """The champion's accuracy on the candidate's test data (``None`` with a note when its
    features differ, so it cannot read that data)."""
    manifest = registry.read_model_manifest(store, model, champion, verify_checksums=True)
    problems = manifest.feature_spec.compatible_with(candidate_manifest.feature_spec)
    if problems:
        return None, manifest.metrics.test_accuracy, (
            f"the champion {champion} was trained on other features ({'; '.join(problems)}), so it cannot be measured on "
            "this test data; only the floor applies")
    measured, _ = accuracy_on(load_model(registry.stage_model(store, model, champion, tmp_dir / "models")), test_data, test_split)
    return measured, manifest.metrics.test_accuracy, ""
