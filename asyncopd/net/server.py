"""Shared server plumbing: bind checks, bearer-token auth, JSON errors, uvicorn in a thread."""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from asyncopd.data.tokenizer import TOKENIZER_FILE, tokenizer_fingerprint, tokenizer_vocab_size

log = logging.getLogger(__name__)

# Paths anyone on the network may read without the API key: liveness probes, as SGLang exempts /health*
# (its /health_generate runs a one-token generation: a probe, not an admin or weight endpoint).
PUBLIC_PATHS = frozenset({"/health", "/health_generate"})


class ApiError(Exception):
    """Raised inside a handler: answered as HTTP `status` with JSON {"error": message}."""

    def __init__(self, message: str, status: int = 400, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.extra = extra or {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str, what: str) -> None:
    """Refuse to listen beyond loopback without an API key (DESIGN.md: weight updates need the key)."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"{what}: refusing to listen on {host!r} without an API key; set {what}.api_key "
            f"(clients then send 'Authorization: Bearer <key>') or bind {what}.host=127.0.0.1")


def too_large(what: str, limit: int, field: str) -> ApiError:
    """HTTP 413 naming the limit and the setting that raises it."""
    return ApiError(f"{what} exceeds the limit {field}={limit}; split the request or raise {field}", status=413)


def make_app(title: str, api_key: str = "", max_body_bytes: int = 0, limit_field: str = "max_request_bytes") -> FastAPI:
    """A FastAPI app that answers ApiError as JSON {"error"}, and checks the bearer key when set.

    `max_body_bytes` > 0 caps a request body: a larger Content-Length is refused before the body is read, and
    `read_json` stops reading a chunked body at the cap (413 naming `limit_field`)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.max_body_bytes = int(max_body_bytes)
    app.state.limit_field = limit_field

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse({**exc.extra, "error": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        log.exception("%s: unhandled error", title)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    if max_body_bytes:
        @app.middleware("http")
        async def _body_limit(request: Request, call_next):
            size = request.headers.get("content-length", "")
            if size.isdigit() and int(size) > max_body_bytes:
                exc = too_large(f"request body of {size} bytes", max_body_bytes, limit_field)
                return JSONResponse({"error": exc.message}, status_code=exc.status)
            return await call_next(request)

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.url.path not in PUBLIC_PATHS:
                got = request.headers.get("authorization", "").encode()
                if not secrets.compare_digest(got, expected):
                    return JSONResponse(
                        {"error": "missing or wrong API key: send header 'Authorization: Bearer <api_key>'"},
                        status_code=401)
            return await call_next(request)

    return app


async def read_body(request: Request) -> bytes:
    """The request body, read no further than the app's `max_body_bytes` (chunked bodies carry no length)."""
    limit = getattr(request.app.state, "max_body_bytes", 0)
    if not limit:
        return await request.body()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"request body of over {limit} bytes", limit, request.app.state.limit_field)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict[str, Any]:
    body = await read_body(request)
    try:
        payload = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"request body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise ApiError("request body must be a JSON object")
    return payload


class ServerThread:
    """Serve `app` with uvicorn on a daemon thread; port 0 picks a free port (see `.url`)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto must be IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY on a
        # connection only when sock.proto == IPPROTO_TCP (base_events._set_nodelay). Without it, Nagle plus
        # the client's delayed ACK stall every response after the first on a kept-alive connection ~40 ms.
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn:{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"HTTP server on {self.url} exited during start-up (see log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {self.url} did not start within {timeout_s} s")
            time.sleep(0.01)
        return self

    @property
    def alive(self) -> bool:
        """Whether uvicorn still serves (a standalone server exits when it does not)."""
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()


class HttpService:
    """Base of the rollout and teacher servers: serves `self.app` once `start()` is called."""

    def _listen(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self._server = ServerThread(app, host, port)

    @property
    def url(self) -> str:
        return self._server.url

    def start(self):
        self._server.start()
        return self

    @property
    def alive(self) -> bool:
        return self._server.alive

    def stop(self) -> None:
        self._server.stop()


def vocabulary_card(model_path: str | Path, rows: int) -> dict[str, Any]:
    """The vocabulary fields of /model_info for a checkpoint at `model_path` with `rows` embedding rows.

    `tokenizer_vocab_size` counts the ids its tokenizer can produce: a checkpoint may pad its embedding past them
    (Qwen3: 151669 tokens, 151936 rows), and teacher and student may pad differently, so the pipeline pairs them
    by `tokenizer_fingerprint` and that count, never by rows. Without tokenizer files (bare test models) every
    row counts as a token and the fingerprint is "", which the pipeline refuses to pair.
    """
    if not model_path or not (Path(model_path) / TOKENIZER_FILE).is_file():
        return {"vocab_size": rows, "tokenizer_vocab_size": rows, "tokenizer_fingerprint": ""}
    return {"vocab_size": rows, "tokenizer_vocab_size": tokenizer_vocab_size(model_path),
            "tokenizer_fingerprint": tokenizer_fingerprint(model_path)}


def model_card(model_path: str | Path, model) -> dict[str, Any]:
    """Fields every server's /model_info carries so the pipeline can check compatibility."""
    cfg = model.config
    return {
        "model_path": str(model_path),
        **vocabulary_card(model_path, int(cfg.vocab_size)),
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0) or 0),
        "architectures": list(getattr(cfg, "architectures", None) or []),
    }
