"""Which of several inference servers gets the next request: round-robin over the servers that are up,
with a back-off for the ones that failed.

A server whose request failed with a connection error, or that answered not
ready, is marked down and gets no request until its back-off has passed; the
next request that finds it due probes its readiness first, and only a ready
answer brings it back (a failed probe doubles the back-off, up to
MAX_BACKOFF_FACTOR times the first). The caller (inference.backends.TritonBackend)
sends the request to the next server in the order this gives, so a server
stopped in the middle of a series costs that series one failed request, not
the job. The pool knows nothing about the protocol: it is told what happened.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MAX_BACKOFF_FACTOR = 12  # 5 s first back-off: a dead server is probed at most once a minute


@dataclass(frozen=True)
class ServerState:
    """One server as health views report it: up, or down with the reason and when it is probed next."""

    url: str
    up: bool
    reason: str = ""  # why it is down ("" when up)
    probe_in_s: float = 0.0  # this process's back-off left before a request probes it (0 when up or due)

    def describe(self) -> str:
        return "up" if self.up else f"down ({self.reason})"


@dataclass(frozen=True)
class Candidate:
    url: str
    probe: bool  # down until now: probe its readiness before sending it the request


@dataclass
class _Server:
    url: str
    down_until: float | None = None  # monotonic time its back-off ends; None while up
    backoff_s: float = 0.0
    reason: str = ""


class ServerPool:
    """The servers' up/down marks and the round-robin cursor, shared by the threads of one process."""

    def __init__(self, urls: tuple[str, ...], backoff_s: float) -> None:
        if not urls:
            raise ValueError("a server pool needs at least one url")
        self._servers = [_Server(url) for url in urls]
        self._first_backoff_s = backoff_s
        self._next = 0
        self._lock = threading.Lock()

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(server.url for server in self._servers)

    def candidates(self, every: bool = False) -> list[Candidate]:
        """The order to try the servers in for one request: first the down servers whose back-off has
        passed, to be probed (a ready one takes this request: that is how a server comes back), then the
        up servers from the round-robin cursor (which moves on by one per request); with `every` (a retry
        after all failed) the down servers still in back-off last."""
        now = time.monotonic()
        with self._lock:
            count = len(self._servers)
            rotated = [self._servers[(self._next + i) % count] for i in range(count)]
            self._next = (self._next + 1) % count
            due = sorted((s for s in rotated if s.down_until is not None and s.down_until <= now),
                         key=lambda s: s.down_until)
            up = [s for s in rotated if s.down_until is None]
            waiting = sorted((s for s in rotated if s.down_until is not None and s.down_until > now and every),
                             key=lambda s: s.down_until)
        return ([Candidate(s.url, True) for s in due] + [Candidate(s.url, False) for s in up]
                + [Candidate(s.url, True) for s in waiting])

    def mark_down(self, url: str, reason: str) -> bool:
        """Back-off from now; doubled when the server was down already (its probe failed). True when
        the server was up until now (the caller logs the change once)."""
        with self._lock:
            server = self._server(url)
            was_up = server.down_until is None
            server.backoff_s = (self._first_backoff_s if was_up
                                else min(server.backoff_s * 2, self._first_backoff_s * MAX_BACKOFF_FACTOR))
            server.down_until = time.monotonic() + server.backoff_s
            server.reason = reason
            return was_up

    def mark_up(self, url: str) -> bool:
        """True when the server was down until now."""
        with self._lock:
            server = self._server(url)
            was_down = server.down_until is not None
            server.down_until, server.backoff_s, server.reason = None, 0.0, ""
            return was_down

    def states(self) -> list[ServerState]:
        now = time.monotonic()
        with self._lock:
            return [ServerState(s.url, s.down_until is None, s.reason,
                                0.0 if s.down_until is None else max(s.down_until - now, 0.0))
                    for s in self._servers]

    def _server(self, url: str) -> _Server:
        for server in self._servers:
            if server.url == url:
                return server
        raise KeyError(url)
