"""A person's approval of a model version, in Airflow's human-in-the-loop step.

When the gate's decision is ``needs_approval`` (the spec's ``model.gate.approval`` policy), the
pipeline DAG's ``approve`` task waits in Airflow 3.3's ``awaiting_input`` state (the standard
provider's :class:`HITLOperator`: no worker slot, no triggerer while it waits) with the evidence in
its body: the candidate against the champion on the same test set (overall and per class, the
confusion matrix), the dates each was trained on, the newest scored date's prediction shift, links
to both versions' pages and training curves. It is answered on Airflow's Required Actions page or
through the REST API (``PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/approve/-1/hitlDetails``)
with one of ``publish`` / ``staging`` / ``reject`` and a comment; the answer, who gave it and when
go through :func:`twocluster.store.registry.decide_approval` into the gate log and the alias
history. With no answer before ``model.gate.approval_timeout_hours`` the default, ``reject``,
applies. Any other decision skips the task.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param

from twocluster.orchestration.notifiers import approval_notifier
from twocluster.orchestration.results import ApprovalAnswer, GateResult
from twocluster.spec import PipelineSpec
from twocluster.store import layout, registry
from twocluster.store.storage import ObjectStore
from twocluster.training.decision import GateDecision

OPTIONS = list(registry.APPROVAL_OPTIONS)  # publish, staging, reject
TIMEOUT_DEFAULT = "reject"


def _trained_on(store: ObjectStore, model: str, version: str | None) -> str:
    if not version:
        return "-"
    try:
        manifest = registry.read_model_manifest(store, model, version)
    except Exception as e:  # noqa: BLE001 - evidence, not a check: say what could not be read
        return f"(unreadable: {e})"
    dates = sorted({dv[0] for uri in manifest.lineage.inputs if (dv := layout.dated_version(uri))})
    return f"{dates[0]} .. {dates[-1]} ({len(dates)} dates)" if dates else "no dated data"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def approval_body(store: ObjectStore, spec: PipelineSpec, decision: GateDecision, ops_url: str = "") -> tuple[str, str]:
    """(subject, Markdown body) for a version waiting for approval, from the gate's decision."""
    model, version, alias = decision.model, decision.version, decision.alias
    champion = decision.champion_version
    subject = f"Publish {model} {version} as {alias}?"
    mine, theirs = decision.per_class_accuracy or {}, decision.champion_per_class_accuracy or {}
    rows = [f"| **overall** | {_pct(decision.test_accuracy)} | {_pct(decision.champion_test_accuracy)} |"]
    for label in sorted(mine):
        worse = theirs.get(label) is not None and mine[label] is not None and mine[label] < theirs[label]
        rows.append(f"| {label}{' ⚠' if worse else ''} | {_pct(mine[label])} | {_pct(theirs.get(label))} |")
    labels = sorted(mine) if mine else []
    confusion = decision.confusion_matrix or []
    matrix = ""
    if confusion and len(confusion) == len(labels):
        matrix = ("\n\n**Confusion matrix of the candidate** (rows: true, columns: predicted)\n\n| | " + " | ".join(labels) + " |\n|"
                  + "---|" * (len(labels) + 1) + "\n"
                  + "\n".join(f"| {labels[i]} | " + " | ".join(str(n) for n in row) + " |" for i, row in enumerate(confusion)))
    try:
        shift = _newest_shift(store, spec, labels, confusion)
    except Exception as e:  # noqa: BLE001 - evidence, not a check
        shift = f"\n\n(The newest date's prediction shift could not be read: {e})"
    base = f"{ops_url.rstrip('/')}/twocluster" if ops_url else "/twocluster"
    links = " · ".join(f"[{name} {v}]({base}/models/{model}/versions/{v}) ([curves]({base}/models/{model}/versions/{v}/files/training_curves.png))"
                       for name, v in (("candidate", version), ("champion", champion)) if v)
    body = (f"The gate passed **{model} {version}** for `{alias}` but a person must decide: {decision.reason}\n\n"
            f"Both measured now on the candidate's test split ({decision.test_examples} examples):\n\n"
            f"| class | candidate | champion {champion or '(none)'} |\n|---|---|---|\n" + "\n".join(rows) + matrix
            + f"\n\nTrained on: candidate {_trained_on(store, model, version)}; champion {_trained_on(store, model, champion)}."
            + shift + f"\n\n{links}\n\n**publish** moves `{alias}`; **staging** moves only `{registry.STAGING_ALIAS}`; "
            f"**reject** moves nothing. Without an answer in {spec.model.gate.approval_timeout_hours:g} h: {TIMEOUT_DEFAULT}.")
    return subject, body


def _newest_shift(store: ObjectStore, spec: PipelineSpec, labels: list[str], confusion: list[list[int]]) -> str:
    """How the newest scored date's predicted labels differ from the labels of the test split the
    decision was measured on (total variation distance: 0 the same mix, 1 disjoint)."""
    from twocluster.store.manifest import PredictionsManifest, resolve_latest

    days = sorted((d for f in store.list_folders(layout.predictions_prefix(spec.name)) if (d := layout.date_from_folder(f))), reverse=True)
    for day in days:
        latest = resolve_latest(store, layout.predictions_date_prefix(spec.name, day), PredictionsManifest)
        if latest is None or latest.manifest.summary is None:
            continue
        predicted = latest.manifest.summary.predicted_labels
        tested = {label: sum(row) for label, row in zip(labels, confusion, strict=False)}
        n_p, n_t = sum(predicted.values()), sum(tested.values())
        if not n_p or not n_t:
            return ""
        distance = 0.5 * sum(abs(predicted.get(k, 0) / n_p - tested.get(k, 0) / n_t) for k in set(predicted) | set(tested))
        return (f"\n\nNewest scored date {day} (by {latest.manifest.model_version}): its predicted labels differ from the test "
                f"split's labels by {distance:.3f} (total variation; the drift limit is {spec.monitoring.max_drift:.2f}).")
    return "\n\nNo date has been scored yet."


def responder(event: dict[str, Any]) -> str:
    """Who answered, for the alias history (``airflow:<user>``; a timeout's default: ``airflow:timeout``)."""
    user = event.get("responded_by_user") or {}
    name = user.get("name") or user.get("id") if isinstance(user, dict) else None
    return f"airflow:{name}" if name else "airflow:timeout"


class ModelApprovalOperator(HITLOperator):
    """Wait for a person's answer to a ``needs_approval`` gate decision and apply it (skipped for
    any other decision). ``decision``: the publish task's result (an XCom)."""

    template_fields = (*HITLOperator.template_fields, "decision")

    def __init__(self, *, spec: PipelineSpec, decision: Any, store_for, **kwargs):
        kwargs.pop("params", None)  # the DAG's run parameters are not this form's fields
        super().__init__(
            subject="Model approval", options=OPTIONS, defaults=TIMEOUT_DEFAULT,
            params={"comment": Param("", type="string", title="Comment", description="why: recorded in the alias history")},
            response_timeout=dt.timedelta(hours=spec.model.gate.approval_timeout_hours),
            notifiers=[approval_notifier()], **kwargs)
        self.spec, self.decision, self.store_for = spec, decision, store_for

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowSkipException

        decision = GateResult.from_xcom(self.decision) if self.decision else None
        if decision is None or decision.outcome != "needs_approval":
            raise AirflowSkipException(f"the gate's decision is {decision.outcome if decision else None!r}: no approval needed")
        from airflow.providers.common.compat.sdk import conf

        self.subject, self.body = approval_body(self.store_for(self.spec), self.spec, decision, conf.get("api", "base_url", fallback=""))
        return super().execute(context)

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        # At the timeout Airflow's scheduler answers with the defaults (reject) and no user.
        answer = super().execute_complete(context, event)
        decision, who = GateResult.from_xcom(self.decision), responder(event)
        option = answer["chosen_options"][0]
        comment = (answer.get("params_input") or {}).get("comment") or ""
        if who == "airflow:timeout":
            comment = f"no answer within {self.spec.model.gate.approval_timeout_hours:g} h: {TIMEOUT_DEFAULT} by default"
        result = registry.decide_approval(self.store_for(self.spec), decision.model, decision.version, decision.alias, option,
                                          who=who, comment=comment, run_id=context["run_id"])
        print(f"approval: {option} by {who}: {comment!r} -> {result}")
        return ApprovalAnswer(**result, option=option, comment=comment, who=who).to_xcom()
