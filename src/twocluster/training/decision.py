"""What the gate decides (:mod:`twocluster.training.gate`), as a value the Airflow side can read
without importing Keras: the publish task returns it through XCom, the approval step reads it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, computed_field

Outcome = Literal["published", "already_published", "refused", "needs_approval"]
ApprovalPolicy = Literal["never", "first_model", "when_worse_on_any_class", "always"]


class GateDecision(BaseModel):
    """What the gate decided for one version under one alias (the publish task's result, through XCom)."""

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
    gate_entry: int | None = None  # the gate log entry of this decision
    decisions: int = 0  # how many times it decided (more than 1: it lost a race and re-decided)
    per_class_accuracy: dict[str, float | None] | None = None  # the candidate's, on the test split (the evidence for a person)
    champion_per_class_accuracy: dict[str, float | None] | None = None
    confusion_matrix: list[list[int]] | None = None
    split_skew: float | None = None  # the candidate's test split vs its training split (Jensen-Shannon, largest channel)

    @computed_field
    @property
    def published(self) -> bool:
        return self.outcome == "published"

    def to_json(self) -> str:
        return self.model_dump_json()
