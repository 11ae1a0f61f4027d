"""`asyncopd bench weights`: what one weight update costs, against a raw torch.distributed broadcast of the same
bytes on the same group.

Setup, as a run has it: N embedded rollout engines, each its own process serving SGLang's HTTP API, and this
process as rank 0 of the weight group (the learner's role: asyncopd.weights.source.ModuleWeightSource), all
joined by `WeightSync.init_group` at slime's rank offsets. The model is a random Qwen2 of the given shape (the
bytes matter, not the values), bucketed at weights.bucket_mb. Each mode runs `--repeats` times:

- `raw per-tensor`: rank 0 broadcasts every tensor of every bucket; each engine process receives them with plain
  `dist.broadcast` on the group object its engine joined (no HTTP, no pause, nothing loaded): the floor for
  SGLang's default per-tensor format;
- `raw flattened`: one broadcast per bucket of its bytes (the floor for `load_format=flattened_bucket`);
- `sync per-tensor` / `sync flattened`: `WeightSync.sync`, as a run calls it after every learner step (pause,
  flush, begin, every bucket over HTTP, end, continue), with `weights.load_format` "" / flattened_bucket.

The modes take turns (one update each, round-robin, after one warm-up each), so a shared machine's load drift
reaches every mode alike.

The gap between a sync row and its raw row is the protocol's cost: HTTP calls, the session, staging and the
swap into the model. `engine stall` is the longest time one engine had generation paused.

`python -m asyncopd.bench.weight_bench serve DIR` is the engine process (also used by the weight-sync tests): it
serves DIR's checkpoint on a free loopback port, prints `url <URL>`, then answers JSON commands on stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asyncopd.bench.args import positive_int
from asyncopd.bench.report import box_plot, write_report
from asyncopd.bench.table import format_table

MODES = ("raw per-tensor", "raw flattened", "sync per-tensor", "sync flattened")
TABLE = [("mode", "mode", "s"), ("n", "n", "d"), ("p50_s", "p50 s", ".4f"), ("min_s", "min s", ".4f"),
         ("max_s", "max s", ".4f"), ("gbps", "GB/s (p50)", ".3f"), ("vs_raw", "x raw", ".2f"),
         ("stall_s", "engine stall s (p50)", ".4f")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=positive_int, default=2, help="rollout engine processes receiving the weights")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed updates per mode (after one warm-up)")
    p.add_argument("--hidden", type=positive_int, default=512, help="model hidden size")
    p.add_argument("--layers", type=positive_int, default=4, help="model decoder layers")
    p.add_argument("--vocab", type=positive_int, default=32000, help="model vocabulary (embedding rows)")
    p.add_argument("--bucket-mb", type=float, default=0.0, help="bucket size in MiB (0: weights.bucket_mb)")
    p.add_argument("--engine-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the engines serve (weights.dtype=auto sends it: bfloat16 halves the bytes)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per engine process")
    p.add_argument("--out", default="", help="directory for weights.json and weights.png")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (weights.backend=..., weights.pause_mode=...)")


# ---- the engine process --------------------------------------------------------------------------------------

@dataclass
class EngineProcess:
    """One embedded engine serving over HTTP in its own process (rank offset.. of the weight group once joined)."""

    proc: subprocess.Popen
    url: str

    def command(self, cmd: dict) -> str:
        """Send one JSON command; return the process's one-line answer."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"engine process {self.url} exited (code {self.proc.wait()})")
        return line.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.communicate(json.dumps({"cmd": "stop"}) + "\n", timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_engine_process(model_dir: str | Path, threads: int = 1, dtype: str = "float32",
                         group_timeout_s: float = 60.0) -> EngineProcess:
    """Start `serve` in a new Python process and wait for its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "asyncopd.bench.weight_bench", "serve", str(model_dir),
                             "--threads", str(threads), "--dtype", dtype, "--group-timeout", str(group_timeout_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    line = proc.stdout.readline()
    if not line.startswith("url "):
        proc.kill()
        raise RuntimeError(f"engine process for {model_dir} failed to start (code {proc.wait()}): {line!r}")
    return EngineProcess(proc, line.split(" ", 1)[1].strip())


def _serve(argv: list[str]) -> None:
    """The engine process: serve, then answer stdin commands until "stop" (or EOF)."""
    import torch

    from asyncopd.model.build import load_model
    from asyncopd.net.actor import set_threads
    from asyncopd.rollout.engine import RolloutEngine
    from asyncopd.rollout.http_server import RolloutServer
    from asyncopd.weights.broadcast import recv_bucket

    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--group-timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    set_threads(a.threads)
    model = load_model(a.model_dir).to(getattr(torch, a.dtype))
    engine = RolloutEngine(model, a.model_dir, group_timeout_s=a.group_timeout)
    server = RolloutServer(engine).start()
    print("url", server.url, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "stop":
            break
        if cmd["cmd"] == "raw":  # receive buckets on the engine's own group, as plain broadcasts
            t0 = time.perf_counter()
            for b in cmd["buckets"]:
                recv_bucket(engine.weight_group, [str(i) for i in range(len(b["dtypes"]))], b["dtypes"],
                            b["shapes"], flattened=cmd["flattened"])
            print("ok", time.perf_counter() - t0, flush=True)
        elif cmd["cmd"] == "params":  # a digest of the served weights, for tests
            with torch.no_grad():
                digest = {n: float(t.double().sum()) for n, t in engine.model.named_parameters()}
            print(json.dumps(digest), flush=True)
    server.stop()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of gloo objects (see tests/test_weight_broadcast.py's sender)


# ---- the bench -------------------------------------------------------------------------------------------------

def _raw(source, engines: list[EngineProcess], buckets: list[dict], flattened: bool) -> float:
    """Rank 0 sends each bucket's tensors (same dtypes and shapes as the sync announces) as plain broadcasts."""
    import torch

    from asyncopd.weights.broadcast import send_bucket, str_to_dtype

    tensors = [[torch.zeros(s, dtype=str_to_dtype(d)) for d, s in zip(b["dtypes"], b["shapes"], strict=True)]
               for b in buckets]
    cmd = json.dumps({"cmd": "raw", "flattened": flattened,
                      "buckets": [{"dtypes": b["dtypes"], "shapes": b["shapes"]} for b in buckets]}) + "\n"
    t0 = time.perf_counter()
    for e in engines:
        e.proc.stdin.write(cmd)
        e.proc.stdin.flush()
    for bucket in tensors:
        send_bucket(source.group, bucket, flattened=flattened)
    for e in engines:
        if not e.proc.stdout.readline().startswith("ok"):
            raise RuntimeError(f"engine {e.url} failed a raw receive")
    return time.perf_counter() - t0


def summarize(mode: str, seconds: list[float], stalls: list[float], nbytes: int) -> dict:
    """One table row: median and spread of the update time, the bandwidth at the median, the median stall."""
    a = np.asarray(seconds)
    p50 = float(np.median(a))
    return {"mode": mode, "n": len(a), "p50_s": p50, "min_s": float(a.min()), "max_s": float(a.max()),
            "gbps": nbytes / p50 / 1e9, "stall_s": float(np.median(stalls)) if stalls else 0.0,
            "samples_s": [float(x) for x in a], "stall_samples_s": [float(x) for x in stalls]}


def run(args: argparse.Namespace) -> list[dict]:
    """Start the engines and rank 0, time every mode, print and save the table."""
    import dataclasses

    from asyncopd.config.schema import ModelSpec
    from asyncopd.model.build import build_model
    from asyncopd.rollout.client import SGLangClient
    from asyncopd.validation import load_config
    from asyncopd.weights.broadcast import FLATTENED
    from asyncopd.weights.source import ModuleWeightSource
    from asyncopd.weights.sync import WeightSync

    cfg = load_config(args.overrides)
    if args.bucket_mb > 0:
        cfg.weights.bucket_mb = args.bucket_mb
    spec = ModelSpec(num_layers=args.layers, hidden_size=args.hidden, num_heads=max(1, args.hidden // 64),
                     num_kv_heads=max(1, args.hidden // 64), intermediate_size=args.hidden * 11 // 4,
                     tie_embeddings=False)
    model = build_model(spec, args.vocab, seed=0)
    rows: list[dict] = []
    engines: list[EngineProcess] = []
    with tempfile.TemporaryDirectory(prefix="asyncopd-weights-", ignore_cleanup_errors=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        source = ModuleWeightSource(model)
        syncs: dict[str, WeightSync] = {}
        try:
            engines = [start_engine_process(tmp, args.threads, args.engine_dtype, cfg.weights.timeout_s)
                       for _ in range(args.engines)]
            clients = [SGLangClient(e.url, timeout_s=cfg.weights.timeout_s) for e in engines]
            syncs[""] = base = WeightSync(dataclasses.replace(cfg.weights, load_format=""), source, clients)
            base.init_group()
            # the same group, announced as flattened buckets
            syncs[FLATTENED] = flat = WeightSync(dataclasses.replace(cfg.weights, load_format=FLATTENED), source,
                                                 clients)
            flat.check_engines()
            flat.plan()
            versions = iter(range(1, 10**6))

            def timed(mode: str) -> tuple[float, float]:
                """(seconds, engine stall) of one update in `mode`."""
                sync = syncs[FLATTENED if mode.endswith("flattened") else ""]
                if mode.startswith("raw"):
                    return _raw(source, engines, sync.buckets, flattened=sync is flat), 0.0
                stats = sync.sync(next(versions))
                return stats.seconds, stats.engine_stall_s

            for mode in MODES:
                timed(mode)  # warm-up
            # round-robin over the modes: a shared machine's load drifts, and every mode should meet the same drift
            runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
            for _ in range(args.repeats):
                for mode in MODES:
                    runs[mode].append(timed(mode))
            rows = [summarize(mode, [t for t, _ in runs[mode]], [x for _, x in runs[mode]] if mode.startswith("sync")
                              else [], base.bytes) for mode in MODES]
        finally:
            for s in syncs.values():
                s.close()
            for e in engines:
                e.stop()
            source.close()
    for r in rows:
        raw = next(x for x in rows if x["mode"] == ("raw flattened" if r["mode"].endswith("flattened")
                                                     else "raw per-tensor"))
        r["vs_raw"] = r["p50_s"] / raw["p50_s"]
    load, cpus = os.getloadavg()[0], os.cpu_count()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Weight update vs a raw broadcast of the same bytes on the same group: {n_params / 1e6:.1f} M parameters, "
          f"{base.bytes / 2**20:.1f} MiB as {base.wire_dtype} in {len(base.buckets)} bucket(s) of "
          f"<= {cfg.weights.bucket_mb:g} MiB, {args.engines} engine(s), {cfg.weights.backend}, "
          f"pause_mode={cfg.weights.pause_mode}; {args.repeats} repeats after one warm-up; 1-min load average "
          f"{load:.1f} on {cpus} CPUs")
    print(format_table(rows, TABLE))
    if args.out:
        saved = {"parameters": n_params, "bytes": base.bytes, "wire_dtype": base.wire_dtype,
                 "buckets": len(base.buckets), "bucket_mb": cfg.weights.bucket_mb, "engines": args.engines,
                 "backend": cfg.weights.backend, "pause_mode": cfg.weights.pause_mode, "repeats": args.repeats,
                 "load_average_1min": load, "cpus": cpus, "modes": rows}
        write_report(args.out, "weights", saved, lambda path: plot(rows, path))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Each mode's update times (box: quartiles, whiskers: min-max)."""
    box_plot([r["samples_s"] for r in rows], [r["mode"] for r in rows], "seconds per update (box: quartiles, "
             "whiskers: min-max)", "AsyncOPD: weight update vs raw broadcast of the same bytes", path)



if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m asyncopd.bench.weight_bench serve MODEL_DIR (the bench: asyncopd bench "
                         "weights)")
