"""`asyncopd serve` as real subprocesses for the tests: started together, awaited on /health, stopped by SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from asyncopd.net.client import HttpClient, ServerError
from asyncopd.weights.process_group import find_free_port
from tests.conftest import TEST_THREADS

START_TIMEOUT_S = 180.0  # torch + transformers imports on a loaded 2-core machine take tens of seconds


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then the exit code (a server that does not exit in time is killed: -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def serve_command(role: str, model_path: str | Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "asyncopd.cli.main", "serve", role, "--model-path", str(model_path), *args]


def run_serve(role: str, model_path: str | Path, *args: str, timeout_s: float = 120.0
              ) -> subprocess.CompletedProcess:
    """A serve command expected to exit on its own (bad arguments)."""
    return subprocess.run(serve_command(role, model_path, *args), capture_output=True, text=True, timeout=timeout_s)


def _wait_healthy(s: Served, deadline: float) -> None:
    client = HttpClient(s.url, timeout_s=2.0)
    while True:
        if s.proc.poll() is not None:
            raise AssertionError(f"asyncopd serve exited with {s.proc.returncode} before serving:\n{s.output()}")
        try:
            client.get_json("/health")
            return
        except ServerError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"asyncopd serve did not answer /health within {START_TIMEOUT_S} s:\n{s.output()}")
        time.sleep(0.2)


@contextlib.contextmanager
def serving(role: str, model_path: str | Path, log_dir: Path, *args: str, count: int = 1) -> Iterator[list[Served]]:
    """`count` servers of `role` on free 127.0.0.1 ports, started at once and healthy on entry; whatever still runs
    on exit is SIGTERMed (a test that checks the exit code stops its server itself)."""
    started: list[Served] = []
    try:
        for _ in range(count):
            port = find_free_port("127.0.0.1")
            log = log_dir / f"serve-{role}-{port}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(serve_command(role, model_path, "--port", str(port), "--threads",
                                                      str(TEST_THREADS), *args),
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            started.append(Served(proc, f"http://127.0.0.1:{port}", log))
        deadline = time.monotonic() + START_TIMEOUT_S
        for s in started:
            _wait_healthy(s, deadline)
        yield started
    finally:
        for s in started:
            s.stop()
