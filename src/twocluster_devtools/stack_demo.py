"""`make stack-demo`: from the empty stack `make stack-up` leaves to a scored date.

1. Sample arrivals for the last ``--days`` days go into the stack's bucket with the **ingest**
   identity, which may write only under ``raw/`` (the bucket policy says so; an upstream system
   would hold this key), each date closed by its arrival marker. Days already there are kept.
2. The pipeline is unpaused: the scheduler starts the run for the newest complete day itself
   (``catchup`` is off), and a backfill covers the days before it (``reprocess_behavior: none``).
   Each run's model decisions wait for the earlier dates' (``wait_for_earlier_dates``).
3. It follows the runs until they end, then shows the store as an operator sees it: ``twocluster
   status`` with the **operator** key, which reads everything and writes nothing.

Everything it needs is in ``.local/stack/endpoints.json`` (mode 600), written by ``make
stack-up``; it prints no key.

    python -m twocluster_devtools.stack_demo [--days 4] [--clips-per-day 600] [--no-wait]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twocluster.deployment import PIPELINES_DIR
from twocluster.spec import load_pipeline_spec
from twocluster.store.storage import ObjectStore, S3Settings
from twocluster_demo import sample_data
from twocluster_devtools.airflow_api import AirflowApi
from twocluster_devtools.stack import DEFAULT_DIR, Endpoints

TERMINAL = ("success", "failed")


def _say(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def _wait(ready, timeout: float, what: str, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while (value := ready()) in (None, False, [], {}):
        if time.monotonic() > deadline:
            raise SystemExit(f"stack-demo: {what} did not happen within {timeout:.0f} s")
        time.sleep(every)
    return value


def _runs_by_date(api: AirflowApi, dag_id: str, dates: list[dt.date]) -> dict[dt.date, dict]:
    wanted = {d.isoformat() for d in dates}
    return {dt.date.fromisoformat(r["logical_date"][:10]): r for r in api.dag_runs(dag_id)
            if r.get("logical_date") and r["logical_date"][:10] in wanted}


def demo(endpoints: Endpoints, pipeline: str, days: int, clips_per_day: int, wait: bool, timeout: float) -> int:
    started = time.monotonic()
    spec = load_pipeline_spec(PIPELINES_DIR / f"{pipeline}.yaml")
    dates = sample_data.arrival_dates(days)
    ingest = S3Settings(endpoint_url=endpoints.s3_endpoint, region="us-east-1", access_key=endpoints.ingest_access_key,
                        secret_key=endpoints.ingest_secret_key)
    store = ObjectStore(endpoints.store_uri, ingest)
    _say(f"sample arrivals for {dates[0]} .. {dates[-1]} into {store.uri(f'raw/{spec.name}')} as the ingest identity (writes raw/ only)")
    for report in sample_data.generate(store, spec, dates, clips_per_day, seed=0, bad_files_per_day=2):
        _say(f"  {report.date}: {report.clips} clips + {report.bad_files} broken files, {report.bytes / 1e6:.1f} MB "
             f"({'already there' if report.skipped else 'uploaded'})")

    api = AirflowApi(endpoints.airflow_url, endpoints.airflow_user, endpoints.airflow_password)
    _wait(lambda: api.call("GET", f"/dags/{spec.name}")[0] == 200, 180, f"the {spec.name} DAG to be parsed")
    api.ok("PATCH", f"/dags/{spec.name}", {"is_paused": False})
    _say(f"{spec.name} unpaused: the scheduler starts the newest day's run")
    try:
        newest = _wait(lambda: _runs_by_date(api, spec.name, dates[-1:]), 60, f"the scheduled run for {dates[-1]}")
        earlier = dates[:-1] if newest else dates
    except SystemExit:  # the schedule did not reach it (e.g. an end_date): the backfill covers every day
        earlier = dates
    if earlier:
        backfill = api.ok("POST", "/backfills", {
            "dag_id": spec.name, "from_date": f"{earlier[0]}T00:00:00Z", "to_date": f"{earlier[-1]}T00:00:00Z",
            "reprocess_behavior": "none", "max_active_runs": 2, "dag_run_conf": {}})
        _say(f"backfill {backfill['id']} for {earlier[0]} .. {earlier[-1]} (two runs at a time; their model decisions in date order)")
    _say(f"watch: {endpoints.airflow_url}/dags/{spec.name}  ·  ops page: {endpoints.airflow_url}/twocluster/"
         f"  (user {endpoints.airflow_user}, password in endpoints.json)")
    if not wait:
        return 0

    deadline = time.monotonic() + timeout
    last = ""
    while True:
        runs = _runs_by_date(api, spec.name, dates)
        line = "  ".join(f"{d:%m-%d} {runs[d]['state'] if d in runs else '-'}" for d in dates)
        if line != last:
            _say(line)
            last = line
        if len(runs) == len(dates) and all(r["state"] in TERMINAL for r in runs.values()):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"stack-demo: the runs did not finish within {timeout:.0f} s: {line}")
        time.sleep(10)

    operator = endpoints.store_environment("operator")
    _say("the store as an operator sees it (twocluster status with the operator key: reads everything, writes nothing)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW_VAR_", "TWOCLUSTER_STORE"))}
    status = subprocess.run([sys.executable, "-m", "twocluster.ops.cli", "status", "--pipeline", spec.name],
                            env={**env, **operator}, capture_output=True, text=True, timeout=300)
    print(status.stdout + status.stderr, flush=True)
    scored = subprocess.run([sys.executable, "-m", "twocluster.ops.cli", "status", "--pipeline", spec.name, "--json"],
                            env={**env, **operator}, capture_output=True, text=True, timeout=300)
    dates_scored = [row["date"] for row in json.loads(scored.stdout)["pipelines"].get(spec.name, {}).get("dates", [])
                    if row["predictions"]] if scored.returncode == 0 else []
    failed = [d for d, r in _runs_by_date(api, spec.name, dates).items() if r["state"] != "success"]
    _say(f"done in {(time.monotonic() - started) / 60:.1f} min: scored {', '.join(dates_scored) or 'nothing'}"
         + (f"; runs that failed: {', '.join(map(str, failed))}" if failed else ""))
    return 0 if dates_scored and not failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="the stack's folder (make stack-up's)")
    parser.add_argument("--pipeline", default="speech_commands")
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--clips-per-day", type=int, default=600)
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="start the runs and return")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the runs")
    args = parser.parse_args(argv)
    path = Path(args.dir) / "endpoints.json"
    if not path.exists():
        print(f"stack-demo: {path} is missing: start the stack first (make stack-up)", file=sys.stderr)
        return 2
    return demo(Endpoints.model_validate_json(path.read_text()), args.pipeline, args.days, args.clips_per_day, args.wait, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
