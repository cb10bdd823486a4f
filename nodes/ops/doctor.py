"""``voxgrid node doctor``: check a node (or grid) home and say what is wrong, one line per check.

Each check returns ``ok``, ``warn`` or ``fail`` with a reason a site's IT person can act on. Any
``fail`` makes the command exit non-zero, so the doctor can gate a service start or a container
health check. Nothing here changes the home (the writability probe removes its own file).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from voxgrid.nodes.service.home import Home, HomeError, ServerConfig
from voxgrid.nodes.worker.devices import CudaProbe, host_has_nvidia_gpu, no_cuda_reason, probe_torch

OK, WARN, FAIL = "ok", "warn", "fail"
CERT_WARN_DAYS = 30
DISK_WARN_BYTES = 5 * 1024**3
_ANY_ADDRESS = {"0.0.0.0", "::", ""}


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    reason: str

    def line(self) -> str:
        return f"{self.status.upper():4} {self.name:11} {self.reason}"


def _cert_hosts(cert) -> tuple[list[str], list]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)


def _names_host(cert, host: str) -> bool:
    dns, ips = _cert_hosts(cert)
    try:
        return ipaddress.ip_address(host) in ips
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in (n.lower() for n in dns):
        if name == host or (name.startswith("*.") and host.split(".", 1)[-1] == name[2:] and "." in host):
            return True
    return False


def configured_host(cfg: ServerConfig) -> str | None:
    """The host name clients use: the public URL's host, else the listen address (None for 0.0.0.0)."""
    if cfg.connect == "outbound":
        return urlsplit(cfg.public_url or f"https://{cfg.name}").hostname
    if cfg.public_url:
        return urlsplit(cfg.public_url).hostname
    return None if cfg.host in _ANY_ADDRESS else cfg.host


def check_config(home: Home) -> tuple[Check, ServerConfig | None]:
    try:
        cfg = home.load()
    except (HomeError, OSError) as exc:
        return Check("config", FAIL, str(exc)), None
    return Check("config", OK, f"{home.config_file} readable: {cfg.kind} {cfg.name!r}, port {cfg.port}"), cfg


def check_certificate(home: Home, cfg: ServerConfig | None, now: dt.datetime | None = None) -> Check:
    """server.crt is signed by the home's CA, within its validity, and names the configured host."""
    from cryptography import x509

    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        ca = x509.load_pem_x509_certificate((home.tls / "ca.crt").read_bytes())
        cert = x509.load_pem_x509_certificate((home.tls / "server.crt").read_bytes())
    except (OSError, ValueError) as exc:
        return Check("certificate", FAIL, f"cannot read TLS certificates in {home.tls}: {exc}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        return Check("certificate", FAIL, f"server.crt (issuer {cert.issuer.rfc4514_string()}) was not issued by "
                                          f"the federation CA in tls/ca.crt ({exc}): a foreign certificate")
    except Exception as exc:  # cryptography raises InvalidSignature, which is no ValueError
        return Check("certificate", FAIL, f"server.crt signature does not verify against tls/ca.crt "
                                          f"({type(exc).__name__}): a foreign certificate")
    for which, c in (("CA certificate", ca), ("server.crt", cert)):
        if now < c.not_valid_before_utc:
            return Check("certificate", FAIL, f"{which} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M}Z")
        if now >= c.not_valid_after_utc:
            fix = (f"rotate it: 'voxgrid {home.kind} cert rotate --home {home.path} --bundle KIT' (or --ca-dir CA)"
                   if c is cert else "the federation needs a new CA and new certificates")
            return Check("certificate", FAIL, f"{which} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M}Z; {fix}")
    host = configured_host(cfg) if cfg else None
    if host and not _names_host(cert, host):
        dns, ips = _cert_hosts(cert)
        return Check("certificate", FAIL, f"server.crt does not name the configured host {host!r} "
                                          f"(it names {', '.join([*dns, *map(str, ips)]) or 'nothing'})")
    days = (min(cert.not_valid_after_utc, ca.not_valid_after_utc) - now).days
    named = f", names {host}" if host else " (listening on all addresses: host name not checked)"
    if days < CERT_WARN_DAYS:
        return Check("certificate", WARN, f"expires in {days} days{named}; renew it soon "
                                          f"('voxgrid {home.kind} cert rotate')")
    return Check("certificate", OK, f"issued by the federation CA, valid {days} more days{named}")


def check_key(home: Home) -> Check:
    """server.key is the certificate's private key and readable by its owner only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key_file = home.tls / "server.key"
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((home.tls / "server.crt").read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        return Check("key", FAIL, f"cannot read {key_file}: {exc}")
    if key.public_key() != cert.public_key():
        return Check("key", FAIL, f"{key_file} is not the private key of server.crt")
    mode = key_file.stat().st_mode & 0o777
    if mode & 0o077:
        return Check("key", FAIL, f"{key_file} has mode {mode:04o}; it must be 0600 (chmod 600 {key_file})")
    return Check("key", OK, "matches server.crt, mode 0600")


def check_store(home: Home) -> Check:
    """The SQLite store opens read-write, passes integrity_check, and the home folder is writable."""
    if not home.db_file.is_file():
        return Check("store", FAIL, f"{home.db_file} is missing")
    try:
        con = sqlite3.connect(f"{home.db_file.as_uri()}?mode=rw", uri=True, timeout=5)
        try:
            result = con.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as exc:
        return Check("store", FAIL, f"{home.db_file} does not open: {exc}")
    if result != "ok":
        return Check("store", FAIL, f"{home.db_file} integrity_check: {result}")
    try:
        with tempfile.NamedTemporaryFile(dir=home.path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("store", FAIL, f"{home.path} is not writable: {exc}")
    return Check("store", OK, f"{home.db_file.name} integrity ok, {home.path} writable")


def check_grid(home: Home, cfg: ServerConfig | None, timeout: float = 3.0) -> Check:
    """The grid answers over TLS (federation CA) and accepts this node's grid token."""
    if cfg is None or cfg.kind != "node":
        return Check("grid", OK, "not a node: nothing to reach")
    if not cfg.grid_url:
        return Check("grid", OK, "no grid configured (scientists connect to this node directly)")
    token_file = home.path / (cfg.grid_token_file or "grid.token")
    if not token_file.is_file():
        return Check("grid", FAIL, f"grid {cfg.grid_url} configured but no grid token at {token_file}")
    from voxgrid.client import AuthError, GridClient, VoxgridError
    from voxgrid.nodes.http.dialer import Route

    try:
        proxy = Route.of_node(home, cfg).httpx_proxy()
    except (OSError, ValueError) as exc:
        return Check("grid", FAIL, f"proxy settings unusable: {exc}")

    try:
        with GridClient(cfg.grid_url, token_file.read_text().strip(), home.tls / "ca.crt", timeout=timeout,
                        via=proxy) as g:
            who = g.whoami()
    except AuthError as exc:
        return Check("grid", FAIL, f"grid {cfg.grid_url} refused this node's token: {exc}")
    except (VoxgridError, OSError) as exc:
        return Check("grid", FAIL, f"grid {cfg.grid_url} unreachable: {exc}")
    if who.role != "node" or who.name != cfg.name:
        return Check("grid", FAIL, f"grid token is {who.role} {who.name!r}, not node {cfg.name!r}: "
                                   f"the grid will refuse registration")
    return Check("grid", OK, f"{cfg.grid_url} reachable over TLS, token accepted as node {who.name!r}")


def check_outbound(home: Home, cfg: ServerConfig | None) -> Check:
    """Outbound mode: every hop to the grid (proxy, proxy CONNECT, TLS, token), naming the one that fails."""
    if cfg is None or cfg.kind != "node" or cfg.connect != "outbound":
        return Check("outbound", OK, "direct mode: scientists connect to this node's own port")
    import asyncio

    from voxgrid.nodes.http.dialer import Route, check_path

    try:
        route = Route.of_node(home, cfg)
    except (OSError, ValueError) as exc:
        return Check("outbound", FAIL, str(exc))
    hops = asyncio.run(check_path(route))
    path = " -> ".join(f"{hop} {'ok' if ok else 'FAILED'}" for hop, ok, _ in hops)
    hop, ok, detail = hops[-1]
    if not ok:
        return Check("outbound", FAIL, f"{path}: the '{hop}' hop failed: {detail}")
    via = f"via proxy {route.proxy}" if route.proxy else "without a proxy"
    return Check("outbound", OK, f"{path}: the grid {cfg.grid_url} relays to this node ({via}); it listens on "
                                 "no network port")


def check_gpu(cfg: ServerConfig | None, probe: Callable[[], CudaProbe] | None = None,
              host_gpu: Callable[[], bool] = host_has_nvidia_gpu) -> Check:
    """Whether jobs will run on a GPU. ``probe``: what torch says (default: ask the installed torch);
    ``host_gpu``: whether the machine has an NVIDIA GPU (the driver's /proc file, or nvidia-smi on PATH).

    WARN when the machine has a GPU that torch cannot use (a CPU-only torch build, or no device
    visible to it): jobs would run on the CPU. OK "jobs run on the CPU" only without a GPU."""
    device = cfg.device if cfg else "auto"
    if probe is None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            return Check("gpu", FAIL, f"torch does not import: {exc}")
        probe = partial(probe_torch, names=True)
    p = probe()
    if p.usable:
        return Check("gpu", OK, f"{len(p.names) or p.device_count} CUDA device(s): "
                                f"{', '.join(p.names) or 'unnamed'} (device {device})")
    has_gpu = host_gpu()
    why = no_cuda_reason(p, has_gpu)
    if device.startswith("cuda"):
        return Check("gpu", FAIL, f"device {device!r} configured but torch cannot use a GPU: {why}")
    if device == "cpu":
        return Check("gpu", OK, f"device 'cpu' configured: jobs run on the CPU ({why})")
    if has_gpu:
        return Check("gpu", WARN, f"this machine has an NVIDIA GPU but jobs would run on the CPU: {why}")
    return Check("gpu", OK, f"no GPU on this machine ({why}); jobs run on the CPU")


def check_disk(home: Home, warn_bytes: int = DISK_WARN_BYTES) -> Check:
    try:
        free = shutil.disk_usage(home.path).free
    except OSError as exc:
        return Check("disk", FAIL, f"cannot stat {home.path}: {exc}")
    text = f"{free / 1024**3:.1f} GiB free at {home.path}"
    if free < warn_bytes:
        return Check("disk", WARN, f"{text} (under {warn_bytes / 1024**3:.0f} GiB)")
    return Check("disk", OK, text)


def check_storage(home: Home, cfg: ServerConfig | None) -> Check:
    """What stored weights and updates take, the most any scientist is charged, and the storage policy."""
    if cfg is None or cfg.kind != "node":
        return Check("storage", OK, "not a node: no blobs")
    from voxgrid.nodes.service.blobs import StoragePolicy, human, storage_report

    try:
        policy = StoragePolicy.parse(cfg.storage)
    except ValueError as exc:
        return Check("storage", FAIL, f"{home.config_file.name}: {exc}")
    r = storage_report(home, policy)
    w, u, who = r["weights"], r["updates"], r["scientists"]
    top = max(who.items(), key=lambda kv: kv[1]["bytes"], default=None)
    text = (f"weights {w['files']} file(s) {human(w['bytes'])}, updates {u['files']} file(s) {human(u['bytes'])}; "
            f"{len(who)} scientist(s) charged" + (f", most {top[0]!r} {human(top[1]['bytes'])} in {top[1]['blobs']} "
                                                  f"blob(s)" if top else "") +
            f"; quota {human(policy.quota_bytes)} / {policy.quota_blobs} blobs per scientist, weights expire after "
            f"{policy.weights_ttl_hours:g} h unused, updates {policy.updates_ttl_hours:g} h after their job")
    full = [s for s, v in who.items()
            if v["bytes"] >= 0.9 * policy.quota_bytes or v["blobs"] >= 0.9 * policy.quota_blobs]
    if full:
        return Check("storage", WARN, f"{text}; at 90% of the quota or more: {', '.join(full)}")
    return Check("storage", OK, text)


def diagnose(path: Path | str, kind: str = "node", *, timeout: float = 3.0, gpu: bool = True,
             now: dt.datetime | None = None) -> list[Check]:
    """Every check of a home, in order. ``gpu=False`` skips importing torch (the grid needs none)."""
    home = Home(path, kind)
    if not home.path.is_dir():
        return [Check("config", FAIL, f"no {kind} home folder at {home.path}")]
    config, cfg = check_config(home)
    checks = [config, check_certificate(home, cfg, now), check_key(home), check_store(home),
              check_grid(home, cfg, timeout), check_outbound(home, cfg)]
    if gpu:
        checks.append(check_gpu(cfg))
    checks.append(check_disk(home))
    checks.append(check_storage(home, cfg))
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


def as_json(checks: list[Check]) -> dict:
    return {"ok": not failed(checks), "checks": [asdict(c) for c in checks]}


def summary(checks: list[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    return f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail"

