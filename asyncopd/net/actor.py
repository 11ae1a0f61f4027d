"""What the rollout and teacher Ray actors share: thread budget, reachable URL, serving and keeping it served."""

from __future__ import annotations

import errno
import logging
import os
import threading

import ray
import torch

from asyncopd.config.schema import SupervisionConfig
from asyncopd.net.client import HttpClient, ServerError

log = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    """The role's CPU budget (DESIGN.md: a fixed budget per role, the same in every mode)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def url_port(url: str) -> int:
    """The port of a server's base URL (http://host:port)."""
    return int(url.rsplit(":", 1)[1])


def public_url(url: str, host: str) -> str:
    """A wildcard bind (0.0.0.0 / ::) is reached at this node's IP, not at the wildcard."""
    if host not in ("0.0.0.0", "::", ""):
        return url
    import ray

    ip = ray.util.get_node_ip_address()
    return f"http://{ip}:{url_port(url)}"


STOP_WAIT_S = 30.0  # how long a restart waits for the old server to stop (its port to be free)


def _stop_quietly(server, role: str) -> None:
    try:
        server.stop()
    except Exception:  # a dead server's remains: nothing more to free
        log.exception("%s: stopping the old server failed", role)


class Watchdog:
    """A daemon thread in a server's actor: every `health_interval_s` it checks the server, restarting a dead one
    (its process or thread gone) at once and a live one after `health_failures` failed probes in a row, at most
    `max_restarts` times. The driver learns of a restart from what the server answers next (asyncopd.pipeline
    .supervisor): a restarted engine serves its checkpoint's weights until the driver has sent the current ones."""

    def __init__(self, host: ServiceHost, cfg: SupervisionConfig):
        self.host, self.cfg = host, cfg
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog:{host.role}", daemon=True)

    def start(self) -> None:
        if self.cfg.health_interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.cfg.health_interval_s):
            server = self.host.server
            if server is None:
                continue
            if server.alive and self.host.probe():
                failures = 0
                continue
            failures += 1
            if server.alive and failures < self.cfg.health_failures:
                continue
            if self.host.restarts >= self.cfg.max_restarts:
                if failures == self.cfg.health_failures or not server.alive and failures == 1:  # said once
                    log.error("%s: unhealthy and out of restarts (%d): left for the driver", self.host.role,
                              self.host.restarts)
                continue
            reason = f"{failures} failed health probes" if server.alive else "its server exited"
            try:
                self.host.restart(reason, expected=server)
            except Exception:
                log.exception("%s: restart after %s failed", self.host.role, reason)
            failures = 0


class ServiceHost:
    """Body of a Ray actor that loads a checkpoint, serves it, and keeps it served: `start()` -> base URL, `stop()`.

    Subclasses implement `_launch(port)` (load the model within the role's thread budget, return a started server:
    `.url`, `.alive`, `.stop()`; port 0 = a free one); `self.cfg` is the role's config (host, port, api_key, ...).
    A Watchdog restarts a server that dies or stops answering its probe (`probe_paths`: the first the server has),
    on the same port when it is free. If the actor's own process dies (the embedded servers run inside it, so
    SIGKILL of the server is SIGKILL of the actor), Ray restarts the actor and the driver calls `ensure_serving`.
    """

    role = "service"
    probe_paths: tuple[str, ...] = ("/health",)

    def __init__(self, model_path: str, cfg, supervision: SupervisionConfig | None = None):
        self.model_path = model_path
        self.cfg = cfg
        self.supervision = supervision or SupervisionConfig()
        self.server = None
        self.restarts = 0
        self._lock = threading.RLock()
        self._probe_path = ""
        self._watchdog: Watchdog | None = None

    def _launch(self, port: int):
        raise NotImplementedError

    def node_id(self) -> str:
        """The Ray node this actor runs on (summary.json's ray_nodes)."""
        return ray.get_runtime_context().get_node_id()

    def _launch_on(self, port: int):
        """Serve on `port` (0: a free one); a port taken meanwhile (by another process) falls back to a free one."""
        try:
            return self._launch(port)
        except OSError as e:
            if not port or e.errno != errno.EADDRINUSE:
                raise
            log.warning("%s: port %d is taken, serving on a free port", self.role, port)
            return self._launch(0)

    def start(self, port: int = 0) -> str:
        """Serve (once) on `port` if given (a restarted actor reclaims its predecessor's), else `cfg.port`; the URL."""
        with self._lock:
            if self.server is None:
                self.server = self._launch_on(port or self.cfg.port)
                if self._watchdog is None:
                    self._watchdog = Watchdog(self, self.supervision)
                    self._watchdog.start()
            return self.url()

    def ensure_serving(self, port: int = 0) -> str:
        """The URL once a server answers here: started if this actor is fresh (Ray restarted it), restarted if its
        server died and the watchdog has not yet seen it."""
        with self._lock:
            if self.server is not None and not self.server.alive:
                self.restart("its server exited", expected=self.server)
            return self.start(port)

    def restart(self, reason: str, expected=None) -> str:
        """Stop the server (whatever is left of it) and serve anew from the checkpoint, on its port if free; no-op
        when `expected` is no longer the server (someone restarted it already)."""
        with self._lock:
            if expected is not None and self.server is not expected:
                return self.url()
            old, self.server = self.server, None
            port = url_port(old.url) if old is not None else 0
            if old is not None:  # a wedged server may never finish stopping: wait a while, then serve anyway
                stopper = threading.Thread(target=_stop_quietly, args=(old, self.role), daemon=True)
                stopper.start()
                stopper.join(STOP_WAIT_S)
            self.restarts += 1
            log.warning("%s restart %d (%s) on port %d", self.role, self.restarts, reason, port)
            self._probe_path = ""
            return self.start(port)

    def probe(self) -> bool:
        """Whether the server answers its health probe within supervision.health_timeout_s."""
        server = self.server
        if server is None:
            return False
        client = HttpClient(server.url, self.cfg.api_key, self.supervision.health_timeout_s)
        for path in ([self._probe_path] if self._probe_path else self.probe_paths):
            try:
                client.request("GET", path)
            except ServerError as e:
                if e.status == 404 and not self._probe_path:
                    continue  # this server lacks the path (no /health_generate): the next one
                # SGLang answers its generating health probes with 503 while it is paused for a weight update (after
                # waiting 20 s itself) or still starting: an answer from a live server, never a reason to restart it
                return e.status == 503
            self._probe_path = path
            return True
        return False

    def pid(self) -> int:
        """The process serving (this actor's own for servers running inside it)."""
        return os.getpid()

    def url(self) -> str:
        if self.server is None:
            raise RuntimeError(f"{self.role} not started: call start() first")
        return public_url(self.server.url, self.cfg.host)

    def stop(self) -> None:
        with self._lock:
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None
            if self.server is not None:
                self.server.stop()
                self.server = None
