"""`twocluster`: the operator's command line over the store (every subcommand takes ``--json``).

    twocluster status  [--pipeline P] [--store URI]     what is committed, published and skipped
    twocluster verify  URI                              re-check one version's files
    twocluster alias set MODEL ALIAS VERSION            move an alias (compare-and-set)
    twocluster alias rollback MODEL ALIAS               back to the version before the current one
    twocluster gc      [--apply]                        what garbage collection would delete
    twocluster migrate [--apply]                        pre-log stores to the commit-log layout

The store is ``--store``, else ``$TWOCLUSTER_STORE_URI``; S3 credentials come from the standard
``AWS_*`` environment variables. Exit codes: 0 ok, 1 a problem was found or refused, 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from twocluster.spec import STORE_URI_ENV
from twocluster.store import layout, registry
from twocluster.store.manifest import (
    DatasetManifest,
    ManifestError,
    PredictionsManifest,
    read_manifest,
    resolve_version,
    scan_location,
    unlisted_files,
    verify_files,
)
from twocluster.store.storage import ObjectStore, StorageError, StoreSnapshot, split_uri


class CliError(Exception):
    pass


def _store(uri: str | None) -> ObjectStore:
    uri = uri or os.environ.get(STORE_URI_ENV)
    if not uri:
        raise CliError(f"no store: pass --store URI or set {STORE_URI_ENV}")
    return ObjectStore(uri)


# -- status --------------------------------------------------------------------------------------


def store_status(store: ObjectStore, pipeline: str | None = None) -> dict[str, Any]:
    """What the store holds, as read through the commit logs (the same reads the pipeline makes).
    Read like the ops page: one recursive listing per area, every log entry in parallel (a
    commit's entry carries its manifest), then no round trip per location."""
    out: dict[str, Any] = {"store": store.root_uri, "pipelines": {}, "models": {}, "skipped": []}
    store = StoreSnapshot(store, ["datasets", "predictions", "models"], immutable_cache={}, is_immutable=layout.is_commit_record)
    store.prefetch(key for key in store.objects if layout.is_log_entry_key(key))

    def skipped(state_skipped) -> None:
        out["skipped"] += [asdict(s) for s in state_skipped]

    pipelines = sorted(set(store.list_folders("datasets")) | set(store.list_folders("predictions")))
    for name in pipelines:
        if pipeline and name != pipeline:
            continue
        dates: dict[str, dict] = {}
        for kind, manifest_kind in (("datasets", DatasetManifest), ("predictions", PredictionsManifest)):
            parent = layout.datasets_prefix(name) if kind == "datasets" else layout.predictions_prefix(name)
            for folder in store.list_folders(parent):
                day = layout.date_from_folder(folder)
                if day is None:
                    continue
                state = scan_location(store, f"{parent}/{folder}", manifest_kind)
                skipped(state.skipped)
                row = dates.setdefault(day.isoformat(), {"dataset": None, "predictions": None})
                latest = state.latest
                if latest is None:
                    continue
                m = latest.manifest
                summary = {"version": latest.version, "log_entry": latest.seq, "committed_versions": len(state.versions),
                           "input": m.counts.input, "accepted": m.counts.accepted, "rejected": m.counts.rejected,
                           "rejected_by_reason": m.counts.rejected_by_reason, "manifest_uri": latest.manifest_uri}
                if kind == "predictions":
                    summary.update(model=m.model, model_version=m.model_version)
                row[kind.rstrip("s") if kind == "datasets" else kind] = summary
        out["pipelines"][name] = {"dates": [{"date": d, **dates[d]} for d in sorted(dates)]}

    for model in registry.model_names(store):
        versions = registry.model_versions(store, model)
        skipped(versions.skipped)
        aliases: dict[str, dict] = {}
        pointed: dict[str, list[str]] = {}
        for alias in store.list_folders(layout.model_aliases_prefix(model)):
            try:
                state = registry.read_alias(store, model, alias, versions)
            except layout.LayoutError:
                continue
            skipped(state.skipped)
            if state.current is not None:
                aliases[alias] = {"version": state.version, "log_entry": state.current.seq,
                                  "previous_version": state.previous_version(), "reason": state.current.reason,
                                  "moves": len(state.history)}
                pointed.setdefault(state.version, []).append(alias)
        out["models"][model] = {
            "aliases": aliases,
            "versions": [
                {"version": v.version, "log_entry": v.seq, "test_accuracy": v.manifest.metrics.test_accuracy,
                 "trained_on": sorted({dv[0] for u in v.manifest.lineage.inputs if (dv := layout.dated_version(u))}),
                 "run_id": v.manifest.lineage.run_id, "aliases": pointed.get(v.version, [])}
                for v in versions.versions
            ],
        }
    return out


def _print_status(status: dict) -> None:
    print(f"store {status['store']}")
    for name, p in status["pipelines"].items():
        print(f"\npipeline {name}")
        print(f"  {'date':<10}  {'dataset':<26} {'in':>5} {'ok':>5} {'rej':>4}  {'predictions':<26} {'rows':>5}  scored by")
        for row in p["dates"]:
            d, pr = row["dataset"], row["predictions"]
            ds = f"{d['version']:<26} {d['input']:>5} {d['accepted']:>5} {d['rejected']:>4}" if d else f"{'-':<26} {'':>5} {'':>5} {'':>4}"
            ps = f"{pr['version']:<26} {pr['accepted']:>5}  {pr['model']} v={pr['model_version']}" if pr else "-"
            print(f"  {row['date']:<10}  {ds}  {ps}")
            if d and d["rejected_by_reason"]:
                print(f"  {'':<10}  rejects: {', '.join(f'{k} {v}' for k, v in d['rejected_by_reason'].items())}")
    for model, m in status["models"].items():
        print(f"\nmodel {model}")
        for alias, a in sorted(m["aliases"].items()):
            prev = f" (before: {a['previous_version']})" if a["previous_version"] else ""
            print(f"  {alias} -> {a['version']}{prev}")
        for v in m["versions"]:
            tags = f"  [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            span = f"{v['trained_on'][0]}..{v['trained_on'][-1]}" if v["trained_on"] else "-"
            print(f"  {v['version']}  test accuracy {v['test_accuracy']:.3f}  trained on {span}{tags}")
    if status["skipped"]:
        print(f"\nskipped as invalid ({len(status['skipped'])}):")
        for s in status["skipped"]:
            print(f"  {s['uri']}: {s['problem']}")


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


def alias_set(store: ObjectStore, model: str, alias: str, version: str, reason: str, attempts: int = 5) -> dict:
    layout.check_name(model, "model"), layout.check_name(alias, "alias"), layout.check_version(version)
    for _ in range(attempts):
        state = registry.read_alias(store, model, alias)
        if state.version == version:
            return {"model": model, "alias": alias, "version": version, "moved": False, "reason": "already there"}
        try:
            entry = registry.move_alias(store, model, alias, version, expected=state, reason=reason or "set by an operator",
                                        run_id=_operator())
        except registry.AliasConflict:
            continue
        return {"model": model, "alias": alias, "version": version, "moved": True, "previous_version": state.version,
                "log_entry": entry.seq}
    raise CliError(f"{model}:{alias} kept moving; try again")


def alias_rollback(store: ObjectStore, model: str, alias: str, reason: str) -> dict:
    state = registry.read_alias(store, model, alias)
    if state.current is None:
        raise CliError(f"nothing is published as {model}:{alias}")
    previous = state.previous_version()
    if previous is None:
        raise CliError(f"{model}:{alias} has no earlier version to roll back to (it only ever pointed at {state.version})")
    try:
        entry = registry.move_alias(store, model, alias, previous, expected=state,
                                    reason=reason or f"rollback from {state.version} by an operator", run_id=_operator())
    except registry.AliasConflict:
        raise CliError(f"{model}:{alias} moved while rolling back; look at `twocluster status` and try again") from None
    return {"model": model, "alias": alias, "version": previous, "moved": True, "previous_version": state.version, "log_entry": entry.seq}


def _operator() -> str:
    return f"cli:{os.environ.get('USER', 'unknown')}"


# -- main ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help=f"store URI (default: ${STORE_URI_ENV})")
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
    rollback = alias_sub.add_parser("rollback", parents=[common])
    rollback.add_argument("model")
    rollback.add_argument("alias")
    rollback.add_argument("--reason", default="")
    gc = sub.add_parser("gc", parents=[common], help="garbage collection (a dry run unless --apply)")
    gc.add_argument("--apply", action="store_true")
    gc.add_argument("--keep", type=int, default=None, help="committed versions kept per date and model (default: the spec's, 3)")
    gc.add_argument("--grace-hours", type=float, default=None, help="leave younger objects alone (default: the spec's, 24)")
    gc.add_argument("--pipeline", help="take --keep and --grace-hours from this pipeline's spec")
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
    store = _store(args.store)
    if args.command == "status":
        status = store_status(store, args.pipeline)
        if args.json:
            _emit(args, status)
        else:
            _print_status(status)
        return 0
    if args.command == "alias":
        if args.alias_command == "set":
            result = alias_set(store, args.model, args.alias, args.version, args.reason)
        else:
            result = alias_rollback(store, args.model, args.alias, args.reason)
        _emit(args, result, f"{result['model']}:{result['alias']} -> {result['version']}"
                            + ("" if result["moved"] else f" ({result['reason']})"))
        return 0
    if args.command == "gc":
        from twocluster.store.gc import apply_gc, plan_gc

        keep, grace = 3, 24.0
        if args.pipeline:
            from twocluster.spec import default_spec_path, load_pipeline_spec

            retention = load_pipeline_spec(default_spec_path(args.pipeline)).retention
            keep, grace = retention.keep_versions, retention.grace_hours
        keep = args.keep if args.keep is not None else keep
        grace = args.grace_hours if args.grace_hours is not None else grace
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
