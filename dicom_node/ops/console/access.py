"""Who may use the HTTP server, and how: one check for the API and the console, run before every route.

In order, for every request:

1. `Host` must name this server (`http.allowed_hosts`; on a loopback bind also
   a loopback name): a DNS-rebinding page reaches the server under a name of
   its own, and is refused.
2. A state-changing request (POST, PUT, PATCH, DELETE) that carries `Origin`
   must come from this server's own origin; one that a browser sends with the
   session cookie, or one to the console, must carry it (browsers always do
   on POST), so a form on another site cannot ride a logged-in session.
3. Who is calling: `Authorization: Bearer <http.bearer_token>` is `token`; a
   valid session cookie (HttpOnly, SameSite=Strict, set by the login page) is
   the user it was issued to. A logged-in browser's state-changing request
   must also carry the session's CSRF token (a hidden form field the console
   checks, `X-CSRF-Token` for the API), so the session alone never suffices.
4. Without either: `/healthz` and STOW-RS (its own sender tokens) are open; a
   loopback API without `bearer_token` stays open to local scripts as before
   (audited as `anonymous`); the console's pages send people to the login
   page, unless `http.console.read_only_without_login` (loopback only) lets
   them read without acting.

Sessions live in the node's memory (a restart logs everyone out): a session
id is 256 random bits, and logging out ends it on the server, not only in the
browser. Failed logins are counted per user name and client host
(`FailedLogins`): past `http.console.failed_logins` of them within
`http.console.lockout_minutes`, that name is refused from that host until the
oldest failure is that old, whatever password comes.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from dicom_node.config.base import LOOPBACK_HOSTS
from dicom_node.config.node import HttpConfig

log = logging.getLogger("dicom_node.ops.console")

SESSION_COOKIE = "dicom_node_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
CONSOLE_PREFIX = "/console/"


def is_console_path(path: str) -> bool:
    """The console's pages (HTML for people), as opposed to the API's paths (JSON for programs)."""
    return path == "/" or path.startswith(CONSOLE_PREFIX) or path in (LOGIN_PATH, LOGOUT_PATH)


@dataclass(frozen=True)
class Session:
    id: str
    user: str
    csrf_token: str
    expires: float  # time.monotonic()


@dataclass(frozen=True)
class Caller:
    """Who made a request: `actor` is a user name, `token` or `anonymous` (what the audit records)."""

    actor: str
    session: Session | None = None
    may_act: bool = True  # False: read-only pages without login


class Sessions:
    """Logged-in people, in memory."""

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(self, user: str) -> Session:
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32),
                          time.monotonic() + self.lifetime_s)
        with self._lock:
            now = time.monotonic()
            self._sessions = {key: s for key, s in self._sessions.items() if s.expires > now}
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires <= time.monotonic():
                del self._sessions[session_id]
                return None
            return session

    def end(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.pop(session_id, None)


class FailedLogins:
    """Failed logins per (user name, client host) in a sliding window.

    scrypt makes each guess slow, not rare: without a limit a script can try a password list against a
    console user around the clock. Counting per name and host, not per name alone, keeps one mistyping
    colleague (or someone who knows a user name) from locking that user out everywhere, and, not per host
    alone, keeps everyone behind one proxy from being locked out by one of them. At most `KEPT` pairs are
    remembered (the least recently failed are forgotten first), so a spray of made-up names cannot grow
    the node's memory."""

    KEPT = 10_000

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, user: str, host: str) -> float:
        """Seconds until `user` may try again from `host`; 0 while under the limit."""
        with self._lock:
            times = self._recent((user, host))
            if times is None or len(times) < self.limit:
                return 0.0
            return times[0] + self.window_s - self._clock()

    def failed(self, user: str, host: str) -> bool:
        """Count a failure; True when it is the one that reaches the limit."""
        key = (user, host)
        with self._lock:
            times = self._recent(key) or deque()
            times.append(self._clock())
            self._failures[key] = times
            self._failures.move_to_end(key)
            while len(self._failures) > self.KEPT:
                self._failures.popitem(last=False)
            return len(times) == self.limit

    def succeeded(self, user: str, host: str) -> None:
        with self._lock:
            self._failures.pop((user, host), None)

    def _recent(self, key: tuple[str, str]) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self._clock() - self.window_s
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times


def host_name(authority: str) -> str:
    """`host` of `host:port`, `[::1]:port` or `host`, lower case."""
    authority = authority.lower()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.rpartition(":")[0] if authority.count(":") == 1 else authority


class Access:
    """The checks of the module docstring for one server's `http` settings."""

    def __init__(self, http: HttpConfig) -> None:
        self.token = http.bearer_token
        self.loopback = http.host in LOOPBACK_HOSTS
        self.allowed_hosts = frozenset(http.allowed_hosts) | (LOOPBACK_HOSTS if self.loopback else frozenset())
        self.any_host = not self.loopback and not http.allowed_hosts  # an API-only node off loopback, as before
        self.read_only_open = http.console.read_only_without_login
        self.secure_cookie = http.tls is not None
        self.sessions = Sessions(http.console.session_hours * 3600)
        self.failed_logins = FailedLogins(http.console.failed_logins, http.console.lockout_minutes * 60)

    def foreign(self, method: str, host: str, origin: str | None, origin_required: bool) -> str | None:
        """Why a request may come from a web page rather than this server's own, or None."""
        if not self.any_host and host_name(host) not in self.allowed_hosts:
            return f"Host {host!r} is not a name of this server (http.allowed_hosts)"
        if method.upper() in UNSAFE_METHODS:
            if origin is None:
                return f"{method.upper()} without Origin from a browser session" if origin_required else None
            if origin.lower().partition("://")[2].rstrip("/") != host.lower():
                return f"cross-origin {method.upper()} from {origin!r}"
        return None

    def bearer(self, request: Request) -> bool | None:
        """True: the configured token; False: another; None: no Authorization header."""
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, given = header.partition(" ")
        return (self.token is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(given.encode(), self.token.encode()))

    def check(self, request: Request, open_path: bool) -> Caller | Response:
        """The caller of `request`, or the response that refuses it (module docstring)."""
        path, method = request.url.path, request.method.upper()
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        bearer = self.bearer(request)
        console = is_console_path(path)
        refusal = self.foreign(method, request.headers.get("host", ""), request.headers.get("origin"),
                               origin_required=console or (session is not None and bearer is None))
        if refusal is not None:
            return _refused(method, path, 403, refusal)
        if open_path:
            return Caller("anonymous")
        if bearer is True:
            return Caller("token")
        if bearer is False:
            return JSONResponse({"detail": "bearer token required"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if session is not None:
            if method in UNSAFE_METHODS and not console and not hmac.compare_digest(
                    request.headers.get(CSRF_HEADER, "").encode(), session.csrf_token.encode()):
                return _refused(method, path, 403, "a browser session's request needs its CSRF token")
            return Caller(session.user, session)
        if path == LOGIN_PATH:
            return Caller("anonymous", may_act=False)
        if console:
            if method in ("GET", "HEAD") and self.read_only_open:
                return Caller("anonymous", may_act=False)
            if method in ("GET", "HEAD"):
                return RedirectResponse(f"{LOGIN_PATH}?next={quote(path)}", status_code=303)
            return _refused(method, path, 403, "log in first")
        if self.token is None and self.loopback:
            return Caller("anonymous")
        return JSONResponse({"detail": "bearer token required"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    def session_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(SESSION_COOKIE, session.id, max_age=int(self.sessions.lifetime_s), httponly=True,
                            samesite="strict", secure=self.secure_cookie, path="/")


def csrf_ok(caller: Caller, given: str | None) -> bool:
    """A console form's hidden token matches the session's; a bearer-token client needs none."""
    if caller.actor == "token" and caller.session is None:
        return True
    return caller.session is not None and given is not None and hmac.compare_digest(
        given.encode(), caller.session.csrf_token.encode())


def _refused(method: str, path: str, status: int, reason: str) -> Response:
    log.warning("HTTP %s %s refused: %s", method, path, reason)
    return JSONResponse({"detail": reason}, status_code=status)
