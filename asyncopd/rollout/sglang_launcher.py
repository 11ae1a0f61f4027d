"""backend=sglang: a Ray actor that runs `python -m sglang.launch_server` and waits for /health.

For the rollout fleet (RolloutConfig) the server speaks the same HTTP API as the embedded engine, so
SGLangClient and the weight sync work unchanged; for the teacher (TeacherConfig) it serves
prefill scoring to SGLangTeacherClient. sglang is imported by the subprocess only; a missing install
fails here, early and clearly.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from asyncopd.config.schema import RolloutConfig, TeacherConfig
from asyncopd.net.actor import public_url
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


def sglang_command(model_path: str, cfg: RolloutConfig | TeacherConfig, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", cfg.host,
           "--port", str(port)]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    if cfg.tp > 1:  # both roles: rollout.tp, teacher.tp
        cmd += ["--tp", str(cfg.tp)]
    return cmd + shlex.split(cfg.sglang_args)


class SGLangServerHost:
    def __init__(self, model_path: str, cfg: RolloutConfig | TeacherConfig, log_dir: str = ""):
        self.model_path = model_path
        self.cfg = cfg
        self.role = _role(cfg)
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self._url = ""
        self.log_path: Path | None = None

    def _log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def start(self) -> str:
        if self.proc is not None:
            return self._url
        require_sglang(self.role)
        check_bind(self.cfg.host, self.cfg.api_key, self.role)
        port = self.cfg.port or find_free_port("127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host)
        log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="sglang-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"sglang-{port}.log"
        cmd = sglang_command(self.model_path, self.cfg, port)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        local = f"http://{'127.0.0.1' if self.cfg.host in ('0.0.0.0', '') else self.cfg.host}:{port}"
        client = SGLangClient(local, api_key=self.cfg.api_key, timeout_s=5.0)
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"sglang.launch_server exited with code {code} before serving "
                                   f"({' '.join(cmd)}); log {self.log_path}:\n{self._log_tail()}")
            try:
                client.health()
                break
            except ServerError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sglang.launch_server did not answer /health within "
                                   f"{self.cfg.startup_timeout_s} s; log {self.log_path}:\n{self._log_tail()}")
            time.sleep(1.0)
        self._url = public_url(local, self.cfg.host)
        return self._url

    def url(self) -> str:
        return self._url

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


SGLangServerActor = ray.remote(SGLangServerHost)
