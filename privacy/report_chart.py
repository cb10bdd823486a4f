"""The privacy report's chart: cumulative epsilon over releases as inline SVG (no scripts, nothing fetched).

One chart per dataset: a step line per scope (the dataset's total, each scientist), its budget as a
dashed horizontal line in the same colour, and a red dashed mark at every release without DP (no
line goes past it: no bound holds after it). Elements carry classes (``xtick``, ``ytick``,
``budget``, ``spend``, ``nodp``) so tests can count them.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

#: Colour of the dataset's total; scientists cycle through a colour-blind-safe palette (Okabe-Ito).
TOTAL = "#222222"
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#8C564B", "#7F7F7F")
NO_DP = "#C00000"
_W, _H = 880, 330  # the plot; the legend adds rows below
_L, _R, _T, _B = 64, 24, 16, 56  # margins: left (y labels), right, top, bottom (x labels)
_ROW = 20  # legend row height
_GAP = 18  # between the x axis label and the legend


@dataclass(frozen=True)
class Line:
    """A scope's cumulative epsilon: (release number, epsilon or None once unbounded) after each release."""

    label: str
    color: str
    points: list[tuple[int, float | None]]
    width: float = 2.0


@dataclass(frozen=True)
class Budget:
    label: str
    color: str
    epsilon: float


def nice_ticks(top: float, target: int = 5) -> list[float]:
    """0 and round steps (1, 2, 2.5 or 5 times a power of ten) up to at least ``top``: about ``target`` + 1 ticks."""
    top = top if top > 0 and math.isfinite(top) else 1.0
    raw = top / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return [round(i * step, 12) for i in range(math.ceil(top / step - 1e-9) + 1)]


def int_ticks(n: int, target: int = 12) -> list[int]:
    """Release numbers 0..n at a round step (1, 2, 5, 10, 20, ...) giving at most ``target`` + 1 ticks."""
    n, step, k = max(n, 1), 1, 0
    while n / step > target:
        k += 1
        step = (1, 2, 5)[k % 3] * 10 ** (k // 3)
    return list(range(0, n + 1, step))


class _Scale:
    def __init__(self, n: int, top: float):
        self.n, self.top = max(n, 1), top
        self.end = self.n + max(0.4, self.n / 40)  # room after the last release, so its step shows

    def x(self, i: float) -> float:
        return _L + (_W - _L - _R) * i / self.end

    def y(self, v: float) -> float:
        return _H - _B - (_H - _T - _B) * v / self.top


def _axes(s: _Scale, xt: list[int], yt: list[float], ylabel: str, xlabel: str) -> list[str]:
    out = []
    for v in yt:
        out.append(f'<g class="ytick"><line x1="{_L}" x2="{_W - _R}" y1="{s.y(v):.1f}" y2="{s.y(v):.1f}" '
                   f'stroke="#e3e3e3"/><text x="{_L - 6}" y="{s.y(v) + 4:.1f}" text-anchor="end">{v:g}</text></g>')
    for i in xt:
        out.append(f'<g class="xtick"><line x1="{s.x(i):.1f}" x2="{s.x(i):.1f}" y1="{_H - _B}" y2="{_H - _B + 5}" '
                   f'stroke="#444"/><text x="{s.x(i):.1f}" y="{_H - _B + 18}" text-anchor="middle">{i}</text></g>')
    out.append(f'<path d="M{_L},{_T} V{_H - _B} H{_W - _R}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{(_L + _W - _R) / 2:.0f}" y="{_H - 12}" text-anchor="middle" class="axis">'
               f'{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(16,{(_T + _H - _B) / 2:.0f}) rotate(-90)" text-anchor="middle" '
               f'class="axis">{html.escape(ylabel)}</text>')
    return out


def _line(s: _Scale, line: Line) -> list[str]:
    """A step line from (0, 0): flat between releases, a jump at each; it stops at the first unbounded point."""
    d, marks, x_end = [f"M{s.x(0):.1f},{s.y(0):.1f}"], [], s.end
    for i, v in line.points:
        if v is None:
            x_end = i
            break
        d.append(f"H{s.x(i):.1f} V{s.y(v):.1f}")
        marks.append(f'<circle cx="{s.x(i):.1f}" cy="{s.y(v):.1f}" r="3.2" fill="{line.color}">'
                     f'<title>{html.escape(line.label)}: release {i}, cumulative epsilon {v:.4g}</title></circle>')
    d.append(f"H{s.x(x_end):.1f}")
    path = (f'<path class="spend" d="{" ".join(d)}" fill="none" stroke="{line.color}" '
            f'stroke-width="{line.width}" stroke-linejoin="round"/>')
    return [path] + (marks if len(line.points) <= 60 else [])


def _budgets(s: _Scale, budgets: list[Budget]) -> list[str]:
    out, last = [], -math.inf
    for b in sorted(budgets, key=lambda b: -b.epsilon):  # labels from the top down, kept 13 px apart
        y = s.y(b.epsilon)
        ty = max(y - 4, last + 13)
        last = ty
        out.append(f'<line class="budget" x1="{_L}" x2="{_W - _R}" y1="{y:.1f}" y2="{y:.1f}" stroke="{b.color}" '
                   f'stroke-width="1.5" stroke-dasharray="7 4"><title>{html.escape(b.label)}</title></line>'
                   f'<text x="{_W - _R - 4}" y="{ty:.1f}" text-anchor="end" fill="{b.color}" class="blabel" '
                   'stroke="#fff" stroke-width="3" paint-order="stroke">'
                   f'{html.escape(b.label)}</text>')
    return out


def _no_dp(s: _Scale, marks: list[tuple[int, str]]) -> list[str]:
    return [f'<g class="nodp"><line x1="{s.x(i):.1f}" x2="{s.x(i):.1f}" y1="{_T}" y2="{_H - _B}" stroke="{NO_DP}" '
            f'stroke-width="1.5" stroke-dasharray="3 3"/><text x="{s.x(i) + 4:.1f}" y="{_T + 12}" fill="{NO_DP}">'
            f'{html.escape(label)}</text></g>' for i, label in marks]


def _legend(lines: list[Line], budgets: list[Budget], marks: bool) -> list[str]:
    items = [(ln.color, "", ln.width, ln.label) for ln in lines]
    items += [(b.color, "7 4", 1.5, b.label) for b in budgets]
    if marks:
        items.append((NO_DP, "3 3", 1.5, "release without differential privacy: no bound holds after it"))
    out = []
    for k, (color, dash, width, label) in enumerate(items):
        y = _H + _GAP + k * _ROW
        out.append(f'<g class="legend"><line x1="{_L}" x2="{_L + 28}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" '
                   f'stroke-width="{width}" stroke-dasharray="{dash}"/>'
                   f'<text x="{_L + 36}" y="{y}">{html.escape(label)}</text></g>')
    return out


def render(lines: list[Line], budgets: list[Budget], releases: int, no_dp: list[tuple[int, str]],
           ylabel: str, xlabel: str, title: str) -> str:
    """An SVG chart of ``lines`` over release numbers 0..``releases``, with ``budgets`` and non-DP marks."""
    ys = [v for ln in lines for _, v in ln.points if v is not None] + [b.epsilon for b in budgets]
    yt = nice_ticks(max(ys, default=0.0) * 1.08)
    s = _Scale(releases, yt[-1])
    height = _H + _GAP + _ROW * (len(lines) + len(budgets) + bool(no_dp))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" viewBox="0 0 {_W} {height}" '
             f'role="img" aria-label="{html.escape(title)}" font-family="sans-serif" font-size="12">',
             f"<title>{html.escape(title)}</title>",
             "<style>.axis{font-size:13px;fill:#222}.blabel{font-size:11px}</style>"]
    parts += _axes(s, int_ticks(releases), yt, ylabel, xlabel)
    parts += _budgets(s, budgets) + _no_dp(s, no_dp)
    for ln in lines:
        parts += _line(s, ln)
    parts += _legend(lines, budgets, bool(no_dp))
    return "".join(parts) + "</svg>"
