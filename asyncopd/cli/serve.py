"""`asyncopd serve rollout|teacher`: one of our servers as a standalone process, like `python -m sglang.launch_server`.

So any SGLang client (slime, AReaL, sglang-router, curl) can use the embedded rollout engine or the teacher scoring
server without Ray or a run around it. The process serves until SIGTERM or SIGINT, then stops the server (the engine
leaves any weight-update group it joined) and exits 0. What can be checked before the model loads is (bind address
and API key, the checkpoint path): a bad argument exits 2 naming it, as every `asyncopd` command does.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from asyncopd.bench.args import positive_int
from asyncopd.core.errors import ConfigError
from asyncopd.net.server import HttpService, check_bind

ROLES = ("rollout", "teacher")
DEFAULT_PORT = 30000  # sglang.launch_server's


def port_number(text: str) -> int:
    """argparse type for --port: 0 (a free port, printed at start) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("role", choices=ROLES, help="rollout: SGLang's /generate API (embedded engine); "
                   "teacher: /score (asyncopd.teacher.client)")
    p.add_argument("--model-path", required=True, help="a Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; beyond loopback needs --api-key")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--api-key", default="", help="clients then send 'Authorization: Bearer <key>' "
                   "(/health and /health_generate stay open)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads for the forwards")


def _start(args: argparse.Namespace) -> HttpService:
    """Load the checkpoint and start serving it; raises ConfigError for what the arguments got wrong."""
    from asyncopd.model.build import load_model
    from asyncopd.net.actor import set_threads

    try:
        check_bind(args.host, args.api_key, args.role)
    except ValueError as e:  # the config-field wording of check_bind, said as the flags this command takes
        raise ConfigError(f"refusing to listen on {args.host!r} without an API key: pass --api-key K (clients "
                          "then send 'Authorization: Bearer K') or --host 127.0.0.1") from e
    set_threads(args.threads)
    try:
        model = load_model(args.model_path, field="--model-path")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    try:
        if args.role == "rollout":
            from asyncopd.rollout.engine import RolloutEngine
            from asyncopd.rollout.http_server import RolloutServer

            server: HttpService = RolloutServer(RolloutEngine(model, args.model_path), host=args.host,
                                                port=args.port, api_key=args.api_key)
        else:
            from asyncopd.teacher.server import TeacherServer

            server = TeacherServer(model, args.model_path, host=args.host, port=args.port, api_key=args.api_key)
    except OSError as e:  # the socket binds here: a port in use, an address not on this machine
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; choose another --port "
                          "(0 = a free one) or --host") from None
    return server.start()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then stop cleanly: 0; the HTTP server dying under us: 1."""
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = _start(args)
        print(f"asyncopd serve {args.role}: {args.model_path} on {server.url} (ready)", flush=True)
        while not stop.wait(1.0):
            if not server.alive:
                print(f"asyncopd serve {args.role}: the HTTP server on {server.url} stopped", file=sys.stderr)
                server.stop()
                return 1
        print(f"asyncopd serve {args.role}: {received[0]}, shutting down", flush=True)
        server.stop()
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
