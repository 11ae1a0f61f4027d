"""Shared HTTP client plumbing: one kept-alive connection per thread, bearer key, clear errors.

The transport is the standard library's http.client, not requests: every pipeline step makes several calls
(generate, score, weight update), and on a 2-core machine requests spends ~1 ms of client CPU per call
(session merging, hooks, cookie jars) against ~0.1 ms for http.client (`asyncopd bench latency`). Proxy
settings in the environment are not consulted: this is service-to-service traffic inside one run.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class ServerError(RuntimeError):
    """A server answered with an error status (the server's own message is included), or not at all."""

    def __init__(self, message: str, status: int | None = None, timed_out: bool = False):
        super().__init__(message)
        self.status = status
        self.timed_out = timed_out  # the deadline passed with the server still on it: busy, not known to be gone


def unanswered(e: BaseException) -> bool:
    """The server gave no answer (refused, reset): it may be gone, so its supervisor should look. A request that
    outran its deadline is not that: a long generation or a paused engine is alive, and restarting it would lose
    its work (the caller's error names the deadline to raise)."""
    return isinstance(e, ServerError) and e.status is None and not e.timed_out


def transient(e: BaseException) -> bool:
    """Another try may succeed, here later or on another replica: no answer, or a 5xx. A 4xx never does."""
    return isinstance(e, ServerError) and (e.status is None or e.status >= 500)


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff: at most `attempts` tries, try k+1 after min(base_s * 2**k, max_s) seconds, and
    none started after `deadline_s` from the first (each try keeps its own request deadline, `timeout_s`)."""

    attempts: int = 4
    base_s: float = 0.2
    max_s: float = 5.0
    deadline_s: float = 600.0

    def delays(self) -> Iterator[float]:
        """The waits between tries: attempts - 1 of them."""
        for k in range(max(self.attempts, 1) - 1):
            yield min(self.base_s * 2**k, self.max_s)

    def call(self, fn: Callable[[int], T], retry_if: Callable[[BaseException], bool] = transient) -> T:
        """`fn(attempt)` until it returns, retrying errors `retry_if` accepts; the last error is raised once the
        tries or the deadline run out (`attempt` lets a caller pick another replica per try)."""
        deadline = time.monotonic() + self.deadline_s
        delays = self.delays()
        attempt = 0
        while True:
            try:
                return fn(attempt)
            except Exception as e:
                delay = next(delays, None)
                if not retry_if(e) or delay is None or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            attempt += 1


@dataclass
class Response:
    """What the clients read of an answer: status, body bytes, headers (lower-case names), and the size of
    the request body that was sent (for bytes-on-the-wire accounting)."""

    status_code: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)
    sent_bytes: int = 0

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


# A kept-alive connection the server has since closed fails when reused, before any answer: open a new one
# and send again, as requests/urllib3 do. Anything after the request was answered is never retried.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class HttpClient:
    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 300.0):
        self.retarget(base_url)
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()

    def retarget(self, base_url: str) -> None:
        """Talk to `base_url` from now on (a restarted server on another port); every thread's kept-alive
        connection to the old address is dropped at its next call."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host, self._port, self._prefix = parts.hostname or "", parts.port, parts.path

    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh or (conn.host, conn.port) != (self._host, self._port or conn.default_port):
            if conn is not None:
                conn.close()
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self.timeout_s)
        return conn

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
              headers: dict[str, str], timeout_s: float) -> Response:
        conn.timeout = timeout_s
        if conn.sock is not None:
            conn.sock.settimeout(timeout_s)
        conn.request(method, self._prefix + path, body=body, headers=headers)
        r = conn.getresponse()
        content = r.read()
        return Response(r.status, content, {k.lower(): v for k, v in r.getheaders()}, len(body or b""))

    def request(self, method: str, path: str, *, timeout_s: float | None = None, json: Any = None,
                data: bytes | None = None, headers: dict[str, str] | None = None) -> Response:
        """One call on this thread's kept-alive connection, `timeout_s` its deadline; raises ServerError on no answer
        or status >= 400 (retrying is the caller's: Backoff, on the same server or another)."""
        url = self.base_url + path
        hdrs = {**self._headers, **(headers or {})}
        body = data
        if json is not None:
            body = jsonlib.dumps(json).encode()
            hdrs.setdefault("Content-Type", "application/json")
        timeout = timeout_s or self.timeout_s
        try:
            reused = getattr(self._local, "conn", None) is not None
            try:
                r = self._send(self._connection(), method, path, body, hdrs, timeout)
            except _STALE:
                if not reused:
                    raise
                r = self._send(self._connection(fresh=True), method, path, body, hdrs, timeout)
        except (OSError, http.client.HTTPException) as e:
            self._connection(fresh=True)  # never reuse a connection left mid-exchange
            if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError
                raise ServerError(f"{method} {url}: no answer within {timeout:g} s (the request's deadline: raise "
                                  "rollout.request_timeout_s / teacher.request_timeout_s for longer generations)",
                                  timed_out=True) from None
            raise ServerError(f"{method} {url}: no answer ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            try:
                body_json = r.json()
                msg = body_json.get("error") or body_json.get("message") or body_json.get("detail") or body_json
            except (ValueError, AttributeError):
                msg = r.text[:500]
            raise ServerError(f"{method} {url}: HTTP {r.status_code}: {msg}", r.status_code)
        return r

    def get_json(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw).json()

    def post_json(self, path: str, payload: dict | None = None, **kw) -> Any:
        r = self.request("POST", path, json=payload if payload is not None else {}, **kw)
        return r.json() if r.content else {}
