"""Small SVG charts rendered on the server.

Why server-side SVG rather than a vendored JavaScript chart library: the page must render with no
internet access and inside Airflow's UI; SVG from Python needs no bundle, no licence file to
carry, no client code to test, works with JavaScript disabled, and the charts are checked by the
same tests as the numbers. Every chart has a <title> per mark, so hovering shows the exact value.
"""

from __future__ import annotations

from html import escape

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
ACCEPTED = "#59a14f"
WIDTH, HEIGHT = 760, 230
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 48


LEGEND_CHAR_PX = 6.6  # an upper estimate of one character's width at 11 px in a sans-serif font
LEGEND_GAP_PX = 18


def legend_layout(names: list[str], width: int = WIDTH) -> list[tuple[float, int]]:
    """(x, row) of each legend item: laid out by the width of its label, so long stage names
    never overlap, wrapping to another row where the line is full."""
    x, row, out = float(LEFT), 0, []
    for name in names:
        item = 14 + len(name) * LEGEND_CHAR_PX
        if x > LEFT and x + item > width - RIGHT:
            x, row = float(LEFT), row + 1
        out.append((x, row))
        x += item + LEGEND_GAP_PX
    return out


def _frame(title: str, body: str, legend: list[tuple[str, str]] = (), width: int = WIDTH, height: int = HEIGHT) -> str:
    layout = legend_layout([name for name, _ in legend], width)
    rows = 1 + max((row for _, row in layout), default=0)
    total = height + 14 * (rows - 1)  # extra legend rows below the chart, not over its axis labels
    items = "".join(
        f'<rect x="{x:.0f}" y="{height - 14 + 14 * row}" width="10" height="10" fill="{color}"/>'
        f'<text x="{x + 14:.0f}" y="{height - 5 + 14 * row}" class="legend">{escape(name)}</text>'
        for (name, color), (x, row) in zip(legend, layout, strict=True)
    )
    return (f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {total}" '
            f'xmlns="http://www.w3.org/2000/svg" font-family="system-ui, sans-serif" font-size="11">'
            f'<text x="{LEFT}" y="16" font-size="13" font-weight="600">{escape(title)}</text>{body}{items}</svg>')


def _y_axis(y_max: float, plot_h: float, fmt: str = "{:g}", ticks: int = 4) -> str:
    out = []
    for i in range(ticks + 1):
        value = y_max * i / ticks
        y = TOP + plot_h - plot_h * i / ticks
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{escape(fmt.format(value))}</text>')
    return "".join(out)


def _x_labels(labels: list[str], x_of, every: int) -> str:
    return "".join(
        f'<text x="{x_of(i):.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle" fill="#555">{escape(label)}</text>'
        for i, label in enumerate(labels) if i % every == 0 or i == len(labels) - 1
    )


def stacked_bars(title: str, labels: list[str], series: list[tuple[str, list[float]]], colors: dict[str, str] | None = None,
                 threshold: tuple[str, list[float | None]] | None = None, fmt: str = "{:.0f}") -> str:
    """One bar per label, stacked by series; optional per-bar threshold marks (e.g. the reject
    budget at each date's volume)."""
    colors = colors or {}
    plot_h = HEIGHT - TOP - BOTTOM
    totals = [sum(values[i] for _, values in series) for i in range(len(labels))]
    y_max = max([*totals, 1.0])
    slot = (WIDTH - LEFT - RIGHT) / max(len(labels), 1)
    bar_w = max(2.0, slot * 0.7)
    body = [_y_axis(y_max, plot_h, fmt)]
    legend = []
    for k, (name, _) in enumerate(series):
        legend.append((name, colors.get(name, PALETTE[k % len(PALETTE)])))
    bottoms = [0.0] * len(labels)
    for k, (name, values) in enumerate(series):
        color = colors.get(name, PALETTE[k % len(PALETTE)])
        for i, value in enumerate(values):
            if not value:
                continue
            h = plot_h * value / y_max
            y = TOP + plot_h - plot_h * bottoms[i] / y_max - h
            body.append(f'<rect class="mark" x="{LEFT + i * slot + (slot - bar_w) / 2:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                        f'height="{h:.1f}" fill="{color}"><title>{escape(labels[i])}: {escape(name)} {value:g}</title></rect>')
            bottoms[i] += value
    if threshold:
        name, limits = threshold
        for i, limit in enumerate(limits):
            if limit is not None:
                y = TOP + plot_h - plot_h * limit / y_max
                body.append(f'<line x1="{LEFT + i * slot + 2:.1f}" x2="{LEFT + (i + 1) * slot - 2:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                            f'stroke="#d62728" stroke-width="2"><title>{escape(labels[i])}: {escape(name)} {limit:g}</title></line>')
        legend.append((name, "#d62728"))
    body.append(_x_labels(labels, lambda i: LEFT + (i + 0.5) * slot, max(1, len(labels) // 10)))
    return _frame(title, "".join(body), legend)


def lines(title: str, labels: list[str], series: list[tuple[str, list[float | None]]], y_max: float | None = None,
          y_min: float = 0.0, fmt: str = "{:g}", markers: list[tuple[int, str]] = ()) -> str:
    """Lines over categorical x (dates, versions); ``markers`` are labelled vertical flags
    (e.g. where an alias pointed)."""
    plot_h = HEIGHT - TOP - BOTTOM
    values = [v for _, vs in series for v in vs if v is not None]
    top = y_max if y_max is not None else max([*values, 1e-9]) * 1.1
    span = max(top - y_min, 1e-9)
    slot = (WIDTH - LEFT - RIGHT) / max(len(labels), 1)

    def x_of(i: int) -> float:
        return LEFT + (i + 0.5) * slot

    def y_of(v: float) -> float:
        return TOP + plot_h - plot_h * (v - y_min) / span

    body = []
    for i in range(5):
        value = y_min + span * i / 4
        y = TOP + plot_h - plot_h * i / 4
        body.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                    f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{escape(fmt.format(value))}</text>')
    for index, text in markers:
        body.append(f'<line x1="{x_of(index):.1f}" x2="{x_of(index):.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#b07aa1" '
                    f'stroke-dasharray="4 3"/><text x="{x_of(index) + 3:.1f}" y="{TOP + 10}" fill="#b07aa1">{escape(text)}</text>')
    legend = []
    for k, (name, vs) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        legend.append((name, color))
        points = [(x_of(i), y_of(v), v, labels[i]) for i, v in enumerate(vs) if v is not None]
        if len(points) > 1:
            body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                        f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)}"/>')
        body += [f'<circle class="mark" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"><title>{escape(label)}: {escape(name)} '
                 f'{escape(fmt.format(v))}</title></circle>' for x, y, v, label in points]
    body.append(_x_labels(labels, x_of, max(1, len(labels) // 8)))
    return _frame(title, "".join(body), legend)
