"""The ops page: a FastAPI app the Airflow API server mounts (``plugins/ops_monitoring.py``).

    /                                   index of pipelines: freshness at a glance
    /pipelines/{pipeline}               the page: freshness, volumes and rejects, models, predictions,
                                        lineage, run timings, skipped objects
    /pipelines/{pipeline}/dates/{date}  one date's lineage: raw -> dataset -> model -> predictions
    /models/{model}/versions/{version}  one model version's lineage and artifacts
    /models/{model}/versions/{version}/files/{name}   training_curves.png, metrics.json (checksum verified)
    /runs/{dag_id}/{run_id}             what one DAG run committed (Airflow's per-run tab opens it)
    /api/...                            the same data as JSON

Every route depends on the caller-supplied ``auth`` dependency (the plugin passes Airflow's
``requires_authenticated()``: a plugin's sub-app is public otherwise). Everything is read through
:mod:`twocluster.ops.monitoring`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from html import escape
from pathlib import Path

# At module level: route annotations are resolved from the module's names (a name imported
# inside create_app left /openapi.json unable to describe the routes: a 500 for everyone).
from fastapi import Request, Response

from twocluster.ops import charts
from twocluster.ops.monitoring import PipelineOverview, RunView, health_problems, pipeline_overview, run_view
from twocluster.spec import PipelineSpec, load_pipeline_spec
from twocluster.store import layout, registry, statistics
from twocluster.store.manifest import ManifestError, verify_files
from twocluster.store.storage import ObjectStore

log = logging.getLogger(__name__)
ARTIFACTS = {"training_curves.png": "image/png", "metrics.json": "application/json", "history.csv": "text/csv"}

CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f7f7f8;color:#1d1d1f}
header{background:#017cee;color:#fff;padding:10px 20px}header a{color:#fff}
main{padding:16px 20px;max-width:1180px}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px 16px;margin:0 0 16px}
h1{font-size:20px;margin:0}h2{font-size:16px;margin:0 0 8px}
table{border-collapse:collapse;font-size:12px;width:100%}th,td{border-bottom:1px solid #eee;padding:3px 6px;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.chip{display:inline-block;border-radius:9px;padding:0 7px;font-size:11px;color:#fff}
tr.override td{color:#e15759;font-weight:600}form{margin:4px 0}.pending{color:#b36b00;font-weight:600}.ok{background:#59a14f}.bad{background:#e15759}.warn{background:#f28e2b}.none{background:#aaa}
.banner{padding:8px 12px;border-radius:6px;margin-bottom:12px}.banner.ok{color:#fff}.banner.bad{color:#fff}
svg.chart{width:100%;height:auto;max-width:760px}code{font-size:11px}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{CSS}</style></head>"
            f"<body><header><h1>{escape(title)}</h1></header><main>{body}</main></body></html>")


def _chip(ok: bool | None, text: str) -> str:
    cls = "none" if ok is None else ("ok" if ok else "bad")
    return f'<span class="chip {cls}">{escape(text)}</span>'


def _actions(o: PipelineOverview, base: str, csrf: str) -> str:
    """The forms an operator acts with (each a POST carrying the CSRF token; the registry decides
    what is allowed and records who did it)."""
    hidden = f"<input type=hidden name=csrf value='{escape(csrf)}'>"
    forms = []
    for alias, current in o.aliases.items():
        if current is None:
            continue
        eligible = [m.version for m in reversed(o.models) if m.version != current
                    and (standing := next((g for g in reversed(m.gate) if g.alias == alias), None)) and standing.outcome in registry.MAY_SERVE]
        forms.append(f"<form method=post action='{base}/actions/aliases/{o.model}/{alias}/rollback'>{hidden}"
                     f"<b>{escape(alias)}</b> → {escape(current)} <input name=reason required placeholder='why (required)' size=28>"
                     f"<button>Roll back {escape(alias)}</button></form>")
        if eligible:
            options = "".join(f"<option>{v}</option>" for v in eligible)
            forms.append(f"<form method=post action='{base}/actions/aliases/{o.model}/{alias}/set'>{hidden}"
                         f"<select name=version>{options}</select> <input name=reason required placeholder='why (required)' size=28>"
                         f"<button>Move {escape(alias)} to this gate-passed version</button></form>")
    pending = sorted({(m.version, g.alias) for m in o.models for g in m.gate[-1:] if g.outcome == "needs_approval"})
    for version, alias in pending:
        forms.append(f"<p class=pending>{escape(version)} waits for a person's approval as {escape(alias)}: "
                     f"<a href='/required_actions'>open the pending approval</a></p>")
    retrain = "".join(f"<option>{m}</option>" for m in ("auto", "force", "never"))
    forms.append(f"<form method=post action='{base}/actions/pipelines/{o.pipeline}/rerun'>{hidden}"
                 f"Re-run <input type=date name=date required> retrain <select name=retrain>{retrain}</select> "
                 f"<button>Trigger {escape(o.pipeline)}</button></form>")
    return f"<section id='actions'><h2>Act</h2>{''.join(forms)}</section>"


def render_overview(o: PipelineOverview, base: str = "", csrf: str | None = None, notice: str = "") -> str:
    f = o.freshness
    lag = "never scored" if f.lag_days is None else f"{f.lag_days} day(s)"
    banner = (f'<div class="banner {"bad" if f.late or o.broken_aliases else "ok"}">Newest scored date: <b>{f.newest_scored_date or "none"}</b> '
              f"({lag} behind; limit {f.max_lag_days}). Aliases: "
              + ", ".join(f"<b>{escape(a)}</b> → {escape(v or 'nothing')}" + (f" <b>BROKEN: {escape(o.broken_aliases[a])}</b>"
                                                                              if a in o.broken_aliases else "")
                          for a, v in o.aliases.items()) + "</div>")
    labels = [d.date.strftime("%m-%d") for d in o.dates]
    reasons = sorted({r for d in o.dates if d.dataset for r in d.dataset.rejected_by_reason})
    volume = charts.stacked_bars(
        "Accepted and rejected inputs per date (red: reject budget)", labels,
        [("accepted", [d.dataset.accepted if d.dataset else 0 for d in o.dates])]
        + [(f"rejected: {r}", [d.dataset.rejected_by_reason.get(r, 0) if d.dataset else 0 for d in o.dates]) for r in reasons],
        colors={"accepted": charts.ACCEPTED},
        threshold=("allowed rejects", [round(d.dataset.input * o.max_reject_rate, 1) if d.dataset else None for d in o.dates]))
    freshness_rows = "".join(
        f"<tr><td><a href='{base}/pipelines/{o.pipeline}/dates/{d.date}'>{d.date}</a></td>"
        f"<td>{_chip(d.raw.complete if d.raw.files else None, f'{d.raw.files} files' + ('' if d.raw.complete or not d.raw.files else ', incomplete'))}</td>"
        f"<td>{_chip(bool(d.dataset), d.dataset.version if d.dataset else 'missing')}</td>"
        f"<td class=num>{f'{d.dataset.reject_rate:.1%}' if d.dataset else ''}</td>"
        f"<td>{_chip(bool(d.predictions), d.predictions.version if d.predictions else 'missing')}</td>"
        f"<td>{escape(d.predictions.model_version) if d.predictions else ''}</td>"
        f"<td class=num>{'' if not d.predictions or d.predictions.drift is None else f'{d.predictions.drift:.3f}'}</td>"
        f"<td class=num>{'' if not d.predictions or d.predictions.feature_skew is None else f'{d.predictions.feature_skew:.3f}'}</td>"
        f"<td class=num>{'' if not d.predictions or d.predictions.mean_confidence is None else f'{d.predictions.mean_confidence:.2f}'}</td>"
        f"<td>{escape('; '.join(d.problems))}</td></tr>"
        for d in reversed(o.dates))
    freshness = (f"<section id='freshness'><h2>Freshness</h2>{banner}<table><tr><th>date</th><th>raw arrivals</th><th>dataset</th>"
                 f"<th class=num>rejects</th><th>predictions</th><th>scored by</th><th class=num>drift (TVD)</th>"
                 f"<th class=num>feature skew (JS)</th>"
                 f"<th class=num>mean conf.</th><th>problems</th></tr>{freshness_rows}</table></section>")

    versions = [m.version[:15] for m in o.models]
    markers = [(i, "/".join(m.aliases)) for i, m in enumerate(o.models) if m.aliases]
    champion = [next((g.champion_test_accuracy for g in m.gate if g.champion_test_accuracy is not None), None) for m in o.models]
    accuracy = charts.lines("Test accuracy by model version (dashed: where aliases point)", versions,
                            [("test accuracy", [m.test_accuracy for m in o.models]),
                             ("champion on the same test data", champion)], y_max=1.0,
                            y_min=min([0.5, *[m.test_accuracy for m in o.models]]), fmt="{:.2f}", markers=markers)
    model_rows = "".join(
        f"<tr><td><a href='{base}/models/{o.model}/versions/{m.version}'>{m.version}</a></td><td>{m.trained_at:%Y-%m-%d %H:%M}</td>"
        f"<td>{escape(', '.join(m.trained_on[:1] + m.trained_on[-1:]) if len(m.trained_on) > 1 else ', '.join(m.trained_on))}"
        f" ({len(m.trained_on)} dates)</td><td class=num>{m.test_accuracy:.3f}</td>"
        f"<td class=num>{'' if m.training_seconds is None else f'{m.training_seconds:.0f}s'}</td>"
        f"<td>{escape(' | '.join(f'{g.alias}: {g.outcome} ({g.reason})' for g in m.gate[-2:]))}</td>"
        f"<td>{escape(', '.join(m.aliases))}</td>"
        f"<td>{' '.join(f'<a href={chr(39)}{base}/models/{o.model}/versions/{m.version}/files/{n}{chr(39)}>{n}</a>' for n in m.files)}</td></tr>"
        for m in reversed(o.models))
    # A gate override is shown in red: the one way a version reached an alias without a pass or an approval.
    moves = "".join(f"<tr{' class=override' if mv.authority == 'override' else ''}><td>{escape(mv.alias)}</td><td class=num>{mv.seq}</td>"
                    f"<td>{mv.version}</td><td>{escape(mv.previous_version or '')}</td>"
                    f"<td>{escape({'override': 'GATE OVERRIDDEN'}.get(mv.authority, mv.authority))}</td><td>{escape(mv.who)}</td>"
                    f"<td>{escape(mv.reason)}</td></tr>" for mv in reversed(o.alias_moves))
    models = (f"<section id='models'><h2>Models</h2>{accuracy}<table><tr><th>version</th><th>trained</th><th>on dates</th>"
              f"<th class=num>test acc.</th><th class=num>fit</th><th>gate</th><th>aliases</th><th>artifacts</th></tr>{model_rows}</table>"
              f"<h2 style='margin-top:12px'>Alias moves</h2><table><tr><th>alias</th><th class=num>entry</th><th>to</th><th>from</th>"
              f"<th>authority</th><th>who</th><th>reason</th></tr>{moves}</table></section>")

    drift = charts.lines("Predictions against the training data: drift, feature skew; confidence", labels,
                         [("drift (TVD)", [d.predictions.drift if d.predictions else None for d in o.dates]),
                          ("feature skew (JS)", [d.predictions.feature_skew if d.predictions else None for d in o.dates]),
                          ("mean confidence", [d.predictions.mean_confidence if d.predictions else None for d in o.dates]),
                          ("below confidence floor", [d.predictions.below_confidence_floor_share if d.predictions else None for d in o.dates])],
                         y_max=1.0, fmt="{:.2f}")
    predictions = f"<section id='predictions'><h2>Predictions</h2>{drift}</section>"
    stages = [("preprocess: featurize + write shards", lambda d: d.dataset and d.dataset.seconds.get("featurize")),
              ("preprocess: promote", lambda d: d.dataset and d.dataset.seconds.get("write")),
              ("scoring: total", lambda d: d.predictions and d.predictions.seconds.get("total"))]
    timings = charts.lines("Run timings per date (seconds)", labels, [(n, [fn(d) or None for d in o.dates]) for n, fn in stages], fmt="{:.1f}")
    skipped = "".join(f"<li><code>{escape(s.uri)}</code>: {escape(s.problem)}</li>" for s in o.skipped) or "<li>none</li>"
    return _page(f"{o.pipeline}: operations",
                 f"<p><a href='{base}/'>all pipelines</a> · store <code>{escape(o.store)}</code> · read in {o.read_seconds:.2f}s</p>"
                 + (f"<div class='banner ok' id='notice'>{escape(notice)}</div>" if notice else "")
                 + f"{freshness}{_actions(o, base, csrf) if csrf else ''}<section id='volumes'><h2>Volumes and rejects</h2>{volume}</section>{models}{predictions}"
                 f"<section id='timings'><h2>Run timings</h2>{timings}</section>"
                 f"<section id='skipped'><h2>Skipped as invalid ({len(o.skipped)})</h2><ul>{skipped}</ul></section>")


def date_lineage(o: PipelineOverview, date: dt.date) -> dict:
    row = next((d for d in o.dates if d.date == date), None)
    if row is None:
        raise LookupError(f"{date} is not in {o.pipeline}'s window")
    return {
        "date": str(date),
        "raw": {"uri": o.store + "/" + layout.raw_date_prefix(o.pipeline, date), **row.raw.model_dump()},
        "dataset": row.dataset.model_dump() if row.dataset else None,
        "model_version": row.predictions.model_version if row.predictions else None,
        "predictions": row.predictions.model_dump() if row.predictions else None,
        "problems": row.problems,
    }


def render_quality(dataset: statistics.VersionStatistics | None, scored: statistics.VersionStatistics | None) -> str:
    """A date's data quality: the dataset's accepted inputs with content warnings, its features
    per channel against the scored ones, and the scored features' skew per channel."""
    if dataset is None and scored is None:
        return "<section id='quality'><h2>Data quality</h2><p>No statistics (versions written before they existed).</p></section>"
    parts = []
    if dataset is not None:
        warned = ", ".join(f"{escape(r)} {n}" for r, n in dataset.quality_warnings.items()) or "none"
        parts.append(f"<p>Accepted with a content warning: {warned}.</p>")
        if dataset.clips:
            rows = "".join(f"<tr><td>{escape(name)}</td>" + "".join(f"<td class=num>{v:.3g}</td>" for v in (m.p05, m.p50, m.p95, m.min, m.max))
                           + "</tr>" for name, m in dataset.clips.items())
            parts.append("<table id='clips'><tr><th>per accepted input</th><th class=num>p5</th><th class=num>median</th>"
                         f"<th class=num>p95</th><th class=num>min</th><th class=num>max</th></tr>{rows}</table>")
    reference = dataset.overall if dataset is not None else None
    channels = len((reference or scored.overall).channels)
    labels = [str(i) for i in range(channels)]
    series = []
    if reference is not None:
        series.append(("dataset mean", [c.mean for c in reference.channels]))
    if scored is not None:
        series.append(("scored mean", [c.mean for c in scored.overall.channels]))
    parts.append(charts.lines(f"Feature means per channel ({escape((reference or scored.overall).feature)})", labels, series,
                              y_min=min(min(v for _, vs in series for v in vs), 0.0), fmt="{:.1f}"))
    if scored is not None and scored.skew is not None:
        skew = scored.skew
        parts.append(charts.lines(f"Skew per channel vs the model's training data (Jensen-Shannon, max {skew.feature_skew:.3f})",
                                  labels, [("skew", skew.per_channel)], y_max=1.0, fmt="{:.2f}"))
    return f"<section id='quality'><h2>Data quality</h2>{''.join(parts)}</section>"


_NONE_ROW = "<tr><td colspan='6'>none</td></tr>"


def render_run(v: RunView, base: str = "") -> str:
    p = f"{base}/pipelines/{v.pipeline}"
    dates = "".join(
        f"<tr><td><a href='{p}/dates/{d.date}'>{d.date}</a></td>"
        f"<td>{_chip(True, d.dataset.version) if d.dataset and d.dataset.run_id == v.run_id else ''}</td>"
        f"<td class=num>{f'{d.dataset.accepted} / {d.dataset.rejected}' if d.dataset and d.dataset.run_id == v.run_id else ''}</td>"
        f"<td>{_chip(True, d.predictions.version) if d.predictions and d.predictions.run_id == v.run_id else ''}</td>"
        f"<td>{escape(d.predictions.model_version) if d.predictions and d.predictions.run_id == v.run_id else ''}</td>"
        f"<td>{escape('; '.join(d.problems))}</td></tr>" for d in v.dates)
    models = "".join(
        f"<tr><td><a href='{base}/models/{v.model}/versions/{m.version}'>{m.version}</a></td><td class=num>{m.test_accuracy:.3f}</td>"
        f"<td>{escape(', '.join(m.trained_on))}</td><td>{escape(', '.join(m.aliases))}</td></tr>" for m in v.models)
    gate = "".join(f"<li>{escape(g.alias)}: <b>{escape(g.outcome)}</b> — {escape(g.reason)}</li>" for g in v.gate)
    empty = ("" if v.dates or v.models else
             "<p>This run has committed nothing in the page's window: it is still running, it found its inputs unchanged, "
             "or its dates are outside the window.</p>")
    return _page(f"{v.pipeline}: run {v.run_id}",
                 f"<p><a href='{p}'>{escape(v.pipeline)}</a></p><section id='run'>{empty}"
                 f"<h2>Dates it committed</h2><table><tr><th>date</th><th>dataset</th><th class=num>accepted / rejected</th>"
                 f"<th>predictions</th><th>scored by</th><th>problems</th></tr>{dates or _NONE_ROW}</table>"
                 f"<h2 style='margin-top:12px'>Models it trained or gated</h2><table><tr><th>version</th><th class=num>test acc.</th>"
                 f"<th>trained on</th><th>aliases now</th></tr>{models or _NONE_ROW}</table>"
                 f"<h2 style='margin-top:12px'>Gate decisions</h2><ul>{gate or '<li>none</li>'}</ul></section>")


def create_app(store_for: Callable[[PipelineSpec], ObjectStore], specs: Callable[[], dict[str, PipelineSpec]], auth=None,
               base: str = "", *, user=None, csrf_key: bytes | None = None, trigger_run=None):
    """The ops app. ``store_for`` opens a pipeline's store, ``specs`` lists the pipelines, ``auth``
    is a FastAPI dependency every route requires, ``base`` the mount point (for links).

    Acting (rollback, moving an alias, re-running a date) needs ``user`` (a dependency giving the
    signed-in user's name, recorded as ``airflow:<name>``), ``csrf_key`` (each form carries an HMAC
    of the user under it, and a cross-site ``Origin`` is refused) and, to re-run, ``trigger_run``
    (``(request, dag_id, conf) -> run id``: the plugin triggers through Airflow's REST API with the
    caller's own token, so the run is the user's). Without them the page only shows."""
    import hashlib
    import hmac
    from urllib.parse import quote, urlparse

    from fastapi import Depends, FastAPI, Form, HTTPException
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, RedirectResponse

    from twocluster.ops import cli

    # The API's description and its docs are routes like the others, behind the same ``auth``
    # (FastAPI's own are public); ReDoc is off.
    app = FastAPI(title="twocluster ops", dependencies=[Depends(auth)] if auth is not None else [], docs_url=None,
                  redoc_url=None, openapi_url=None)

    @app.exception_handler(Exception)
    def unexpected(request: Request, error: Exception) -> Response:
        # A mounted sub-app's error reaches no log of the API server otherwise: only a bare 500.
        log.exception("twocluster ops: %s %s failed", request.method, request.url.path)
        return Response(f"the ops page failed on {request.url.path}: {type(error).__name__} (the API server's log has the "
                        "traceback)", status_code=500, media_type="text/plain")

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=f"{base}/openapi.json", title="twocluster ops API")
    user_name = user or (lambda: "")

    def csrf_for(name: str) -> str | None:
        return hmac.new(csrf_key, f"twocluster-ops:{name}".encode(), hashlib.sha256).hexdigest() if csrf_key and name else None

    def check_action(request: Request, csrf: str, name: str) -> None:
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlparse(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, f"cross-site request from {origin} refused")
        expected = csrf_for(name)
        if expected is None or not hmac.compare_digest(csrf or "", expected):
            raise HTTPException(403, "this action needs the page's form token (reload the page and try again)")

    def back_to(spec: PipelineSpec, notice: str) -> RedirectResponse:
        return RedirectResponse(f"{base}/pipelines/{spec.name}?notice={quote(notice[:600])}#notice", status_code=303)

    def spec_of(name: str) -> PipelineSpec:
        found = specs().get(name)
        if found is None:
            raise HTTPException(404, f"no pipeline {name!r}")
        return found

    def overview(name: str, days: int | None = None) -> PipelineOverview:
        """``days``: the window's length (default the spec's ``monitoring.window_days``)."""
        spec = spec_of(name)
        if days is not None and not 1 <= days <= 366:
            raise HTTPException(400, "days: the window is 1 to 366 days")
        return pipeline_overview(store_for(spec), spec, window_days=days)

    @app.get("/api/pipelines")
    def api_pipelines() -> list[dict]:
        out = []
        for name, spec in sorted(specs().items()):
            o = pipeline_overview(store_for(spec), spec)
            out.append({"pipeline": name, "freshness": o.freshness.model_dump(mode="json"), "problems": health_problems(o),
                        "aliases": o.aliases})
        return out

    @app.get("/api/pipelines/{name}")
    def api_pipeline(name: str, days: int | None = None) -> dict:
        return overview(name, days).model_dump(mode="json")

    @app.get("/api/pipelines/{name}/dates/{date}")
    def api_date(name: str, date: dt.date) -> dict:
        try:
            return date_lineage(overview(name), date)
        except LookupError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/api/pipelines/{name}/health")
    def api_health(name: str) -> dict:
        problems = health_problems(overview(name))
        return {"pipeline": name, "healthy": not problems, "problems": problems}

    def run_of(dag_id: str, run_id: str) -> RunView:
        # A pipeline's DAG id is its name (twocluster.orchestration.dag_factory).
        return run_view(overview(dag_id), run_id)

    @app.get("/api/runs/{dag_id}/{run_id}")
    def api_run(dag_id: str, run_id: str) -> dict:
        return run_of(dag_id, run_id).model_dump(mode="json")

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
    def run_page(dag_id: str, run_id: str) -> str:
        return render_run(run_of(dag_id, run_id), base)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        rows = "".join(
            f"<tr><td><a href='{base}/pipelines/{p['pipeline']}'>{escape(p['pipeline'])}</a></td>"
            f"<td>{_chip(not p['freshness']['late'], str(p['freshness']['newest_scored_date'] or 'never scored'))}</td>"
            f"<td>{escape('; '.join(p['problems']) or 'healthy')}</td></tr>" for p in api_pipelines())
        return _page("twocluster pipelines", f"<section><table><tr><th>pipeline</th><th>newest scored date</th><th>health</th></tr>"
                                             f"{rows}</table></section>")

    @app.get("/pipelines/{name}", response_class=HTMLResponse)
    def pipeline_page(name: str, notice: str = "", days: int | None = None, who: str = Depends(user_name)) -> str:
        return render_overview(overview(name, days), base, csrf=csrf_for(who), notice=notice)

    def alias_action(request: Request, csrf: str, who: str, model: str, reason: str, move, describe) -> Response:
        """An alias move from the page: the form token checked, a reason required, the move made
        by ``move(store, reason, who)`` through the CLI's functions; a refusal shown, not raised."""
        check_action(request, csrf, who)
        spec = model_spec(model)
        if not reason.strip():
            raise HTTPException(400, "moving an alias needs a reason")
        try:
            done = move(store_for(spec), reason.strip(), f"airflow:{who}")
        except (cli.CliError, registry.RegistryError, ManifestError, layout.LayoutError) as e:
            return back_to(spec, f"refused: {e}")
        return back_to(spec, describe(done) + (f" (alias log entry {done['log_entry']}, by airflow:{who})" if done["moved"] else ""))

    @app.post("/actions/aliases/{model}/{alias}/rollback")
    def rollback_action(request: Request, model: str, alias: str, csrf: str = Form(""), reason: str = Form(""), to: str = Form(""),
                        who: str = Depends(user_name)) -> Response:
        return alias_action(request, csrf, who, model, reason,
                            lambda store, why, by: cli.alias_rollback(store, model, alias, why, to=to or None, who=by),
                            lambda done: f"{model}:{alias} rolled back from {done['previous_version']} to {done['version']}")

    @app.post("/actions/aliases/{model}/{alias}/set")
    def set_action(request: Request, model: str, alias: str, csrf: str = Form(""), version: str = Form(""), reason: str = Form(""),
                   who: str = Depends(user_name)) -> Response:
        # Never an override from the page: only a version the gate passed or a person approved.
        return alias_action(request, csrf, who, model, reason,
                            lambda store, why, by: cli.alias_set(store, model, alias, version, why, who=by),
                            lambda done: f"{model}:{alias} -> {version}" + ("" if done["moved"] else " (already there)"))

    @app.post("/actions/pipelines/{name}/rerun")
    def rerun_action(request: Request, name: str, csrf: str = Form(""), date: str = Form(""), retrain: str = Form("auto"),
                     who: str = Depends(user_name)) -> Response:
        check_action(request, csrf, who)
        spec = spec_of(name)
        if trigger_run is None:
            raise HTTPException(501, "re-running needs Airflow's API (the page runs without it here)")
        try:
            day = layout.check_date(date)
        except layout.LayoutError as e:
            raise HTTPException(400, str(e)) from None
        if retrain not in ("auto", "force", "never"):
            raise HTTPException(400, f"retrain {retrain!r} is not one of auto, force, never")
        try:
            run_id = trigger_run(request, name, {"date": day, "retrain": retrain})
        except Exception as e:  # noqa: BLE001 - Airflow's answer, shown to the operator
            return back_to(spec, f"refused: Airflow did not start the run: {e}")
        return back_to(spec, f"triggered {name} for {day} (retrain {retrain}) as {who}: run {run_id}")

    @app.get("/pipelines/{name}/dates/{date}", response_class=HTMLResponse)
    def date_page(name: str, date: dt.date) -> str:
        o = overview(name)
        try:
            lineage = date_lineage(o, date)
        except LookupError as e:
            raise HTTPException(404, str(e)) from None
        d, p = lineage["dataset"], lineage["predictions"]
        hops = [f"raw <code>{escape(lineage['raw']['uri'])}</code> ({lineage['raw']['files']} files"
                f"{'' if lineage['raw']['complete'] else ', incomplete'})",
                f"dataset <code>{escape(d['manifest_uri'])}</code>" if d else "dataset: none committed",
                (f"model <a href='{base}/models/{o.model}/versions/{p['model_version']}'>{p['model_version']}</a>" if p else "model: -"),
                f"predictions <code>{escape(p['manifest_uri'])}</code> ({p['rows']} rows)" if p else "predictions: none committed"]
        problems = "".join(f"<li>{escape(x)}</li>" for x in lineage["problems"]) or "<li>none</li>"
        store = store_for(spec_of(name))
        dataset_stats = statistics.read(store, layout.dataset_version_prefix(name, date, d["version"])) if d else None
        scored_stats = statistics.read(store, layout.predictions_version_prefix(name, date, p["version"])) if p else None
        return _page(f"{name} {date}: lineage", f"<p><a href='{base}/pipelines/{name}'>{escape(name)}</a></p><section><h2>Lineage</h2>"
                                                f"<ol>{''.join(f'<li>{h}</li>' for h in hops)}</ol><h2>Problems</h2><ul>{problems}</ul></section>"
                                                + render_quality(dataset_stats, scored_stats))

    def model_spec(model: str) -> PipelineSpec:
        found = next((s for s in specs().values() if s.model.name == model), None)
        if found is None:
            raise HTTPException(404, f"no pipeline trains {model!r}")
        return found

    @app.get("/models/{model}/versions/{version}", response_class=HTMLResponse)
    def model_page(model: str, version: str) -> str:
        spec = model_spec(model)
        store = store_for(spec)
        try:
            manifest = registry.read_model_manifest(store, model, version)
        except (ManifestError, layout.LayoutError) as e:
            raise HTTPException(404, str(e)) from None
        o = pipeline_overview(store, spec)
        scored = [str(d.date) for d in o.dates if d.predictions and d.predictions.model_version == version]
        trained = "".join(f"<li><code>{escape(u)}</code></li>" for u in manifest.lineage.inputs)
        files = "".join(f"<li><a href='{base}/models/{model}/versions/{version}/files/{n}'>{n}</a></li>"
                        for n in ARTIFACTS if any(f.path == n for f in manifest.files))
        curves = (f"<img alt='training curves' src='{base}/models/{model}/versions/{version}/files/training_curves.png' style='max-width:760px'>"
                  if any(f.path == "training_curves.png" for f in manifest.files) else "")
        decisions = "".join(
            f"<li>#{d.seq} {escape(d.alias)}: <b>{escape(d.outcome)}</b>{' by ' + escape(d.decided_by) if d.decided_by else ''}"
            f" — {escape(d.reason)}</li>" for d in registry.gate_decisions(store, model) if d.version == version)
        moves = "".join(
            f"<tr{' class=override' if mv.authority == 'override' else ''}><td>{escape(mv.alias)}</td><td class=num>{mv.seq}</td>"
            f"<td>{mv.written_at:%Y-%m-%d %H:%M}</td><td>{escape(mv.previous_version or '-')} → {escape(mv.version)}</td>"
            f"<td>{escape(mv.authority)}</td><td>{escape(mv.who)}</td><td>{escape(mv.reason)}</td></tr>"
            for mv in o.alias_moves if version in (mv.version, mv.previous_version))
        return _page(f"{model} {version}", f"<p><a href='{base}/pipelines/{spec.name}'>{escape(spec.name)}</a></p><section>"
                                           f"<h2>Gate decisions and approvals</h2><ul id='decisions'>{decisions or '<li>none</li>'}</ul>"
                                           f"<h2>Alias history (moves to or from it)</h2><table id='moves'><tr><th>alias</th>"
                                           f"<th class=num>entry</th><th>when</th><th>move</th><th>authority</th><th>who</th><th>why</th></tr>"
                                           f"{moves or _NONE_ROW}</table>"
                                           f"<h2>Trained on</h2><ul>{trained}</ul><h2>Scored dates (in the window)</h2>"
                                           f"<p>{escape(', '.join(scored) or 'none')}</p><h2>Artifacts</h2><ul>{files}</ul>{curves}</section>")

    @app.get("/models/{model}/versions/{version}/files/{name}")
    def artifact(model: str, version: str, name: str) -> Response:
        if name not in ARTIFACTS:
            raise HTTPException(404, f"{name!r} is not a published artifact")
        store = store_for(model_spec(model))
        try:
            manifest = registry.read_model_manifest(store, model, version)
            prefix = layout.model_version_prefix(model, version)
            verify_files(store, prefix, manifest, [name])
            data = store.read_bytes(f"{prefix}/{name}")
        except (ManifestError, layout.LayoutError) as e:
            raise HTTPException(404, str(e)) from None
        return Response(data, media_type=ARTIFACTS[name])

    return app


def load_specs(folder: str | Path) -> dict[str, PipelineSpec]:
    specs = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        spec = load_pipeline_spec(path)
        specs[spec.name] = spec
    return specs
