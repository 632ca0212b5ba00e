"""A sweep's report: ``pareto.svg`` (packed size against accuracy, the front drawn) and
``report.html`` (self-contained: the chart inlined, the table, a recommendation).

Hand-built markup, no plotting library. Every string that came from a user (metadata, file
names, configuration values) is escaped: the report is opened in a browser.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

from core.jobs import JobStatus
from core.storage import human_bytes
from core.sweep_table import SweepTable, SweepView, comparable

METRIC_TITLES = {
    "student_top1": "student top-1 on the labelled images",
    "agreement": "agreement with the teacher (top-1)",
}
LATENCY_NOTE = "OpenVINO, model_qdq_cpu.onnx, batch 1, on the worker's CPU"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"

# Colours: one accent for the front, muted grey for the rest.
FRONT = "#2563eb"
FRONT_DARK = "#1e40af"
OTHER = "#94a3b8"
RECOMMENDED = "#f59e0b"
INK = "#0f172a"
MUTED = "#64748b"
GRID = "#e2e8f0"

# Chart geometry (SVG user units, ~px).
WIDTH, HEIGHT = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 78, 28, 64, 62
LABEL_SIZE = 12
CHAR_WIDTH = 7.4  # generous advance of a 12 px (bold) sans-serif character, for label boxes
LOG_SCALE_SPAN = 4  # sizes spanning more than this factor go on a log axis


def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


# ---------------------------------------------------------------------------------------------
# Axes


@dataclass
class Axis:
    low: float
    high: float
    start: float  # pixel of ``low``
    end: float  # pixel of ``high``
    log: bool = False

    def __call__(self, value: float) -> float:
        if self.log:
            low, high, value = math.log(self.low), math.log(self.high), math.log(value)
        else:
            low, high = self.low, self.high
        return self.start + (value - low) / (high - low) * (self.end - self.start)


def nice_step(span: float, target_ticks: int) -> float:
    """A 1-2-5 step giving about ``target_ticks`` ticks over ``span``."""
    raw = span / max(target_ticks, 1)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power


def linear_ticks(low: float, high: float, target: int = 6) -> list[float]:
    step = nice_step(high - low, target)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 times powers of ten inside [low, high]; only powers of ten if that is many."""
    ticks = []
    for exponent in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
        for factor in (1, 2, 5):
            value = factor * 10.0**exponent
            if low <= value <= high:
                ticks.append(value)
    if len(ticks) > 9:
        ticks = [t for t in ticks if math.isclose(math.log10(t), round(math.log10(t)))]
    return ticks


def size_unit(largest: float) -> tuple[float, str]:
    for unit, name in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if largest >= unit:
            return unit, name
    return 1, "B"


def tick_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:g}"


# ---------------------------------------------------------------------------------------------
# Labels that do not overlap


Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _overlap(a: Box, b: Box) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0)


@dataclass
class LabelSpot:
    x: float  # the text's anchor point; y is its baseline
    y: float
    anchor: str  # SVG text-anchor
    leader: tuple[float, float] | None  # where a line from the point meets a far label


NEAR_SPOTS = [  # (dx, dy of the baseline, anchor), in order of preference
    (12, 4, "start"),
    (-12, 4, "end"),
    (0, -11, "middle"),
    (0, 20, "middle"),
    (9, -9, "start"),
    (-9, -9, "end"),
    (9, 18, "start"),
    (-9, 18, "end"),
]
FAR_SPOTS = [(0, -30, "middle"), (0, 39, "middle"), (24, -24, "start"), (-24, -24, "end")]
FAR_SPOTS += [(24, 34, "start"), (-24, 34, "end"), (40, 4, "start"), (-40, 4, "end")]


def place_labels(
    points: Sequence[tuple[float, float, str]], bounds: Box, obstacles: Sequence[Box] = ()
) -> list[LabelSpot]:
    """A spot for each point's label: the first spot around the point, near ones before far
    ones (which get a leader line), that overlaps no label placed before it, no point, none
    of ``obstacles`` (the front's line) and stays in ``bounds``; else the spot overlapping
    least."""
    height = LABEL_SIZE + 2
    marks: list[Box] = [(x - 8, y - 8, x + 8, y + 8) for x, y, _ in points]
    marks += obstacles
    placed: list[Box] = []
    result = []
    for x, y, text in points:
        width = len(text) * CHAR_WIDTH
        best: tuple[float, LabelSpot, Box] | None = None
        for far, (dx, dy, anchor) in [(False, s) for s in NEAR_SPOTS] + [
            (True, s) for s in FAR_SPOTS
        ]:
            left = {"start": x + dx, "end": x + dx - width, "middle": x - width / 2}[anchor]
            box = (left, y + dy - height + 3, left + width, y + dy + 3)
            outside = (
                max(bounds[0] - box[0], 0)
                + max(box[2] - bounds[2], 0)
                + max(bounds[1] - box[1], 0)
                + max(box[3] - bounds[3], 0)
            )
            cost = sum(_overlap(box, other) for other in placed + marks) + 50 * outside
            cost += 5 if far else 0  # a near spot that overlaps a little beats a far one
            if best is None or cost < best[0]:
                leader = (min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3]))
                best = (cost, LabelSpot(x + dx, y + dy, anchor, leader if far else None), box)
            if cost == 0:
                break
        assert best is not None
        placed.append(best[2])
        result.append(best[1])
    return result


# ---------------------------------------------------------------------------------------------
# pareto.svg


def _text(x: float, y: float, content: str, **attributes: str | float) -> str:
    attrs = " ".join(
        f"{key.rstrip('_').replace('_', '-')}={quoteattr(str(v))}" for key, v in attributes.items()
    )
    return f'<text x="{x:.1f}" y="{y:.1f}" {attrs}>{xml_escape(content)}</text>'


def render_svg(table: SweepTable, *, title: str | None = None) -> str:
    """Packed size (x; log scale when sizes span more than 4x) against accuracy (y, %): every
    succeeded job a labelled point, the Pareto front emphasised and joined by a step line."""
    metric = table.pareto_metric
    rows = sorted(comparable(table.rows, metric), key=lambda r: (r.packed_bytes or 0, r.label))
    plot: Box = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" font-family="{FONT}" role="img" '
        'aria-labelledby="pareto-title">',
        f'<title id="pareto-title">{xml_escape(title or "Sweep: size against accuracy")}</title>',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        _text(LEFT, 26, title or "Size against accuracy", font_size=15, font_weight=600, fill=INK),
        _text(
            LEFT,
            44,
            f"{len(rows)} succeeded configuration{'' if len(rows) == 1 else 's'}; "
            "up and to the left is better",
            font_size=12,
            fill=MUTED,
        ),
    ]
    parts.append(_legend(any(row is table.recommended for row in rows)))
    if not rows:
        parts.append(
            f'<rect x="{LEFT}" y="{TOP}" width="{plot[2] - LEFT}" height="{plot[3] - TOP}" '
            f'fill="none" stroke="{GRID}"/>'
        )
        parts.append(
            _text(
                (plot[0] + plot[2]) / 2,
                (plot[1] + plot[3]) / 2,
                "no succeeded job to plot",
                font_size=14,
                fill=MUTED,
                text_anchor="middle",
            )
        )
        parts.append("</svg>")
        return "\n".join(parts)

    sizes = [float(row.packed_bytes or 1) for row in rows]
    accuracies = [100 * (row.accuracy(metric) or 0.0) for row in rows]
    log = max(sizes) / max(min(sizes), 1) > LOG_SCALE_SPAN
    unit, unit_name = size_unit(max(sizes))
    x_axis = _size_axis([s / unit for s in sizes], log, plot)
    y_axis = _accuracy_axis(accuracies, plot)
    parts += _axes(x_axis, y_axis, plot, unit_name, metric, log)

    points = [(x_axis(s / unit), y_axis(a)) for s, a in zip(sizes, accuracies, strict=True)]
    front = [(point, row) for point, row in zip(points, rows, strict=True) if row.pareto]
    line: list[Box] = []  # the step line's segments, which labels keep off
    if front:
        (x, y), _ = front[0]
        steps = [f"M{x:.1f},{y:.1f}"]
        for (x1, y1), _ in [*front[1:], ((plot[2], front[-1][0][1]), None)]:
            # Horizontal at the accuracy reached so far, then up to the next front point; the
            # last runs on to the edge: what the largest front point offers beyond it.
            steps.append(f"H{x1:.1f}V{y1:.1f}")
            line += [(x, y - 2, x1, y + 2), (x1 - 2, min(y, y1), x1 + 2, max(y, y1))]
            x, y = x1, y1
        parts.append(
            f'<path class="front" d="{"".join(steps)}" fill="none" stroke="{FRONT}" '
            'stroke-width="2" stroke-linejoin="round" opacity="0.85"/>'
        )
    # Front points last, so that they lie on top; labels placed front first.
    order = sorted(range(len(rows)), key=lambda i: (not rows[i].pareto, i))
    spots = place_labels([(*points[i], rows[i].label) for i in order], plot, line)
    point_marks, label_marks, leaders = [], [], []
    for i, spot in zip(order, spots, strict=True):
        row, (x, y) = rows[i], points[i]
        if spot.leader is not None:
            leaders.append(
                f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{spot.leader[0]:.1f}" '
                f'y2="{spot.leader[1]:.1f}" stroke="{OTHER}" stroke-width="1"/>'
            )
        tooltip = (
            f"{row.label}: {human_bytes(row.packed_bytes or 0)}, "
            f"{percent(row.accuracy(metric))} ({metric}), job {row.job_id}"
        )
        circle = (
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{FRONT}" stroke="#ffffff" '
            'stroke-width="2"/>'
            if row.pareto
            else f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#ffffff" stroke="{OTHER}" '
            'stroke-width="2"/>'
        )
        ring = (
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="{RECOMMENDED}" '
            'stroke-width="2.5"/>'
            if row is table.recommended
            else ""
        )
        point_marks.append(
            f'<g class="point{" pareto" if row.pareto else ""}" '
            f"data-job-id={quoteattr(row.job_id)}>"
            f"<title>{xml_escape(tooltip)}</title>{ring}{circle}</g>"
        )
        label_marks.append(
            _text(
                spot.x,
                spot.y,
                row.label,
                class_="label",
                font_size=LABEL_SIZE,
                font_weight=600 if row.pareto else 400,
                fill=FRONT_DARK if row.pareto else MUTED,
                text_anchor=spot.anchor,
                data_job_id=row.job_id,
            )
        )
    parts += leaders
    parts += [mark for i, mark in zip(order, point_marks, strict=True) if not rows[i].pareto]
    parts += [mark for i, mark in zip(order, point_marks, strict=True) if rows[i].pareto]
    parts += label_marks
    parts.append("</svg>")
    return "\n".join(parts)


def _size_axis(values: Sequence[float], log: bool, plot: Box) -> Axis:
    low, high = min(values), max(values)
    if log:
        return Axis(low / 1.35, high * 1.6, plot[0], plot[2], log=True)
    span = (high - low) or high * 0.5 or 1.0
    # More room on the right: a label goes beside its point.
    return Axis(max(low - 0.12 * span, 0), high + 0.22 * span, plot[0], plot[2])


def _accuracy_axis(values: Sequence[float], plot: Box) -> Axis:
    low, high = min(values), max(values)
    if high - low < 2:  # a point or a tight cluster: show +-2 points around it
        middle = (low + high) / 2
        low, high = middle - 1, middle + 1
    span = high - low
    low, high = max(low - 0.15 * span, 0.0), min(high + 0.15 * span, 100.0)
    step = nice_step(high - low, 5)
    low, high = math.floor(low / step) * step, min(math.ceil(high / step) * step, 100.0)
    return Axis(low, high, plot[3], plot[1])


def _axes(
    x_axis: Axis, y_axis: Axis, plot: Box, unit_name: str, metric: str, log: bool
) -> list[str]:
    parts = []
    x_ticks = (
        log_ticks(x_axis.low, x_axis.high) if log else linear_ticks(x_axis.low, x_axis.high, 6)
    )
    for value in x_ticks:
        x = x_axis(value)
        parts.append(
            f'<line x1="{x:.1f}" y1="{plot[1]}" x2="{x:.1f}" y2="{plot[3]}" stroke="{GRID}"/>'
        )
        parts.append(
            _text(x, plot[3] + 18, tick_text(value), font_size=11, fill=MUTED, text_anchor="middle")
        )
    for value in linear_ticks(y_axis.low, y_axis.high, 5):
        y = y_axis(value)
        parts.append(
            f'<line x1="{plot[0]}" y1="{y:.1f}" x2="{plot[2]}" y2="{y:.1f}" stroke="{GRID}"/>'
        )
        parts.append(
            _text(plot[0] - 8, y + 4, f"{value:g}%", font_size=11, fill=MUTED, text_anchor="end")
        )
    parts.append(
        f'<path d="M{plot[0]},{plot[1]}V{plot[3]}H{plot[2]}" fill="none" stroke="{MUTED}"/>'
    )
    scale = ", log scale" if log else ""
    parts.append(
        _text(
            (plot[0] + plot[2]) / 2,
            HEIGHT - 16,
            f"packed model size ({unit_name}{scale})",
            font_size=12,
            fill=INK,
            text_anchor="middle",
        )
    )
    y_middle = (plot[1] + plot[3]) / 2
    parts.append(
        f'<text x="18" y="{y_middle:.1f}" font-size="12" fill="{INK}" text-anchor="middle" '
        f'transform="rotate(-90 18 {y_middle:.1f})">{xml_escape(METRIC_TITLES[metric])} (%)</text>'
    )
    return parts


def _legend(recommended: bool) -> str:
    x, y = WIDTH - RIGHT - 330, 22
    items = [
        f'<path d="M{x},{y}h22" stroke="{FRONT}" stroke-width="2"/>',
        f'<circle cx="{x + 11}" cy="{y}" r="5" fill="{FRONT}" stroke="#fff" stroke-width="2"/>',
        _text(x + 28, y + 4, "Pareto front", font_size=12, fill=INK),
        f'<circle cx="{x + 120}" cy="{y}" r="4.5" fill="#fff" stroke="{OTHER}" stroke-width="2"/>',
        _text(x + 130, y + 4, "dominated", font_size=12, fill=INK),
    ]
    if recommended:
        items += [
            f'<circle cx="{x + 222}" cy="{y}" r="7" fill="none" stroke="{RECOMMENDED}" '
            'stroke-width="2.5"/>',
            _text(x + 235, y + 4, "recommended", font_size=12, fill=INK),
        ]
    return '<g class="legend">' + "".join(items) + "</g>"


# ---------------------------------------------------------------------------------------------
# report.html

CSS = """
:root { --ink: #0f172a; --muted: #64748b; --line: #e2e8f0; --front: #2563eb;
  --front-bg: #eff6ff; --bad: #b91c1c; --bad-bg: #fef2f2; --rec: #b45309; --rec-bg: #fffbeb; }
* { box-sizing: border-box; }
body { margin: 0; background: #f8fafc; color: var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 32px 28px 48px; }
header { display: flex; justify-content: space-between; align-items: flex-start; gap: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 15px; margin: 28px 0 10px; }
.sub { color: var(--muted); margin: 0; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12.5px; }
.pill { display: inline-block; padding: 2px 10px; border-radius: 999px; font-size: 12px;
  font-weight: 600; background: #e2e8f0; color: var(--ink); white-space: nowrap; }
.pill.completed, .pill.succeeded { background: #dcfce7; color: #166534; }
.pill.canceled { background: #f1f5f9; color: var(--muted); }
.pill.failed { background: var(--bad-bg); color: var(--bad); }
.pill.running, .pill.queued { background: #e0f2fe; color: #075985; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; margin-top: 22px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; }
.card .v { font-size: 18px; font-weight: 650; margin-top: 2px; }
.card .d { color: var(--muted); font-size: 12px; }
.recommend { margin-top: 16px; background: var(--rec-bg); border: 1px solid #fde68a;
  border-left: 4px solid #f59e0b; border-radius: 10px; padding: 12px 16px; }
.recommend b { color: var(--rec); }
.panel { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 8px; }
.panel svg { display: block; width: 100%; height: auto; }
.howto { color: var(--muted); margin: 8px 2px 0; }
table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line);
  border-radius: 10px; overflow: hidden; }
th, td { padding: 8px 12px; text-align: left; border-bottom: 1px solid var(--line); }
th { background: #f1f5f9; font-size: 12px; color: var(--muted); font-weight: 600;
  white-space: nowrap; }
td { white-space: nowrap; }
td.mono { color: var(--muted); font-size: 12px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:last-child td { border-bottom: none; }
tr.front td { background: var(--front-bg); }
tr.front td:first-child { box-shadow: inset 3px 0 0 var(--front); }
tr.front .cfg { color: #1e40af; font-weight: 650; }
tr.failed td { background: var(--bad-bg); }
.star { color: #f59e0b; }
.err { color: var(--bad); font-size: 12px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
footer { color: var(--muted); font-size: 12px; margin-top: 28px; }
"""


def _table_rows(table: SweepTable) -> str:
    ordered = sorted(
        table.rows,
        key=lambda r: (r.packed_bytes is None, r.packed_bytes or 0, r.label),
    )
    lines = []
    for row in ordered:
        classes = " ".join(
            name
            for name, on in (("front", row.pareto), ("failed", row.status == JobStatus.FAILED))
            if on
        )
        status = f'<span class="pill {escape(row.status)}">{escape(row.status)}</span>'
        if row.error:
            status += (
                f'<div class="err" title="{escape(str(row.error.get("message", "")))}">'
                f"{escape(str(row.error.get('code', '')))}</div>"
            )
        marker = (
            ' <span class="star" title="recommended">★</span>' if row is table.recommended else ""
        )
        latency = "–" if row.int8_latency_ms is None else f"{row.int8_latency_ms:.2f}"
        size = "–" if row.packed_bytes is None else human_bytes(row.packed_bytes)
        lines.append(
            f'<tr class="{classes}"><td><span class="cfg">{escape(row.label)}</span>{marker}</td>'
            f"<td>{status}</td>"
            f'<td class="num">{size}</td>'
            f'<td class="num">{percent(row.agreement)}</td>'
            f'<td class="num">{percent(row.student_top1)}</td>'
            f'<td class="num">{latency}</td>'
            f"<td>{'front' if row.pareto else ''}</td>"
            f'<td class="mono" title="{escape(row.job_id)}">{escape(row.job_id[:8])}</td></tr>'
        )
    return "\n".join(lines)


def _recommendation(table: SweepTable) -> str:
    best = table.recommended
    metric = table.pareto_metric
    if best is None:
        return (
            '<div class="recommend">No configuration succeeded, so there is nothing to '
            "recommend: see the errors in the table.</div>"
        )
    front = [row for row in table.rows if row.pareto]
    most_accurate = max(front, key=lambda r: (r.accuracy(metric) or 0.0, -(r.packed_bytes or 0)))
    text = (
        f"<b>Recommended: {escape(best.label)}</b>: {human_bytes(best.packed_bytes or 0)} "
        f"packed, {percent(best.accuracy(metric))} {escape(METRIC_TITLES[metric])}"
    )
    if most_accurate is not best:
        gap = 100 * ((most_accurate.accuracy(metric) or 0) - (best.accuracy(metric) or 0))
        ratio = (most_accurate.packed_bytes or 1) / max(best.packed_bytes or 1, 1)
        text += (
            f", {gap:.1f} points below the most accurate ({escape(most_accurate.label)}) "
            f"at {ratio:.1f}x smaller"
        )
    else:
        text += ", the most accurate configuration"
    return (
        f'<div class="recommend">{text}. It is the smallest configuration on the front within '
        "1 point of the best accuracy.</div>"
    )


def _cards(table: SweepTable) -> str:
    metric = table.pareto_metric
    counts = table.counts
    plotted = comparable(table.rows, metric)
    best = max(plotted, key=lambda r: r.accuracy(metric) or 0.0, default=None)
    smallest = min(plotted, key=lambda r: r.packed_bytes or 0, default=None)
    fastest = min(
        (r for r in plotted if r.int8_latency_ms is not None),
        key=lambda r: r.int8_latency_ms or 0.0,
        default=None,
    )
    finished = ", ".join(
        f"{counts[s]} {s}" for s in ("failed", "canceled", "queued", "running") if counts[s]
    )

    def card(key: str, value: str, detail: str) -> str:
        return (
            f'<div class="card"><div class="k">{key}</div><div class="v">{value}</div>'
            f'<div class="d">{detail}</div></div>'
        )

    return (
        '<div class="cards">'
        + "".join(
            [
                card(
                    "jobs succeeded",
                    f"{counts['succeeded']} of {len(table.rows)}",
                    finished or "all",
                ),
                card(
                    "best accuracy",
                    percent(best.accuracy(metric)) if best else "–",
                    escape(best.label) if best else "no succeeded job",
                ),
                card(
                    "smallest",
                    human_bytes(smallest.packed_bytes or 0) if smallest else "–",
                    escape(smallest.label) if smallest else "no succeeded job",
                ),
                card(
                    "fastest int8 (batch 1)",
                    f"{fastest.int8_latency_ms:.2f} ms"
                    if fastest and fastest.int8_latency_ms
                    else "–",
                    escape(fastest.label) if fastest else "not measured",
                ),
            ]
        )
        + "</div>"
    )


def render_html(view: SweepView, svg: str, *, generated_at: dt.datetime) -> str:
    """The report: title, summary, recommendation, the chart, the table, the inputs."""
    sweep, table = view.sweep, view.table
    names = view.names
    inputs = " · ".join(
        f"{role} <b>{escape(name)}</b>"
        for role, name in (
            ("model", names.get("model")),
            ("data", names.get("data")),
            ("labelled images", names.get("eval_data")),
        )
        if name
    )
    metadata = "".join(
        f"<dt>{escape(str(key))}</dt><dd>{escape(str(value))}</dd>"
        for key, value in sorted((sweep.user_metadata or {}).items())
    )
    metric_title = METRIC_TITLES[table.pareto_metric]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sweep {escape(sweep.id)}: report</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
  <div>
    <h1>Sweep report</h1>
    <p class="sub"><span class="mono">{escape(sweep.id)}</span></p>
    <p class="sub">{inputs or "inputs no longer stored"}</p>
  </div>
  <span class="pill {escape(table.status)}">{escape(table.status)}</span>
</header>
{_cards(table)}
{_recommendation(table)}
<div class="panel" style="margin-top: 20px">{svg}</div>
<p class="howto">How to read: each point is one job. Further left is smaller, higher is more
accurate ({escape(metric_title)}). Blue points are the Pareto front: no other configuration is
both at least as small and at least as accurate. Choose along the front the smallest model whose
accuracy you accept.</p>
<h2>All configurations</h2>
<table>
<thead><tr><th>configuration</th><th>status</th><th class="num">packed size</th>
<th class="num">agreement</th><th class="num">student top-1</th>
<th class="num">int8 latency (ms)</th><th>Pareto</th><th>job</th></tr></thead>
<tbody>
{_table_rows(table)}
</tbody>
</table>
{f"<h2>Metadata</h2><dl>{metadata}</dl>" if metadata else ""}
<footer>Sorted by packed size (weights at their bit-width). Agreement: top-1 agreement of the
student with its teacher; student top-1 needs labelled images. int8 latency: {LATENCY_NOTE}.
Generated {escape(generated_at.strftime("%Y-%m-%d %H:%M UTC"))} for sweep created
{escape(sweep.created_at.strftime("%Y-%m-%d %H:%M UTC"))}.</footer>
</main>
</body>
</html>
"""
