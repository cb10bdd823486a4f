"""The owner console (nodes/http/console.py) of a real node process, over real HTTPS checked against the
federation CA: sessions, CSRF and Origin checks, bad input, the audit filters, the privacy report's parity with
the file, and, in Debian's chromium driven by Selenium, an owner approving a request a scientist then uses."""

import html
import json
import math
import re
import shutil
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from homes import cube_volumes, node_home, serving

from voxgrid import Experiment, unet_plan
from voxgrid.cli import main
from voxgrid.client import NodeClient
from voxgrid.experiment import RoundFailed
from voxgrid.nodes.http.console_sessions import ANONYMOUS_S, IDLE_S, MAX_AGE_S, Sessions, csrf_ok
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.store import NodeStore
from voxgrid.pki import create_ca, issue_certificate
from voxgrid.pointers import DatasetPointer

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def plan(lr=2e-3):
    return unet_plan(["background", "pancreas"], patch_size=(16, 16, 16), channels=(4, 8), strides=(2,),
                     num_res_units=0, lr=lr, local_epochs=1, steps_per_epoch=1, batch_size=1, samples_per_volume=1)




@dataclass
class Node:
    home: Path
    url: str
    ca: Path
    console: str  # https://127.0.0.1:PORT/
    owner: str
    alice: str

    @property
    def origin(self) -> str:
        return self.console.rstrip("/")

    def client(self, **headers) -> httpx.Client:
        """An HTTPS client of the console that checks its certificate against the federation CA."""
        return httpx.Client(base_url=self.origin, verify=ssl.create_default_context(cafile=str(self.ca)),
                            headers={"origin": self.origin, **headers}, timeout=30)

    def owner_api(self) -> NodeClient:
        return NodeClient(self.url, self.owner, self.ca, timeout=60)

    def alice_api(self) -> NodeClient:
        return NodeClient(self.url, self.alice, self.ca, timeout=60)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A real node process (dataset 'ct' under review) with its owner console on a free loopback port."""
    tmp = tmp_path_factory.mktemp("console")
    home = node_home(tmp, volumes=cube_volumes(tmp / "data")).path
    assert main(["node", "policy", "set", "--home", str(home), "--dataset", "ct", "--policy", "review"]) == 0
    alice = admin.issue_token(home, "node", "alice", "scientist")
    with serving(home, tmp / "node.log", args=("--console-port", "0")) as (url, ca):
        console = json.loads(Home(home).run_file.read_text())["console"]
        yield Node(home, url, ca, console, Home(home).owner_token_file.read_text().strip(), alice)


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def alert(page: str) -> str:
    return html.unescape(re.search(r'role="alert">(.*?)</p>', page, re.S).group(1))


def login(client: httpx.Client, token: str) -> str:
    """Log ``client`` in; returns the session's CSRF token."""
    r = client.post("/login", data={"csrf": csrf_of(client.get("/login").text), "token": token})
    assert r.status_code == 303 and r.headers["location"] == "/requests", r.text
    return csrf_of(client.get("/requests").text)


def ask(node: Node, lr: float, purpose: str = "liver cohort") -> str:
    """A pending request of alice's for a plan with learning rate ``lr``; its id."""
    with node.alice_api() as alice:
        return alice.request_approval("ct", plan(lr), releases=2, purpose=purpose).request_id


def state(node: Node, request_id: str):
    with node.owner_api() as owner:
        return owner.request(request_id)


@pytest.mark.slow  # a real node process
def test_login_sets_a_strict_session_cookie_and_logout_ends_it(node):
    with node.client() as c:
        r = c.get("/requests")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/requests"
        assert r.headers["content-security-policy"].startswith("default-src 'none'")
        elsewhere = httpx.get(node.url + "/login", verify=ssl.create_default_context(cafile=str(node.ca)))
        assert elsewhere.status_code in (401, 404) and "Owner token" not in elsewhere.text  # not on the API's port
        page = c.get("/login")
        cookie = page.headers["set-cookie"]
        assert cookie.startswith("__Host-voxgrid-console=") and "HttpOnly" in cookie and "Secure" in cookie
        assert "samesite=strict" in cookie.lower() and "Path=/" in cookie
        anonymous = c.cookies["__Host-voxgrid-console"]
        # a scientist's token or a wrong one opens nothing
        for token, status, words in ((node.alice, 403, "scientist's token"), ("vxg_nope", 401, "not valid")):
            r = c.post("/login", data={"csrf": csrf_of(page.text), "token": token})
            assert r.status_code == status and words in alert(r.text)
            assert c.get("/requests").status_code == 303
        csrf = login(c, node.owner)
        assert c.cookies["__Host-voxgrid-console"] != anonymous  # a new id once logged in
        assert c.get("/requests").status_code == 200
        assert c.post("/logout", data={"csrf": csrf}).headers["location"] == "/login"
        assert c.get("/requests").status_code == 303
    with node.client() as c:  # the old id and CSRF token are dead too
        c.cookies.set("__Host-voxgrid-console", anonymous)
        r = c.post("/policies", data={"csrf": csrf, "dataset": "ct", "policy": "open"})
        assert r.status_code == 401 and "Not logged in" in r.text
    store = NodeStore(Home(node.home).db_file)
    assert store.policies() == {"ct": "review"}
    store.close()


@pytest.mark.slow  # a real node process
def test_forms_without_session_csrf_token_or_origin_change_nothing(node):
    rid = ask(node, 3e-3)
    with node.client() as c:
        r = c.post(f"/requests/{rid}/approve", data={"releases": "1"})
        assert r.status_code == 401 and "session has ended or never began" in alert(r.text)
        csrf = login(c, node.owner)
        port = node.origin.rsplit(":", 1)[1]
        rebound = {"host": f"evil.example:{port}", "origin": f"https://evil.example:{port}"}  # DNS rebinding
        for data, headers, words in (({"releases": "1"}, {}, "CSRF token is missing"),
                                     ({"releases": "1", "csrf": "x" + csrf}, {}, "CSRF token is missing or wrong"),
                                     ({"csrf": csrf}, {"origin": "https://evil.example"}, "not from this console"),
                                     ({"csrf": csrf}, {"origin": None}, "neither Origin nor Referer"),
                                     ({"csrf": csrf}, rebound, "not one this console answers to")):
            c.headers.pop("origin")
            r = c.post(f"/requests/{rid}/approve", data=data,
                       headers={k: v for k, v in ({"origin": node.origin} | headers).items() if v is not None})
            c.headers["origin"] = node.origin
            assert r.status_code == 403 and words in alert(r.text), (data, headers, r.text[-400:])
        r = c.post(f"/requests/{rid}/approve", json={"csrf": csrf, "releases": 1})  # not a form
        assert r.status_code == 415
    assert state(node, rid).state == "pending"


@pytest.mark.slow  # a real node process
def test_bad_decisions_get_error_pages_and_change_nothing(node):
    rid = ask(node, 4e-3)
    with node.client() as c:
        csrf = login(c, node.owner)
        r = c.post("/requests/r000000000000/approve", data={"csrf": csrf})
        assert r.status_code == 404 and "no request 'r000000000000'" in alert(r.text)
        r = c.post(f"/requests/{rid}/deny", data={"csrf": csrf, "reason": "  "})
        assert r.status_code == 422 and "needs a reason" in alert(r.text)
        r = c.post(f"/requests/{rid}/approve", data={"csrf": csrf, "releases": "0"})
        assert r.status_code == 422 and "releases" in alert(r.text)
        assert state(node, rid).state == "pending"
        r = c.post(f"/requests/{rid}/approve", data={"csrf": csrf, "releases": "3", "days": "2"})
        assert r.status_code == 303 and r.headers["location"] == f"/requests/{rid}"
        assert "approved: 3 release(s)" in html.unescape(c.get(r.headers["location"]).text)
        for verb in ("approve", "deny"):
            r = c.post(f"/requests/{rid}/{verb}", data={"csrf": csrf, "releases": "9", "reason": "late"})
            assert r.status_code == 409 and "already approved" in alert(r.text)
    after = state(node, rid)
    assert after.state == "approved" and after.releases == 3
    with node.owner_api() as owner:
        approvals = [e for e in owner.audit(500) if e.action == "request.approve" and rid in e.detail]
    assert len(approvals) == 1 and approvals[0].actor == "owner"  # as the CLI writes it


@pytest.mark.slow  # a real node process
def test_a_revoked_owner_token_ends_its_session(node):
    second = admin.issue_token(node.home, "node", "deputy", "owner")
    with node.client() as c, node.client() as deputy:
        csrf = login(c, node.owner)
        login(deputy, second)
        ids = re.findall(r'<td class="mono">([0-9a-f]+)</td><td><b>deputy</b>', c.get("/tokens").text)
        assert len(ids) == 1
        r = c.post(f"/tokens/{ids[0]}/revoke", data={"csrf": csrf})
        assert r.status_code == 303 and "revoked" in html.unescape(c.get("/tokens").text)
        assert deputy.get("/requests").status_code == 303  # back to the login page


@pytest.mark.slow  # a real node process
def test_policies_show_and_set_with_rules(node):
    with node.client() as c:
        csrf = login(c, node.owner)
        r = c.post("/policies", data={"csrf": csrf, "dataset": "ct", "policy": "review", "max_patch_size": "32"})
        assert r.status_code == 422 and "apply only to the 'rules' policy" in alert(r.text)
        r = c.post("/policies", data={"csrf": csrf, "dataset": "ct", "policy": "rules", "max_patch_size": "-1"})
        assert r.status_code == 422 and "max_patch_size" in alert(r.text)
        r = c.post("/policies", data={"csrf": csrf, "dataset": "ct", "policy": "rules", "require_dp": "true",
                                      "networks": "UNet, SegResNet", "max_patch_size": "32", "max_rounds": "4"})
        assert r.status_code == 303
        page = html.unescape(c.get("/policies").text)
        assert "networks: ['UNet', 'SegResNet']" in page and "max patch size: 32" in page
        with node.owner_api() as owner:
            (ct,) = owner.policies()
        assert ct.policy == "rules" and ct.rules.max_patch_size == 32 and ct.rules.max_rounds == 4
        assert c.post("/policies", data={"csrf": csrf, "dataset": "ct", "policy": "review"}).status_code == 303
        assert "now 'review'" in html.unescape(c.get("/policies").text)


def test_init_puts_the_console_on_loopback_unless_told_otherwise(tmp_path):
    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "node-a", ["127.0.0.1"])
    tls = ["--name", "node-a", "--ca", str(ca.cert), "--cert", str(cert.cert), "--key", str(cert.key)]
    for flags, where in (([], ("127.0.0.1", 8444)), (["--console-port", "off"], ("127.0.0.1", None)),
                         (["--console-host", "::1", "--console-port", "9443"], ("::1", 9443))):
        home = tmp_path / f"home-{len(flags)}"
        assert main(["node", "init", "--home", str(home), *tls, *flags]) == 0
        cfg = Home(home).load()
        assert (cfg.console_host, cfg.console_port) == where


def test_sessions_end_when_idle_or_too_old():
    sessions = Sessions()
    anonymous, owner, old = sessions.new(), sessions.new("vxg_t", "owner"), sessions.new("vxg_t", "owner")
    assert sessions.get(owner.sid) is owner and sessions.get("nope") is None
    anonymous.created -= ANONYMOUS_S + 1
    owner.seen -= IDLE_S + 1
    old.created -= MAX_AGE_S + 1
    assert [sessions.get(s.sid) for s in (anonymous, owner, old)] == [None, None, None]
    assert not csrf_ok(None, "x") and not csrf_ok(old, "") and csrf_ok(old, old.csrf)


@pytest.mark.slow  # a real node process
def test_audit_filters_and_the_privacy_report_is_the_files(node, tmp_path):
    with node.client() as c:
        csrf = login(c, node.owner)
        # bob's budget: alice's jobs (no DP) in the browser test stay allowed
        r = c.post("/budgets", data={"csrf": csrf, "dataset": "ct", "scientist": "bob", "epsilon": "6",
                                     "delta": "1e-5"})
        assert r.status_code == 303
        budgets = html.unescape(c.get("/budgets").text)
        assert "Spend and what remains" in budgets and "bob" in budgets and "ε 6 at δ=1e-05" in budgets
        mine = c.get("/audit", params={"actor": "owner", "action": "budget."}).text
        assert "budget.set" in mine and "request.create" not in mine and "policy.set" not in mine
        theirs = c.get("/audit", params={"actor": "alice"}).text
        assert "request.create" in theirs and "budget.set" not in theirs
        assert "0 entries" in c.get("/audit", params={"until": "2001-01-01"}).text
        assert c.get("/audit", params={"since": "yesterday"}).status_code == 422
        console = c.get("/privacy").text
        download = c.get("/privacy-report.html").text
    _, page = admin.privacy_report(node.home, tmp_path / "report")

    def report(doc: str) -> str:  # the report's content, less the minute it was generated at
        body = doc[doc.index('<main class="report">'):doc.index("</main>")]
        return re.sub(r"Generated [^<]* UTC", "Generated", body)

    assert report(console) == report(page.read_text()) == report(download)
    assert "Summary per dataset and scientist" in report(console) and "budget, bob: ε 6" in report(console)


def browser(tmp: Path, cert: Path):
    """Headless Debian chromium (Selenium) that trusts the node's key: its certificate chains to the federation
    CA, which no browser store holds; pinning that one key keeps every other certificate check."""
    import base64

    webdriver = pytest.importorskip("selenium.webdriver")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them)")
    spki = x509.load_pem_x509_certificate(cert.read_bytes()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                f"--user-data-dir={tmp / 'chromium'}", "--no-first-run", "--disable-extensions",
                f"--ignore-certificate-errors-spki-list={base64.b64encode(digest.finalize()).decode()}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def scientist_waits_then_trains(node: Node, p, out: dict) -> None:
    """Alice's experiment: its round is refused (approval needed: the node records a request), it waits for the
    owner's decision (Experiment.wait_for_approvals), then runs the round."""
    with node.alice_api() as client:
        exp = Experiment(p, [DatasetPointer("node-a", node.url, client.dataset("ct"), client)], rounds=1,
                         evaluate=False, job_timeout=120)
        try:
            exp.run_round()
            out["error"] = "the round ran without approval"
            return
        except RoundFailed as exc:
            out["refused"] = str(exc)
        out["request"] = next(r.request_id for r in client.requests() if r.plan_hash == p.content_hash)
        out["asked"].set()
        out["approvals"] = exp.wait_for_approvals(timeout=90, poll=0.2)
        out["round"] = exp.run_round()


@pytest.mark.slow  # a real node process
def test_owner_approves_in_a_real_browser_and_the_waiting_job_runs(node, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    driver = browser(tmp_path, node.home / "tls" / "server.crt")
    p, out = plan(lr=1e-3), {"asked": threading.Event()}
    alice = threading.Thread(target=scientist_waits_then_trains, args=(node, p, out), daemon=True)
    alice.start()
    try:
        driver.get(node.console + "requests")  # not logged in: the login page, then back here
        driver.find_element(By.ID, "token").send_keys(node.owner)
        driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
        WebDriverWait(driver, 30).until(expected_conditions.url_to_be(node.console + "requests"))
        assert out["asked"].wait(60), out
        driver.refresh()
        driver.find_element(By.LINK_TEXT, out["request"]).click()
        page = driver.find_element(By.TAG_NAME, "body").text
        algorithm, *blocks = driver.find_element(By.CLASS_NAME, "hash").text.split()
        assert f"{algorithm}:{''.join(blocks)}" == p.content_hash and {len(b) for b in blocks} == {8}
        assert "optimizer.lr" in page and "alice" in page and "Projected privacy cost" in page
        driver.find_element(By.CSS_SELECTOR, "button.approve").click()
        flash = WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((By.CLASS_NAME, "flash")))
        assert "approved" in flash.text
    finally:
        driver.quit()
    alice.join(150)
    assert "error" not in out and "approval" in out["refused"] and out["approvals"].approved, out
    (site,) = out["round"].sites
    assert site.ok and site.samples > 0 and math.isfinite(site.loss), site
    with node.owner_api() as owner:
        used = [e for e in owner.audit(500) if e.action == "approval.use" and out["request"] in e.detail]
    assert len(used) == 1 and used[0].actor == "alice"
