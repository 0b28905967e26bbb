"""Self-contained SVG plots (no plotting library): an x-y plot with lines or points, and grouped
bars, each with axes, ticks, a legend and a note when there is nothing to draw."""


from __future__ import annotations

import html
import math
from dataclasses import dataclass

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")

def esc(x) -> str:
    return html.escape(str(x), quote=True)

# SVG plots ---------------------------------------------------------------------------------------

W, H = 640, 380  # a plot's viewBox without its legend, which goes below (a wide plot: 2 * W)
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 40, 60  # margins around the plotting area
LEGEND_ROW, LEGEND_MAX = 16, 12  # legend line height, entries shown


@dataclass
class Series:
    name: str
    points: list[tuple[float, float, str]]  # x, y, the point's text (its label or tooltip)
    color: str
    line: bool = True
    labels: bool = False  # write each point's text beside it
    dashed: bool = False
    counted: bool = True  # a reference line is drawn but is not data of the plot


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def _tick_text(v: float, pct: bool) -> str:
    return f"{100 * v:.0f}%" if pct else f"{v:g}"


def frame(pid: str, title: str, n: int, body: str, empty: str, w: int = W,
           legend: list[tuple[str, str, bool]] = ()) -> str:
    """A plot's figure: the SVG with its count of drawn data points (data-points), its title,
    and its legend below; or the title and a no-data message."""
    if n == 0:
        body, legend = (f'<text class="no-data" x="{w / 2}" y="{H / 2}" text-anchor="middle">'
                        f"no data: {esc(empty)}</text>"), []
    shown = min(len(legend), LEGEND_MAX) + (len(legend) > LEGEND_MAX)
    h = H + shown * LEGEND_ROW + (8 if shown else 0)
    wide = ' class="plot wide"' if w > W else ' class="plot"'
    return (f'<figure{wide}><svg id="{pid}" class="plot" data-points="{n}" '
            f'viewBox="0 0 {w} {h}" role="img" xmlns="http://www.w3.org/2000/svg">'
            f"<title>{esc(title)}</title>"
            f'<text class="title" x="{w / 2}" y="22" text-anchor="middle">{esc(title)}</text>'
            f"{body}{_legend(legend)}</svg></figure>")


def _legend(entries: list[tuple[str, str, bool]]) -> str:
    """Colour swatches and names (name, colour, dashed) below the axes, one a line."""
    out = []
    for i, (name, color, dashed) in enumerate(entries[:LEGEND_MAX]):
        y = H + 4 + i * LEGEND_ROW
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<g class="legend"><line x1="{LEFT}" x2="{LEFT + 18}" y1="{y - 4}" '
                   f'y2="{y - 4}" stroke="{color}" stroke-width="4"{dash}/>'
                   f'<text x="{LEFT + 24}" y="{y}">{esc(name)}</text></g>')
    if len(entries) > LEGEND_MAX:
        y = H + 4 + LEGEND_MAX * LEGEND_ROW
        out.append(f'<text x="{LEFT + 24}" y="{y}">and {len(entries) - LEGEND_MAX} more '
                   f"(hover a point or bar for its name)</text>")
    return "".join(out)


def _axes(w: int, xt: list[float], yt: list[float], sx, sy, xlabel: str, ylabel: str,
          xpct: bool, ypct: bool, xtext=None) -> str:
    """Grid, ticks and axis labels; `xtext` overrides the x tick labels (a log axis)."""
    x0, x1, y0, y1 = LEFT, w - RIGHT, H - BOTTOM, TOP
    out = [f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>',
           f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>']
    for v in yt:
        y = sy(v)
        out.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{_tick_text(v, ypct)}</text>")
    for v in xt:
        x = sx(v)
        label = xtext(v) if xtext else _tick_text(v, xpct)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y1}"/>'
                   f'<text class="tick" x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">'
                   f"{esc(label)}</text>")
    if xlabel:
        out.append(f'<text class="axis-label" x="{(x0 + x1) / 2}" y="{H - 22}" '
                   f'text-anchor="middle">{esc(xlabel)}</text>')
    out.append(f'<text class="axis-label" transform="translate(16 {(y0 + y1) / 2}) rotate(-90)" '
               f'text-anchor="middle">{esc(ylabel)}</text>')
    return "".join(out)


def xy_plot(pid: str, title: str, xlabel: str, ylabel: str, series: list[Series], empty: str,
            xpct: bool = False, ypct: bool = True, xlog: bool = False) -> str:
    """Points and lines on linear axes (x optionally log10); y starts at 0."""
    n = sum(len(s.points) for s in series if s.counted)
    if n == 0:
        return frame(pid, title, 0, "", empty)
    pts = [p for s in series for p in s.points]
    xs = [math.log10(p[0]) if xlog else p[0] for p in pts]
    ymax = max(p[1] for p in pts)
    yt = _ticks(0.0, min(1.0, ymax * 1.1) if ypct and ymax > 0 else (ymax * 1.1 or 1.0))
    if xpct:
        xt = _ticks(0.0, 1.0)
    elif xlog:
        xt = list(range(math.floor(min(xs)), math.ceil(max(xs)) + 1))
        xt = xt if len(xt) > 1 else [xt[0] - 1, xt[0]]
    else:
        xt = _ticks(min(xs), max(xs)) if max(xs) > min(xs) else _ticks(min(xs) - 1, min(xs) + 1)
    lo, hi = xt[0], xt[-1]

    def sx(v):
        return LEFT + (v - lo) / (hi - lo) * (W - RIGHT - LEFT)

    def sy(v):
        return H - BOTTOM - (v - yt[0]) / (yt[-1] - yt[0]) * (H - BOTTOM - TOP)

    def tx(v):
        return math.log10(v) if xlog else v

    body = [_axes(W, xt, yt, sx, sy, xlabel, ylabel, xpct, ypct,
                  (lambda v: f"{10 ** v:g}") if xlog else None)]
    for s in series:
        xy = sorted((sx(tx(x)), sy(y), text) for x, y, text in s.points)
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        if s.line and len(xy) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in xy)
            body.append(f'<polyline class="series" points="{d}" fill="none" '
                        f'stroke="{s.color}" stroke-width="2"{dash}/>')
        if s.counted:
            for x, y, text in xy:
                body.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4" '
                            f'fill="{s.color}"><title>{esc(text)}</title></circle>')
                if s.labels:
                    body.append(f'<text class="point-label" x="{x + 6:.1f}" y="{y - 6:.1f}">'
                                f"{esc(text.split(' ')[0])}</text>")
    return frame(pid, title, n, "".join(body), empty,
                  legend=[(s.name, s.color, s.dashed) for s in series])


def bar_plot(pid: str, title: str, ylabel: str, groups: list[str],
             series: list[tuple[str, str, list[float | None]]], empty: str, w: int = W) -> str:
    """Grouped bars: one group per x label, one bar per series (name, colour, values); y is a
    share (0-100%). Missing values leave a gap."""
    n = sum(v is not None for _, _, values in series for v in values)
    if n == 0 or not groups:
        return frame(pid, title, 0, "", empty, w)
    yt = _ticks(0.0, 1.0)
    x0, x1, y0 = LEFT, w - RIGHT, H - BOTTOM

    def sy(v):
        return y0 - v * (y0 - TOP)

    gw = (x1 - x0) / len(groups)
    rotate = max(len(g) for g in groups) * 6 > gw  # labels wider than their group turn
    body = [_axes(w, [], yt, None, sy, "", ylabel, False, True)]
    bw = gw * 0.8 / len(series)
    for g, name in enumerate(groups):
        for s, (sname, color, values) in enumerate(series):
            v = values[g]
            if v is None:
                continue
            x = x0 + g * gw + gw * 0.1 + s * bw
            body.append(f'<rect class="bar" x="{x:.1f}" y="{sy(v):.1f}" width="{bw:.1f}" '
                        f'height="{y0 - sy(v):.1f}" fill="{color}"><title>'
                        f"{esc(sname)}, {esc(name)}: {100 * v:.1f}%</title></rect>")
        cx = x0 + (g + 0.5) * gw
        if rotate:
            body.append(f'<text class="tick" transform="translate({cx + 3:.1f} {y0 + 10}) '
                        f'rotate(-35)" text-anchor="end">{esc(name)}</text>')
        else:
            body.append(f'<text class="tick" x="{cx:.1f}" y="{y0 + 16}" text-anchor="middle">'
                        f"{esc(name)}</text>")
    return frame(pid, title, n, "".join(body), empty, w,
                  legend=[(s[0], s[1], False) for s in series])

def colors(keys) -> dict:
    """A colour per distinct key, in order of first appearance."""
    out: dict = {}
    for k in keys:
        out.setdefault(k, PALETTE[len(out) % len(PALETTE)])
    return out
