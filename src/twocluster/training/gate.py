"""Gate and publish: the step between training and serving.

Loads the new model version back from the store exactly as a consumer would (every file verified
against its manifest's checksums), checks that it reproduces the trainer's outputs on a recorded
batch (a load test), evaluates it **and the current champion on the same test data** (the
candidate's test split), compares with an absolute floor and with the champion, and only then
moves the alias, as a compare-and-set on the alias's commit log: if another gate (a backfill next
to a manual run, the DAG next to ``training_jobs/publish.py``) moved it in between, the decision
is made again against the new champion. The result is read back: ``published`` is true only if
the alias now points at this version because of this call.

Where it runs: wherever a model is published, which is not the GPU cluster. The pipeline DAG's
``publish`` task calls it on an Airflow worker (through :func:`twocluster.orchestration.runs.publish`;
Keras on the CPU, a few hundred test examples), and ``training_jobs/publish.py`` is the same gate
as a command for a person or another scheduler. It lives beside the trainer because it loads and
evaluates models with the trainer's own code (:mod:`twocluster.training.data`, ``serving``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twocluster import serving
from twocluster.store import registry, statistics
from twocluster.store.manifest import ManifestError
from twocluster.store.storage import ObjectStore
from twocluster.training import data, report
from twocluster.training.decision import ApprovalPolicy, GateDecision, Outcome

log = logging.getLogger(__name__)

MAX_DECISIONS = 10  # re-decisions after lost compare-and-sets before giving up


class GateError(RuntimeError):
    pass


@dataclass
class Measurement:
    """A model's predictions on the candidate's test split: accuracy overall and per class."""

    accuracy: float
    examples: int
    per_class: dict[str, float | None]
    confusion: list[list[int]]


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


def measure(model, staged, split: str, vocabulary: list[str], batch_size: int = 256) -> Measurement:
    """Top-1 accuracy of a Keras model on a staged split, overall and per class."""
    y_true, y_pred = report.predict_labels(model, data.batches(staged, split, batch_size, training=False, seed=0))
    if len(y_true) == 0:
        raise GateError(f"the {split!r} split is empty")
    n = len(vocabulary)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    support = confusion.sum(axis=1)
    per_class = {label: (round(float(confusion[i, i] / support[i]), 4) if support[i] else None) for i, label in enumerate(vocabulary)}
    return Measurement(float(np.mean(y_true == y_pred)), len(y_true), per_class, confusion.tolist())


def approval_needed(policy: ApprovalPolicy, champion: str | None, candidate: Measurement,
                    champion_measured: Measurement | None) -> str | None:
    """Why a person must approve before the alias moves (``None``: the gate decides alone)."""
    if policy == "never":
        return None
    if policy == "always":
        return "the pipeline's gate.approval is 'always'"
    if champion is None:
        return "this would be the first model published under the alias (gate.approval: " + policy + ")"
    if policy == "when_worse_on_any_class":
        if champion_measured is None:
            return "the champion could not be measured on this test data, so no per-class comparison was possible"
        worse = [f"{label} {mine:.3f} < {champion_measured.per_class[label]:.3f}" for label, mine in candidate.per_class.items()
                 if mine is not None and champion_measured.per_class.get(label) is not None and mine < champion_measured.per_class[label]]
        if worse:
            return "worse than the champion on " + ", ".join(worse)
    return None


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
    approval: ApprovalPolicy = "never",
    max_split_skew: float | None = None,
    before_move: Callable[[registry.AliasState], None] | None = None,
) -> GateDecision:
    """Decide whether ``version`` replaces the champion under ``alias``, and move the alias if so.

    A pass is written to the gate log before the move (the registry only moves an alias to a
    version whose newest decision for it is a pass or a person's approval). When the spec's
    ``approval`` policy wants a person, the decision is ``needs_approval`` with the evidence, and
    the alias does not move: :func:`twocluster.store.registry.decide_approval` does, later.
    ``before_move`` is called with the alias state the decision was made on, just before the
    compare-and-set (tests use it to line two gates up)."""
    who = f"gate:{run_id}" if run_id else "gate"

    def decision(outcome: Outcome, reason: str, logged: str | None = None, **kw) -> GateDecision:
        (log.info if outcome != "refused" else log.warning)("%s %s version %s as %r: %s", outcome, model, version, alias, reason)
        made = GateDecision(outcome=outcome, model=model, version=version, alias=alias, reason=reason, **kw)
        numbers = made.model_dump(exclude={"outcome", "model", "version", "alias", "reason", "published", "gate_entry"})
        entry = registry.record_gate_decision(store, model, version, alias, logged or outcome, reason, numbers=numbers, run_id=run_id)
        made.gate_entry = entry.seq
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
        vocabulary = candidate_manifest.label_vocabulary
        # The candidate's own test split is the common ground: the champion is measured on it too.
        try:
            # Read with the gate's own store settings (Airflow's identity), not whatever AWS_* the
            # worker's environment holds (none on the stack's scheduler: it went to AWS).
            test_data = data.stage_splits(candidate_manifest.lineage.inputs, [test_split], tmp_dir / "data", "auto",
                                          settings=store.s3_settings)
            mine = measure(candidate, test_data, test_split, vocabulary)
        except Exception as e:  # noqa: BLE001 - no trustworthy measurement means "do not publish"
            return decision("refused", f"its test data could not be read and verified: {e}")
        accuracy, examples = mine.accuracy, mine.examples
        numbers = {"test_accuracy": accuracy, "recorded_test_accuracy": recorded, "test_examples": examples,
                   "per_class_accuracy": mine.per_class, "confusion_matrix": mine.confusion}
        if not accuracy >= min_test_accuracy:
            return decision("refused", f"test accuracy {accuracy:.3f} is below the floor {min_test_accuracy:.3f}", **numbers)
        # A test split unlike the training split measures nothing the model will meet: refused,
        # or put to a person where the pipeline has approvals.
        measured_skew = statistics.split_skew(store, candidate_manifest.lineage.inputs) if max_split_skew is not None else None
        if measured_skew is not None:
            skew, test_rows = measured_skew
            numbers["split_skew"] = round(skew, 4)
            if skew > max_split_skew and test_rows >= statistics.SPLIT_SKEW_MIN_ROWS:
                why = f"its test split's features skew {skew:.3f} from its training split's (Jensen-Shannon; limit {max_split_skew:.3f})"
                if approval == "never":
                    return decision("refused", why, **numbers)
                return decision("needs_approval", f"test accuracy {accuracy:.3f}, but {why}; a person must approve", **numbers)

        champions: dict[str, tuple[Measurement | None, float | None, str]] = {}  # version -> (measured, recorded, note)
        for attempt in range(1, MAX_DECISIONS + 1):
            state = registry.read_alias(store, model, alias)
            if state.version == version and not state.broken:
                return decision("already_published", f"{model}:{alias} already points at {version} (entry {state.current.seq})",
                                alias_entry=state.current.seq, decisions=attempt, **numbers)
            champion = state.version
            if champion is not None and champion not in champions:
                try:
                    if state.broken:
                        raise registry.AliasBroken(state.broken)
                    champions[champion] = _measure_champion(store, model, champion, candidate_manifest, test_data, test_split, tmp_dir)
                except (registry.RegistryError, ManifestError) as e:
                    champions[champion] = (None, None, f"the champion {champion} is broken ({e}), so only the floor applies")
            measured, champion_recorded, note = champions.get(champion, (None, None, ""))
            about_champion = {"champion_version": champion, "champion_test_accuracy": measured.accuracy if measured else None,
                              "champion_recorded_test_accuracy": champion_recorded,
                              "champion_per_class_accuracy": measured.per_class if measured else None}
            if measured is not None and accuracy < measured.accuracy - max_regression:
                return decision("refused", f"test accuracy {accuracy:.3f} is more than {max_regression:.3f} below the champion "
                                           f"{champion}'s {measured.accuracy:.3f} on the same {examples} test examples",
                                decisions=attempt, **numbers, **about_champion)
            if champion is None:
                reason = f"test accuracy {accuracy:.3f} >= floor {min_test_accuracy:.3f} (first model)"
            elif measured is None:
                reason = f"test accuracy {accuracy:.3f} >= floor {min_test_accuracy:.3f}; {note}"
            else:
                reason = (f"test accuracy {accuracy:.3f} >= floor {min_test_accuracy:.3f} and within {max_regression:.3f} of the "
                          f"champion {champion}'s {measured.accuracy:.3f} on the same {examples} test examples")
            why_a_person = approval_needed(approval, champion, mine, measured)
            if why_a_person:
                return decision("needs_approval", f"{reason}; a person must approve: {why_a_person}",
                                decisions=attempt, **numbers, **about_champion)
            if before_move is not None:
                before_move(state)
            passed = decision("published", reason, logged="passed", decisions=attempt, **numbers, **about_champion)
            try:
                entry = registry.move_alias(store, model, alias, version, expected=state, who=who, reason=reason, run_id=run_id,
                                            decision={**numbers, **about_champion, "gate_entry": passed.gate_entry})
            except registry.AliasConflict:
                log.info("%s:%s moved while gating %s; deciding again", model, alias, version)
                continue
            # Read back: report published only if the alias resolves to this version now.
            after = registry.read_alias(store, model, alias)
            if after.current is None or after.current.seq < entry.seq:
                raise GateError(f"{model}:{alias}: wrote entry {entry.seq} for {version} but the alias reads {after.version}")
            passed.alias_entry = entry.seq
            return passed
    raise GateError(f"{model}:{alias} kept moving while gating {version}; gave up after {MAX_DECISIONS} decisions")


def _measure_champion(store: ObjectStore, model: str, champion: str, candidate_manifest, test_data, test_split: str,
                      tmp_dir: Path) -> tuple[Measurement | None, float | None, str]:
    """The champion's accuracy on the candidate's test data (``None`` with a note when its
    features differ, so it cannot read that data)."""
    manifest = registry.read_model_manifest(store, model, champion, verify_checksums=True)
    problems = manifest.feature_spec.compatible_with(candidate_manifest.feature_spec)
    if problems:
        return None, manifest.metrics.test_accuracy, (
            f"the champion {champion} was trained on other features ({'; '.join(problems)}), so it cannot be measured on "
            "this test data; only the floor applies")
    measured = measure(load_model(registry.stage_model(store, model, champion, tmp_dir / "models")), test_data, test_split,
                       candidate_manifest.label_vocabulary)
    return measured, manifest.metrics.test_accuracy, ""
