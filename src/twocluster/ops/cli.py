"""`twocluster`: the operator's command line over the store (every subcommand takes ``--json``).

    twocluster status  [--pipeline P] [--store URI]     what is committed, published and skipped
    twocluster verify  URI                              re-check one version's files
    twocluster alias set MODEL ALIAS VERSION            move an alias (compare-and-set)
    twocluster alias set MODEL ALIAS VERSION --override-gate --reason TEXT   bypass the gate (recorded)
    twocluster alias rollback MODEL ALIAS [--to V]      back along the history to a version that verifies
    twocluster alias history MODEL ALIAS                every move: when, from, to, who, why, authority
    twocluster approve MODEL VERSION --option publish|staging|reject --comment TEXT
    twocluster gc      [--apply]                        what garbage collection would delete
    twocluster migrate [--apply]                        pre-log stores to the commit-log layout

The store is found as the DAGs and the ops page find it (:mod:`twocluster.store_access`),
from this process's environment: ``--store``, the ``twocluster_store_uri`` Airflow variable
(``AIRFLOW_VAR_TWOCLUSTER_STORE_URI``), ``$TWOCLUSTER_STORE_URI``, the ``--pipeline``'s spec; S3
credentials from the ``twocluster_store`` connection (``AIRFLOW_CONN_TWOCLUSTER_STORE``), else
the standard ``AWS_*`` variables. Exit codes: 0 ok, 1 a problem was found or refused, 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from twocluster.ops.monitoring import StoreStatus, store_status
from twocluster.spec import STORE_URI_ENV
from twocluster.store import layout, registry
from twocluster.store.manifest import (
    ManifestError,
    read_manifest,
    resolve_version,
    unlisted_files,
    verify_files,
)
from twocluster.store.storage import ObjectStore, StorageError, split_uri


class CliError(Exception):
    pass


def _store(uri: str | None, pipeline: str | None = None) -> ObjectStore:
    """The store by the DAGs' and the ops page's lookup (:mod:`twocluster.store_access`),
    read from this process's environment: ``--store``, ``AIRFLOW_VAR_TWOCLUSTER_STORE_URI``,
    ``$TWOCLUSTER_STORE_URI``, the ``--pipeline``'s spec; the ``twocluster_store`` connection's
    keys (``AIRFLOW_CONN_TWOCLUSTER_STORE``), else ``AWS_*``."""
    from twocluster.spec import SpecError, default_spec_path, load_pipeline_spec
    from twocluster.store_access import store_for

    try:
        return store_for(None, uri, via="environment")
    except SpecError as e:
        if not pipeline:
            raise CliError(str(e)) from None
    try:  # the spec is read only when nothing else names the store
        return store_for(load_pipeline_spec(default_spec_path(pipeline)), uri, via="environment")
    except SpecError as e:
        raise CliError(str(e)) from None


# -- status --------------------------------------------------------------------------------------


def _print_status(status: StoreStatus) -> None:
    print(f"store {status.store}")
    for name, p in status.pipelines.items():
        print(f"\npipeline {name}")
        print(f"  {'date':<10}  {'dataset':<26} {'in':>5} {'ok':>5} {'rej':>4}  {'predictions':<26} {'rows':>5}  scored by")
        for row in p.dates:
            d, pr = row.dataset, row.predictions
            ds = f"{d.version:<26} {d.input:>5} {d.accepted:>5} {d.rejected:>4}" if d else f"{'-':<26} {'':>5} {'':>5} {'':>4}"
            ps = f"{pr.version:<26} {pr.rows:>5}  {pr.model} v={pr.model_version}" if pr else "-"
            print(f"  {row.date.isoformat():<10}  {ds}  {ps}")
            if d and d.rejected_by_reason:
                print(f"  {'':<10}  rejects: {', '.join(f'{k} {v}' for k, v in d.rejected_by_reason.items())}")
    for model, m in status.models.items():
        print(f"\nmodel {model}")
        for alias, a in sorted(m.aliases.items()):
            prev = f" (before: {a.previous_version})" if a.previous_version else ""
            broken = f"  BROKEN: {a.broken}" if a.broken else ""
            override = "  [set by a gate override]" if a.authority == "override" else ""
            print(f"  {alias} -> {a.version}{prev}{override}{broken}")
        for v in m.versions:
            tags = f"  [{', '.join(v.aliases)}]" if v.aliases else ""
            span = f"{v.trained_on[0]}..{v.trained_on[-1]}" if v.trained_on else "-"
            print(f"  {v.version}  test accuracy {v.test_accuracy:.3f}  trained on {span}{tags}")
    if status.skipped:
        print(f"\nskipped as invalid ({len(status.skipped)}):")
        for s in status.skipped:
            print(f"  {s.uri}: {s.problem}")


# -- verify --------------------------------------------------------------------------------------


def verify_uri(uri: str) -> dict:
    """Re-check one committed version (a ``v=`` folder or its manifest URI): committed in its log,
    every file's size and checksum, nothing unlisted in the folder."""
    folder = uri.rstrip("/")
    if folder.endswith("/" + layout.MANIFEST_NAME):
        folder = folder.rsplit("/", 1)[0]
    location_uri, name = split_uri(folder)
    version = layout.version_from_folder(name)
    if version is None:
        raise CliError(f"{uri}: not a version folder (.../v=<version>) or its manifest")
    store = ObjectStore(location_uri)
    result: dict[str, Any] = {"uri": folder, "version": version, "problems": [], "ok": False}
    try:
        committed = resolve_version(store, "", version)
        manifest = committed.manifest
        result.update(kind=manifest.kind, log_entry=committed.seq, files=len(manifest.files))
    except ManifestError as e:
        result["problems"].append(str(e))
        try:
            manifest = read_manifest(store, name)
        except ManifestError:
            return result
    try:
        verify_files(store, name, manifest)
    except ManifestError as e:
        result["problems"].append(str(e))
    result["problems"] += [f"{store.uri(k)}: in the folder but not in the manifest" for k in unlisted_files(store, name, manifest)]
    result["ok"] = not result["problems"]
    return result


# -- alias ---------------------------------------------------------------------------------------


def operator(user: str | None = None) -> str:
    """Who acts, for the alias history: an Airflow user when one is given, else the OS user."""
    return f"airflow:{user}" if user else f"os:{os.environ.get('USER') or getpass.getuser()}"


def alias_set(store: ObjectStore, model: str, alias: str, version: str, reason: str, *, override_gate: bool = False,
              who: str | None = None, attempts: int = 5) -> dict:
    """Move an alias to a version whose gate decision for it passed or a person approved; with
    ``override_gate`` (and a reason) to any committed version, recorded as an override."""
    layout.check_name(model, "model"), layout.check_name(alias, "alias"), layout.check_version(version)
    if override_gate and not reason.strip():
        raise CliError("--override-gate needs --reason TEXT: the override is recorded with it")
    for _ in range(attempts):
        state = registry.read_alias(store, model, alias)
        if state.version == version and not state.broken:
            return {"model": model, "alias": alias, "version": version, "moved": False, "reason": "already there"}
        try:
            entry = registry.move_alias(store, model, alias, version, expected=state, who=who or operator(),
                                        reason=reason or "set by an operator", override=override_gate)
        except registry.AliasConflict:
            continue
        return {"model": model, "alias": alias, "version": version, "moved": True, "previous_version": state.version,
                "log_entry": entry.seq, "authority": registry.authority_of(entry).kind}
    raise CliError(f"{model}:{alias} kept moving; try again")


def alias_rollback(store: ObjectStore, model: str, alias: str, reason: str, *, to: str | None = None, who: str | None = None) -> dict:
    """Back along the alias's history: to the newest version before the current one that a
    rollback has not left and whose files verify (or to ``to``, which must have served under the
    alias and verify). Never to a version that does not verify."""
    state = registry.read_alias(store, model, alias)
    if state.current is None:
        raise CliError(f"nothing is published as {model}:{alias}")
    candidates = [layout.check_version(to)] if to else state.rollback_candidates()
    if not candidates:
        raise CliError(f"{model}:{alias} has no earlier version to roll back to (history: "
                       f"{' -> '.join(e.version for e in state.history)}; versions rolled back from are not candidates)")
    problems = []
    for target in candidates:
        try:
            registry.read_model_manifest(store, model, target, verify_checksums=True)
        except ManifestError as e:
            problems.append(f"{target}: {e}")
            continue
        try:
            entry = registry.move_alias(store, model, alias, target, expected=state, who=who or operator(), rollback=True,
                                        reason=reason or f"rollback from {state.version} by an operator")
        except registry.AliasConflict:
            raise CliError(f"{model}:{alias} moved while rolling back; look at `twocluster alias history` and try again") from None
        return {"model": model, "alias": alias, "version": target, "moved": True, "previous_version": state.version,
                "log_entry": entry.seq, "skipped_targets": problems}
    raise CliError(f"{model}:{alias}: no rollback target verifies: " + "; ".join(problems))


def alias_history(store: ObjectStore, model: str, alias: str) -> dict:
    """Every move of the alias, oldest first: entry, time, from, to, who, why and on what authority."""
    layout.check_name(model, "model"), layout.check_name(alias, "alias")
    state = registry.read_alias(store, model, alias)
    decisions = {d.seq: d for d in registry.gate_decisions(store, model)}
    moves = []
    for e in state.history:
        authority = registry.authority_of(e)
        gate = decisions.get(authority.gate_entry) if authority.gate_entry else None
        moves.append({"entry": e.seq, "time": e.written_at.isoformat(), "from": e.previous_version, "to": e.version,
                      "who": authority.who or e.run_id, "run_id": e.run_id, "why": e.reason,
                      "authority": {"gate": "gate-passed", "approval": "approved", "override": "overridden",
                                    "rollback": "rollback", "legacy": "before audits"}[authority.kind],
                      "gate_entry": authority.gate_entry, "approved_by": gate.decided_by if gate and gate.outcome == "approved" else None,
                      "rolled_back_from": authority.rolled_back_from})
    return {"model": model, "alias": alias, "current": state.version, "broken": state.broken, "moves": moves,
            "skipped": [asdict(s) for s in state.skipped]}


def _print_history(history: dict) -> None:
    print(f"{history['model']}:{history['alias']} -> {history['current'] or 'nothing'}"
          + (f"  BROKEN: {history['broken']}" if history["broken"] else ""))
    for m in history["moves"]:
        print(f"  #{m['entry']:<4} {m['time'][:19]}  {m['from'] or '-':<26} -> {m['to']:<26} {m['authority']:<12} "
              f"{m['who']}: {m['why']}")


def approve(store: ObjectStore, model: str, version: str, alias: str, option: str, comment: str, who: str | None = None) -> dict:
    """A person's answer to a version waiting for approval (see :func:`registry.decide_approval`)."""
    layout.check_name(model, "model"), layout.check_name(alias, "alias"), layout.check_version(version)
    result = registry.decide_approval(store, model, version, alias, option, who=who or operator(), comment=comment)
    return {"model": model, "version": version, "alias": alias, **result}


# -- main ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help=f"store URI (default: $AIRFLOW_VAR_TWOCLUSTER_STORE_URI, ${STORE_URI_ENV}, the spec's)")
    common.add_argument("--json", action="store_true", help="print JSON")
    parser = argparse.ArgumentParser(prog="twocluster", description="Operate the two-cluster ML store.")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", parents=[common], help="datasets, predictions, models and aliases; what was skipped")
    status.add_argument("--pipeline")
    verify = sub.add_parser("verify", parents=[common], help="re-check one committed version's files")
    verify.add_argument("uri")
    alias = sub.add_parser("alias", help="move an alias (compare-and-set on its log)")
    alias_sub = alias.add_subparsers(dest="alias_command", required=True)
    alias_set_p = alias_sub.add_parser("set", parents=[common])
    alias_set_p.add_argument("model")
    alias_set_p.add_argument("alias")
    alias_set_p.add_argument("version")
    alias_set_p.add_argument("--reason", default="")
    alias_set_p.add_argument("--override-gate", action="store_true",
                             help="point at a version the gate did not pass (needs --reason; recorded as an override)")
    rollback = alias_sub.add_parser("rollback", parents=[common], help="back to the newest earlier version that verifies")
    rollback.add_argument("model")
    rollback.add_argument("alias")
    rollback.add_argument("--reason", default="")
    rollback.add_argument("--to", help="roll back to this version (it must have served under the alias)")
    history = alias_sub.add_parser("history", parents=[common], help="every move: when, from, to, who, why, on what authority")
    history.add_argument("model")
    history.add_argument("alias")
    approve_p = sub.add_parser("approve", parents=[common], help="answer a version waiting for a person's approval")
    approve_p.add_argument("model")
    approve_p.add_argument("version")
    approve_p.add_argument("--alias", default="production")
    approve_p.add_argument("--option", choices=registry.APPROVAL_OPTIONS, required=True,
                           help="publish: move the alias; staging: move only 'staging'; reject")
    approve_p.add_argument("--comment", required=True)
    gc = sub.add_parser("gc", parents=[common], help="garbage collection (a dry run unless --apply)")
    gc.add_argument("--apply", action="store_true")
    gc.add_argument("--keep", type=int, default=None, help="committed versions kept per date and model (default: the spec's, 3)")
    gc.add_argument("--grace-hours", type=float, default=None, help="leave younger objects alone (default: the spec's, 24)")
    gc.add_argument("--pipeline", help="take --keep and --grace-hours from this pipeline's spec")
    gc.add_argument("--force", action="store_true",
                    help="accept a --grace-hours below the longest job timeout (a running job's staging area may go)")
    migrate = sub.add_parser("migrate", parents=[common], help="record a pre-log store's versions in commit logs")
    migrate.add_argument("--apply", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if getattr(args, "json", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except (CliError, layout.LayoutError, registry.RegistryError, ManifestError, StorageError) as e:
        print(f"twocluster {args.command}: {e}", file=sys.stderr)
        return 1


def _emit(args, payload: Any, text: str | None = None) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif text is not None:
        print(text)


def _run(args) -> int:
    if args.command == "verify":
        result = verify_uri(args.uri)
        _emit(args, result, f"{result['uri']}: " + ("ok, " + f"{result.get('files')} files verified" if result["ok"] else
                                                     "PROBLEMS\n  " + "\n  ".join(result["problems"])))
        return 0 if result["ok"] else 1
    store = _store(args.store, getattr(args, "pipeline", None))
    if args.command == "status":
        status = store_status(store, args.pipeline)
        if args.json:
            _emit(args, status.model_dump(mode="json"))
        else:
            _print_status(status)
        return 0
    if args.command == "alias":
        if args.alias_command == "history":
            history = alias_history(store, args.model, args.alias)
            if args.json:
                _emit(args, history)
            else:
                _print_history(history)
            return 1 if history["broken"] else 0
        if args.alias_command == "set":
            result = alias_set(store, args.model, args.alias, args.version, args.reason, override_gate=args.override_gate)
        else:
            result = alias_rollback(store, args.model, args.alias, args.reason, to=args.to)
        _emit(args, result, f"{result['model']}:{result['alias']} -> {result['version']}"
                            + ("" if result["moved"] else f" ({result['reason']})")
                            + (" (GATE OVERRIDDEN, recorded)" if result.get("authority") == "override" else ""))
        return 0
    if args.command == "approve":
        result = approve(store, args.model, args.version, args.alias, args.option, args.comment)
        _emit(args, result, f"{args.model} {args.version}: {result['outcome']}" + (f", {result['alias_moved']} -> {args.version}"
                                                                                     if result.get("alias_moved") else ""))
        return 0
    if args.command == "gc":
        from twocluster.spec import Retention, Timeouts
        from twocluster.store.gc import apply_gc, plan_gc

        retention, timeouts = Retention(), Timeouts()
        if args.pipeline:
            from twocluster.spec import default_spec_path, load_pipeline_spec

            pipeline = load_pipeline_spec(default_spec_path(args.pipeline))
            retention, timeouts = pipeline.retention, pipeline.timeouts
        keep = args.keep if args.keep is not None else retention.keep_versions
        grace = args.grace_hours if args.grace_hours is not None else retention.grace_hours
        if grace < timeouts.longest_hours and not args.force:
            print(f"twocluster gc: --grace-hours {grace:g} is below the longest job timeout ({timeouts.longest_hours:g} h"
                  f"{' in the spec of ' + args.pipeline if args.pipeline else ', the default'}): a job still running could lose "
                  "its staging area; pass --force to accept that", file=sys.stderr)
            return 2
        plan = plan_gc(store, keep_versions=keep, grace=dt.timedelta(hours=grace))
        deleted = apply_gc(store, plan) if args.apply else 0
        lines = [f"{'deleting' if args.apply else 'would delete'} {store.uri(d.prefix)}  ({d.what}, {d.objects} objects, "
                 f"{d.bytes / 1e6:.1f} MB): {d.reason}" for d in plan.deletions]
        lines.append(f"{len(plan.deletions)} items, {plan.bytes / 1e6:.1f} MB" + ("" if args.apply else "; dry run: pass --apply to delete"))
        _emit(args, {**plan.as_dict(), "applied": args.apply, "deleted_objects": deleted}, "\n".join(lines))
        return 0
    if args.command == "migrate":
        from twocluster.store.migrate import migrate

        report = migrate(store, apply=args.apply)
        lines = [f"{'migrated' if args.apply else 'would migrate'} {loc['location']}: {len(loc['versions'])} versions" for loc in report.locations]
        lines += [f"{'migrated' if args.apply else 'would migrate'} alias {a['model']}:{a['alias']}: {len(a['versions'])} records" for a in report.aliases]
        lines += [f"problem: {p['uri']}: {p['problem']}" for p in report.problems]
        lines.append("nothing to migrate" if not (report.locations or report.aliases) else ("" if args.apply else "dry run: pass --apply"))
        _emit(args, {**asdict(report), "applied": args.apply}, "\n".join(line for line in lines if line))
        return 1 if report.problems else 0
    raise CliError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
