"""What a site's IT person does to a node home, as functions (the CLI is a thin layer over these)."""

from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path

from voxgrid.datasets import VolumeError, load_volume, scan_folder
from voxgrid.datasets.folder import read_geometry
from voxgrid.wire import NAME_RE, normalise_tag

from voxgrid.nodes.service.home import Home, HomeError, check_data_roots
from voxgrid.nodes.service.store import NodeStore, VolumeRecord

SPLITS = ("train", "val", "test")


def init_home(kind: str, path: Path, name: str, *, ca_cert: Path, cert: Path, key: Path, **config) -> str:
    """Create a node or grid home and its owner token; returns the owner token (also in HOME/owner.token)."""
    home = Home(path, kind)
    home.create(name, ca_cert=ca_cert, cert=cert, key=key, **config)
    from voxgrid.nodes.service.db import Database
    from voxgrid.nodes.http.grid import SCHEMA as GRID_SCHEMA
    from voxgrid.nodes.service.store import SCHEMA as NODE_SCHEMA

    db = Database(home.db_file, NODE_SCHEMA if kind == "node" else GRID_SCHEMA, issue_as=_issue_as(kind))
    try:
        token = db.add_token("owner", "owner")
    finally:
        db.close()
    home.write_secret(home.owner_token_file, token)
    return token


def set_data_roots(path: Path, roots: list[Path]) -> list[str]:
    """Replace a node's data roots (``[]``: no restriction). Datasets already registered are not
    re-checked here; their jobs are, when the worker loads the volumes. Returns the roots as stored."""
    home = Home(path, "node")
    cfg = home.load()
    cfg.data_roots = check_data_roots(roots)
    home.save(cfg)
    return cfg.data_roots


def set_limits(path: Path, **changes) -> dict:
    """Change a node's job limits (:class:`~.limits.JobLimits`; a value of None returns that limit to
    its default). Restart a running node to apply them. Returns every limit, defaults included."""
    from voxgrid.nodes.service.limits import JobLimits

    unknown = set(changes) - set(JobLimits.model_fields)
    if unknown:
        raise ValueError(f"unknown limit(s) {', '.join(sorted(unknown))}; known: {', '.join(JobLimits.model_fields)}")
    home = Home(path, "node")
    cfg = home.load()
    limits = {**cfg.limits, **changes}
    limits = {k: v for k, v in limits.items() if v is not None}
    JobLimits.parse(limits)  # ValueError naming the bad one
    cfg.limits = limits
    home.save(cfg)
    return JobLimits.parse(limits).model_dump()


@contextmanager
def running_node(path: Path):
    """A NodeClient with the owner's token on the home's running node (None: the node is not running),
    for actions only the running node can carry out (stopping a worker). Refusals come as ValueError."""
    from voxgrid.client import NodeClient, RemoteError, Unreachable

    home = Home(path, "node")
    home.load()
    client = None
    if home.run_file.exists():
        state = json.loads(home.run_file.read_text())
        # An outbound node listens on nothing but its private socket: its owner, on its machine, uses that.
        client = NodeClient(state["url"], home.owner_token_file.read_text().strip(), home.tls / "ca.crt", timeout=60,
                            uds=state.get("socket"))
        try:
            client.health()
        except Unreachable:  # a stale run.json: the node is not running
            client.close()
            client = None
    try:
        yield client
    except RemoteError as exc:
        raise ValueError(exc.detail) from None
    finally:
        if client is not None:
            client.close()


def cancel_job(path: Path, job_id: str) -> dict:
    """The owner cancels a job: through the running node's API (it stops the worker if the job runs),
    or in the node's store when the node is not running. Returns the job's status."""
    with running_node(path) as client:
        if client is not None:
            return client.cancel(job_id).model_dump(mode="json")
    home = Home(path, "node")
    home.load()
    from voxgrid.nodes.service.node import Caller, NodeService, ServiceError

    service = NodeService(home, start_executor=False)
    try:
        return service.cancel_job(Caller("owner", "owner"), job_id).model_dump(mode="json")
    except ServiceError as exc:
        raise ValueError(exc.detail) from None
    finally:
        service.close()


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


def _check_volumes(sources, names: dict[int, str], allow_resample: bool = False) -> list[tuple[tuple, tuple]]:
    """Read every volume once: a corrupt file or a label map that does not fit its image is refused now,
    naming the case, rather than failing a job later. Returns each image's (shape, spacing)."""
    geometries = []
    for src in sources:
        vol = load_volume(src, allow_resample=allow_resample)
        geometries.append((vol.image.shape, vol.spacing))
        if vol.label is not None:
            unknown = sorted({int(v) for v in vol.label.ravel().tolist()} - set(names) - {0}) \
                if vol.label.size < 50_000_000 else []
            if unknown:
                raise VolumeError(f"case {src.case_id}: label map has values {unknown} that --label-names "
                                  f"does not name (named: {names})")
    return geometries


def geometry_ranges(geometries) -> tuple[tuple, tuple] | tuple[None, None]:
    """(shape_range, spacing_range) of a dataset's images: per-axis minima and maxima, the only geometry a
    dataset publishes (spacing rounded to 1 um: header float noise is not information)."""
    if not geometries:
        return None, None
    shapes = [tuple(int(n) for n in g[0]) for g in geometries]
    spacings = [tuple(round(float(x), 3) for x in g[1]) for g in geometries]
    # every image is 3-D (load_volume and read_geometry refuse anything else): the axes line up
    return ((tuple(map(min, zip(*shapes, strict=True))), tuple(map(max, zip(*shapes, strict=True)))),
            (tuple(map(min, zip(*spacings, strict=True))), tuple(map(max, zip(*spacings, strict=True)))))


def _check_roots(home: Home, sources, folders: dict[str, Path | None]) -> None:
    """Refuse, before anything is read or registered, a folder or case file that resolves outside the
    node's data roots (symlinks followed, ``..`` collapsed); the error names the file and the roots."""
    roots = home.data_roots(home.load())
    if not roots:
        return
    for what, folder in folders.items():
        if folder is not None:
            roots.check_path(folder, what, recursive=False)
    for src in sources:
        roots.check_source(src)


def _dataset_basics(path: Path, name: str, tags: list[str], label_names) -> tuple[Home, list[str], dict[int, str]]:
    """The node home, normalised tags and label names of a dataset about to be added; clear errors."""
    home = Home(path, "node")
    home.load()
    if not NAME_RE.match(name):
        raise ValueError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' or '-'")
    tag_list = sorted({normalise_tag(t) for t in tags})
    if not tag_list:
        raise ValueError("give the dataset at least one tag, e.g. --tags ct,pancreas")
    return home, tag_list, parse_label_names(label_names)


def add_dataset(path: Path, name: str, images: Path, labels: Path | None, *, tags: list[str],
                label_names: str | dict, splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
                description: str = "", modality: str = "CT", replace: bool = False, seed: int = 0,
                check: bool = True, patients: dict[str, str] | None = None, policy: str | None = None) -> dict:
    """Register a folder of NIfTI images (+ labels) or DICOM series as a dataset of the node.

    Every volume is read once (``check``) so a corrupt file or a label map that does not fit its
    image is refused now, naming the case, rather than failing a job later (without ``check``, only
    headers are read, for the published shape and spacing ranges). With data roots set on the node,
    an image or label path that resolves outside them (symlinks, ``..``) is refused first, naming the file.
    ``patients``: case id -> patient id, where several volumes are of one patient (the unit of
    privacy for DP-SGD); a patient's volumes are kept in one split. Unlisted cases: one patient each.
    ``policy``: 'open', 'review' or 'rules' (None: a new dataset starts in 'review', a replaced one keeps its own).
    Returns a summary: name, volume count per split.
    """
    home, tag_list, names = _dataset_basics(path, name, tags, label_names)
    sources = scan_folder(Path(images), Path(labels) if labels else None)
    _check_roots(home, sources, {"image folder": Path(images), "label folder": Path(labels) if labels else None})
    geometries = _check_volumes(sources, names) if check else [read_geometry(s) for s in sources]
    shape_range, spacing_range = geometry_ranges(geometries)
    patients = dict(patients or {})
    unknown = sorted(set(patients) - {s.case_id for s in sources})
    if unknown:
        raise ValueError(f"patients: no volume with case id {', '.join(unknown[:5])} in {images}")
    patient_of = {s.case_id: patients.get(s.case_id) or s.case_id for s in sources}
    split_of_patient = assign_splits(sorted(set(patient_of.values())), tuple(splits), seed)
    split_of = {c: split_of_patient[p] for c, p in patient_of.items()}
    records = [VolumeRecord(s.case_id, str(Path(s.image).resolve()),
                            str(Path(s.label).resolve()) if s.label else None, s.kind, split_of[s.case_id],
                            patient=patients.get(s.case_id)) for s in sources]
    store = NodeStore(home.db_file)
    try:
        store.add_dataset(name, description=description, tags=tag_list, modality=modality, label_names=names,
                          volumes=records, replace=replace, shape_range=shape_range, spacing_range=spacing_range,
                          policy=policy)
    finally:
        store.close()
    return {"name": name, "volumes": len(records), "tags": tag_list,
            "splits": {s: sum(r.split == s for r in records) for s in SPLITS}}


def _issue_as(kind: str):
    """The grid stores what holders will send it: :func:`voxgrid.client.grid_credential` of their token."""
    from voxgrid.client import grid_credential

    return grid_credential if kind == "grid" else None


def issue_token(path: Path, kind: str, name: str, role: str, token_file: Path | None = None, *,
                expires: str | None = None, days: float | None = None) -> str:
    """Issue a token for ``name`` with ``role``. With ``token_file``: if it exists, authorise the token it
    holds (a scientist's existing token); otherwise write the new token there (mode 0600). ``expires``
    (``YYYY-MM-DD``: 00:00 UTC that day, or an ISO time) or ``days`` from now: when it stops working
    (default: never); a malformed or past date is refused before anything changes."""
    from voxgrid.nodes.service.db import Database, parse_expiry

    home = Home(path, kind)
    home.load()
    roles = ("owner", "scientist") if kind == "node" else ("owner", "scientist", "node")
    if role not in roles:
        raise ValueError(f"role {role!r} is not one of {roles} for a {kind}")
    if not NAME_RE.match(name):
        raise ValueError(f"invalid name {name!r}: use letters, digits, '.', '_' or '-'")
    expires_at = parse_expiry(expires, days)
    existing = token_file.read_text().strip() if token_file and token_file.is_file() else None
    db = Database(home.db_file, "", issue_as=_issue_as(kind))
    try:
        token = db.add_token(name, role, existing, expires_at=expires_at)
    finally:
        db.close()
    if token_file and not existing:
        home.write_secret(token_file, token)
    return token


def short_token_id(kind: str, token: str) -> str:
    """The short id ``list_tokens`` shows for ``token`` (the first hex digits of the hash the home stores)."""
    from voxgrid.nodes.service.db import TOKEN_ID_LEN, hash_token

    issue_as = _issue_as(kind)
    return hash_token(issue_as(token) if issue_as else token)[:TOKEN_ID_LEN]


def _token_db(path: Path, kind: str):
    from voxgrid.nodes.service.db import Database

    home = Home(path, kind)
    home.load()
    return Database(home.db_file, "", issue_as=_issue_as(kind))


def list_tokens(path: Path, kind: str) -> list[dict]:
    """Every token of a node or grid home, oldest first: id, name, role, created, expires, revoked, expired
    (never a token or its hash). Safe while the server runs."""
    db = _token_db(path, kind)
    try:
        return db.tokens()
    finally:
        db.close()


def revoke_token(path: Path, kind: str, *, name: str | None = None, token_id: str | None = None) -> list[dict]:
    """Revoke every valid token of ``name``, or the token ``token_id`` (an id ``list_tokens`` shows); returns
    them. A running server refuses them from its next request (it reads the tokens from the home's SQLite
    file every time). Audited before it takes effect. ValueError (nothing changed) for an unknown name or
    id, tokens already revoked, or revoking the last valid owner token."""
    if (name is None) == (token_id is None):
        raise ValueError("give --name NAME or --id ID (one of them)")
    db = _token_db(path, kind)
    try:
        return db.revoke(name=name, token_id=token_id)
    finally:
        db.close()


def set_budget(path: Path, dataset: str, epsilon: float, delta: float, scientist: str | None = None) -> list[dict]:
    """Set the (epsilon, delta) budget of a dataset, for one scientist or (None) everyone together.

    Safe while the node runs (the ledger is SQLite in WAL mode). Returns the dataset's budgets.
    """
    from pydantic import ValidationError

    from voxgrid.wire import BudgetSet

    from voxgrid.nodes.service.node import Caller, NodeService, ServiceError

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


def set_outbound(path: Path, proxy: str | None = None, proxy_credentials_file: Path | None = None) -> None:
    """Outbound mode: the node listens on nothing and dials its grid (through ``proxy`` when given; else
    ``HTTPS_PROXY``/``NO_PROXY``); proxy credentials ("user:password") are copied into the home."""
    home = Home(path, "node")
    cfg = home.load()
    if not cfg.grid_url:
        raise HomeError("outbound mode needs a grid: give --grid URL and --grid-token-file")
    if proxy is not None and not proxy.startswith(("http://", "https://")):
        raise HomeError(f"proxy must be an http:// or https:// URL, got {proxy!r}")
    cfg.connect, cfg.proxy = "outbound", proxy
    if proxy_credentials_file is not None:
        secret = Path(proxy_credentials_file).read_text().strip()
        if ":" not in secret or "\n" in secret:
            raise HomeError(f"{proxy_credentials_file}: proxy credentials must be one line 'user:password'")
        home.write_secret(home.path / "proxy.credentials", secret)
        cfg.proxy_credentials_file = "proxy.credentials"
    home.save(cfg)


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_pacs_source(source: str) -> dict:
    """``dicomweb+https://host:port/dicom-web`` (``dicomweb+http://`` only for a loopback PACS) or
    ``dimse://CALLEDAE@host:port`` -> the arguments of the matching pull, with clear errors."""
    from urllib.parse import urlsplit

    scheme, sep, rest = source.partition("://")
    try:
        parts = urlsplit(source)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"PACS source {source!r}: {exc}") from None
    if sep and scheme in ("dicomweb+https", "dicomweb+http"):
        if not parts.hostname:
            raise ValueError(f"PACS source {source!r} names no host")
        if scheme == "dicomweb+http" and parts.hostname not in _LOOPBACK:
            raise ValueError(f"PACS source {source!r}: plain HTTP is only accepted for a PACS on this machine "
                             f"(127.0.0.1/localhost); use dicomweb+https://")
        if parts.username or parts.password:
            raise ValueError("PACS source: put no credentials in the URL; use --pacs-user and --pacs-password-file")
        return {"protocol": "dicomweb", "url": f"{scheme[len('dicomweb+'):]}://{rest}"}
    if sep and scheme == "dimse":
        called_ae = parts.username or ""
        if not called_ae or parts.password is not None or not parts.hostname or port is None \
                or parts.path not in ("", "/") or len(called_ae) > 16:
            raise ValueError(f"PACS source {source!r} is not of the form dimse://CALLEDAE@host:port "
                             f"(AE title up to 16 characters)")
        return {"protocol": "dimse", "host": parts.hostname, "port": port, "called_ae": called_ae}
    raise ValueError(f"PACS source {source!r} must start with dicomweb+https://, dicomweb+http:// (loopback only) "
                     f"or dimse://CALLEDAE@host:port")


def pull_pacs(source: str, cache: Path, query, *, username: str | None = None, password_file: Path | None = None,
              calling_ae: str = "VOXGRID", timeout: float = 30.0):
    """Pull the series `query` matches from `source` into `cache` (resumable); returns the PullReport.
    Raises PacsError subclasses (PacsUnavailable, PacsAuthError, PacsTransferError) as the pull does."""
    from voxgrid.datasets.pacs import pull_dicomweb, pull_dimse

    where = parse_pacs_source(source)
    password = None
    if password_file is not None:
        password = Path(password_file).read_text().rstrip("\r\n")
    if where["protocol"] == "dicomweb":
        if password is not None and username is None:
            raise ValueError("--pacs-password-file needs --pacs-user")
        return pull_dicomweb(where["url"], cache, query, username=username, password=password, timeout=timeout)
    if username is not None or password is not None:
        raise ValueError("a DIMSE PACS takes no user or password: it knows this node by its AE title (--calling-ae)")
    if not calling_ae or len(calling_ae) > 16:
        raise ValueError(f"calling AE title {calling_ae!r} must be 1 to 16 characters")
    return pull_dimse(where["host"], where["port"], cache, query, called_ae=where["called_ae"],
                      calling_ae=calling_ae, timeout=timeout)


def add_dataset_from_pacs(path: Path, name: str, *, source: str, username: str | None = None,
                          password_file: Path | None = None, calling_ae: str = "VOXGRID", query,
                          rules=None, labels: Path | None = None, tags: list[str], label_names: str | dict,
                          splits: tuple[float, float, float] = (0.6, 0.2, 0.2), description: str = "",
                          replace: bool = False, allow_resample: bool = False, seed: int = 0,
                          timeout: float = 30.0, policy: str | None = None) -> dict:
    """Pull the series `query` matches from a PACS into ``HOME/cache/pacs/<name>/`` (resumable: what is
    already there is not downloaded again), keep the ones `rules` accept (one volume per series, case id
    ``series-<hash>``, no UID), read each once with its label map ``labels/<case_id>.nii.gz`` and register
    them as a dataset. Without `labels` the pull is kept but nothing is registered (jobs need labels): a
    ValueError lists the case ids to annotate. A PACS failure raises its PacsError and leaves the
    registry as it was. Returns a summary of counts only (no UIDs, descriptions, paths or names)."""
    from voxgrid.datasets import SeriesRules, VolumeSource, scan_dicom_export
    from voxgrid.datasets.folder import _find_label
    from voxgrid.datasets.pacs import PacsQuery, series_folder

    # Everything checkable is checked before the pull, so a typo does not cost a download.
    home, tag_list, names = _dataset_basics(path, name, tags, label_names)
    if not isinstance(query, PacsQuery):
        raise TypeError(f"query must be a PacsQuery, got {type(query).__name__}")
    query.study_date()  # validates the dates
    assign_splits(["a", "b", "c"], tuple(splits), seed)  # validates the fractions
    parse_pacs_source(source)
    if labels is not None and not Path(labels).is_dir():
        raise VolumeError(f"label folder {labels} does not exist or is not a folder")
    _check_roots(home, [], {"label folder": Path(labels) if labels is not None else None})
    if password_file is not None and not Path(password_file).is_file():
        raise FileNotFoundError(f"PACS password file {password_file} does not exist")
    if rules is None:
        rules = SeriesRules(modalities=(query.modality,) if query.modality else ())
    store = NodeStore(home.db_file)
    try:
        if store.dataset(name) is not None and not replace:
            raise ValueError(f"dataset {name!r} already exists (use --replace to rebuild it)")
    finally:
        store.close()

    cache = home.cache / "pacs" / name
    cache.mkdir(parents=True, exist_ok=True)
    report = pull_pacs(source, cache, query, username=username, password_file=password_file,
                       calling_ae=calling_ae, timeout=timeout)
    if report.series == 0:
        raise ValueError(f"the PACS holds no series that the query matches ({report.studies} studies); "
                         f"nothing registered")
    # Only the series this query matched: the cache may hold series of an earlier, different query.
    pulled = {Path(f).name for f in report.folders}  # series-<hash>: the case id of that series
    sources, summaries = scan_dicom_export(cache, rules)
    summaries = [s for s in summaries if series_folder(cache, s.uid).name in pulled]
    sources = [s for s in sources if s.case_id in pulled]
    if not sources:
        raise VolumeError(f"none of the {len(summaries)} series pulled passes the series rules "
                          f"(skipped: {sorted({str(s.skipped) for s in summaries})}); nothing registered")
    if labels is None:
        ids = [s.case_id for s in sources]
        shown = ", ".join(ids[:20]) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")
        raise ValueError(f"dataset {name!r} not registered: training jobs need a label map per volume and no "
                         f"--labels was given. The {len(ids)} accepted series are pulled into {cache} (case ids: "
                         f"{shown}); write <case_id>.nii.gz label maps into a folder and run this again with "
                         f"--labels FOLDER (nothing already pulled is downloaded again)")
    with_labels = []
    for s in sources:
        label = _find_label(Path(labels), s.case_id)
        if label is None:
            raise VolumeError(f"case {s.case_id!r} has no label map {s.case_id}.nii.gz in {labels}")
        # The series' own cache folder: reading it does not scan the headers of every other series.
        with_labels.append(VolumeSource(case_id=s.case_id, image=series_folder(cache, s.series_uid), label=label,
                                        kind="dicom", series_uid=s.series_uid))
    _check_roots(home, with_labels, {})  # the series sit in HOME/cache; a label map may be a symlink
    shape_range, spacing_range = geometry_ranges(_check_volumes(with_labels, names, allow_resample=allow_resample))

    split_of = assign_splits([s.case_id for s in with_labels], tuple(splits), seed)
    records = [VolumeRecord(s.case_id, str(Path(s.image).resolve()), str(Path(s.label).resolve()), s.kind,
                            split_of[s.case_id], s.series_uid, allow_resample) for s in with_labels]
    modalities = sorted({s.modality for s in summaries if s.accepted and s.modality})
    store = NodeStore(home.db_file)
    try:
        store.add_dataset(name, description=description, tags=tag_list, modality="/".join(modalities) or "OT",
                          label_names=names, volumes=records, replace=replace, shape_range=shape_range,
                          spacing_range=spacing_range, policy=policy)
    finally:
        store.close()
    return {"name": name, "volumes": len(records), "tags": tag_list,
            "splits": {s: sum(r.split == s for r in records) for s in SPLITS},
            "pull": report.public(),
            "series": {"found": len(summaries), "accepted": len(records),
                       "skipped": [s.public() for s in summaries if not s.accepted]}}


def rotate_certificate(path: Path, kind: str = "node", *, cert: Path | None = None, key: Path | None = None,
                       bundle: Path | None = None, ca_dir: Path | None = None, hosts: list[str] | None = None,
                       days: int = 825) -> dict:
    """Install a new server certificate and key into a home; the old pair is kept in ``tls/backup/``.

    The new pair comes from ``cert`` + ``key``, from a provisioned kit (``bundle``: its server.crt and
    server.key), or is issued here from the CA files in ``ca_dir`` for ``hosts`` (default: the hosts the
    current certificate names). Before anything changes it must chain to the home's federation CA
    (tls/ca.crt), be valid now, be issued to the home's name, match its key and name the configured
    host; otherwise CertificateError says why and no file is touched. Each file is swapped with an
    atomic rename. A running server keeps serving the old certificate until it is restarted.
    """
    import datetime as dt
    import tempfile

    from voxgrid.pki import CertificateError, certificate_info, issue_certificate, load_ca, verify_certificate

    from voxgrid.nodes.ops.doctor import _cert_hosts, _names_host, configured_host

    home = Home(path, kind)
    cfg = home.load()
    if bool(cert) != bool(key):
        raise ValueError("a new certificate needs its key: give --cert and --key together")
    if len([s for s in (cert, bundle, ca_dir) if s]) != 1:
        raise ValueError("give exactly one of: --cert with --key, --bundle KIT, or --ca-dir CA")
    if bundle:
        cert, key = Path(bundle) / "server.crt", Path(bundle) / "server.key"
    old_cert, old_key = home.tls / "server.crt", home.tls / "server.key"
    with tempfile.TemporaryDirectory(dir=home.tls, prefix=".rotate-") as tmp:
        if ca_dir:
            if not hosts:
                dns, ips = _cert_hosts(_load_cert(old_cert))
                hosts = [*dns, *map(str, ips)]
            issued = issue_certificate(load_ca(ca_dir), tmp, cfg.name, hosts, days=days)
            cert, key = issued.cert, issued.key
        for f in (cert, key):
            if not Path(f).is_file():
                raise FileNotFoundError(f"{f} not found")
        new = verify_certificate(cert, home.tls / "ca.crt", key_path=key, name=cfg.name)
        host = configured_host(cfg)
        if host and not _names_host(new, host):
            raise CertificateError(f"{cert} does not name {host!r}, the host this {kind} is reached at "
                                   f"(public URL or listen address)")
        # Staged next to the targets (same file system, so the renames below are atomic) and on disk
        # before the old pair is touched; the backup is written before the swap too. Between the two
        # renames the key is new and the certificate old for an instant: the server reads both only at
        # start, and a crash there leaves the backup and a doctor that names the mismatch.
        staged_cert, staged_key = Path(tmp) / "new.crt", Path(tmp) / "new.key"
        _write_durably(staged_cert, Path(cert).read_bytes(), 0o644)
        _write_durably(staged_key, Path(key).read_bytes(), 0o600)
        old = certificate_info(old_cert)
        backup = home.tls / "backup"
        backup.mkdir(mode=0o700, exist_ok=True)
        stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{old['serial'][:16]}"
        _write_durably(backup / f"server-{stamp}.crt", old_cert.read_bytes(), 0o644)
        _write_durably(backup / f"server-{stamp}.key", old_key.read_bytes(), 0o600)
        os.replace(staged_key, old_key)
        os.replace(staged_cert, old_cert)
    info = certificate_info(old_cert)
    running = json.loads(home.run_file.read_text()).get("pid") if home.run_file.is_file() else None
    return {"old_serial": old["serial"], "serial": info["serial"], "not_valid_after": info["not_valid_after"],
            "sans": info["sans"], "backup": str(backup / f"server-{stamp}.crt"), "running_pid": running}


def _write_durably(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` created with ``mode`` (no window with looser bits) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _load_cert(path: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(path).read_bytes())
