"""The owner's privacy report, for a privacy officer: JSON data and a self-contained HTML page.

The page leads with a summary per dataset and scientist (epsilon spent, budget, remaining, releases,
last release), flagging what no budget limits and every release without DP; then, per dataset, a
chart of cumulative spend over releases with the budgets (:mod:`.report_chart`: inline SVG, no
scripts, nothing fetched) and each release's mechanism in words, with its epsilon and the cumulative
epsilon; then refused jobs. Epsilons compose with the RDP accountant at the scope's delta (budgets
use it), the total also by the tighter PRV accountant. A release without DP has no epsilon, and no
bound holds for its scope after it. :func:`render_body` is the content; the file wraps it in a page, and the
node's owner console shows the same body in its own.
"""

from __future__ import annotations

import html
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

from . import report_chart as chart
from .ledger import Ledger, fmt_epsilon
from .records import LedgerEntry, LedgerView

DEFAULT_DELTA = 1e-5  # for a scope without a budget or any DP release to take delta from
USED_WARNING = 0.8  # a budget used this much is flagged


# data --------------------------------------------------------------------------------------------
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


def _scopes(view: LedgerView) -> list[tuple[str, str | None]]:
    """Per dataset (with entries or a budget): its total (scientist None), then each scientist."""
    live = [e for e in view.entries if e.state != "cancelled"]
    out = []
    for d in sorted({e.dataset for e in live} | {b.dataset for b in view.budgets}):
        names = {e.scientist for e in live if e.dataset == d}
        names |= {b.scientist for b in view.budgets if b.dataset == d and b.scientist is not None}
        out += [(d, None)] + [(d, s) for s in sorted(names)]
    return out


def _limited_by(view: LedgerView, dataset: str, scientist: str | None) -> str | None:
    """What bounds a scope: "budget" (its own), "dataset budget", "scientist budgets", or None (nothing)."""
    mine = [b for b in view.budgets if b.dataset == dataset]
    if any(b.scientist == scientist for b in mine):
        return "budget"
    if scientist is not None and any(b.scientist is None for b in mine):
        return "dataset budget"
    return "scientist budgets" if scientist is None and mine else None


def _summary_row(ledger: Ledger, view: LedgerView, series: dict) -> dict:
    """Spend, budget and releases of one scope (dataset, scientist or None: all scientists together)."""
    d, who, delta = series["dataset"], series["scientist"], series["delta"]
    mine = [e for e in view.entries if e.dataset == d and who in (None, e.scientist) and e.state != "cancelled"]
    released = [e for e in mine if e.state == "released"]
    own = next((b for b in view.budgets if b.dataset == d and b.scientist == who), None)
    spent = ledger.spent(d, who, delta)  # reserved entries count, as in the budget check
    row = {"dataset": d, "scientist": who, "delta": delta, "spent": None if math.isinf(spent) else spent,
           "spent_prv": series["epsilon_prv"], "budget": own.epsilon if own else None,
           "budget_delta": own.delta if own else None, "remaining": own.remaining if own else None,
           "limited_by": _limited_by(view, d, who), "releases": len(released),
           "releases_without_dp": sum(not e.dp for e in released), "in_progress": len(mine) - len(released),
           "last_release": max((e.released_at for e in released if e.released_at), default=None)}
    return row | _status(row)


def _status(row: dict) -> dict:
    """``status`` ("ok", "warning", "alert") and ``note`` (words) of a summary row."""
    notes, level = [], "ok"
    if row["releases_without_dp"]:
        n = row["releases_without_dp"]
        notes.append(f"{n} release{'s' * (n > 1)} without differential privacy: no epsilon bound holds")
        level = "alert"
    limit = row["limited_by"]
    if limit is None:
        return {"status": "alert", "note": "; ".join(["NO BUDGET: nothing limits these releases", *notes])}
    if limit == "scientist budgets":
        notes.append("no dataset-wide budget; only per-scientist budgets")
    elif limit == "dataset budget":
        notes.append("no budget of its own; the dataset-wide budget applies")
    elif row["remaining"] <= 0:
        notes.append("budget exhausted: further jobs are refused")
        level = "alert"
    else:
        used = row["spent"] / row["budget"]
        notes.append(f"{used:.0%} of the budget used")
        level = "warning" if level == "ok" and used >= USED_WARNING else level
    return {"status": level, "note": "; ".join(notes)}


def build(ledger: Ledger) -> dict:
    """The report's data (JSON-ready; unbounded spend is None, never a number)."""
    view = ledger.view()
    series = [_series(ledger, view, d, s) for d, s in _scopes(view)]
    released = [e for e in view.entries if e.state == "released"]
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": [_summary_row(ledger, view, s) for s in series],
        "budgets": [b.model_dump(mode="json") for b in view.budgets],
        "series": series,
        "releases": [e.model_dump(mode="json") | {"description": describe(e.mechanism, e.parameters)}
                     for e in released],
        "refusals": [r.model_dump(mode="json") for r in view.refusals],
    }


# words -------------------------------------------------------------------------------------------
def _n(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not isinstance(x, float):
        return str(x)
    text = f"{x:.4g}"
    return text + ".0" if x.is_integer() and "e" not in text else text  # 1.0 reads as the parameter it is


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _dp_sgd(p: dict) -> str:
    rate = p.get("sample_rate")
    text = (f"DP-SGD (patient-level, in local training): noise multiplier {_n(p['noise_multiplier'])}, "
            f"clip {_n(p['max_grad_norm'])} (L2 norm of each patient's gradient), "
            + (f"sample rate {_n(rate)}" if rate is not None else "sample rate batch size / patients"))
    if "steps" in p:
        text += f", {p['steps']} steps"
    if "patients" in p:
        text += f", {p['patients']} patients in the train split"
    return text


def _gaussian(p: dict) -> str:
    z, c = p["noise_multiplier"], p["clip"]
    text = (f"Gaussian update: clip {_n(c)} (L2 norm of the whole update), noise multiplier {_n(z)} "
            f"(noise std {_n(float(z * c))})")
    return text + ("; distributed: each node adds a share of the noise, the secure sum carries all of it"
                   if p.get("distributed") else "")


def _percentile(p: dict, after_noise: bool = False) -> str:
    share = f"{100 * p['fraction']:.3g}%"
    why = "after the noise: no further privacy cost" if after_noise else "no noise: not differentially private"
    return f"Top-{share} sharing: only the {share} of update entries of largest magnitude leave ({why})"


def _dice(p: dict) -> str:
    if p.get("dice") != "noised":
        return f"Metrics: Dice {p.get('dice')}, training loss {p.get('loss')} (no noise, nothing accounted)"
    z, s = p["noise_multiplier"], p["sensitivity"]
    return (f"Dice metric release: Gaussian noise std {_n(float(z * s))} on the per-class Dice of the "
            f"{p.get('split')} split (noise multiplier {_n(z)}, sensitivity {_n(s)}); training loss {p.get('loss')}")


def _other(p: dict) -> str:
    rest = ", ".join(f"{k.replace('_', ' ')} {_n(v)}" for k, v in p.items() if k != "mechanism")
    return f"{str(p.get('mechanism', 'filter')).replace('_', ' ')}: {rest or 'no parameters'}"


_WORDS = {"dp_sgd": _dp_sgd, "gaussian_update": _gaussian, "percentile": _percentile, "gaussian_dice": _dice}


def describe(mechanism: str, parameters: list[dict]) -> list[str]:
    """Each filter of a release in words and numbers, in chain order."""
    if not parameters:
        return ["No privacy filter: the update left as trained"] if mechanism == "none" else [mechanism]
    out, noised = [], False
    for p in parameters:
        name = p.get("mechanism")
        try:
            out.append(_percentile(p, noised) if name == "percentile" else _WORDS.get(name, _other)(p))
        except (KeyError, TypeError, ValueError):  # an entry of another version: its fields as they are
            out.append(_other(p))
        noised = noised or name in ("dp_sgd", "gaussian_update")
    return out


# HTML --------------------------------------------------------------------------------------------
_e = html.escape

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:68em;padding:0 1em;
 color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:2px solid #ddd}h3{margin-top:1.6em}.meta{color:#555}
table{border-collapse:collapse;font-size:13px;width:100%;margin:.5em 0}th{background:#f2f2f2}
td,th{border:1px solid #d4d4d4;padding:4px 7px;text-align:left;vertical-align:top}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}td.cnt{text-align:right}
td.who,td.ds,td.when{white-space:nowrap}th.status{width:26%}
tr.total td{font-weight:600;background:#fafafa;border-top:2px solid #bbb}tr.scientist td.who{padding-left:1.5em}
.chip{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.ok{background:#e6f4ea;color:#1e6b30}.warning{background:#fff3d6;color:#7a4d00}.alert{background:#fde7e7;color:#a00000}
.bad{color:#a00000;font-weight:600}.small{font-size:11px;color:#666}code{font-size:11px;color:#666}
.alerts{list-style:none;padding:0}.alerts li{margin:.3em 0;padding:.45em .8em;border-radius:4px}
.bar{display:inline-block;width:60px;height:7px;background:#e6e6e6;margin-left:6px;vertical-align:middle}
.bar i{display:block;height:7px;background:#1e6b30}.bar i.warning{background:#c98a00}.bar i.alert{background:#a00000}
tr.nodp td{background:#fff0f0}ul.mech{margin:0;padding-left:1.1em}svg{max-width:100%;height:auto}
details summary{font-weight:600;margin:.8em 0 .3em;cursor:pointer}@media print{section{break-inside:avoid}}
"""


def _when(iso: str | None) -> str:
    if not iso:
        return "—"
    try:
        return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _delta(x: float | None) -> str:
    return "—" if x is None else re.sub(r"e-0*", "e-", f"{x:g}")


def _eps(x: float | None) -> str:
    return '<span class="bad">unbounded</span>' if x is None else fmt_epsilon(x)


def _who(scientist: str | None) -> str:
    return "all scientists together" if scientist is None else scientist


def _row_alerts(r: dict, unbudgeted: set[str]) -> list[tuple[str, str]]:
    """(level, words) for one summary row; a dataset no budget limits is flagged once, not per scientist."""
    where = f"dataset {_e(r['dataset'])}" + (f", scientist {_e(r['scientist'])}" if r["scientist"] else "")
    out = []
    if r["limited_by"] is None and (r["scientist"] is None or r["dataset"] not in unbudgeted):
        out.append(("alert", f"<b>No budget</b> on {where}: nothing limits what is released."))
    if r["scientist"] is None and r["releases_without_dp"]:
        out.append(("alert", f"<b>{_plural(r['releases_without_dp'], 'release')} without differential privacy"
                             f"</b> on {where}: no ε bound holds after it (marked in red below)."))
    if r["budget"] is not None and r["remaining"] <= 0:
        out.append(("alert", f"<b>Budget exhausted</b> on {where}: further jobs are refused."))
    elif r["budget"] is not None and r["status"] == "warning":
        out.append(("warning", f"<b>Budget nearly used</b> on {where}: ε {_eps(r['spent'])} of "
                               f"{fmt_epsilon(r['budget'])} spent, {fmt_epsilon(r['remaining'])} remaining."))
    return out


def _alerts(report: dict) -> str:
    """What a privacy officer must see first: unbudgeted scopes, releases without DP, budgets (nearly) spent."""
    rows = report["summary"]
    unbudgeted = {r["dataset"] for r in rows if r["scientist"] is None and r["limited_by"] is None}
    items = [item for r in rows for item in _row_alerts(r, unbudgeted)]
    if report["refusals"]:
        items.append(("warning", f"{_plural(len(report['refusals']), 'job')} refused for lack of budget "
                                 "(listed at the end)."))
    if not items:
        items = [("ok", "Every dataset has a budget, every release is differentially private, and no budget is "
                        "nearly used.")]
    items.sort(key=lambda item: ("alert", "warning", "ok").index(item[0]))  # stable: the worst first
    return '<ul class="alerts">' + "".join(f'<li class="{k}">{t}</li>' for k, t in items) + "</ul>"


def _budget_cells(r: dict) -> tuple[str, str]:
    """The budget and remaining cells; remaining with a gauge of the share left."""
    if r["budget"] is None:
        word = {None: '<span class="bad">none</span>', "dataset budget": "dataset-wide",
                "scientist budgets": "per scientist"}[r["limited_by"]]
        word = word if r["limited_by"] is None else f'<span class="small">{word}</span>'
        return word, word
    left = r["remaining"] / r["budget"] if r["budget"] > 0 else 0.0
    gauge = f'<span class="bar" title="{left:.0%} left"><i class="{r["status"]}" style="width:{100 * left:.0f}%">'
    return fmt_epsilon(r["budget"]), f'{fmt_epsilon(r["remaining"])}{gauge}</i></span>'


def _summary_cells(r: dict) -> str:
    releases = str(r["releases"])
    if r["releases_without_dp"]:
        releases += f' <span class="bad">({r["releases_without_dp"]} without DP)</span>'
    if r["in_progress"]:
        releases += f' <span class="small">+ {r["in_progress"]} in progress</span>'
    spent = _eps(r["spent"])
    if r["spent_prv"] is not None and r["releases"]:
        spent += f'<br><span class="small">PRV: {fmt_epsilon(r["spent_prv"])}</span>'
    budget, remaining = _budget_cells(r)
    return (f"<td class=cnt>{releases}</td><td class=when>{_when(r['last_release'])}</td><td class=num>{spent}</td>"
            f"<td class=num>{budget}</td><td class=num>{remaining}</td><td class=num>{_delta(r['delta'])}</td>"
            f'<td><span class="chip {r["status"]}">{r["status"]}</span> {_e(r["note"])}</td>')


def summary_table(rows: list[dict]) -> str:
    """The summary per dataset and scientist (spent, budget, remaining, releases, last release, status)."""
    if not rows:
        return "<p>No releases and no budgets yet.</p>"
    head = ("<tr><th>Dataset</th><th>Scientist</th><th>Releases</th><th>Last release (UTC)</th><th>ε spent</th>"
            "<th>ε budget</th><th>ε remaining</th><th>at δ</th><th class=status>Status</th></tr>")
    body = []
    for r in rows:
        n = sum(x["dataset"] == r["dataset"] for x in rows)
        first = f'<td rowspan="{n}" class="ds">{_e(r["dataset"])}</td>' if r["scientist"] is None else ""
        body.append(f'<tr class="{"total" if r["scientist"] is None else "scientist"}">{first}'
                    f"<td class=who>{_e(_who(r['scientist']))}</td>{_summary_cells(r)}</tr>")
    return f"<table class=summary>{head}{''.join(body)}</table>"


def _line_label(s: dict, alone: bool) -> str:
    last = s["points"][-1]["cumulative_epsilon"] if s["points"] else 0.0
    spent = "unbounded" if last is None else fmt_epsilon(last)
    return (f"{_who(s['scientist'])}{' (all releases)' if alone else ''}: ε {spent} after "
            f"{_plural(len(s['points']), 'release')}, δ={_delta(s['delta'])}")


def _chart(dataset: str, series: list[dict], budgets: list[dict], releases: list[dict], order: dict) -> str:
    """One chart: each scope's cumulative spend, its budget, and the releases without DP."""
    limit = {(b["dataset"], b["scientist"]): b for b in budgets}
    people = [s for s in series if s["scientist"] is not None]
    alone = len(people) == 1 and people[0]["delta"] == series[0]["delta"]  # then the total is their line
    lines, lims = [], []
    for k, s in enumerate(series):
        total = s["scientist"] is None
        color = chart.TOTAL if total else chart.PALETTE[(k - 1) % len(chart.PALETTE)]
        b = limit.get((dataset, s["scientist"]))
        if b:
            lims.append(chart.Budget(f"budget, {_who(s['scientist'])}: ε {fmt_epsilon(b['epsilon'])} at "
                                     f"δ={_delta(b['delta'])}", color, b["epsilon"]))
        if not (total and alone):
            pts = [(order[p["job_id"]], p["cumulative_epsilon"]) for p in s["points"] if p["job_id"] in order]
            lines.append(chart.Line(_line_label(s, alone), color, pts, 3.0 if total else 2.0))
    no_dp = [(order[r["job_id"]], f"#{order[r['job_id']]} no DP") for r in releases if not r["dp"]]
    return chart.render(lines, lims, len(releases), no_dp, "cumulative ε (privacy loss, no unit)",
                        "release number on this dataset (all scientists, in ledger order)",
                        f"Cumulative privacy spend on dataset {dataset}")


def _release_row(r: dict, i: int, cumulative: dict) -> str:
    mech = "".join(f"<li>{_e(line)}</li>" for line in r["description"])
    own, total = cumulative.get((r["scientist"], r["job_id"])), cumulative.get((None, r["job_id"]))
    if r["dp"]:
        eps = f"{fmt_epsilon(r['epsilon'])} <span class=small>at δ={_delta(r['delta'])}</span>"
    else:
        eps = '<span class="bad">NOT differentially private</span><br>no ε'
    cells = [_eps(c[0]) + f" <span class=small>at δ={_delta(c[1])}</span>" if c else "—" for c in (own, total)]
    return (f'<tr class="{"dp" if r["dp"] else "nodp"}"><td class=num>{i}</td>'
            f'<td class=when>{_when(r["released_at"])}</td><td>{_e(r["scientist"])}</td>'
            f'<td><ul class="mech">{mech}</ul><code>{_e(r["mechanism"])} · job {_e(r["job_id"])}</code></td>'
            f"<td class=num>{eps}</td><td class=num>{cells[0]}</td><td class=num>{cells[1]}</td></tr>")


def _release_table(releases: list[dict], series: list[dict], order: dict) -> str:
    if not releases:
        return "<p>No releases yet.</p>"
    cumulative = {(s["scientist"], p["job_id"]): (p["cumulative_epsilon"], s["delta"])
                  for s in series for p in s["points"]}
    head = ("<tr><th>#</th><th>Released (UTC)</th><th>Scientist</th><th>Mechanism and parameters</th>"
            "<th>ε this release</th><th>Cumulative ε, this scientist</th><th>Cumulative ε, all scientists</th></tr>")
    return f"<table>{head}{''.join(_release_row(r, order[r['job_id']], cumulative) for r in releases)}</table>"


def _dataset_section(dataset: str, report: dict) -> str:
    releases = [r for r in report["releases"] if r["dataset"] == dataset]
    series = [s for s in report["series"] if s["dataset"] == dataset]
    order = {r["job_id"]: i + 1 for i, r in enumerate(releases)}
    return (f"<section><h3>Dataset {_e(dataset)}</h3>"
            f"{_chart(dataset, series, report['budgets'], releases, order)}"
            f"<details open><summary>{_plural(len(releases), 'release')} of {_e(dataset)}: mechanism, parameters "
            f"and ε of each</summary>{_release_table(releases, series, order)}</details></section>")


def _refusals(rows: list[dict]) -> str:
    if not rows:
        return "<p>None.</p>"
    body = "".join(f"<tr><td>{_when(r['at'])}</td><td>{_e(r['scientist'])}</td><td>{_e(r['dataset'])}</td>"
                   f"<td><code>{_e(r['mechanism'])}</code></td><td>{_e(r['detail'])}</td></tr>" for r in rows)
    return ("<table><tr><th>When (UTC)</th><th>Scientist</th><th>Dataset</th><th>Mechanism</th><th>Why</th></tr>"
            f"{body}</table>")


_METHOD = """<p class="small">ε (epsilon) bounds how much the released results can reveal about any one patient,
with probability of failure δ (delta); smaller is more private, and ε has no unit. Spend composes every release of
the scope with the RDP accountant (Opacus) at the δ shown; budgets are enforced with it. Below ε spent, the same
total by the tighter PRV accountant. Spent and remaining include jobs accepted but not yet released. A release
without differential privacy has no ε, and no bound holds for its dataset and scientist after it.</p>"""


def render_body(report: dict) -> str:
    """The report's content (no page around it): the HTML file and the owner console show exactly this."""
    datasets = list(dict.fromkeys(r["dataset"] for r in report["summary"]))
    sections = "".join(_dataset_section(d, report) for d in datasets) or "<p>No releases yet.</p>"
    return (f'<h1>Privacy report</h1><p class="meta">Generated {_when(report["generated_at"])} UTC from this node\'s '
            f"privacy ledger.</p>{_alerts(report)}<h2>Summary per dataset and scientist</h2>"
            f"{summary_table(report['summary'])}{_METHOD}<h2>Spend over releases, per dataset</h2>{sections}"
            f"<h2>Refused jobs</h2>{_refusals(report['refusals'])}")


def render_html(report: dict) -> str:
    """A self-contained HTML page (no scripts, nothing fetched) for the report data from :func:`build`."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>voxgrid privacy report</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main class="report">{render_body(report)}</main></body></html>')


def write(ledger: Ledger, out: Path) -> tuple[Path, Path]:
    """Write ``privacy-report.json`` and ``privacy-report.html`` into ``out``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = build(ledger)
    js, page = out / "privacy-report.json", out / "privacy-report.html"
    js.write_text(json.dumps(report, indent=1))
    page.write_text(render_html(report))
    return js, page
