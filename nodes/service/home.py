"""A server's home folder: configuration, TLS material, SQLite store, blobs.

Layout (node)::

    HOME/node.json        name, listen address, public URL, grid URL, data roots
    HOME/node.db          registry, jobs, tokens, audit log (SQLite)
    HOME/owner.token      the owner's token (mode 0600)
    HOME/tls/             server.crt, server.key, ca.crt; backup/: pairs replaced by 'cert rotate'
    HOME/blobs/           global weights received (safetensors, content-addressed)
    HOME/updates/         updates computed by jobs (safetensors, one per job)
    HOME/cache/           volumes converted from DICOM
    HOME/local-state/     tensors a site keeps across rounds (FedBN normalisation layers)
    HOME/run.json         written when the server listens: URL, process id, owner console URL

A grid's home is the same minus blobs/updates/cache, with ``grid.json`` and ``grid.db``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from voxgrid.wire import NAME_RE

if TYPE_CHECKING:
    from voxgrid.datasets.folder import DataRoots


class ConfigSection(BaseModel):
    """A section of ``node.json`` (``limits``, ``storage``): typed, unknown keys refused."""

    model_config = ConfigDict(extra="forbid")
    section: ClassVar[str]

    @classmethod
    def parse(cls, data: dict | None):
        """From the section's dict (None: every default); ValueError naming the bad key."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ValueError("; ".join(f"{cls.section}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                       for e in exc.errors())) from None


class HomeError(ValueError):
    """A home folder that is missing, incomplete or malformed."""


def check_data_roots(paths) -> list[str]:
    """Data roots as absolute, symlink-free paths; each must be an existing folder (HomeError naming it)."""
    out = []
    for p in paths:
        resolved = Path(p).expanduser().resolve()
        if not resolved.is_dir():
            raise HomeError(f"data root {p} does not exist or is not a folder")
        out.append(str(resolved))
    return sorted(set(out))


@dataclass
class ServerConfig:
    name: str
    kind: str  # "node" | "grid"
    host: str = "127.0.0.1"
    port: int = 8443
    public_url: str | None = None
    grid_url: str | None = None
    grid_token_file: str | None = None
    connect: str = "direct"  # node: "direct" (listens on host:port) or "outbound" (dials grid_url; listens on nothing)
    proxy: str | None = None  # node: forward proxy to the grid (http://host:port); None: HTTPS_PROXY/NO_PROXY
    proxy_credentials_file: str | None = None  # node: file (in the home) holding "user:password" for the proxy
    device: str = "auto"
    threads: int = 0
    extra: dict = field(default_factory=dict)
    data_roots: list[str] = field(default_factory=list)  # node: folders volumes may come from ([]: anywhere)
    limits: dict = field(default_factory=dict)  # node: the owner's job limits (nodes.limits.JobLimits; {}: defaults)
    storage: dict = field(default_factory=dict)  # node: quotas and expiry of blobs (nodes.blobs.StoragePolicy)
    # node: the owner console (nodes/http/console.py), HTTPS on its own port; None: off (homes made before it,
    # and programmatic ones such as the demo's; 'voxgrid node init' turns it on at 127.0.0.1:8444). 0: any free port.
    console_host: str = "127.0.0.1"
    console_port: int | None = None


class Home:
    def __init__(self, path: Path | str, kind: str = "node"):
        self.path = Path(path).expanduser().resolve()
        self.kind = kind

    # paths -------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / f"{self.kind}.json"

    @property
    def db_file(self) -> Path:
        return self.path / f"{self.kind}.db"

    @property
    def owner_token_file(self) -> Path:
        return self.path / "owner.token"

    @property
    def tls(self) -> Path:
        return self.path / "tls"

    @property
    def blobs(self) -> Path:
        return self.path / "blobs"

    @property
    def updates(self) -> Path:
        return self.path / "updates"

    @property
    def cache(self) -> Path:
        return self.path / "cache"

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    # lifecycle ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_file.is_file()

    def create(self, name: str, *, ca_cert: Path, cert: Path, key: Path, **config) -> ServerConfig:
        """Create the folder; copies the TLS material in. Refuses to overwrite an existing home."""
        if not NAME_RE.match(name):
            raise HomeError(f"invalid {self.kind} name {name!r}: use letters, digits, '.', '_' or '-'")
        if self.exists():
            raise HomeError(f"{self.config_file} already exists: refusing to overwrite an existing {self.kind} home")
        for src in (ca_cert, cert, key):
            if not Path(src).is_file():
                raise HomeError(f"TLS file not found: {src}")
        if config.get("data_roots"):
            config["data_roots"] = check_data_roots(config["data_roots"])
        for d in (self.path, self.tls, self.blobs, self.updates, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        shutil.copyfile(ca_cert, self.tls / "ca.crt")
        shutil.copyfile(cert, self.tls / "server.crt")
        shutil.copyfile(key, self.tls / "server.key")
        os.chmod(self.tls / "server.key", 0o600)
        cfg = ServerConfig(name=name, kind=self.kind, **config)
        self.save(cfg)
        return cfg

    def data_roots(self, cfg: ServerConfig) -> DataRoots:
        """Where this node may read volumes from: its data roots plus its own cache (PACS pulls land
        there); no roots configured means no restriction, as before data roots existed."""
        from voxgrid.datasets.folder import DataRoots  # here: the grid imports this module without readers

        return DataRoots([*cfg.data_roots, self.cache]) if cfg.data_roots else DataRoots([])

    def load(self) -> ServerConfig:
        if not self.exists():
            raise HomeError(f"no {self.kind} home at {self.path} (missing {self.config_file.name}); "
                            f"create one with 'voxgrid {self.kind} init'")
        try:
            return ServerConfig(**json.loads(self.config_file.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise HomeError(f"{self.config_file} is malformed: {exc}") from exc

    def save(self, cfg: ServerConfig) -> None:
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(cfg), indent=2))
        os.replace(tmp, self.config_file)

    def write_secret(self, path: Path, text: str) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        return path
