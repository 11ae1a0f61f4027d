"""backend=sglang: a Ray actor that runs `python -m sglang.launch_server` and waits for /health.

For the rollout fleet (RolloutConfig) the server speaks the same HTTP API as the embedded engine, so
SGLangClient and the weight sync work unchanged; for the teacher (TeacherConfig) it serves
prefill scoring to SGLangTeacherClient. sglang is imported by the subprocess only; a missing install
fails here, early and clearly.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from asyncopd.config.schema import RolloutConfig, SupervisionConfig, TeacherConfig
from asyncopd.core.errors import ConfigError
from asyncopd.net.actor import ServiceHost
from asyncopd.net.client import ServerError
from asyncopd.net.server import check_bind
from asyncopd.rollout.client import SGLangClient
from asyncopd.weights.process_group import find_free_port

MISSING = "rollout.backend=sglang needs `pip install .[gpu]` (sglang not importable)"


def _role(cfg: RolloutConfig | TeacherConfig) -> str:
    return "teacher" if isinstance(cfg, TeacherConfig) else "rollout"


def require_sglang(role: str = "rollout") -> None:
    if importlib.util.find_spec("sglang") is None:
        raise RuntimeError(MISSING.replace("rollout.", f"{role}.", 1))


_TP_FLAGS = ("--tp", "--tp-size", "--tensor-parallel-size")


def sglang_args_problem(role: str, sglang_args: str) -> str | None:
    """Why `<role>.sglang_args` cannot be used, or None: the TP size comes from `<role>.tp` alone, because the
    weight-sync group gives each engine `tp` ranks (a TP size hidden in sglang_args would leave ranks without a
    receiver). `asyncopd validate` reports it; the launcher refuses it again."""
    try:
        extra = shlex.split(sglang_args)
    except ValueError as e:
        return f"{role}.sglang_args={sglang_args!r} does not parse as shell words: {e}"
    for arg in extra:
        if arg.split("=", 1)[0] in _TP_FLAGS:
            return f"{role}.sglang_args sets the tensor-parallel size ({arg!r}): set {role}.tp instead"
    return None


def sglang_command(model_path: str, cfg: RolloutConfig | TeacherConfig, port: int) -> list[str]:
    """`python -m sglang.launch_server ...` with `<role>.tp` as its --tp-size (see `sglang_args_problem`)."""
    role = _role(cfg)
    problem = sglang_args_problem(role, cfg.sglang_args)
    if problem:
        raise ConfigError(problem)
    extra = shlex.split(cfg.sglang_args)
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", cfg.host,
           "--port", str(port)]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    cmd += ["--tp-size", str(cfg.tp)]  # both roles: rollout.tp, teacher.tp
    return cmd + extra


class SGLangProcess:
    """One `sglang.launch_server` process (in its own process group: its scheduler and detokenizer children die
    with it), answering /health: `.url` (local), `.alive`, `.pid`, `.stop()`."""

    def __init__(self, cmd: list[str], url: str, api_key: str, log_path: Path, startup_timeout_s: float):
        self.url, self.log_path = url, log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                                         start_new_session=True)
        client = SGLangClient(url, api_key=api_key, timeout_s=5.0)
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sglang.launch_server exited with code {self.proc.returncode} before serving "
                                   f"({' '.join(cmd)}); log {log_path}:\n{self.log_tail()}")
            try:
                client.health()
                return
            except ServerError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sglang.launch_server did not answer /health within {startup_timeout_s} s; "
                                   f"log {log_path}:\n{self.log_tail()}")
            time.sleep(1.0)

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s (also for a server already dead: its children)."""
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, None)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
                if sig == signal.SIGTERM:
                    break
            except subprocess.TimeoutExpired:
                continue


class SGLangServerHost(ServiceHost):
    """Runs `python -m sglang.launch_server` for the role `cfg` belongs to and keeps it running (ServiceHost's
    watchdog: the process alive, and /health_generate for engines); `start()` -> URL."""

    def __init__(self, model_path: str, cfg: RolloutConfig | TeacherConfig,
                 supervision: SupervisionConfig | None = None, log_dir: str = ""):
        super().__init__(model_path, cfg, supervision)
        self.role = _role(cfg)
        self.probe_paths = ("/health_generate", "/health") if self.role == "rollout" else ("/health",)
        self.log_dir = log_dir

    def _launch(self, port: int) -> SGLangProcess:
        require_sglang(self.role)
        check_bind(self.cfg.host, self.cfg.api_key, self.role)
        local_host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host
        if port and not port_is_free(local_host, port):
            raise OSError(errno.EADDRINUSE, f"port {port} is in use")
        port = port or find_free_port(local_host)
        log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="sglang-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        return SGLangProcess(sglang_command(self.model_path, self.cfg, port), f"http://{local_host}:{port}",
                             self.cfg.api_key, log_dir / f"sglang-{port}.log", self.cfg.startup_timeout_s)

    def pid(self) -> int:
        if self.server is None:
            raise RuntimeError(f"{self.role} not started: call start() first")
        return self.server.pid


def port_is_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` now (SGLang binds it itself, in its own process)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


SGLangServerActor = ray.remote(SGLangServerHost)
