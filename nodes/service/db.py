"""SQLite plumbing shared by the node store and the grid store.

One connection per store guarded by a lock: the node's write rate is a few rows per job, so
serialising is simpler than pooling and keeps every write durable (WAL + synchronous=FULL).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

TOKEN_PREFIX = "vxg_"

TOKENS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class Database:
    """A SQLite file with the token and audit tables every voxgrid server has."""

    def __init__(self, path: Path, schema: str, issue_as: Callable[[str], str] | None = None):
        self.path = Path(path)
        # issue_as: what a holder will present instead of the token (the grid: voxgrid.client.grid_credential)
        self.issue_as = issue_as
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            self._conn.executescript(TOKENS_SCHEMA + schema)  # runs in its own transaction

    @contextmanager
    def transaction(self):
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # tokens -------------------------------------------------------------------------------
    def add_token(self, name: str, role: str, token: str | None = None) -> str:
        """Store a token's hash (never the token) and return the token."""
        token = token or new_token()
        if len(token) < 24:
            raise ValueError("a token must be at least 24 characters long")
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO tokens(token_hash, name, role, created_at, revoked) VALUES (?,?,?,?,0)",
                (hash_token(self.issue_as(token) if self.issue_as else token), name, role, now()),
            )
        self.audit("owner", "token.issue", f"{role} token for {name}")
        return token

    def check_token(self, token: str | None) -> tuple[str, str] | None:
        """(name, role) for a valid token, else None."""
        if not token:
            return None
        rows = self.query("SELECT name, role FROM tokens WHERE token_hash=? AND revoked=0", (hash_token(token),))
        return (rows[0]["name"], rows[0]["role"]) if rows else None

    def revoke_tokens(self, name: str) -> int:
        with self.transaction() as c:
            n = c.execute("UPDATE tokens SET revoked=1 WHERE name=? AND revoked=0", (name,)).rowcount
        self.audit("owner", "token.revoke", f"{n} token(s) of {name}")
        return n

    def tokens(self) -> list[dict]:
        return [dict(r) | {"token_hash": r["token_hash"][:12]} for r in self.query(
            "SELECT token_hash, name, role, created_at, revoked FROM tokens ORDER BY created_at")]

    # audit --------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, detail: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO audit(at, actor, action, detail) VALUES (?,?,?,?)", (now(), actor, action, detail))

    def audit_log(self, limit: int = 200) -> list[dict]:
        rows = self.query("SELECT at, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]
