"""The owner's privacy report: JSON data and a self-contained HTML page."""

import json

import pytest

from voxgrid.cli import main
from voxgrid.nodes.ops import admin
from voxgrid.pki import create_ca, issue_certificate
from voxgrid.privacy import BudgetExceeded, Ledger, PrivacySpec, report
from voxgrid.privacy.accountant import GaussianEvent, epsilon

GAUSS = PrivacySpec.parse({"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 4.0, "delta": 1e-5})
PERCENTILE = PrivacySpec.parse({"mechanism": "percentile", "fraction": 0.25})


def test_report_json_and_html(tmp_path):
    led = Ledger(tmp_path / "node.db")
    single = epsilon([GaussianEvent(2.0, 1.0, 1)], 1e-5)
    led.set_budget("ct", 1.3 * single, 1e-5, scientist="alice")
    for job, who, spec in (("j1", "alice", GAUSS), ("j2", "bob", GAUSS), ("j3", "bob", PERCENTILE),
                           ("j4", "bob", GAUSS)):
        led.reserve(job, who, "ct", spec)
        led.release(job)
    with pytest.raises(BudgetExceeded):
        led.reserve("j5", "alice", "ct", GAUSS)
    js, page = report.write(led, tmp_path / "out")
    data = json.loads(js.read_text())
    series = {s["scientist"]: s for s in data["series"]}
    assert series["alice"]["points"][0]["cumulative_epsilon"] == pytest.approx(single)
    bob = [p["cumulative_epsilon"] for p in series["bob"]["points"]]
    assert bob[0] == pytest.approx(single) and bob[1:] == [None, None]  # no bound after a non-DP release
    assert len(data["refusals"]) == 1 and data["budgets"][0]["remaining"] == pytest.approx(0.3 * single)
    text = js.read_text()
    assert "Infinity" not in text and "NaN" not in text
    doc = page.read_text()
    assert doc.count("<svg") == 2 and "NOT differentially private" in doc and "Refused jobs" in doc
    assert "<script" not in doc and "http://" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")
    led.close()


def test_report_command(tmp_path, capsys):
    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "node-a", ["127.0.0.1"])
    admin.init_home("node", tmp_path / "home", "node-a", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    assert main(["privacy", "report", "--home", str(tmp_path / "home"), "--out", str(tmp_path / "rep")]) == 0
    assert "privacy-report.html" in capsys.readouterr().out
    assert (tmp_path / "rep" / "privacy-report.json").is_file()
