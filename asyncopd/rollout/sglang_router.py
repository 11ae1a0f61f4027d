"""rollout.router=sglang_router: the SGLang ecosystem's router (`pip install sglang-router`, Rust, no torch) in front
of the rollout engines, started and stopped with the fleet.

What sglang-router 0.3.2 does with our traffic, measured in front of two embedded engines (tests/test_sglang_router.py
checks each point against the installed router):
- it binds 0.0.0.0 by default, and its Prometheus server too: both are bound to 127.0.0.1 here (the router is the
  run's own; the engines keep their rollout.host);
- it needs GET /health from a worker (GET /get_load for power_of_two) and reads /server_info at registration;
- it re-serialises /generate bodies: it adds `model: null`, `background`, `no_logs`, `return_bytes`,
  `return_entropy` (SGLang, and our engine, ignore them) and drops every field it does not know: our `mc_samples`
  extension is dropped whether top-level, in `sampling_params` or in `custom_params` (top-level or in
  sampling_params), and headers other than authorization, x-request-id and traceparent are not forwarded. So a
  request carrying the extension cannot pass it; the fleet sends those to the engines directly (rollout.dispatch).
  Standard fields do pass (`top_logprobs_num`, hence the student's top-k; `sampling_seed`, `rid`, `stop`);
- it refuses per-item `sampling_params` lists (422), so a seeded request carries one prompt;
- `--api-key K` is both the key it sends on its own calls to workers and the key it requires of its callers (401
  without), whose Authorization header it forwards to the worker: the engines' rollout.api_key serves for both;
  at registration it probes each worker with gRPC first (uvicorn logs "Invalid HTTP
  request received"), then settles on HTTP;
- it does not forward pause, weight-update or abort endpoints: the weight sync talks to each engine directly;
- its circuit breaker counts a worker's 4xx answers as failures (20 bad requests: 503 for 60 s for everyone): a
  client's malformed request says nothing about the engine, so it is off here;
- it retries 5xx, timeouts and connection errors (5 attempts by default, with backoff), but a retry may pick the
  dead engine again, and without the breaker only its health checks (every 60 s, 3 failures by default) take a
  dead engine out of rotation. SIGKILL of one engine of two, then 300 requests 50 ms apart: with default retries
  and health checks 98 failed (HTTP 500); with 3 attempts and a health check every 2 s (2 failures) 4 failed, all
  within the first seconds, the slowest answer 0.15 s. 3 attempts also bound what a hung engine costs a request
  (3 x rollout.request_timeout_s);
- it re-admits a worker that answers /health again: an engine restarted on its port (Ray, or its actor's watchdog)
  would take traffic with its checkpoint's weights before the supervisor re-broadcast the current ones. So the
  supervisor takes a lost engine out (`remove_worker`) and adds it back, at its possibly new URL, after catch-up
  (`add_worker`). 0.3.2's worker API is REST: GET /workers (id, url, is_healthy, ...), POST /workers {"url",
  "api_key"} and DELETE /workers/{id}, both answered 202 and done by a background job, so each call here waits for
  the list to show it; the older /add_worker, /remove_worker and /list_workers are 404. An answer does not name
  the worker that served it: a request the router failed, or answered with weights older than every engine behind
  it was sent, makes the supervisor look at every engine (`lost_behind`, asyncopd.pipeline.supervisor).
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from asyncopd.core.errors import ConfigError
from asyncopd.net.client import HttpClient, ServerError, unanswered
from asyncopd.weights.process_group import find_free_port

ROUTER_VERSION = "0.3.2"  # the release the flags and the behaviour above were measured on
ROUTERS = ("none", "sglang_router")
# power_of_two: of two engines drawn at random, the one with fewer requests in flight (the router's count, and
# /get_load): a request goes where there is room, as the in-process dispatcher sends it to a free slot.
ROUTER_FLAGS = ("--policy", "power_of_two", "--disable-circuit-breaker", "--retry-max-retries", "3",
                "--health-check-interval-secs", "2", "--health-failure-threshold", "2", "--log-level", "warn")


MISSING = (f"rollout.router=sglang_router needs sglang-router (`pip install sglang-router=={ROUTER_VERSION}`), "
           "which is not importable here; or set rollout.router=none (the in-process dispatcher)")


def require_router() -> None:
    if importlib.util.find_spec("sglang_router") is None:
        raise ConfigError(MISSING)


def lost_behind(e: BaseException) -> bool:
    """A request through the router that an engine behind it lost: no answer, or a 5xx (what the router answers once
    its own retries are spent). Sent again through the router, which then has other engines to pick; a deadline
    passed is not a loss (asyncopd.net.client.unanswered)."""
    return unanswered(e) or (isinstance(e, ServerError) and e.status is not None and e.status >= 500)


class SGLangRouter:
    """`python -m sglang_router.launch_router` over `worker_urls`, on 127.0.0.1 at a free port; `start()` -> URL
    once every worker is registered and healthy; `remove_worker`/`add_worker` while it runs; `stop()` ends it
    (terminate, then kill)."""

    def __init__(self, worker_urls: Sequence[str], *, api_key: str = "", request_timeout_s: float = 300.0,
                 extra_args: str = "", startup_timeout_s: float = 60.0, log_dir: str = ""):
        if not worker_urls:
            raise ValueError("SGLangRouter needs at least one worker URL")
        self.worker_urls, self.api_key = list(worker_urls), api_key
        self.request_timeout_s, self.extra_args = request_timeout_s, extra_args
        self.startup_timeout_s, self.log_dir = startup_timeout_s, log_dir
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path: Path | None = None
        self._client: HttpClient | None = None

    def command(self, port: int, metrics_port: int) -> list[str]:
        """Our flags first, then rollout.router_args: argparse keeps the last value, so the user's win."""
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *self.worker_urls,
               "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
               "--prometheus-port", str(metrics_port), "--request-timeout-secs", str(int(self.request_timeout_s)),
               "--worker-startup-timeout-secs", str(int(self.startup_timeout_s)), *ROUTER_FLAGS]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + shlex.split(self.extra_args)

    def _log_tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def workers(self) -> dict[str, dict]:
        """The router's workers by URL (GET /workers: id, is_healthy, load, ...); {} while it does not answer."""
        try:
            listed = self._client.get_json("/workers", timeout_s=2.0) if self._client is not None else {}
        except ServerError:
            return {}
        return {w["url"]: w for w in listed.get("workers", [])}

    def _await(self, done: Callable[[dict[str, dict]], bool], timeout_s: float, what: str) -> None:
        """Until `done(workers())`; RuntimeError naming the log if the router exits or `timeout_s` passes first."""
        deadline = time.monotonic() + timeout_s
        while not done(self.workers()):
            code = self.proc.poll() if self.proc is not None else -1
            if code is not None or time.monotonic() > deadline:
                why = f"exited with code {code} before it could" if code is not None else "did not"
                raise RuntimeError(f"sglang-router {why} {what} within {timeout_s} s; log {self.log_path}:\n"
                                   f"{self._log_tail()}")
            time.sleep(0.05)

    def remove_worker(self, url: str, timeout_s: float = 30.0) -> None:
        """`url` out of rotation (a no-op if not listed); returns once the router no longer lists it."""
        worker = self.workers().get(url)
        if worker is not None:
            try:
                self._client.request("DELETE", f"/workers/{worker['id']}")
            except ServerError as e:
                if e.status != 404:  # 404: removed meanwhile
                    raise
        self._await(lambda listed: url not in listed, timeout_s, f"remove worker {url}")

    def add_worker(self, url: str) -> None:
        """`url` in rotation, with the engines' API key; returns once the router lists it healthy."""
        self._client.post_json("/workers", {"url": url, **({"api_key": self.api_key} if self.api_key else {})})
        self._await(lambda listed: listed.get(url, {}).get("is_healthy", False), self.startup_timeout_s,
                    f"add worker {url}")

    def start(self) -> str:
        if self.proc is not None:
            return self.url
        require_router()
        port, metrics_port = find_free_port("127.0.0.1"), find_free_port("127.0.0.1")
        log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="sglang-router-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"sglang-router-{port}.log"
        cmd = self.command(port, metrics_port)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        self._client = HttpClient(url, api_key=self.api_key, timeout_s=10.0)
        try:
            self._await(lambda listed: all(listed.get(u, {}).get("is_healthy") for u in self.worker_urls),
                        self.startup_timeout_s, "report every engine healthy")
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}\ncommand: {shlex.join(cmd)}") from None
        self.url = url
        return url

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc, self._client = None, None
