"""Charts for the console, drawn on the server as inline SVG: no script, no CDN, works offline. Every chart
has a text title and description, every mark a tooltip, series differ by pattern as well as colour, and the
page prints the chart's numbers in a table below it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from html import escape

from markupsafe import Markup

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
_PATTERNS = ("", "M0,4 l4,-4", "M0,0 l4,4", "M2,0 v4", "M0,2 h4", "M0,4 l4,-4 M0,0 l4,4")
W, H, PAD_L, PAD_B, PAD_T = 720, 260, 70, 40, 12


def _defs(n: int) -> str:
    out = []
    for i in range(n):
        path = _PATTERNS[i % len(_PATTERNS)]
        if path:
            out.append(f'<pattern id="p{i}" width="4" height="4" patternUnits="userSpaceOnUse">'
                       f'<rect width="4" height="4" fill="{PALETTE[i % len(PALETTE)]}"/>'
                       f'<path d="{path}" stroke="#fff" stroke-width="0.8"/></pattern>')
    return "<defs>" + "".join(out) + "</defs>"


def fill(i: int) -> str:
    return f"url(#p{i})" if _PATTERNS[i % len(_PATTERNS)] else PALETTE[i % len(PALETTE)]


def _axis(top: float, fmt: str) -> str:
    lines = []
    for k in range(5):
        value = top * k / 4
        y = H - PAD_B - (H - PAD_B - PAD_T) * k / 4
        lines.append(f'<line x1="{PAD_L}" x2="{W}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt.format(value)}</text>')
    return "".join(lines)


def stacked_bars(title: str, days: Sequence[str], series: Sequence[str],
                 values: Mapping[tuple[str, str], Decimal]) -> Markup:
    """Spend per day, stacked by series (models or tiers)."""
    totals = [sum((values.get((d, s), Decimal(0)) for s in series), Decimal(0)) for d in days]
    top = float(max(totals, default=Decimal(0))) or 1.0
    plot_w, plot_h = W - PAD_L, H - PAD_B - PAD_T
    step = plot_w / max(len(days), 1)
    bar = max(step * 0.7, 1.0)
    marks = []
    for i, day in enumerate(days):
        y = float(H - PAD_B)
        x = PAD_L + i * step + (step - bar) / 2
        for j, name in enumerate(series):
            value = values.get((day, name), Decimal(0))
            if not value:
                continue
            h = float(value) / top * plot_h
            y -= h
            marks.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{fill(j)}">'
                         f'<title>{escape(day)} {escape(name)}: ${value:.6f}</title></rect>')
        if len(days) <= 16 or i % max(len(days) // 8, 1) == 0:
            marks.append(f'<text x="{x + bar / 2:.1f}" y="{H - PAD_B + 16}" text-anchor="middle">'
                         f'{escape(day[5:])}</text>')
    legend = "".join(f'<rect x="{PAD_L + 130 * j}" y="{H - 14}" width="12" height="12" fill="{fill(j)}"/>'
                     f'<text x="{PAD_L + 130 * j + 16}" y="{H - 4}">{escape(name[:16])}</text>'
                     for j, name in enumerate(series[:5]))
    return _svg(title, f"{title}: {len(days)} days, {len(series)} series; the numbers are in the table below.",
                _defs(len(series)) + _axis(top, "${:.4g}") + "".join(marks) + legend)


def burn_down(title: str, points: Sequence[tuple[float, Decimal]], limit: Decimal | None,
              forecast: Decimal | None, labels: tuple[str, str], measure: str = "usd") -> Markup:
    """Cumulative use over the window (x from 0 to 1), the limit as a solid line, the forecast dashed;
    ``measure``: dollars ("usd") or tokens."""

    def amount(value: Decimal | float, axis: bool = False) -> str:
        if measure == "usd":
            return f"${float(value):.4g}" if axis else f"${Decimal(value):,.6f}"
        return f"{float(value):,.0f} tokens"

    top = float(max([p[1] for p in points] + [limit or Decimal(0), forecast or Decimal(0)], default=Decimal(0))) or 1.0
    top *= 1.1
    plot_w, plot_h = W - PAD_L, H - PAD_B - PAD_T

    def xy(x: float, v: Decimal | float) -> str:
        return f"{PAD_L + x * plot_w:.1f},{H - PAD_B - float(v) / top * plot_h:.1f}"

    parts = [_axis(top, "${:.4g}" if measure == "usd" else "{:,.0f}")]
    if points:
        path = " ".join(xy(x, v) for x, v in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{PALETTE[0]}" stroke-width="2.5">'
                     f'<title>used so far: {amount(points[-1][1])}</title></polyline>')
        if forecast is not None:
            parts.append(f'<line x1="{xy(points[-1][0], points[-1][1]).split(",")[0]}" '
                         f'y1="{xy(points[-1][0], points[-1][1]).split(",")[1]}" x2="{xy(1, forecast).split(",")[0]}" '
                         f'y2="{xy(1, forecast).split(",")[1]}" stroke="{PALETTE[1]}" stroke-width="2" '
                         f'stroke-dasharray="6 4"><title>forecast at the window end: {amount(forecast)}</title></line>')
    if limit is not None:
        y = xy(0, limit).split(",")[1]
        parts.append(f'<line x1="{PAD_L}" x2="{W}" y1="{y}" y2="{y}" stroke="{PALETTE[5]}" stroke-width="1.5">'
                     f'<title>limit: {amount(limit)}</title></line><text x="{W - 4}" y="{float(y) - 4:.1f}" '
                     f'text-anchor="end">limit</text>')
    parts.append(f'<text x="{PAD_L}" y="{H - PAD_B + 16}">{escape(labels[0])}</text>'
                 f'<text x="{W}" y="{H - PAD_B + 16}" text-anchor="end">{escape(labels[1])}</text>')
    return _svg(title, f"{title}: use so far (solid), the limit (solid, labelled) and the forecast (dashed); "
                       "the numbers are in the table beside it.", "".join(parts))


def _svg(title: str, desc: str, body: str) -> Markup:
    return Markup(f'<svg viewBox="0 0 {W} {H}" role="img" class="chart" aria-labelledby="t d">'
                  f'<title id="t">{escape(title)}</title><desc id="d">{escape(desc)}</desc>'
                  f'<g font-size="11" font-family="sans-serif">{body}</g></svg>')
