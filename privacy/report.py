"""The owner's privacy report: JSON data and a self-contained HTML page (inline SVG, no scripts).

Shows, per dataset and scientist, the cumulative epsilon after each release (composed with the
RDP accountant at the budget's delta; the total also by the tighter PRV accountant), the
mechanisms and their parameters (DP-SGD's with its sample rate, steps and patient count),
budgets and what remains, and refused jobs. A release without DP is marked as such; no epsilon is drawn past it.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from .ledger import Ledger, fmt_epsilon
from .records import LedgerEntry, LedgerView

DEFAULT_DELTA = 1e-5  # for a scope without a budget or any DP release to take delta from


def _delta_for(view: LedgerView, dataset: str, scientist: str | None, entries: list[LedgerEntry]) -> float:
    budgets = [b for b in view.budgets if b.dataset == dataset and b.scientist in (scientist, None)]
    own = [b for b in budgets if b.scientist == scientist]
    if own or budgets:
        return (own or budgets)[0].delta
    return next((e.delta for e in entries if e.delta is not None), DEFAULT_DELTA)


def _series(ledger: Ledger, view: LedgerView, dataset: str, scientist: str | None) -> dict:
    entries = [e for e in view.entries if e.dataset == dataset and (scientist is None or e.scientist == scientist)]
    delta = _delta_for(view, dataset, scientist, entries)
    points = [{"at": e.released_at, "job_id": e.job_id, "mechanism": e.mechanism, "dp": e.dp,
               "cumulative_epsilon": None if math.isinf(eps) else eps}
              for e, eps in ledger.history(dataset, scientist, delta)]
    tighter = ledger.spent_tighter(dataset, scientist, delta)
    return {"dataset": dataset, "scientist": scientist, "delta": delta, "points": points,
            "epsilon_prv": None if math.isinf(tighter) else tighter}


def build(ledger: Ledger) -> dict:
    """The report's data (JSON-ready; unbounded spend is None, never a number)."""
    view = ledger.view()
    scopes = sorted({(e.dataset, e.scientist) for e in view.entries if e.state == "released"})
    scopes += [(b.dataset, None) for b in view.budgets if b.scientist is None]
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budgets": [b.model_dump(mode="json") for b in view.budgets],
        "series": [_series(ledger, view, d, s) for d, s in dict.fromkeys(scopes)],
        "releases": [e.model_dump(mode="json") for e in view.entries if e.state == "released"],
        "refusals": [r.model_dump(mode="json") for r in view.refusals],
    }


# HTML --------------------------------------------------------------------------------------------
_W, _H, _PAD = 640, 220, 40


def _svg(series: dict, limit: float | None) -> str:
    pts = series["points"]
    ys = [p["cumulative_epsilon"] for p in pts if p["cumulative_epsilon"] is not None]
    top = max(ys + ([limit] if limit is not None else []) + [1e-9]) * 1.1
    n = max(len(pts), 2)

    def x(i):
        return _PAD + (_W - 2 * _PAD) * i / (n - 1)

    def y(v):
        return _H - _PAD - (_H - 2 * _PAD) * v / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img">',
             f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#444"/>',
             f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#444"/>',
             f'<text x="4" y="{_PAD - 8}" font-size="11">epsilon (delta={series["delta"]:g})</text>',
             f'<text x="{_W - _PAD}" y="{_H - 8}" font-size="11" text-anchor="end">release</text>',
             f'<text x="{_PAD - 4}" y="{y(top / 1.1) + 4:.1f}" font-size="10" text-anchor="end">{top / 1.1:.3g}</text>']
    if limit is not None:
        parts.append(f'<line x1="{_PAD}" y1="{y(limit):.1f}" x2="{_W - _PAD}" y2="{y(limit):.1f}" stroke="#c00" '
                     f'stroke-dasharray="4 3"/><text x="{_W - _PAD}" y="{y(limit) - 4:.1f}" font-size="10" '
                     f'text-anchor="end" fill="#c00">budget {limit:.3g}</text>')
    line = [(x(i), y(p["cumulative_epsilon"])) for i, p in enumerate(pts) if p["cumulative_epsilon"] is not None]
    if line:
        parts.append('<polyline fill="none" stroke="#06c" stroke-width="2" points="'
                     + " ".join(f"{a:.1f},{b:.1f}" for a, b in line) + '"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="#06c"/>' for a, b in line]
    parts += [f'<text x="{x(i):.1f}" y="{_PAD:.1f}" font-size="10" text-anchor="middle" fill="#c00">no DP</text>'
              for i, p in enumerate(pts) if not p["dp"]]
    return "".join(parts) + "</svg>"


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return fmt_epsilon(v) if not math.isnan(v) else "—"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def render_html(report: dict) -> str:
    """A self-contained HTML page for the report data from :func:`build`."""
    budgets = {(b["dataset"], b["scientist"]): b["epsilon"] for b in report["budgets"]}
    charts = []
    for s in report["series"]:
        who = s["scientist"] or "all scientists"
        prv = s.get("epsilon_prv")
        tighter = (f"<p>Total by the tighter PRV accountant: epsilon={fmt_epsilon(prv)} at delta={s['delta']:g}</p>"
                   if prv is not None else "")
        charts.append(f"<h3>{html.escape(s['dataset'])} — {html.escape(who)}</h3>"
                      + _svg(s, budgets.get((s["dataset"], s["scientist"]))) + tighter)
    releases = [r | {"epsilon": r["epsilon"] if r["dp"] else None,
                     "guarantee": "DP" if r["dp"] else "NOT differentially private (no epsilon)"}
                for r in report["releases"]]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>voxgrid privacy report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}</style></head><body>
<h1>Privacy report</h1><p>Generated {html.escape(report["generated_at"])}. Epsilon composes every release with the
RDP accountant (Opacus) at the delta shown; a release without differential privacy has no epsilon, and no
bound holds for its dataset and scientist after it.</p>
<h2>Budgets</h2>{_table(report["budgets"], ["dataset", "scientist", "epsilon", "delta", "spent", "remaining"])}
<h2>Spend over releases</h2>{"".join(charts) or "<p>no releases</p>"}
<h2>Releases</h2>{_table(releases, ["released_at", "scientist", "dataset", "job_id", "mechanism", "parameters",
                                     "guarantee", "epsilon", "delta"])}
<h2>Refused jobs</h2>{_table(report["refusals"], ["at", "scientist", "dataset", "mechanism", "detail"])}
</body></html>"""


def write(ledger: Ledger, out: Path) -> tuple[Path, Path]:
    """Write ``privacy-report.json`` and ``privacy-report.html`` into ``out``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = build(ledger)
    js, page = out / "privacy-report.json", out / "privacy-report.html"
    js.write_text(json.dumps(report, indent=1))
    page.write_text(render_html(report))
    return js, page
