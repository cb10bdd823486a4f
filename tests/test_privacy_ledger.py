"""The ledger: durable entries, budgets per dataset and per scientist, refusals that say why."""

import json
import math
import sqlite3
import subprocess
import sys
import threading

import pytest

from voxgrid.privacy import BudgetExceeded, Ledger, LedgerError, PrivacySpec, Receipt
from voxgrid.privacy.accountant import epsilon

GAUSS = PrivacySpec.parse({"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 4.0, "delta": 1e-5})
PERCENTILE = PrivacySpec.parse({"mechanism": "percentile", "fraction": 0.25})


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "node.db")
    yield led
    led.close()


def one_release(ledger, job, scientist="alice", dataset="ct", spec=GAUSS) -> Receipt:
    ledger.reserve(job, scientist, dataset, spec)
    return ledger.release(job)


def test_durable_settings_and_entries_survive_reopening(tmp_path):
    led = Ledger(tmp_path / "node.db")
    assert led._query("PRAGMA journal_mode")[0][0] == "wal" and led._query("PRAGMA synchronous")[0][0] == 2  # FULL
    one_release(led, "j1")
    led.close()
    again = Ledger(tmp_path / "node.db")
    assert [e.state for e in again.entries()] == ["released"]
    again.close()


def test_an_open_connection_works_in_autocommit_mode_only(tmp_path):
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    Ledger(conn).set_budget("ct", 1.0, 1e-5)
    with pytest.raises(ValueError, match="autocommit"):
        Ledger(sqlite3.connect(tmp_path / "y.db"))


def test_receipts_state_epsilon_and_cumulative_spend(ledger):
    r1 = one_release(ledger, "j1")
    single = epsilon(GAUSS.events(), 1e-5)
    assert r1.dp and r1.epsilon == pytest.approx(single) and r1.delta == 1e-5
    assert r1.cumulative_epsilon == pytest.approx(single) and r1.mechanism == "gaussian_update"
    assert r1.parameters == [{"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 4.0, "delta": 1e-5,
                              "distributed": False}]
    r2 = one_release(ledger, "j2")
    assert r2.epsilon == pytest.approx(single)
    assert single < r2.cumulative_epsilon < 2 * single  # RDP composition beats adding epsilons
    assert ledger.spent("ct", "alice", 1e-5) == pytest.approx(r2.cumulative_epsilon)
    assert ledger.release("j2") == r2  # idempotent: the stored receipt
    one_release(ledger, "j3", scientist="bob")
    assert ledger.spent("ct", "bob", 1e-5) == pytest.approx(single)
    assert ledger.spent("ct", None, 1e-5) > ledger.spent("ct", "alice", 1e-5)
    assert ledger.spent("mri") == 0.0


def test_percentile_alone_is_not_dp_and_states_no_number(ledger):
    r = one_release(ledger, "p1", spec=PERCENTILE)
    assert r.dp is False and r.epsilon is None and r.cumulative_epsilon is None
    assert "NOT differentially private" in r.note and "percentile" in r.note
    assert not any(ch.isdigit() for ch in r.note)
    with pytest.raises(ValueError, match="states no epsilon"):
        Receipt(**r.model_dump() | {"epsilon": 1.0})
    assert math.isinf(ledger.spent("ct", "alice"))
    later = one_release(ledger, "g1")  # DP now, but the scope's bound is gone
    assert later.dp and later.epsilon is not None and later.cumulative_epsilon is None
    assert "No cumulative bound" in later.note
    none = one_release(ledger, "n1", spec=None)
    assert none.mechanism == "none" and not none.dp and "no privacy filter" in none.note


def test_budgets_refuse_with_spent_projected_and_remaining(ledger):
    single = epsilon(GAUSS.events(), 1e-5)
    ledger.set_budget("ct", 1.3 * single, 1e-5, scientist="alice")
    ledger.set_budget("ct", 10 * single, 1e-5)
    one_release(ledger, "j1")
    assert ledger.remaining("ct", "alice") == pytest.approx(0.3 * single)
    [check_a, check_all] = sorted(ledger.project("ct", "alice", GAUSS), key=lambda c: c.budget.scientist is None)
    assert not check_a.ok and check_all.ok
    with pytest.raises(BudgetExceeded) as e:
        ledger.reserve("j2", "alice", "ct", GAUSS)
    msg = str(e.value)
    assert "dataset 'ct', scientist 'alice'" in msg
    assert f"spent so far epsilon={single:.4g}" in msg and "projected cost epsilon=" in msg
    assert f"remaining epsilon={0.3 * single:.4g}" in msg
    assert e.value.spent == pytest.approx(single) and e.value.remaining == pytest.approx(0.3 * single)
    assert ledger.entry("j2") is None
    [refusal] = ledger.refusals()
    assert refusal.scientist == "alice" and refusal.detail == msg
    one_release(ledger, "b1", scientist="bob")  # bob has only the dataset-wide budget
    view = ledger.view()
    assert len(view.budgets) == 2 and len(view.entries) == 2 and len(view.refusals) == 1
    json.loads(view.model_dump_json())  # JSON-clean: no inf or NaN anywhere


def test_a_non_dp_job_is_refused_where_a_budget_applies(ledger):
    ledger.set_budget("ct", 100.0, 1e-5)
    for spec in (PERCENTILE, None):
        with pytest.raises(BudgetExceeded, match="projected cost epsilon=unbounded .*not differentially private"):
            ledger.reserve("p", "alice", "ct", spec)
    ledger.reserve("elsewhere", "alice", "mri", PERCENTILE)  # no budget on mri


def test_cancel_gives_back_a_reservation_but_not_a_release(ledger):
    single = epsilon(GAUSS.events(), 1e-5)
    ledger.set_budget("ct", 1.2 * single, 1e-5)
    ledger.reserve("j1", "alice", "ct", GAUSS)
    with pytest.raises(BudgetExceeded):  # the reservation counts
        ledger.reserve("j2", "alice", "ct", GAUSS)
    ledger.cancel("j1")
    with pytest.raises(LedgerError, match="no reserved privacy spend"):
        ledger.release("j1")
    ledger.reserve("j3", "alice", "ct", GAUSS)
    ledger.release("j3")
    ledger.cancel("j3")  # no-op: released spend stays
    assert ledger.entry("j3").state == "released"
    with pytest.raises(LedgerError):
        ledger.release("never")


def test_concurrent_reservations_cannot_overspend(tmp_path):
    single = epsilon(GAUSS.events(), 1e-5)
    Ledger(tmp_path / "node.db").set_budget("ct", 3.5 * single, 1e-5)
    ledgers = [Ledger(tmp_path / "node.db") for _ in range(4)]  # separate connections, as separate processes
    outcome = []

    def go(i):
        for j in range(3):
            try:
                ledgers[i].reserve(f"{i}-{j}", "alice", "ct", GAUSS)
                outcome.append("ok")
            except BudgetExceeded:
                outcome.append("refused")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    accepted = outcome.count("ok")
    assert epsilon(GAUSS.events() * accepted, 1e-5) <= 3.5 * single < epsilon(GAUSS.events() * (accepted + 1), 1e-5)


def test_a_released_entry_survives_a_hard_kill(tmp_path):
    db = tmp_path / "node.db"
    code = ("import os; from voxgrid.privacy import Ledger, PrivacySpec; led = Ledger(%r); "
            "s = PrivacySpec.parse({'mechanism': 'percentile', 'fraction': 0.5}); "
            "led.reserve('k1', 'alice', 'ct', s); led.release('k1'); os._exit(9)" % str(db))
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 9
    led = Ledger(db)
    assert led.entry("k1").state == "released"
    led.close()


def test_sigkill_at_any_point_loses_no_acknowledged_release(tmp_path):
    """A child reserves and releases in a loop, printing each job once release() returned; we SIGKILL it
    mid-loop. Every job it acknowledged must be in the ledger as released."""
    db = tmp_path / "node.db"
    code = ("import sys; from voxgrid.privacy import Ledger, PrivacySpec; led = Ledger(sys.argv[1]); "
            "s = PrivacySpec.parse({'mechanism': 'percentile', 'fraction': 0.5}); print('ready', flush=True)\n"
            "for i in range(100000):\n"
            "    led.reserve(f'j{i}', 'alice', 'ct', s); led.release(f'j{i}'); print(f'j{i}', flush=True)")
    child = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    assert child.stdout.readline().strip() == "ready"
    while len(acknowledged) < 40:
        acknowledged.append(child.stdout.readline().strip())
    child.kill()
    acknowledged += [line.strip() for line in child.stdout if line.strip()]
    child.wait()
    led = Ledger(db)
    released = {e.job_id for e in led.entries(states=("released",))}
    assert set(acknowledged) <= released and len(acknowledged) >= 40
    led.close()


def test_bad_budgets_are_refused(ledger):
    for eps, delta in ((-1, 1e-5), (float("inf"), 1e-5), (1.0, 0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="budget"):
            ledger.set_budget("ct", eps, delta)


def test_estimate_projects_several_releases_against_each_budget(ledger):
    single = epsilon(GAUSS.events(), 1e-5)
    ledger.set_budget("ct", 1.3 * single, 1e-5, scientist="alice")
    one = ledger.estimate("ct", "alice", GAUSS, releases=1)
    assert one.dp and one.epsilon_per_release == pytest.approx(single) and one.budgets[0].fits
    three = ledger.estimate("ct", "alice", GAUSS, releases=3)
    [check] = three.budgets
    assert not check.fits and check.projected == pytest.approx(epsilon(GAUSS.events() * 3, 1e-5))
    assert check.spent == 0.0 and check.remaining == pytest.approx(1.3 * single)
    heuristic = ledger.estimate("ct", "alice", PERCENTILE)
    assert not heuristic.dp and heuristic.epsilon_per_release is None and heuristic.budgets[0].projected is None
    assert ledger.estimate("mri", "alice", GAUSS).budgets == []  # no budget applies
    assert ledger.entries() == []  # estimating spends nothing
