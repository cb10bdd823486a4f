"""The node's durable state: dataset registry, volumes (private paths), jobs."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from voxgrid.wire import DatasetInfo, JobRequest, JobStatus, Metrics

from voxgrid.nodes.service.db import Database, now

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,
    modality TEXT NOT NULL,
    label_names TEXT NOT NULL,
    created_at TEXT NOT NULL,
    shape_range TEXT,
    spacing_range TEXT
);
CREATE TABLE IF NOT EXISTS volumes (
    dataset TEXT NOT NULL REFERENCES datasets(name),
    case_id TEXT NOT NULL,
    image TEXT NOT NULL,
    label TEXT,
    kind TEXT NOT NULL,
    split TEXT NOT NULL,
    series_uid TEXT,
    resample INTEGER NOT NULL DEFAULT 0,
    patient TEXT,
    PRIMARY KEY (dataset, case_id)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    scientist TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    metrics TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dataset_policies (
    dataset TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    rules TEXT
);
CREATE TABLE IF NOT EXISTS approval_jobs (
    request_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (request_id, job_id)
);
CREATE TABLE IF NOT EXISTS approval_requests (
    request_id TEXT PRIMARY KEY,
    scientist TEXT NOT NULL,
    dataset TEXT NOT NULL,
    plan TEXT NOT NULL,
    plan_hash TEXT NOT NULL,
    purpose TEXT NOT NULL DEFAULT '',
    releases_asked INTEGER,
    created_at TEXT NOT NULL,
    state TEXT NOT NULL,
    decided_at TEXT,
    decided_by TEXT,
    reason TEXT,
    releases INTEGER,
    used INTEGER NOT NULL DEFAULT 0,
    expires_at TEXT
);
CREATE INDEX IF NOT EXISTS approval_requests_triple ON approval_requests (scientist, dataset, plan_hash);
"""
#: A dataset's policy (nodes/service/approvals.py): 'open' (every valid plan runs), 'review' (each plan
#: needs the owner's approval) or 'rules' (a plan meeting the owner's rules is approved automatically).
POLICIES = ("open", "review", "rules")
#: New datasets start under review unless the owner says otherwise.
NEW_DATASET_POLICY = "review"
#: Datasets registered before policies existed have no row and stay open, as they were.
DEFAULT_POLICY = "open"


@dataclass(frozen=True)
class VolumeRecord:
    case_id: str
    image: str
    label: str | None
    kind: str
    split: str
    series_uid: str | None = None  # DICOM: which series of the image folder (None: the folder's only one)
    allow_resample: bool = False  # DICOM: uneven gaps / gantry tilt were accepted (resampled) at registration
    patient: str | None = None  # the patient this volume is of (DP-SGD's unit of privacy); None: its own patient


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    description: str
    tags: list[str]
    modality: str
    label_names: dict[int, str]  # label value at this site -> class name
    volumes: list[VolumeRecord]
    shape_range: tuple | None = None  # ((min i, j, k), (max i, j, k)) voxels; None: registered before ranges
    spacing_range: tuple | None = None  # the same in mm

    def info(self) -> DatasetInfo:
        """The published metadata (invariant 1: no paths, no case ids, no headers)."""
        splits = {s: sum(v.split == s for v in self.volumes) for s in ("train", "val", "test")}
        return DatasetInfo(
            name=self.name, description=self.description, tags=self.tags, modality=self.modality,
            volumes=len(self.volumes),
            label_names=["background"] + [self.label_names[k] for k in sorted(self.label_names)],
            splits=splits, shape_range=self.shape_range, spacing_range=self.spacing_range,
        )


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    scientist: str
    request: JobRequest
    state: str
    error: str | None
    metrics: Metrics | None

    def status(self, has_update: bool) -> JobStatus:
        r = self.request
        return JobStatus(job_id=self.job_id, kind=r.kind, experiment_id=r.experiment_id, round=r.round,
                         dataset=r.dataset, state=self.state, error=self.error, metrics=self.metrics,
                         has_update=has_update)


def new_job_id() -> str:
    return uuid.uuid4().hex


# Columns added after the first release: (name, declaration) for node.db files created before them.
_VOLUME_COLUMNS = (("series_uid", "TEXT"), ("resample", "INTEGER NOT NULL DEFAULT 0"), ("patient", "TEXT"))
_DATASET_COLUMNS = (("shape_range", "TEXT"), ("spacing_range", "TEXT"))  # JSON [[min...], [max...]] or NULL
_JOB_COLUMNS = (("restarts", "INTEGER NOT NULL DEFAULT 0"),)  # times a restart found the job running
_POLICY_COLUMNS = (("rules", "TEXT"),)  # JSON PolicyRules of a 'rules' dataset


class NodeStore(Database):
    def __init__(self, path: Path):
        super().__init__(path, SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as c:
            have = {r["name"] for r in c.execute("PRAGMA table_info(volumes)").fetchall()}
            for column, decl in _VOLUME_COLUMNS:
                if column not in have:
                    c.execute(f"ALTER TABLE volumes ADD COLUMN {column} {decl}")
            have = {r["name"] for r in c.execute("PRAGMA table_info(datasets)").fetchall()}
            for column, decl in _DATASET_COLUMNS:
                if column not in have:
                    c.execute(f"ALTER TABLE datasets ADD COLUMN {column} {decl}")
            for table, columns in (("jobs", _JOB_COLUMNS), ("dataset_policies", _POLICY_COLUMNS)):
                have = {r["name"] for r in c.execute(f"PRAGMA table_info({table})").fetchall()}
                for column, decl in columns:
                    if column not in have:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    # registry ----------------------------------------------------------------------------------
    def add_dataset(self, name: str, *, description: str, tags: list[str], modality: str,
                    label_names: dict[int, str], volumes: list[VolumeRecord], replace: bool = False,
                    shape_range: tuple | None = None, spacing_range: tuple | None = None,
                    policy: str | None = None) -> None:
        """Register (or with ``replace`` rebuild) a dataset. ``policy``: who decides which plans run on it
        (None: a replaced dataset keeps its own, a new one starts in :data:`NEW_DATASET_POLICY`)."""
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
        with self.transaction() as c:
            exists = c.execute("SELECT 1 FROM datasets WHERE name=?", (name,)).fetchone()
            if exists and not replace:
                raise ValueError(f"dataset {name!r} already exists (use --replace to rebuild it)")
            had = c.execute("SELECT 1 FROM dataset_policies WHERE dataset=?", (name,)).fetchone()
            if policy is not None or not had:
                c.execute("INSERT OR REPLACE INTO dataset_policies (dataset, policy, updated_at) VALUES (?,?,?)",
                          (name, policy or NEW_DATASET_POLICY, now()))
            c.execute("DELETE FROM volumes WHERE dataset=?", (name,))
            c.execute("DELETE FROM datasets WHERE name=?", (name,))
            c.execute("INSERT INTO datasets (name, description, tags, modality, label_names, created_at, shape_range, "
                      "spacing_range) VALUES (?,?,?,?,?,?,?,?)",
                      (name, description, json.dumps(tags), modality,
                       json.dumps({str(k): v for k, v in label_names.items()}), now(),
                       json.dumps(shape_range) if shape_range is not None else None,
                       json.dumps(spacing_range) if spacing_range is not None else None))
            c.executemany("INSERT INTO volumes (dataset, case_id, image, label, kind, split, series_uid, resample, "
                          "patient) VALUES (?,?,?,?,?,?,?,?,?)",
                          [(name, v.case_id, v.image, v.label, v.kind, v.split, v.series_uid, int(v.allow_resample),
                            v.patient) for v in volumes])
        self.audit("owner", "dataset.add", f"{name}: {len(volumes)} volumes, tags {tags}")

    def remove_dataset(self, name: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM volumes WHERE dataset=?", (name,))
            if c.execute("DELETE FROM datasets WHERE name=?", (name,)).rowcount == 0:
                raise KeyError(name)
            c.execute("DELETE FROM dataset_policies WHERE dataset=?", (name,))
        self.audit("owner", "dataset.remove", name)

    def dataset(self, name: str) -> DatasetRecord | None:
        rows = self.query("SELECT * FROM datasets WHERE name=?", (name,))
        if not rows:
            return None
        r = rows[0]
        vols = [VolumeRecord(v["case_id"], v["image"], v["label"], v["kind"], v["split"], v["series_uid"],
                             bool(v["resample"]), v["patient"]) for v in self.query(
            "SELECT * FROM volumes WHERE dataset=? ORDER BY case_id", (name,))]
        ranges = [tuple(map(tuple, json.loads(r[k]))) if r[k] else None for k in ("shape_range", "spacing_range")]
        return DatasetRecord(r["name"], r["description"], json.loads(r["tags"]), r["modality"],
                             {int(k): v for k, v in json.loads(r["label_names"]).items()}, vols, *ranges)

    def datasets(self) -> list[DatasetRecord]:
        return [self.dataset(r["name"]) for r in self.query("SELECT name FROM datasets ORDER BY name")]

    # policies (the tables are created by SCHEMA's CREATE ... IF NOT EXISTS, also in older files) -------
    def policy(self, dataset: str) -> str:
        """The dataset's policy, one of :data:`POLICIES` (:data:`DEFAULT_POLICY` where it has none)."""
        rows = self.query("SELECT policy FROM dataset_policies WHERE dataset=?", (dataset,))
        return rows[0]["policy"] if rows else DEFAULT_POLICY

    def rules(self, dataset: str) -> dict | None:
        """A 'rules' dataset's rules as JSON (None: none set)."""
        rows = self.query("SELECT rules FROM dataset_policies WHERE dataset=?", (dataset,))
        return json.loads(rows[0]["rules"]) if rows and rows[0]["rules"] else None

    def policies(self) -> dict[str, str]:
        """Every registered dataset's policy."""
        return {d["name"]: self.policy(d["name"]) for d in self.query("SELECT name FROM datasets ORDER BY name")}

    def set_policy(self, dataset: str, policy: str, actor: str = "owner", rules: dict | None = None) -> None:
        """Set a registered dataset's policy (and a 'rules' one's rules); audited in the same transaction,
        before the change."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
        text = json.dumps(rules, sort_keys=True) if rules is not None else None
        with self.transaction() as c:
            if not c.execute("SELECT 1 FROM datasets WHERE name=?", (dataset,)).fetchone():
                raise KeyError(dataset)
            self.audit(actor, "policy.set", f"{dataset}: {policy}" + (f" {text}" if text else ""), conn=c)
            c.execute("INSERT OR REPLACE INTO dataset_policies (dataset, policy, updated_at, rules) VALUES (?,?,?,?)",
                      (dataset, policy, now(), text))

    # jobs --------------------------------------------------------------------------------------
    def add_job(self, scientist: str, request: JobRequest, job_id: str | None = None) -> JobRecord:
        job_id = job_id or new_job_id()
        with self.transaction() as c:
            c.execute("INSERT INTO jobs (job_id, scientist, request, state, error, metrics, created_at, updated_at) "
                      "VALUES (?,?,?,?,?,?,?,?)",
                      (job_id, scientist, request.model_dump_json(), "queued", None, None, now(), now()))
        return JobRecord(job_id, scientist, request, "queued", None, None)

    def find_job(self, scientist: str, request: JobRequest) -> JobRecord | None:
        """An earlier, not failed job with the identical request (makes resubmission idempotent)."""
        for r in self.query("SELECT * FROM jobs WHERE scientist=? AND request=? AND state!='failed'",
                            (scientist, request.model_dump_json())):
            return self._job(r)
        return None

    def experiment_is_secure(self, scientist: str, experiment_id: str) -> bool:
        """Whether any of the scientist's train jobs in this experiment asked for secure aggregation."""
        rows = self.query("SELECT 1 FROM jobs WHERE scientist=? AND json_extract(request, '$.experiment_id')=? "
                          "AND json_extract(request, '$.secure') IS NOT NULL LIMIT 1", (scientist, experiment_id))
        return bool(rows)

    def set_job(self, job_id: str, state: str, *, error: str | None = None, metrics: Metrics | None = None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE jobs SET state=?, error=?, metrics=?, updated_at=? WHERE job_id=?",
                      (state, error, metrics.model_dump_json() if metrics else None, now(), job_id))

    def count_jobs(self, scientist: str, states: tuple[str, ...]) -> int:
        marks = ",".join("?" * len(states))
        rows = self.query(f"SELECT COUNT(*) AS n FROM jobs WHERE scientist=? AND state IN ({marks})", (scientist, *states))
        return int(rows[0]["n"])

    def add_restart(self, job_id: str) -> int:
        """Count one more restart that found the job running; returns the count."""
        with self.transaction() as c:
            c.execute("UPDATE jobs SET restarts=restarts+1 WHERE job_id=?", (job_id,))
            return int(c.execute("SELECT restarts FROM jobs WHERE job_id=?", (job_id,)).fetchone()["restarts"])

    def job(self, job_id: str) -> JobRecord | None:
        rows = self.query("SELECT * FROM jobs WHERE job_id=?", (job_id,))
        return self._job(rows[0]) if rows else None

    def jobs(self, states: tuple[str, ...] | None = None, limit: int = 500) -> list[JobRecord]:
        rows = self.query("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [j for j in map(self._job, rows) if states is None or j.state in states]

    @staticmethod
    def _job(r) -> JobRecord:
        return JobRecord(r["job_id"], r["scientist"], JobRequest.model_validate_json(r["request"]), r["state"],
                         r["error"], Metrics.model_validate_json(r["metrics"]) if r["metrics"] else None)
