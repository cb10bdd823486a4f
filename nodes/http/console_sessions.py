"""Sessions and cross-site request forgery checks of the owner console (:mod:`.console`).

A session is a random id (256 bits) in an HttpOnly, SameSite=Strict, Secure cookie; everything else stays in
this process's memory: the owner token it logged in with (re-checked on every request, so a revoked or
expired token ends the session at once), a CSRF token for the hidden field of every form, and two expiries.
A login form gets an anonymous session first, so the login POST is checked like every other; logging in
replaces the id (no fixation). A restart of the node logs everyone out, which is what an owner expects.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COOKIE = "__Host-voxgrid-console"  # __Host-: Secure, Path=/, no Domain: only this host sets it
#: Seconds a session lasts without a request, and at most; an anonymous (login form) one lasts less.
IDLE_S, MAX_AGE_S, ANONYMOUS_S = 30 * 60, 8 * 3600, 10 * 60
#: Sessions kept at once; past it the oldest go first (anonymous ones cost an attacker nothing to make).
MAX_SESSIONS = 512


@dataclass
class Session:
    sid: str
    csrf: str
    token: str | None = None  # the owner token; None until logged in
    name: str | None = None
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)
    flash: str | None = None  # a one-time message for the next page ("request r1 approved")

    def expired(self, at: float) -> bool:
        if self.token is None:
            return at - self.created > ANONYMOUS_S
        return at - self.seen > IDLE_S or at - self.created > MAX_AGE_S

    def pop_flash(self) -> str | None:
        text, self.flash = self.flash, None
        return text


class Sessions:
    """The console's sessions, thread-safe (handlers run in a thread pool)."""

    def __init__(self):
        self._items: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self, token: str | None = None, name: str | None = None) -> Session:
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), token, name)
        with self._lock:
            self._sweep(time.monotonic())
            while len(self._items) >= MAX_SESSIONS:
                oldest = min(self._items.values(), key=lambda x: (x.token is not None, x.seen))
                del self._items[oldest.sid]
            self._items[s.sid] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id (its last use now), or None."""
        if not sid:
            return None
        at = time.monotonic()
        with self._lock:
            s = self._items.get(sid)
            if s is None or s.expired(at):
                self._items.pop(sid, None)
                return None
            s.seen = at
            return s

    def drop(self, sid: str) -> None:
        with self._lock:
            self._items.pop(sid, None)

    def _sweep(self, at: float) -> None:
        for sid in [k for k, s in self._items.items() if s.expired(at)]:
            del self._items[sid]


def csrf_ok(session: Session | None, sent: str | None) -> bool:
    """Whether ``sent`` (the form's hidden field) is this session's CSRF token, compared in constant time."""
    return session is not None and bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())


def same_origin(headers, allowed_hosts: set[str]) -> str | None:
    """None if a POST comes from a page of this console, else why not. The Origin header (the Referer where a
    browser sends none) must be ``https://`` + the Host header, and that host must be one the console
    answers to (loopback or its configured names), so a DNS-rebound name cannot pass either."""
    host = headers.get("host", "")
    hostname = urlsplit(f"//{host}").hostname or ""
    if hostname not in allowed_hosts:
        return f"host {host!r} is not one this console answers to"
    origin = headers.get("origin")
    if origin is None:
        referer = headers.get("referer")
        if not referer:
            return "the request carries neither Origin nor Referer"
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin != f"https://{host}":
        return f"it comes from {origin!r}, not from this console (https://{host})"
    return None
