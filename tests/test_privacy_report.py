"""The owner's privacy report: JSON data and a self-contained HTML page."""

import html
import json
import re

import pytest

from voxgrid.cli import main
from voxgrid.nodes.ops import admin
from voxgrid.pki import create_ca, issue_certificate
from voxgrid.privacy import BudgetExceeded, Ledger, PrivacySpec, TrainingContext, report
from voxgrid.privacy.accountant import GaussianEvent, epsilon
from voxgrid.privacy.ledger import fmt_epsilon
from voxgrid.privacy.metrics import MetricsRelease
from voxgrid.privacy.report_chart import int_ticks, nice_ticks

GAUSS = PrivacySpec.parse({"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 4.0, "delta": 1e-5})
PERCENTILE = PrivacySpec.parse({"mechanism": "percentile", "fraction": 0.25})
EVENT = GaussianEvent(2.0, 1.0, 1)  # GAUSS: sensitivity 2 * clip, so the multiplier halves


def _release(led, job, who, dataset, spec, **kw):
    led.reserve(job, who, dataset, spec, **kw)
    return led.release(job)


def _summary(data):
    return {(r["dataset"], r["scientist"]): r for r in data["summary"]}


def test_report_json_and_html(tmp_path):
    led = Ledger(tmp_path / "node.db")
    single = epsilon([EVENT], 1e-5)
    led.set_budget("ct", 1.3 * single, 1e-5, scientist="alice")
    for job, who, spec in (("j1", "alice", GAUSS), ("j2", "bob", GAUSS), ("j3", "bob", PERCENTILE),
                           ("j4", "bob", GAUSS)):
        _release(led, job, who, "ct", spec)
    with pytest.raises(BudgetExceeded):
        led.reserve("j5", "alice", "ct", GAUSS)
    js, page = report.write(led, tmp_path / "out")
    data = json.loads(js.read_text())
    series = {s["scientist"]: s for s in data["series"]}
    assert series["alice"]["points"][0]["cumulative_epsilon"] == pytest.approx(single)
    bob = [p["cumulative_epsilon"] for p in series["bob"]["points"]]
    assert bob[0] == pytest.approx(single) and bob[1:] == [None, None]  # no bound after a non-DP release
    assert [p["cumulative_epsilon"] for p in series[None]["points"]][2:] == [None, None]
    assert len(data["refusals"]) == 1 and data["budgets"][0]["remaining"] == pytest.approx(0.3 * single)
    rows = _summary(data)
    assert rows[("ct", "bob")]["releases_without_dp"] == 1 and rows[("ct", "bob")]["spent"] is None
    assert rows[("ct", "bob")]["limited_by"] is None and rows[("ct", "bob")]["status"] == "alert"
    text = js.read_text()
    assert "Infinity" not in text and "NaN" not in text
    doc = page.read_text()
    assert doc.count("<svg") == 1  # one chart per dataset, a line per scientist and the total
    svg = doc[doc.index("<svg"):doc.index("</svg>")]
    assert svg.count('class="spend"') == 3 and svg.count('class="nodp"') == 1 and svg.count('class="budget"') == 1
    assert "NOT differentially private" in doc and "Refused jobs" in doc and "1 job refused" in doc
    assert "<script" not in doc and "http://" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in doc and "<link" not in doc and "<img" not in doc and "@import" not in doc
    led.close()


def test_summary_rows_per_dataset_and_scientist(tmp_path):
    led = Ledger(tmp_path / "node.db")
    single, three = (epsilon([EVENT] * n, 1e-5) for n in (1, 3))
    led.set_budget("ct", 10.0, 1e-5)  # everyone together
    led.set_budget("ct", 1.2 * single, 1e-5, scientist="alice")
    _release(led, "a1", "alice", "ct", GAUSS)
    _release(led, "b1", "bob", "ct", GAUSS)
    _release(led, "b2", "bob", "ct", GAUSS)
    led.reserve("b3", "bob", "ct", GAUSS)  # accepted, not yet released: counts as spent
    _release(led, "c1", "carol", "mri", GAUSS)  # a dataset with no budget at all
    _release(led, "c2", "carol", "mri", PERCENTILE)
    data = report.build(led)
    rows = _summary(data)
    assert list(rows) == [("ct", None), ("ct", "alice"), ("ct", "bob"), ("mri", None), ("mri", "carol")]
    four = epsilon([EVENT] * 4, 1e-5)
    ct = rows[("ct", None)]
    assert ct["spent"] == pytest.approx(four) and ct["budget"] == 10.0 and ct["remaining"] == pytest.approx(10 - four)
    assert (ct["releases"], ct["in_progress"], ct["limited_by"], ct["status"]) == (3, 1, "budget", "ok")
    released = [e.released_at for e in led.entries(states=("released",)) if e.dataset == "ct"]
    assert ct["last_release"] == max(released)
    alice = rows[("ct", "alice")]
    assert alice["spent"] == pytest.approx(single) and alice["budget"] == pytest.approx(1.2 * single)
    assert alice["remaining"] == pytest.approx(0.2 * single) and alice["releases"] == 1
    assert alice["status"] == "warning" and "83% of the budget used" in alice["note"]  # past USED_WARNING
    bob = rows[("ct", "bob")]
    assert bob["spent"] == pytest.approx(three) and bob["releases"] == 2 and bob["in_progress"] == 1
    assert bob["budget"] is None and bob["remaining"] is None and bob["limited_by"] == "dataset budget"
    assert bob["status"] == "ok" and "dataset-wide budget applies" in bob["note"]
    assert 0 < alice["spent_prv"] <= alice["spent"] + 1e-9  # the tighter PRV figure beside RDP's
    for key in (("mri", None), ("mri", "carol")):
        mri = rows[key]
        assert mri["spent"] is None and mri["budget"] is None and mri["remaining"] is None
        assert mri["limited_by"] is None and mri["releases_without_dp"] == 1 and mri["status"] == "alert"
        assert mri["note"].startswith("NO BUDGET") and "without differential privacy" in mri["note"]

    doc = report.render_html(data)
    alerts = doc[doc.index('<ul class="alerts">'):doc.index("</ul>")]
    assert "<b>No budget</b> on dataset mri:" in alerts and "scientist carol" not in alerts  # flagged once
    assert "<b>1 release without differential privacy</b> on dataset mri" in alerts
    assert "<b>Budget nearly used</b> on dataset ct, scientist alice" in alerts
    assert alerts.index("No budget") < alerts.index("nearly used")  # the worst first
    summary = doc[doc.index("<table class=summary>"):]
    summary = summary[:summary.index("</table>")]
    assert summary.index(">ct<") < summary.index(">alice<") < summary.index(">bob<") < summary.index(">mri<")
    cells = re.findall(r"<td class=num>([^<]*)<", summary)
    assert fmt_epsilon(four) in cells and fmt_epsilon(10 - four) in cells
    assert fmt_epsilon(single) in cells and fmt_epsilon(0.2 * single) in cells
    assert summary.count('<span class="bad">unbounded</span>') == 2 and summary.count(">none<") == 4
    assert "+ 1 in progress" in summary and "NO BUDGET: nothing limits these releases" in summary
    led.close()


def test_each_mechanism_in_words(tmp_path):
    led = Ledger(tmp_path / "node.db")
    sgd = PrivacySpec.parse({"mechanism": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5})
    big = PrivacySpec.parse({"filters": [
        {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 8.0, "delta": 1e-5},
        {"mechanism": "percentile", "fraction": 0.25}]})
    dice = MetricsRelease(dice="noised", loss="withheld", split="test", noise_multiplier=8.0, sensitivity=0.05,
                          delta=1e-5)
    _release(led, "s", "alice", "ct", sgd, context=TrainingContext(patients=160, batch_size=40, local_epochs=10))
    _release(led, "g", "bob", "ct", big, metrics=dice)
    _release(led, "d", "carol", "ct", None, metrics=dice)  # an evaluate job: the Dice alone
    _release(led, "p", "dave", "mri", PERCENTILE)
    _release(led, "n", "dave", "mri", None)
    data = report.build(led)
    words = {r["job_id"]: r["description"] for r in data["releases"]}
    expected = {
        "s": ["DP-SGD (patient-level, in local training): noise multiplier 1.1, clip 1.0 (L2 norm of each patient's "
              "gradient), sample rate 0.25, 40 steps, 160 patients in the train split"],
        "g": ["Gaussian update: clip 1.0 (L2 norm of the whole update), noise multiplier 8.0 (noise std 8.0)",
              "Top-25% sharing: only the 25% of update entries of largest magnitude leave (after the noise: no "
              "further privacy cost)",
              "Dice metric release: Gaussian noise std 0.4 on the per-class Dice of the test split (noise multiplier "
              "8.0, sensitivity 0.05); training loss withheld"],
        "d": ["Dice metric release: Gaussian noise std 0.4 on the per-class Dice of the test split (noise multiplier "
              "8.0, sensitivity 0.05); training loss withheld"],
        "p": ["Top-25% sharing: only the 25% of update entries of largest magnitude leave (no noise: not "
              "differentially private)"],
        "n": ["No privacy filter: the update left as trained"],
    }
    assert words == expected
    assert report.describe("future_filter", [{"mechanism": "future_filter", "noise_scale": 2.0}]) == \
        ["future filter: noise scale 2.0"]
    assert report.describe("dp_sgd", [{"mechanism": "dp_sgd", "noise_multiplier": 1.0}]) == \
        ["dp sgd: noise multiplier 1.0"]  # fields missing (another version's entry): shown as they are
    doc = report.render_html(data)
    for lines in expected.values():
        assert all(f"<li>{html.escape(line)}</li>" in doc for line in lines)
    rows = {re.search(r" · job (\w+)</code>", r).group(1): r for r in doc.split("<tr") if " · job " in r}
    cumulative = {(s["scientist"], p["job_id"]): p["cumulative_epsilon"] for s in data["series"] for p in s["points"]}
    for r in data["releases"]:  # each release's epsilon and the cumulative ones (its scientist's, all), in its row
        row, job = rows[r["job_id"]], r["job_id"]
        assert all(f"<li>{html.escape(line)}</li>" in row for line in expected[job])
        if r["dp"]:
            assert fmt_epsilon(r["epsilon"]) in row and fmt_epsilon(cumulative[(r["scientist"], job)]) in row
            assert fmt_epsilon(cumulative[(None, job)]) in row
        else:
            assert "NOT differentially private</span><br>no ε" in row
    # No raw JSON of parameters anywhere in the page (in either quoting).
    for raw in ('{"', "{&quot;", "{'", "noise_multiplier", "max_grad_norm", "sample_rate", '"clip"', "&quot;clip"):
        assert raw not in doc, raw
    led.close()


def _ticks(svg, axis):
    return [(float(v), float(pos)) for pos, v in re.findall(
        rf'<g class="{axis}tick"><line [^>]*?{"y1" if axis == "y" else "x1"}="([\d.]+)"[^>]*/><text [^>]*>([\d.]+)<',
        svg)]


def test_chart_has_ticks_a_budget_line_and_a_legend(tmp_path):
    led = Ledger(tmp_path / "node.db")
    led.set_budget("ct", 5.0, 1e-5, scientist="alice")
    for job in ("a1", "a2", "a3"):
        _release(led, job, "alice", "ct", GAUSS)
    doc = report.render_html(report.build(led))
    assert doc.count("<svg") == 1
    svg = doc[doc.index("<svg"):doc.index("</svg>")]
    yt, xt = _ticks(svg, "y"), _ticks(svg, "x")
    assert len(yt) > 2 and len(xt) > 2
    assert [v for v, _ in xt] == [0, 1, 2, 3]  # every release numbered
    assert yt[0][0] == 0 and yt[-1][0] >= 5.0  # from 0 past the budget
    (y1, y2), = re.findall(r'<line class="budget" [^>]*y1="([\d.]+)" y2="([\d.]+)"', svg)
    assert y1 == y2  # horizontal, at the budget's height on the axis's scale
    (v0, p0), (v1, p1) = yt[0], yt[-1]
    assert float(y1) == pytest.approx(p0 + (p1 - p0) * (5.0 - v0) / (v1 - v0), abs=0.2)
    assert "cumulative ε" in svg and "release number" in svg  # axis labels
    legend = re.findall(r'<g class="legend">.*?<text [^>]*>([^<]*)</text></g>', svg)
    assert len(legend) == 2 and legend[0].startswith("alice (all releases): ε ") and "budget, alice: ε 5" in legend[1]
    assert svg.count("<circle") == 3
    led.close()


def test_ticks():
    assert nice_ticks(0.9) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(7.3) == [0, 2, 4, 6, 8] and nice_ticks(0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(12) == [0, 2.5, 5, 7.5, 10, 12.5]
    assert int_ticks(0) == [0, 1] and int_ticks(1) == [0, 1] and int_ticks(12) == list(range(13))
    assert int_ticks(100) == list(range(0, 101, 10)) and int_ticks(30) == list(range(0, 31, 5))


def test_empty_ledger(tmp_path):
    led = Ledger(tmp_path / "node.db")
    data = report.build(led)
    assert data["summary"] == [] and data["series"] == []
    doc = report.render_html(data)
    assert "No releases and no budgets yet" in doc and "<svg" not in doc
    led.set_budget("ct", 2.0, 1e-5)  # a budget, nothing released yet
    data = report.build(led)
    (row,) = data["summary"]
    assert (row["spent"], row["budget"], row["remaining"], row["releases"], row["last_release"]) == \
        (0.0, 2.0, 2.0, 0, None)
    assert report.render_html(data).count('class="budget"') == 1
    led.close()


def test_report_command(tmp_path, capsys):
    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "node-a", ["127.0.0.1"])
    admin.init_home("node", tmp_path / "home", "node-a", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    assert main(["privacy", "report", "--home", str(tmp_path / "home"), "--out", str(tmp_path / "rep")]) == 0
    assert "privacy-report.html" in capsys.readouterr().out
    assert (tmp_path / "rep" / "privacy-report.json").is_file()
