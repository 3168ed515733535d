"""Server-side SVG charts (pure): numbers in, escaped SVG markup out.

Why SVG rendered on the server: the dashboard must work offline (no CDN, no JavaScript, a strict
Content-Security-Policy), and a chart must be testable without a browser. So a chart is a pure
function of its data: :func:`line_chart` (time series with an optional threshold line, e.g. PSI
over time against 0.2) and :func:`bar_chart` (grouped bars, e.g. reference vs live distribution
of a feature, or committed/failed/pending per rollout wave).

Every mark carries its exact value as ``data-*`` attributes and a ``<title>`` (the browser's
tooltip), so a test or a curious operator can read the figure behind the pixel:

- bar: ``<rect class="bar" data-series data-category data-value>``, one per (category, series),
  zero-height bars included (so there are always ``categories x series`` of them);
- line: ``<polyline class="line" data-series>`` and ``<circle class="point" data-series
  data-x data-y>`` per point;
- threshold: ``<line class="threshold" data-value>``.

Styling uses SVG presentation attributes only (``fill``, ``stroke``, ``font-size``), never
``style=``, so the page's CSP needs no ``'unsafe-inline'``. Every label is HTML-escaped.

Bad input raises ``ValueError`` naming the thing, expected against actual: values that are not
finite numbers, negative bar values, a series whose length does not match the categories, an
unknown colour.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

__all__ = [
    "PALETTE",
    "BarSeries",
    "LineSeries",
    "bar_chart",
    "line_chart",
    "nice_ticks",
    "time_ticks",
]

#: series colours, in order, when a series names none (colour-blind-safe, Okabe-Ito)
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442",
           "#000000")
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 60, 16, 30, 62
#: time-axis steps (seconds) a tick may fall on
_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
               43200, 86400, 172800, 604800, 2592000)


@dataclass(frozen=True)
class LineSeries:
    """One line: ``points`` are ``(x, y)``; x is unix seconds on a time axis."""

    name: str
    points: Sequence[tuple[float, float]]
    colour: str | None = None


@dataclass(frozen=True)
class BarSeries:
    """One bar per category, in the categories' order."""

    name: str
    values: Sequence[float]
    colour: str | None = None


def _num(value: float) -> str:
    """A number for a label: short (6 significant digits)."""
    return f"{value:.6g}"


def _exact(value: float) -> str:
    """A number for a ``data-*`` attribute: reads back as the same float."""
    return str(int(value)) if value.is_integer() else repr(value)


def _px(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _finite(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _colour(where: str, given: str | None, index: int) -> str:
    if given is None:
        return PALETTE[index % len(PALETTE)]
    if not _COLOUR.match(given):
        raise ValueError(f"{where} colour: expected #rrggbb, got {given!r}")
    return given


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]``: steps of 1, 2, 2.5 or 5 times a power of ten.

    Raises:
        ValueError: a bound is not finite, ``hi < lo``, or ``count < 1``.
    """
    lo, hi = _finite("ticks lo", lo), _finite("ticks hi", hi)
    if hi < lo:
        raise ValueError(f"ticks: expected lo <= hi, got lo {lo} and hi {hi}")
    if count < 1:
        raise ValueError(f"ticks count: expected >= 1, got {count}")
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad if lo != 0 else 0.0, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    n = round((stop - start) / step)
    return [round(start + i * step, 12) for i in range(n + 1)]


def time_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Tick times (unix seconds) on round UTC boundaries covering ``[lo, hi]``.

    Raises:
        ValueError: a bound is not finite or ``hi < lo``.
    """
    lo, hi = _finite("time ticks lo", lo), _finite("time ticks hi", hi)
    if hi < lo:
        raise ValueError(f"time ticks: expected lo <= hi, got lo {lo} and hi {hi}")
    if hi == lo:
        lo, hi = lo - 60, hi + 60
    raw = (hi - lo) / max(count, 1)
    step = next((s for s in _TIME_STEPS if s >= raw), _TIME_STEPS[-1])
    start = math.floor(lo / step) * step
    stop = math.ceil(hi / step) * step
    return [float(start + i * step) for i in range(round((stop - start) / step) + 1)]


def _time_label(span: float) -> Callable[[float], str]:
    fmt = "%H:%M:%S" if span < 600 else "%H:%M" if span <= 2 * 86400 else "%m-%d"

    def label(t: float) -> str:
        return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime(fmt)
    return label


class _Frame:
    """The plot area inside the margins and the mapping from data to pixels."""

    def __init__(self, width: int, height: int, x_domain: tuple[float, float],
                 y_domain: tuple[float, float], *, extra_bottom: int = 0) -> None:
        if width < 200 or height < 120:
            raise ValueError(f"chart size: expected at least 200x120 px, got {width}x{height}")
        self.width, self.height = width, height
        self.left, self.top = _MARGIN_LEFT, _MARGIN_TOP
        self.right = width - _MARGIN_RIGHT
        self.bottom = height - _MARGIN_BOTTOM - extra_bottom
        self.x0, self.x1 = x_domain
        self.y0, self.y1 = y_domain

    def x(self, value: float) -> float:
        span = self.x1 - self.x0
        return self.left + (value - self.x0) / span * (self.right - self.left)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0
        return self.bottom - (value - self.y0) / span * (self.bottom - self.top)


def _open(frame: _Frame, kind: str, title: str) -> list[str]:
    t = escape(title)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-{kind}" '
           f'viewBox="0 0 {frame.width} {frame.height}" width="{frame.width}" '
           f'height="{frame.height}" role="img" aria-label="{t}" '
           'font-family="sans-serif" font-size="11">')
    heading = (f'<text class="chart-title" x="{frame.left}" y="18" font-size="13" '
               f'font-weight="bold" fill="#222222">{t}</text>')
    return [svg, f"<title>{t}</title>", heading]


def _y_axis(frame: _Frame, ticks: Sequence[float], label: str) -> list[str]:
    out = ['<g class="axis axis-y">']
    for t in ticks:
        y = _px(frame.y(t))
        out.append(f'<line x1="{frame.left}" x2="{frame.right}" y1="{y}" y2="{y}" '
                   'stroke="#dddddd" stroke-width="1"/>')
        out.append(f'<text x="{frame.left - 6}" y="{y}" text-anchor="end" '
                   f'dominant-baseline="middle" fill="#444444">{escape(_num(t))}</text>')
    if label:
        mid = _px((frame.top + frame.bottom) / 2)
        out.append(f'<text x="14" y="{mid}" text-anchor="middle" fill="#444444" '
                   f'transform="rotate(-90 14 {mid})">{escape(label)}</text>')
    out.append(f'<line x1="{frame.left}" x2="{frame.left}" y1="{frame.top}" '
               f'y2="{frame.bottom}" stroke="#888888" stroke-width="1"/>')
    out.append("</g>")
    return out


def _legend(frame: _Frame, entries: Sequence[tuple[str, str]]) -> list[str]:
    out = ['<g class="legend">']
    x = float(frame.left)
    y = frame.height - 12
    for name, colour in entries:
        out.append(f'<rect class="swatch" x="{_px(x)}" y="{y - 9}" width="10" height="10" '
                   f'fill="{colour}"/>')
        out.append(f'<text x="{_px(x + 14)}" y="{y}" fill="#222222">{escape(name)}</text>')
        x += 14 + 7 * len(name) + 18
    out.append("</g>")
    return out


def _empty(frame: _Frame, kind: str, title: str, message: str) -> Markup:
    out = _open(frame, kind, title)
    out.append(f'<text class="no-data" x="{_px(frame.width / 2)}" '
               f'y="{_px(frame.height / 2)}" text-anchor="middle" fill="#666666">'
               f"{escape(message)}</text>")
    out.append("</svg>")
    return Markup("\n".join(out))


def line_chart(series: Sequence[LineSeries], *, title: str, threshold: float | None = None,
               threshold_label: str = "", y_label: str = "", time_axis: bool = True,
               y_min: float | None = 0.0, width: int = 640, height: int = 260,
               empty_message: str = "no data yet") -> Markup:
    """A line per series over a shared x axis (UTC time by default), with an optional
    horizontal threshold line.

    Args:
        series: the lines; their points are drawn in x order.
        title: shown above the plot and as the accessible name.
        threshold: a y value drawn as a dashed red line (e.g. a PSI alert level).
        threshold_label: the text beside it (default: ``threshold <value>``).
        y_label: the y axis caption.
        time_axis: x values are unix seconds, labelled in UTC; else plain numbers.
        y_min: the y axis starts at or below this (None: at the data's minimum).
        width, height: pixels (also the viewBox).
        empty_message: shown instead of a plot when no series has a point.

    Raises:
        ValueError: a non-finite coordinate or threshold, a bad colour, or a size under
            200x120.
    """
    xs: list[float] = []
    ys: list[float] = []
    clean: list[tuple[LineSeries, list[tuple[float, float]], str]] = []
    for i, s in enumerate(series):
        pts = sorted((_finite(f"series {s.name!r} point {j} x", p[0]),
                      _finite(f"series {s.name!r} point {j} y", p[1]))
                     for j, p in enumerate(s.points))
        clean.append((s, pts, _colour(f"series {s.name!r}", s.colour, i)))
        xs += [p[0] for p in pts]
        ys += [p[1] for p in pts]
    if threshold is not None:
        threshold = _finite("threshold", threshold)
    if not xs:
        return _empty(_Frame(width, height, (0, 1), (0, 1)), "line", title, empty_message)
    y_values = ys + ([threshold] if threshold is not None else []) \
        + ([y_min] if y_min is not None else [])
    y_ticks = nice_ticks(min(y_values), max(y_values))
    x_lo, x_hi = min(xs), max(xs)
    if time_axis:
        x_ticks = time_ticks(x_lo, x_hi)
        x_text = _time_label(x_ticks[-1] - x_ticks[0])
    else:
        x_ticks = nice_ticks(x_lo, x_hi, 6)

        def x_text(v: float) -> str:
            return _num(v)
    frame = _Frame(width, height, (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1]))
    out = _open(frame, "line", title)
    out += _y_axis(frame, y_ticks, y_label)
    out.append('<g class="axis axis-x">')
    out.append(f'<line x1="{frame.left}" x2="{frame.right}" y1="{frame.bottom}" '
               f'y2="{frame.bottom}" stroke="#888888" stroke-width="1"/>')
    for t in x_ticks:
        out.append(f'<text x="{_px(frame.x(t))}" y="{frame.bottom + 16}" text-anchor="middle" '
                   f'fill="#444444">{escape(x_text(t))}</text>')
    if time_axis:
        out.append(f'<text x="{frame.right}" y="{frame.bottom + 30}" text-anchor="end" '
                   'fill="#666666">UTC</text>')
    out.append("</g>")
    if threshold is not None:
        ty = _px(frame.y(threshold))
        text = threshold_label or f"threshold {_num(threshold)}"
        out.append(f'<line class="threshold" data-value="{_exact(threshold)}" '
                   f'x1="{frame.left}" x2="{frame.right}" y1="{ty}" y2="{ty}" '
                   'stroke="#cc0000" stroke-width="1.5" stroke-dasharray="6 4"/>')
        out.append(f'<text class="threshold-label" x="{frame.right - 4}" y="{ty}" dy="-4" '
                   f'text-anchor="end" fill="#cc0000">{escape(text)}</text>')
    for s, pts, colour in clean:
        name = escape(s.name)
        out.append(f'<g class="series" data-series="{name}">')
        if len(pts) > 1:
            coords = " ".join(f"{_px(frame.x(x))},{_px(frame.y(y))}" for x, y in pts)
            out.append(f'<polyline class="line" data-series="{name}" points="{coords}" '
                       f'fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            shown = escape(f"{s.name}: {x_text(x) if time_axis else _num(x)} = {_num(y)}")
            out.append(f'<circle class="point" data-series="{name}" data-x="{_exact(x)}" '
                       f'data-y="{_exact(y)}" cx="{_px(frame.x(x))}" cy="{_px(frame.y(y))}" '
                       f'r="3" fill="{colour}"><title>{shown}</title></circle>')
        out.append("</g>")
    out += _legend(frame, [(s.name, colour) for s, _, colour in clean])
    out.append("</svg>")
    return Markup("\n".join(out))


def bar_chart(categories: Sequence[str], series: Sequence[BarSeries], *, title: str,
              y_label: str = "", width: int = 640, height: int = 260,
              empty_message: str = "no data yet") -> Markup:
    """Grouped bars: one group per category, one bar per series in each group.

    Args:
        categories: the group labels, left to right.
        series: each with one value (>= 0) per category.
        title: shown above the plot and as the accessible name.
        y_label: the y axis caption.
        width, height: pixels (also the viewBox).
        empty_message: shown instead of a plot when there are no categories or series.

    Raises:
        ValueError: a series with a different number of values than categories, a negative
            or non-finite value, a bad colour, or a size under 200x120.
    """
    values: list[list[float]] = []
    colours: list[str] = []
    for i, s in enumerate(series):
        if len(s.values) != len(categories):
            raise ValueError(f"series {s.name!r}: expected {len(categories)} values (one per "
                             f"category), got {len(s.values)}")
        row = [_finite(f"series {s.name!r} value {j}", v) for j, v in enumerate(s.values)]
        for j, v in enumerate(row):
            if v < 0:
                raise ValueError(f"series {s.name!r} value {j} ({categories[j]!r}): expected "
                                 f">= 0, got {v}")
        values.append(row)
        colours.append(_colour(f"series {s.name!r}", s.colour, i))
    if not categories or not series:
        return _empty(_Frame(width, height, (0, 1), (0, 1)), "bar", title, empty_message)
    y_ticks = nice_ticks(0.0, max(max(row) for row in values))
    slanted = len(categories) > 8  # long label rows are turned, and need more room below
    frame = _Frame(width, height, (0, len(categories)), (y_ticks[0], y_ticks[-1]),
                   extra_bottom=24 if slanted else 0)
    out = _open(frame, "bar", title)
    out += _y_axis(frame, y_ticks, y_label)
    group = (frame.right - frame.left) / len(categories)
    bar = group * 0.8 / len(series)
    out.append('<g class="axis axis-x">')
    out.append(f'<line x1="{frame.left}" x2="{frame.right}" y1="{frame.bottom}" '
               f'y2="{frame.bottom}" stroke="#888888" stroke-width="1"/>')
    for j, category in enumerate(categories):
        cx, cy = _px(frame.left + group * (j + 0.5)), frame.bottom + 16
        turn = f' transform="rotate(-30 {cx} {cy})"' if slanted else ""
        anchor = "end" if slanted else "middle"
        out.append(f'<text class="category" x="{cx}" y="{cy}" text-anchor="{anchor}" '
                   f'fill="#444444"{turn}>{escape(category)}</text>')
    out.append("</g>")
    for i, s in enumerate(series):
        name = escape(s.name)
        out.append(f'<g class="series" data-series="{name}">')
        for j, category in enumerate(categories):
            v = values[i][j]
            left = frame.left + group * j + group * 0.1 + bar * i
            top = frame.y(v)
            shown = escape(f"{s.name}, {category}: {_num(v)}")
            out.append(f'<rect class="bar" data-series="{name}" '
                       f'data-category="{escape(category)}" data-value="{_exact(v)}" '
                       f'x="{_px(left)}" y="{_px(top)}" width="{_px(bar)}" '
                       f'height="{_px(frame.bottom - top)}" fill="{colours[i]}">'
                       f"<title>{shown}</title></rect>")
        out.append("</g>")
    out += _legend(frame, [(s.name, colours[i]) for i, s in enumerate(series)])
    out.append("</svg>")
    return Markup("\n".join(out))
