"""Pictures of an experiment for the notebook, as inline SVG (no plotting library, nothing fetched).

>>> from IPython.display import SVG
>>> SVG(dice_over_rounds(exp.history))   # one line per site: the global model's test Dice after each round
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from voxgrid.reports import RoundResult
from voxgrid.selection import mean_score

#: Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#7F7F7F")
_W, _H, _L, _R, _T, _B, _ROW = 640, 300, 56, 16, 28, 44, 18  # size, margins, legend row (px)


def site_series(history: Sequence[RoundResult]) -> dict[str, list[tuple[int, float]]]:
    """Per site (``dataset@node``), (round, mean test Dice over its annotated classes) for each round
    in which the global model was scored there; rounds without a score are left out."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in history:
        for s in r.sites:
            out.setdefault(s.site, [])
            v = mean_score(s.test_dice)
            if v is not None:
                out[s.site].append((r.round, v))
    return out


def dice_over_rounds(history: Sequence[RoundResult], title: str = "Global model: mean Dice on each site's test "
                     "split") -> str:
    """An SVG line chart: x the round (0-based, as ``RoundResult.round``), y the mean Dice in [0, 1]."""
    series = site_series(history)
    last = max((r.round for r in history), default=0)
    x = lambda i: _L + (_W - _L - _R) * (i / last if last else 0.5)  # noqa: E731
    y = lambda v: _T + (_H - _T - _B) * (1 - v)  # noqa: E731
    height = _H + _ROW * len(series)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" viewBox="0 0 {_W} {height}" '
             f'role="img" aria-label="{html.escape(title)}" font-family="sans-serif" font-size="12">',
             f'<text x="{_L}" y="16" font-size="13">{html.escape(title)}</text>']
    for k in range(6):  # Dice 0, 0.2, ..., 1
        v = k / 5
        parts.append(f'<line class="ytick" x1="{_L}" x2="{_W - _R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{_L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for i in range(last + 1):
        parts.append(f'<text class="xtick" x="{x(i):.1f}" y="{_H - _B + 16}" text-anchor="middle">{i}</text>')
    parts.append(f'<path d="M{_L},{_T} V{_H - _B} H{_W - _R}" fill="none" stroke="#444"/>'
                 f'<text x="{(_L + _W - _R) / 2:.0f}" y="{_H - 8}" text-anchor="middle">round</text>'
                 f'<text transform="translate(14,{(_T + _H - _B) / 2:.0f}) rotate(-90)" text-anchor="middle">'
                 'mean Dice (test)</text>')
    for k, (site, pts) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        if pts:
            d = " ".join(f"{'M' if j == 0 else 'L'}{x(i):.1f},{y(v):.1f}" for j, (i, v) in enumerate(pts))
            parts.append(f'<path class="site" d="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
            parts += [f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"><title>{html.escape(site)}: '
                      f'round {i}, mean Dice {v:.3f}</title></circle>' for i, v in pts]
        ly = _H + _ROW * k + 4
        parts.append(f'<line x1="{_L}" x2="{_L + 24}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{_L + 30}" y="{ly}">{html.escape(site)}</text>')
    return "".join(parts) + "</svg>"
