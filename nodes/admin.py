"""What a site's IT person does to a node home, as functions (the CLI is a thin layer over these)."""

from __future__ import annotations

import random
from pathlib import Path

from voxgrid.datasets import VolumeError, load_volume, scan_folder
from voxgrid.wire import NAME_RE, normalise_tag

from .home import Home, HomeError
from .store import NodeStore, VolumeRecord

SPLITS = ("train", "val", "test")


def init_home(kind: str, path: Path, name: str, *, ca_cert: Path, cert: Path, key: Path, **config) -> str:
    """Create a node or grid home and its owner token; returns the owner token (also in HOME/owner.token)."""
    home = Home(path, kind)
    home.create(name, ca_cert=ca_cert, cert=cert, key=key, **config)
    from .db import Database
    from .grid import SCHEMA as GRID_SCHEMA
    from .store import SCHEMA as NODE_SCHEMA

    db = Database(home.db_file, NODE_SCHEMA if kind == "node" else GRID_SCHEMA)
    try:
        token = db.add_token("owner", "owner")
    finally:
        db.close()
    home.write_secret(home.owner_token_file, token)
    return token


def parse_label_names(spec: str | dict) -> dict[int, str]:
    """``"1=pancreas,2=tumor"`` -> ``{1: "pancreas", 2: "tumor"}`` with clear errors."""
    if isinstance(spec, dict):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            value, sep, name = part.partition("=")
            if not sep:
                raise ValueError(f"label names: {part!r} is not of the form VALUE=NAME (e.g. 1=pancreas)")
            items.append((value.strip(), name.strip()))
    out: dict[int, str] = {}
    for value, name in items:
        if not value.isdigit() or not 1 <= int(value) <= 255:
            raise ValueError(f"label names: label value {value!r} must be an integer from 1 to 255")
        if not NAME_RE.match(name) or name == "background":
            raise ValueError(f"label names: invalid class name {name!r}")
        out[int(value)] = name
    if not out:
        raise ValueError("label names: give at least one, e.g. --label-names 1=pancreas")
    if len(set(out.values())) != len(out):
        raise ValueError(f"label names: class names must be unique, got {sorted(out.values())}")
    return out


def assign_splits(case_ids: list[str], fractions: tuple[float, float, float], seed: int = 0) -> dict[str, str]:
    """Deterministic train/val/test assignment; val and test get at least one case when there are 3+."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test), got {fractions}")
    ids = sorted(case_ids)
    random.Random(seed).shuffle(ids)
    total = sum(fractions)
    n = len(ids)
    n_val = round(n * fractions[1] / total)
    n_test = round(n * fractions[2] / total)
    if n >= 3:
        n_val = max(n_val, 1) if fractions[1] > 0 else 0
        n_test = max(n_test, 1) if fractions[2] > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 1 and fractions[0] > 0:
        raise ValueError(f"only {n} volumes: too few for splits {fractions}")
    out = {}
    for i, cid in enumerate(ids):
        out[cid] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return out


def add_dataset(path: Path, name: str, images: Path, labels: Path | None, *, tags: list[str],
                label_names: str | dict, splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
                description: str = "", modality: str = "CT", replace: bool = False, seed: int = 0,
                check: bool = True) -> dict:
    """Register a folder of NIfTI images (+ labels) or DICOM series as a dataset of the node.

    Every volume is read once (``check``) so a corrupt file or a label map that does not fit its
    image is refused now, naming the case, rather than failing a job later.
    Returns a summary: name, volume count per split.
    """
    home = Home(path, "node")
    home.load()
    if not NAME_RE.match(name):
        raise ValueError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' or '-'")
    tag_list = sorted({normalise_tag(t) for t in tags})
    if not tag_list:
        raise ValueError("give the dataset at least one tag, e.g. --tags ct,pancreas")
    names = parse_label_names(label_names)
    sources = scan_folder(Path(images), Path(labels) if labels else None)
    if check:
        for src in sources:
            vol = load_volume(src)
            if vol.label is not None:
                unknown = sorted(set(int(v) for v in vol.label.ravel().tolist()) - set(names) - {0}) \
                    if vol.label.size < 50_000_000 else []
                if unknown:
                    raise VolumeError(f"case {src.case_id}: label map has values {unknown} that --label-names "
                                      f"does not name (named: {names})")
    split_of = assign_splits([s.case_id for s in sources], tuple(splits), seed)
    records = [VolumeRecord(s.case_id, str(Path(s.image).resolve()),
                            str(Path(s.label).resolve()) if s.label else None, s.kind, split_of[s.case_id])
               for s in sources]
    store = NodeStore(home.db_file)
    try:
        store.add_dataset(name, description=description, tags=tag_list, modality=modality, label_names=names,
                          volumes=records, replace=replace)
    finally:
        store.close()
    return {"name": name, "volumes": len(records), "tags": tag_list,
            "splits": {s: sum(r.split == s for r in records) for s in SPLITS}}


def issue_token(path: Path, kind: str, name: str, role: str, token_file: Path | None = None) -> str:
    """Issue a token for ``name`` with ``role``. With ``token_file``: if it exists, authorise the token it
    holds (a scientist's existing token); otherwise write the new token there (mode 0600)."""
    home = Home(path, kind)
    home.load()
    roles = ("owner", "scientist") if kind == "node" else ("owner", "scientist", "node")
    if role not in roles:
        raise ValueError(f"role {role!r} is not one of {roles} for a {kind}")
    if not NAME_RE.match(name):
        raise ValueError(f"invalid name {name!r}: use letters, digits, '.', '_' or '-'")
    existing = token_file.read_text().strip() if token_file and token_file.is_file() else None
    from .db import Database

    db = Database(home.db_file, "")
    try:
        token = db.add_token(name, role, existing)
    finally:
        db.close()
    if token_file and not existing:
        home.write_secret(token_file, token)
    return token


def set_budget(path: Path, dataset: str, epsilon: float, delta: float, scientist: str | None = None) -> list[dict]:
    """Set the (epsilon, delta) budget of a dataset, for one scientist or (None) everyone together.

    Safe while the node runs (the ledger is SQLite in WAL mode). Returns the dataset's budgets.
    """
    from pydantic import ValidationError

    from voxgrid.wire import BudgetSet

    from .service import Caller, NodeService, ServiceError

    try:
        req = BudgetSet(dataset=dataset, scientist=scientist, epsilon=epsilon, delta=delta)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    service = NodeService(Home(path, "node"), start_executor=False)
    try:  # through the service, so the CLI and the owner API check and audit alike
        return [b.model_dump() for b in service.set_budget(Caller("owner", "owner"), req)]
    except ServiceError as exc:
        raise ValueError(exc.detail) from None
    finally:
        service.close()


def ledger_view(path: Path) -> dict:
    """The node's privacy ledger (budgets, releases, refusals) as JSON-ready data."""
    from voxgrid.privacy import Ledger

    home = Home(path, "node")
    home.load()
    ledger = Ledger(home.db_file)
    try:
        return ledger.view().model_dump(mode="json")
    finally:
        ledger.close()


def privacy_report(path: Path, out: Path) -> tuple[Path, Path]:
    """Write the node's privacy report (JSON + self-contained HTML) into ``out``; returns both paths."""
    from voxgrid.privacy import Ledger, report

    home = Home(path, "node")
    home.load()
    ledger = Ledger(home.db_file)
    try:
        return report.write(ledger, out)
    finally:
        ledger.close()


def set_grid(path: Path, grid_url: str, grid_token_file: Path) -> None:
    """Point a node at its grid; the grid token is copied into the node home."""
    home = Home(path, "node")
    cfg = home.load()
    if not grid_url.startswith("https://"):
        raise HomeError(f"grid URL must start with https://, got {grid_url!r}")
    token = Path(grid_token_file).read_text().strip()
    home.write_secret(home.path / "grid.token", token)
    cfg.grid_url, cfg.grid_token_file = grid_url, "grid.token"
    home.save(cfg)
