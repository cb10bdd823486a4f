"""Screenshots of the owner console for the docs: docs/console-requests.png (a pending request: its plan, what
changed against the plan approved before, the hash, the projected privacy cost) and docs/console-privacy.png (the
privacy report page). Starts a throwaway node (own CA, loopback) with a few releases in its ledger, then drives
Debian's chromium with Selenium, headless.

    .venv/bin/python scripts/console_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from voxgrid import unet_plan
from voxgrid.client import NodeClient
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.store import NodeStore, VolumeRecord
from voxgrid.pki import create_ca, issue_certificate
from voxgrid.privacy import Ledger, PrivacySpec

GAUSS = {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 6.0, "delta": 1e-5}


def plan(lr: float, noise: float):
    return unet_plan(["background", "pancreas", "tumor"], patch_size=(64, 64, 64), lr=lr, local_epochs=2,
                     privacy=GAUSS | {"noise_multiplier": noise})


def make_home(root: Path) -> Path:
    """A node home with dataset pancreas-ct under review, budgets, and releases of alice and bob in its ledger."""
    ca = create_ca(root / "ca")
    cert = issue_certificate(ca, root / "certs", "node-a", ["127.0.0.1"])
    admin.init_home("node", root / "home", "node-a", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    home = Home(root / "home")
    store = NodeStore(home.db_file)
    volumes = [VolumeRecord(f"case{i:02d}", f"/data/ct/case{i:02d}.nii.gz", f"/data/labels/case{i:02d}.nii.gz",
                            "nifti", "train" if i < 12 else "val") for i in range(16)]
    store.add_dataset("pancreas-ct", description="", tags=["#ct", "#pancreas"], modality="CT",
                      label_names={1: "pancreas", 2: "tumor"}, volumes=volumes)
    store.set_policy("pancreas-ct", "review", actor="owner")
    store.close()
    ledger = Ledger(home.db_file)
    ledger.set_budget("pancreas-ct", 8.0, 1e-5)
    ledger.set_budget("pancreas-ct", 4.0, 1e-5, scientist="alice")
    for i, (who, noise) in enumerate([("alice", 6.0), ("bob", 8.0), ("alice", 6.0), ("bob", 8.0), ("alice", 6.0)]):
        ledger.reserve(f"job-{i + 1}", who, "pancreas-ct", PrivacySpec.parse(GAUSS | {"noise_multiplier": noise}))
        ledger.release(f"job-{i + 1}")
    ledger.close()
    return home.path


def start(home: Path, log: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "voxgrid", "node", "start", "--home", str(home), "--port", "0",
                             "--console-port", "0"], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    run = Home(home).run_file
    while not run.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the node did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, json.loads(run.read_text())


def requests(home: Path, url: str) -> str:
    """alice's approved plan, then a changed one (learning rate, noise) left pending; the pending one's id."""
    ca, owner = Home(home).tls / "ca.crt", Home(home).owner_token_file.read_text().strip()
    alice = admin.issue_token(home, "node", "alice", "scientist")
    with NodeClient(url, alice, ca) as a, NodeClient(url, owner, ca) as o:
        first = a.request_approval("pancreas-ct", plan(2e-3, 6.0), releases=3, purpose="pancreas segmentation, "
                                   "multi-site baseline")
        o.approve(first.request_id, releases=3, days=30)
        return a.request_approval("pancreas-ct", plan(1e-2, 4.0), releases=5,
                                  purpose="higher learning rate after round 3 stalled").request_id


def chromium(home: Path, profile: Path) -> webdriver.Chrome:
    """Headless chromium trusting the node's key (its certificate chains to the federation CA only)."""
    cert = x509.load_pem_x509_certificate((Home(home).tls / "server.crt").read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                "--window-size=1366,900", f"--user-data-dir={profile}", "--force-device-scale-factor=1",
                f"--ignore-certificate-errors-spki-list={base64.b64encode(digest.finalize()).decode()}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))


def shoot(driver: webdriver.Chrome, url: str, out: Path, height: int | None = None) -> None:
    driver.get(url)
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1366, min(height or full, 4000))
    driver.get(url)
    driver.save_screenshot(str(out))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home = make_home(root)
        proc, run = start(home, root / "node.log")
        try:
            pending = requests(home, run["url"])
            driver = chromium(home, root / "chromium")
            try:
                driver.get(run["console"] + "login")
                driver.find_element(By.ID, "token").send_keys(Home(home).owner_token_file.read_text().strip())
                driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
                shoot(driver, f"{run['console']}requests/{pending}", args.out / "console-requests.png", 1500)
                shoot(driver, run["console"] + "privacy", args.out / "console-privacy.png", 1500)
            finally:
                driver.quit()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
