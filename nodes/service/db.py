"""SQLite plumbing shared by the node store and the grid store.

One connection per store guarded by a lock: the node's write rate is a few rows per job, so
serialising is simpler than pooling and keeps every write durable (WAL + synchronous=FULL).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

TOKEN_PREFIX = "vxg_"
#: Hex digits of a token's hash that name it in ``token list`` / ``token revoke --id`` (more where two share them).
TOKEN_ID_LEN = 8
_TOKEN_ID_RE = re.compile(r"^[0-9a-f]{%d,64}$" % TOKEN_ID_LEN)

TOKENS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    expires_at TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
# Columns added after the first release: (name, declaration) for files created before them.
_TOKEN_COLUMNS = (("expires_at", "TEXT"),)  # UTC ISO time (as now() writes it) the token stops working; NULL: never


class TokenError(ValueError):
    """A token request that cannot be done as asked; the message names the problem and nothing was changed."""


class UnknownToken(TokenError, LookupError):
    """No token has that name or id."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _stamp(t: datetime) -> str:
    """``t`` as :func:`now` writes times (UTC, milliseconds), so stored times compare as strings."""
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def parse_expiry(expires: str | date | None = None, days: float | None = None) -> str | None:
    """When a token being issued stops working: ``expires`` (a date ``YYYY-MM-DD``, meaning 00:00 UTC of
    that day, or an ISO 8601 time, UTC unless it says otherwise) or ``days`` from now; None: never.
    Raises :class:`TokenError` naming the problem for both given, a malformed date or a time not in the future."""
    if expires is not None and days is not None:
        raise TokenError("give an expiry date (--expires) or a number of days (--days), not both")
    if days is not None:
        if isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 < days <= 36500:
            raise TokenError(f"--days must be a number of days from 1 to 36500, got {days!r}")
        return _stamp(datetime.now(timezone.utc) + timedelta(days=days))
    if expires is None:
        return None
    if isinstance(expires, datetime):
        at = expires
    elif isinstance(expires, date):
        at = datetime(expires.year, expires.month, expires.day)
    else:
        text = str(expires).strip()
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise TokenError(f"malformed expiry date {expires!r}: use YYYY-MM-DD (e.g. 2027-03-01, the token stops "
                             f"working at 00:00 UTC that day) or an ISO 8601 time") from None
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    if at <= datetime.now(timezone.utc):
        raise TokenError(f"expiry date {expires} is not in the future (now: {now()}); give a later date")
    return _stamp(at)


def _token_ids(hashes: list[str]) -> dict[str, str]:
    """Each hash's short id: its first TOKEN_ID_LEN hex digits, or as many more as set it apart from the others."""
    ordered = sorted(set(hashes))

    def shared(a: str, b: str) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    ids = {}
    for i, h in enumerate(ordered):
        near = [shared(h, ordered[j]) for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
        ids[h] = h[:max(TOKEN_ID_LEN, max(near, default=0) + 1)]
    return ids


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
            self._migrate_tokens()

    def _migrate_tokens(self) -> None:
        """Add the token columns a file from an earlier release lacks (checked again under the write lock,
        so two processes opening one old file do not both add them)."""
        def missing(c) -> list[tuple[str, str]]:
            have = {r["name"] for r in c.execute("PRAGMA table_info(tokens)").fetchall()}
            return [(n, d) for n, d in _TOKEN_COLUMNS if n not in have]

        if missing(self._conn):
            with self.transaction() as c:
                for column, decl in missing(c):
                    c.execute(f"ALTER TABLE tokens ADD COLUMN {column} {decl}")

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
    def add_token(self, name: str, role: str, token: str | None = None, *, expires_at: str | None = None,
                  actor: str = "owner") -> str:
        """Store a token's hash (never the token) and return the token. ``expires_at``: as
        :func:`parse_expiry` returns it (None: never). Audited in the same transaction, before the insert."""
        token = token or new_token()
        if len(token) < 24:
            raise ValueError("a token must be at least 24 characters long")
        if expires_at is not None and expires_at <= now():
            raise TokenError(f"expiry {expires_at} is not in the future")
        token_hash = hash_token(self.issue_as(token) if self.issue_as else token)
        with self.transaction() as c:
            self.audit(actor, "token.issue", f"{role} token {token_hash[:TOKEN_ID_LEN]} for {name}"
                                             + (f", expires {expires_at}" if expires_at else ""), conn=c)
            c.execute(
                "INSERT OR REPLACE INTO tokens(token_hash, name, role, created_at, revoked, expires_at) "
                "VALUES (?,?,?,?,0,?)", (token_hash, name, role, now(), expires_at),
            )
        return token

    def check_token(self, token: str | None) -> tuple[str, str] | None:
        """(name, role) for a valid token (known, not revoked, not expired), else None. Read from the file on
        every call, so a revocation or an expiry takes effect at once in every process using it."""
        if not token:
            return None
        rows = self.query("SELECT name, role FROM tokens WHERE token_hash=? AND revoked=0 "
                          "AND (expires_at IS NULL OR expires_at > ?)", (hash_token(token), now()))
        return (rows[0]["name"], rows[0]["role"]) if rows else None

    def tokens(self) -> list[dict]:
        """Every token, oldest first: id, name, role, created, expires, revoked, expired (never the token
        or its hash; ``id`` is the hash's first hex digits, enough to name it for :meth:`revoke`)."""
        return [_public(t) for t in self._token_rows(self._conn, now())]

    def _token_rows(self, c, at: str) -> list[dict]:
        with self._lock:
            rows = c.execute("SELECT token_hash, name, role, created_at, expires_at, revoked FROM tokens "
                             "ORDER BY created_at, token_hash").fetchall()
        ids = _token_ids([r["token_hash"] for r in rows])
        return [{"id": ids[r["token_hash"]], "name": r["name"], "role": r["role"], "created": r["created_at"],
                 "expires": r["expires_at"], "revoked": bool(r["revoked"]),
                 "expired": r["expires_at"] is not None and r["expires_at"] <= at,
                 "_hash": r["token_hash"]} for r in rows]

    def revoke(self, *, name: str | None = None, token_id: str | None = None, actor: str = "owner") -> list[dict]:
        """Revoke every valid token of ``name``, or the one token ``token_id`` names; returns them (as
        :meth:`tokens` lists them). Audited in the same transaction, before the update. Raises
        :class:`UnknownToken` for an unknown name or id, :class:`TokenError` for a malformed or ambiguous id,
        tokens already revoked, or a revocation that would leave no valid owner token; nothing is changed then."""
        if (name is None) == (token_id is None):
            raise TokenError("give a token name or a token id to revoke (one of them)")
        with self.transaction() as c:
            at = now()
            rows = self._token_rows(c, at)
            targets = self._revoke_targets(rows, name, token_id)
            hashes = {t["_hash"] for t in targets}
            owners = {t["_hash"] for t in rows if t["role"] == "owner" and not t["revoked"] and not t["expired"]}
            if owners and owners <= hashes:
                raise TokenError(f"refusing to revoke {_describe(targets)}: that would leave no valid owner token "
                                 f"(the owner could no longer use the owner API); issue another owner token first "
                                 f"(token issue --role owner), then revoke this one")
            self.audit(actor, "token.revoke", _describe(targets), conn=c)
            c.executemany("UPDATE tokens SET revoked=1 WHERE token_hash=?", [(h,) for h in sorted(hashes)])
        return [_public(t) | {"revoked": True} for t in targets]

    @staticmethod
    def _revoke_targets(rows: list[dict], name: str | None, token_id: str | None) -> list[dict]:
        if token_id is not None:
            tid = str(token_id).strip().lower()
            if not _TOKEN_ID_RE.match(tid):
                raise TokenError(f"malformed token id {token_id!r}: an id is the {TOKEN_ID_LEN} (or more) hex digits "
                                 f"'token list' shows")
            found = [t for t in rows if t["_hash"].startswith(tid)]
            if not found:
                raise UnknownToken(f"no token has id {tid} ('token list' shows the ids)")
            if len(found) > 1:
                raise TokenError(f"id {tid} names {len(found)} tokens: give the longer id 'token list' shows")
            if found[0]["revoked"]:
                raise TokenError(f"token {found[0]['id']} of {found[0]['name']} is already revoked")
            return found
        found = [t for t in rows if t["name"] == name]
        if not found:
            raise UnknownToken(f"no token is named {name!r} ('token list' shows the names)")
        found = [t for t in found if not t["revoked"]]
        if not found:
            raise TokenError(f"every token of {name!r} is already revoked")
        return found

    def revoke_tokens(self, name: str) -> int:
        """Revoke every valid token of ``name``; how many (see :meth:`revoke`)."""
        return len(self.revoke(name=name))

    # audit --------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, detail: str, *, conn: sqlite3.Connection | None = None) -> None:
        """Append to the audit log; with ``conn`` (inside :meth:`transaction`), in that transaction, so the
        entry is written with the change it records or not at all."""
        if conn is not None:
            conn.execute("INSERT INTO audit(at, actor, action, detail) VALUES (?,?,?,?)", (now(), actor, action, detail))
            return
        with self.transaction() as c:
            c.execute("INSERT INTO audit(at, actor, action, detail) VALUES (?,?,?,?)", (now(), actor, action, detail))

    def audit_log(self, limit: int = 200) -> list[dict]:
        rows = self.query("SELECT at, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]


def _public(token: dict) -> dict:
    return {k: v for k, v in token.items() if not k.startswith("_")}


def _describe(tokens: list[dict]) -> str:
    if len(tokens) == 1:
        t = tokens[0]
        return f"{t['role']} token {t['id']} of {t['name']}"
    return f"{len(tokens)} tokens of {tokens[0]['name']} ({', '.join(t['id'] for t in tokens)})"
