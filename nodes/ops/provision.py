"""Provisioning a federation from one project file: a startup kit per site and one for the grid.

``project.json``::

    {"federation": "pancreas-study",
     "grid":  {"name": "grid", "host": "grid.example.org", "port": 8443},
     "sites": [{"name": "node-a", "host": "node-a.hospital-a.org", "port": 8443},
               {"name": "node-b", "host": "node-b.hospital-b.org", "port": 443, "connect": "outbound"}, ...],
     "days": 825}                                      # optional: certificate validity

``voxgrid provision --project project.json --out DIR`` writes::

    DIR/ca/                 ca.crt, ca.key: the CA key stays here, in no kit; keep DIR/ca offline
    DIR/<grid>/             ca.crt, server.crt, server.key, kit.json, node-tokens.json, start.sh
    DIR/<site>/             ca.crt, server.crt, server.key, kit.json, grid.token, start.sh

A site's kit holds its own key and its own grid token (role ``node``, named after the site) and
nothing of any other site. The grid's kit holds only the SHA-256 hashes of the node tokens (the grid
stores tokens hashed anyway), which ``start.sh`` authorises with ``voxgrid grid import-tokens``.
``start.sh`` creates the home on its first run (``$VOXGRID_HOME``, default ``KIT/home``) and then
serves in the foreground; ``$VOXGRID`` picks the command, ``$VOXGRID_LISTEN`` the listen address.
A site with ``"connect": "outbound"`` listens on nothing and dials the grid (its ``host`` is then only
the name its certificate carries); its ``start.sh`` takes the site's forward proxy from
``$VOXGRID_PROXY`` and the proxy's credentials file from ``$VOXGRID_PROXY_CREDENTIALS`` (else
``HTTPS_PROXY``/``NO_PROXY`` apply).
Running provision again with the same DIR reuses the CA, leaves existing kits alone and adds kits for
new sites (the grid's node-tokens.json then lists them too: copy it to the grid and restart it).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from voxgrid.client import grid_credential
from voxgrid.pki import _san_entries, create_ca, issue_certificate, load_ca
from voxgrid.wire import NAME_RE

from voxgrid.nodes.service.db import Database, hash_token, new_token, now
from voxgrid.nodes.service.home import Home


class ProjectError(ValueError):
    """A malformed project file; the message names the field."""


class Server(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE.pattern)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    connect: Literal["direct", "outbound"] = "direct"  # sites only: outbound listens on nothing, dials the grid

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        _san_entries([v])  # ValueError: neither an IP address nor a DNS name
        return v

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


class Project(BaseModel):
    model_config = ConfigDict(extra="forbid")
    federation: str = Field(pattern=NAME_RE.pattern)
    grid: Server
    sites: list[Server] = Field(min_length=1)
    days: int = Field(default=825, ge=1, le=3650)

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[Server]) -> list[Server]:
        names = [s.name for s in sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"site names must be unique; repeated: {dupes}")
        return sites


def load_project(path: Path | str) -> Project:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProjectError(f"project file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ProjectError(f"{path}: not JSON: {exc}") from None
    try:
        project = Project.model_validate(data)
    except ValidationError as exc:
        raise ProjectError(f"{path}: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())) from None
    reserved = {"ca", project.grid.name}
    clash = [s.name for s in project.sites if s.name in reserved]
    if clash:
        raise ProjectError(f"{path}: sites: name(s) {clash} clash with the grid's name or the 'ca' folder")
    return project


def _secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text + "\n")


def _start_script(kind: str, server: Server, federation: str, grid: Server) -> str:
    q = shlex.quote
    init = [f'"$VOXGRID" {kind} init --home "$HOME_DIR" --name {q(server.name)} --ca "$KIT/ca.crt"',
            '--cert "$KIT/server.crt" --key "$KIT/server.key" --host "$LISTEN"',
            f"--port {server.port} --public-url {q(server.url)}"]
    if kind == "node":
        init.append(f'--grid {q(grid.url)} --grid-token-file "$KIT/grid.token"')
    if kind == "node" and server.connect == "outbound":
        init.append('--connect outbound ${VOXGRID_PROXY:+--proxy "$VOXGRID_PROXY"} '
                    '${VOXGRID_PROXY_CREDENTIALS:+--proxy-credentials "$VOXGRID_PROXY_CREDENTIALS"}')
    lines = [
        "#!/bin/sh",
        f"# voxgrid startup kit: {kind} {server.name} of federation {federation}.",
        "# First run: creates the home (VOXGRID_HOME, default KIT/home). Then serves in the foreground;",
        "# SIGTERM or Ctrl-C stops it. Extra arguments go to 'voxgrid " + kind + " start' (e.g. --port 0).",
        "set -eu",
        'KIT=$(cd "$(dirname "$0")" && pwd)',
        'VOXGRID=${VOXGRID:-voxgrid}',
        'HOME_DIR=${VOXGRID_HOME:-$KIT/home}',
        'LISTEN=${VOXGRID_LISTEN:-0.0.0.0}',
        f'if [ ! -f "$HOME_DIR/{kind}.json" ]; then',
        "    " + " \\\n        ".join(init),
        "fi",
    ]
    if kind == "grid":
        lines.append('"$VOXGRID" grid import-tokens --home "$HOME_DIR" --file "$KIT/node-tokens.json"')
    lines.append(f'exec "$VOXGRID" {kind} start --home "$HOME_DIR" "$@"')
    return "\n".join(lines) + "\n"


def _kit(out: Path, ca, kind: str, server: Server, project: Project) -> Path:
    kit = out / server.name
    kit.mkdir(mode=0o700)
    os.chmod(kit, 0o700)
    cert = issue_certificate(ca, kit, server.name, [server.host], days=project.days)  # CN: the server's name
    os.replace(cert.cert, kit / "server.crt")
    os.replace(cert.key, kit / "server.key")
    (kit / "ca.crt").write_bytes(Path(ca.cert).read_bytes())
    meta = {"federation": project.federation, "kind": kind, "name": server.name, "host": server.host,
            "port": server.port, "url": server.url, "grid_url": project.grid.url, "connect": server.connect}
    (kit / "kit.json").write_text(json.dumps(meta, indent=1) + "\n")
    script = kit / "start.sh"
    script.write_text(_start_script(kind, server, project.federation, project.grid))
    script.chmod(0o755)
    return kit


def provision(project_file: Path | str, out: Path | str) -> dict:
    """Write the CA (once) and every missing kit; returns {"ca": ..., "created": [...], "kept": [...]}."""
    project = load_project(project_file)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ca_dir = out / "ca"
    if (ca_dir / "ca.crt").exists() or (ca_dir / "ca.key").exists():
        ca = load_ca(ca_dir)
    else:
        ca = create_ca(ca_dir, common_name=f"voxgrid {project.federation} CA")
    os.chmod(ca_dir, 0o700)
    created, kept = [], []
    gkit = out / project.grid.name
    hashes_file = gkit / "node-tokens.json"
    if gkit.exists():
        kept.append(project.grid.name)
        hashes = json.loads(hashes_file.read_text())
    else:
        _kit(out, ca, "grid", project.grid, project)
        created.append(project.grid.name)
        hashes = []
    for site in project.sites:
        if (out / site.name).exists():
            kept.append(site.name)
            continue
        kit = _kit(out, ca, "node", site, project)
        token = new_token()
        _secret(kit / "grid.token", token)
        hashes = [h for h in hashes if h["name"] != site.name]
        # the grid checks the credential its holder sends it, never the token itself
        hashes.append({"name": site.name, "role": "node", "token_hash": hash_token(grid_credential(token))})
        created.append(site.name)
    hashes_file.write_text(json.dumps(hashes, indent=1) + "\n")
    return {"ca": str(ca.cert), "grid_url": project.grid.url, "created": created, "kept": kept,
            "kits": {s: str(out / s) for s in [project.grid.name, *(x.name for x in project.sites)]}}


def import_token_hashes(path: Path | str, file: Path | str, kind: str = "grid") -> int:
    """Authorise tokens known only by their SHA-256 hash (a provisioned grid's node-tokens.json).

    Idempotent; a token already revoked stays revoked. Returns how many entries the file held.
    """
    home = Home(path, kind)
    home.load()
    entries = json.loads(Path(file).read_text())
    roles = ("scientist", "node") if kind == "grid" else ("scientist",)
    for e in entries:
        if set(e) != {"name", "role", "token_hash"} or e["role"] not in roles or not NAME_RE.match(e["name"]) \
                or len(e["token_hash"]) != 64:
            raise ValueError(f"{file}: malformed token entry {e!r} (expected name, role in {roles}, token_hash)")
    db = Database(home.db_file, "")
    try:
        with db.transaction() as c:
            for e in entries:
                c.execute("INSERT OR IGNORE INTO tokens(token_hash, name, role, created_at, revoked) "
                          "VALUES (?,?,?,?,0)", (e["token_hash"], e["name"], e["role"], now()))
        db.audit("owner", "token.import", f"{len(entries)} token hashes from {Path(file).name}")
    finally:
        db.close()
    return len(entries)
