"""Bounded storage for a node's blobs: who uploaded which weights, per-scientist quotas, expiry.

Uploaded weights are content-addressed files (``HOME/blobs/<sha256>.safetensors``). Each upload is
recorded here as an ownership row (weights id, scientist, bytes, when, last used) in the node's
SQLite, and charged to the uploader: a scientist may keep at most ``storage.quota_bytes`` bytes in
at most ``storage.quota_blobs`` blobs (the owner's ``node.json``). Re-uploading weights one already
holds costs nothing and refreshes them. Every uploader is charged for what they uploaded, even when
another scientist sent the same bytes: quotas never tell one scientist what another uploaded.

A sweep (at node start, every ``storage.sweep_minutes`` and when an upload would be refused)
deletes the ownership rows not used for ``storage.weights_ttl_hours`` (used: uploaded again, or
named by a job of that scientist, until it finished), then every weights file no row and no queued
or running job needs. Updates of finished jobs are deleted ``storage.updates_ttl_hours`` after the
job finished; such a job is marked failed with a message saying so, so that a restarted node does
not call the update lost and a resubmission runs the job again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import Field

from voxgrid.nodes.service.home import ConfigSection, Home

log = logging.getLogger("voxgrid.node.storage")

GiB = 1024 ** 3
ACTIVE = ("queued", "running")
SUFFIX = ".safetensors"
TMP_GRACE = timedelta(hours=1)  # a half-written *.tmp older than this is a crash's leftover
REFUSAL_SWEEP_S = 10.0  # at most one sweep this often on behalf of uploads that would be refused

SCHEMA = ("CREATE TABLE IF NOT EXISTS weight_blobs (weights_id TEXT NOT NULL, scientist TEXT NOT NULL, "
          "bytes INTEGER NOT NULL, created_at TEXT NOT NULL, last_used TEXT NOT NULL, "
          "PRIMARY KEY (weights_id, scientist))",
          "CREATE INDEX IF NOT EXISTS weight_blobs_by_scientist ON weight_blobs(scientist)")


class StoragePolicy(ConfigSection):
    """The owner's bounds on stored blobs (``node.json``'s ``storage`` section; every key optional)."""

    section = "storage"

    #: bytes of weights one scientist may keep at the node (4 GiB: 8 uploads at the 512 MiB body limit)
    quota_bytes: int = Field(4 * GiB, ge=0)
    #: weights blobs one scientist may keep (one per round per experiment: rounds of a day, with room)
    quota_blobs: int = Field(256, ge=0)
    #: weights no job used for this long are deleted (a round re-sends its weights, so a day is ample)
    weights_ttl_hours: float = Field(24.0, gt=0)
    #: updates of finished jobs are deleted this long after the job finished (a restart, a late collect)
    updates_ttl_hours: float = Field(168.0, gt=0)
    #: how often the node sweeps expired blobs while it runs
    sweep_minutes: float = Field(15.0, gt=0)



class OverQuota(Exception):
    """An upload past the scientist's storage quota; the message says what is used and how to free it."""


def human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _iso(t: datetime) -> str:
    """The format of :func:`voxgrid.nodes.service.db.now`, so stamps compare as strings with the jobs table's."""
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class SweepReport:
    weights: list[str] = field(default_factory=list)  # weights ids whose file was deleted
    updates: list[str] = field(default_factory=list)  # job ids whose update was deleted
    rows: int = 0  # ownership rows that expired
    freed_bytes: int = 0


class BlobStore:
    """Ownership, quotas and expiry of a node's blobs, over the node store's SQLite connection."""

    def __init__(self, store, home: Home, policy: StoragePolicy, *, evict_weights: Callable[[str], None] = None,
                 evict_update: Callable[[str], None] = None, clock: Callable[[], datetime] = _utcnow):
        self.store, self.home, self.policy, self.clock = store, home, policy, clock
        self._evict_weights = evict_weights or (lambda _: None)
        self._evict_update = evict_update or (lambda _: None)
        self._sweep_lock = threading.Lock()
        self._last_refusal_sweep = float("-inf")
        with store.transaction() as c:
            for statement in SCHEMA:
                c.execute(statement)

    # uploads -----------------------------------------------------------------------------------
    def admit(self, scientist: str, weights_id: str, size: int, *, exempt: bool = False) -> bool:
        """Record that ``scientist`` keeps these weights (True: new to them); OverQuota past the quota.

        ``exempt`` (the owner) records without a quota. Expired rows are swept first when the upload
        would be refused, so only live weights count.
        """
        try:
            return self._admit(scientist, weights_id, size, exempt)
        except OverQuota:
            now = time.monotonic()
            if now - self._last_refusal_sweep < REFUSAL_SWEEP_S:
                raise
            self._last_refusal_sweep = now
            self.sweep()
            return self._admit(scientist, weights_id, size, exempt)

    def _admit(self, scientist: str, weights_id: str, size: int, exempt: bool) -> bool:
        stamp = _iso(self.clock())
        with self.store.transaction() as c:  # BEGIN IMMEDIATE: concurrent uploads are checked one by one
            if c.execute("UPDATE weight_blobs SET last_used=? WHERE weights_id=? AND scientist=?",
                         (stamp, weights_id, scientist)).rowcount:
                return False  # identical bytes again: free, and fresh for another TTL
            used, count, oldest = c.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*), MIN(last_used) "
                                            "FROM weight_blobs WHERE scientist=?", (scientist,)).fetchone()
            p = self.policy
            if not exempt and (used + size > p.quota_bytes or count + 1 > p.quota_blobs):
                raise OverQuota(self._refusal(scientist, size, used, count, oldest))
            c.execute("INSERT INTO weight_blobs (weights_id, scientist, bytes, created_at, last_used) "
                      "VALUES (?,?,?,?,?)", (weights_id, scientist, size, stamp, stamp))
        return True

    def _refusal(self, scientist: str, size: int, used: int, count: int, oldest: str | None) -> str:
        p = self.policy
        due = ""
        if oldest:
            left = datetime.fromisoformat(oldest) + timedelta(hours=p.weights_ttl_hours) - self.clock()
            due = f" (your least recently used expire in about {max(left.total_seconds() / 3600, 0):.1f} h" \
                  f" unless a queued or running job of yours uses them)"
        return (f"storage quota exceeded for {scientist!r}: these weights take {human(size)}, you already keep "
                f"{human(used)} in {count} weights blob(s), and this node's quota is {human(p.quota_bytes)} in "
                f"{p.quota_blobs} blob(s) per scientist. Weights no job of yours has used for "
                f"{p.weights_ttl_hours:g} h are deleted automatically{due}; re-uploading weights you already "
                f"sent costs nothing, so reuse their weights_id; the node's owner can raise storage.quota_bytes "
                f"and storage.quota_blobs in node.json")

    def usage(self) -> dict[str, dict]:
        """Per scientist: bytes and blobs charged."""
        return {r["scientist"]: {"bytes": r["b"], "blobs": r["n"]} for r in self.store.query(
            "SELECT scientist, SUM(bytes) b, COUNT(*) n FROM weight_blobs GROUP BY scientist ORDER BY scientist")}

    # expiry ------------------------------------------------------------------------------------
    def sweep(self, now: datetime | None = None) -> SweepReport:
        """Delete what expired (see the module's docstring); never what a queued or running job needs."""
        with self._sweep_lock:
            now = now or self.clock()
            report = SweepReport()
            self._expire_rows(now, report)
            self._expire_weight_files(now, report)
            self._expire_updates(now, report)
            if report.weights or report.updates or report.rows:
                log.info("storage sweep: %d weights blob(s) and %d update(s) deleted, %s freed; %d ownership row(s) "
                         "expired", len(report.weights), len(report.updates), human(report.freed_bytes), report.rows)
                self.store.audit("node", "storage.sweep",
                                 f"{len(report.weights)} weights blob(s), {len(report.updates)} update(s) deleted, "
                                 f"{human(report.freed_bytes)} freed")
            return report

    def _expire_rows(self, now: datetime, report: SweepReport) -> None:
        cutoff = _iso(now - timedelta(hours=self.policy.weights_ttl_hours))
        for r in self.store.query("SELECT weights_id, scientist, last_used FROM weight_blobs WHERE last_used < ?",
                                  (cutoff,)):
            wid, who = r["weights_id"], r["scientist"]
            active, latest = self.store.query(
                "SELECT COALESCE(SUM(state IN ('queued', 'running')), 0), MAX(updated_at) FROM jobs "
                "WHERE scientist=? AND json_extract(request, '$.weights_id')=?", (who, wid))[0]
            with self.store.transaction() as c:
                if active:  # in use now: fresh
                    c.execute("UPDATE weight_blobs SET last_used=? WHERE weights_id=? AND scientist=?",
                              (_iso(now), wid, who))
                elif latest and latest >= cutoff:  # a job of theirs used it lately
                    c.execute("UPDATE weight_blobs SET last_used=MAX(last_used, ?) WHERE weights_id=? AND "
                              "scientist=?", (latest, wid, who))
                else:  # the condition again: an upload since the query refreshed it
                    report.rows += c.execute("DELETE FROM weight_blobs WHERE weights_id=? AND scientist=? AND "
                                             "last_used < ?", (wid, who, cutoff)).rowcount

    def _active_weights(self) -> set[str]:
        return {r[0] for r in self.store.query(
            "SELECT DISTINCT json_extract(request, '$.weights_id') FROM jobs WHERE state IN ('queued', 'running')")}

    def _expire_weight_files(self, now: datetime, report: SweepReport) -> None:
        cutoff = (now - timedelta(hours=self.policy.weights_ttl_hours)).timestamp()
        for path in self._files(self.home.blobs, now):
            wid = path.name[:-len(SUFFIX)]
            with self.store.transaction() as c:  # the store's lock: an upload cannot slip in between
                if c.execute("SELECT 1 FROM weight_blobs WHERE weights_id=? LIMIT 1", (wid,)).fetchone():
                    continue
                if c.execute("SELECT 1 FROM jobs WHERE state IN ('queued', 'running') AND "
                             "json_extract(request, '$.weights_id')=? LIMIT 1", (wid,)).fetchone():
                    continue
                size = self._mtime_size(path)
                if size is None or size[0] >= cutoff:  # gone, or unowned but recent (from before quotas)
                    continue
                self._evict_weights(wid)
                path.unlink(missing_ok=True)
            report.weights.append(wid)
            report.freed_bytes += size[1]

    def _expire_updates(self, now: datetime, report: SweepReport) -> None:
        ttl = timedelta(hours=self.policy.updates_ttl_hours)
        cutoff = _iso(now - ttl)
        for path in self._files(self.home.updates, now):
            job_id = path.name[:-len(SUFFIX)]
            rows = self.store.query("SELECT state, updated_at FROM jobs WHERE job_id=?", (job_id,))
            size = self._mtime_size(path)
            if size is None or (rows and rows[0]["state"] in ACTIVE):
                continue
            finished = rows[0]["updated_at"] if rows else _iso(datetime.fromtimestamp(size[0], timezone.utc))
            if finished >= cutoff:
                continue
            if rows and rows[0]["state"] == "done":  # first: a crash in between must not read as "update lost"
                with self.store.transaction() as c:
                    c.execute("UPDATE jobs SET state='failed', error=?, updated_at=? WHERE job_id=? AND state='done'",
                              (f"the update expired: this node deletes updates {self.policy.updates_ttl_hours:g} h "
                               "after their job finished (storage.updates_ttl_hours); submit the job again if you "
                               "still need it", _iso(now), job_id))
                self.store.audit("node", "update.expired", job_id)
            self._evict_update(job_id)
            path.unlink(missing_ok=True)
            report.updates.append(job_id)
            report.freed_bytes += size[1]

    @staticmethod
    def _mtime_size(path: Path) -> tuple[float, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def _files(self, folder: Path, now: datetime) -> list[Path]:
        """The blob files of a folder; removes a crash's leftover ``*.tmp`` files on the way."""
        try:
            entries = list(folder.iterdir())
        except OSError:
            return []
        out = []
        for p in entries:
            if p.name.endswith(".tmp"):
                st = self._mtime_size(p)
                if st and st[0] < (now - TMP_GRACE).timestamp():
                    p.unlink(missing_ok=True)
            elif p.name.endswith(SUFFIX) and p.is_file() and not p.is_symlink():
                out.append(p)
        return out

    # a sweep while the node runs ---------------------------------------------------------------
    def start_sweeper(self) -> Sweeper:
        sweeper = Sweeper(self.sweep, self.policy.sweep_minutes * 60)
        sweeper.start()
        return sweeper


class Sweeper(threading.Thread):
    """Sweeps now, then every ``interval`` seconds until :meth:`stop`; a failed sweep is logged, not fatal."""

    def __init__(self, sweep: Callable[[], object], interval: float):
        super().__init__(daemon=True, name="storage-sweeper")
        self._sweep, self.interval = sweep, interval
        self._stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self._sweep()
            except Exception:  # noqa: BLE001 - a full disk or a locked database must not stop the node
                log.exception("storage sweep failed; trying again in %.0f s", self.interval)
            if self._stopping.wait(self.interval):
                return

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=30)


# the owner's view ----------------------------------------------------------------------------------
def _folder(folder: Path) -> tuple[int, int]:
    n = size = 0
    try:
        for p in folder.iterdir():
            if p.name.endswith(SUFFIX) and p.is_file():
                n, size = n + 1, size + p.stat().st_size
    except OSError:
        pass
    return n, size


def storage_report(home: Home, policy: StoragePolicy) -> dict:
    """What the node's blobs take and who is charged for what; reads the store without writing."""
    weights, updates = _folder(home.blobs), _folder(home.updates)
    usage: dict[str, dict] = {}
    if home.db_file.is_file():
        try:
            conn = sqlite3.connect(f"{home.db_file.as_uri()}?mode=ro", uri=True, timeout=5)
            try:
                usage = {s: {"bytes": b, "blobs": n} for s, b, n in conn.execute(
                    "SELECT scientist, SUM(bytes), COUNT(*) FROM weight_blobs GROUP BY scientist ORDER BY scientist")}
            finally:
                conn.close()
        except sqlite3.Error:  # no table yet (a node that never started since quotas), or unreadable
            usage = {}
    return {"weights": {"files": weights[0], "bytes": weights[1]},
            "updates": {"files": updates[0], "bytes": updates[1]},
            "scientists": usage, "policy": policy.model_dump()}
