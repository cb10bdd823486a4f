"""Long-polls that hold no thread: an asyncio.Event per waiter, set from the executor's thread.

A waiter registers for a job, checks the job's state, then awaits its event; ``wake(job_id)``
(called from any thread when the job changes) sets the events of that job's waiters through their
loops. Each caller may have at most ``per_caller`` waits at once (:class:`TooManyWaits` past it).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from contextlib import contextmanager


class JobWaits:
    def __init__(self, per_caller: int):
        self.per_caller = per_caller
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._counts: Counter = Counter()

    @contextmanager
    def register(self, caller_key, job_id: str):
        """An event set whenever ``job_id`` changes; ``None`` when the caller already has ``per_caller`` waits."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            full = self._counts[caller_key] >= self.per_caller
            if not full:
                self._counts[caller_key] += 1
                self._waiters.setdefault(job_id, set()).add(waiter)
        if full:
            yield None
            return
        try:
            yield waiter[1]
        finally:
            with self._lock:
                self._counts[caller_key] -= 1
                if not self._counts[caller_key]:
                    del self._counts[caller_key]
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[job_id]

    def wake(self, job_id: str) -> None:
        """Thread-safe: wake every waiter of ``job_id``."""
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has closed (the server is stopping)
                pass

    def active(self, caller_key) -> int:
        with self._lock:
            return self._counts[caller_key]
