"""Shared HTTP client plumbing: one requests.Session per thread, bearer key, clear errors."""

from __future__ import annotations

import threading
from typing import Any

import requests


class ServerError(RuntimeError):
    """A server answered with an error status (the server's own message is included), or not at all."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class HttpClient:
    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 300.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            # service-to-service traffic inside the run: an operator's HTTP(S)_PROXY must not route it, and
            # reading the environment for proxies costs ~0.3 ms on every call
            s.trust_env = False
            s.headers.update(self._headers)
        return s

    def request(self, method: str, path: str, *, timeout_s: float | None = None, **kw) -> requests.Response:
        url = self.base_url + path
        try:
            r = self.session.request(method, url, timeout=timeout_s or self.timeout_s, **kw)
        except requests.RequestException as e:
            raise ServerError(f"{method} {url}: no answer ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            try:
                body = r.json()
                msg = body.get("error") or body.get("message") or body.get("detail") or body
            except ValueError:
                msg = r.text[:500]
            raise ServerError(f"{method} {url}: HTTP {r.status_code}: {msg}", r.status_code)
        return r

    def get_json(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw).json()

    def post_json(self, path: str, payload: dict | None = None, **kw) -> Any:
        r = self.request("POST", path, json=payload if payload is not None else {}, **kw)
        return r.json() if r.content else {}
