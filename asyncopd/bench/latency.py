"""`asyncopd bench latency`: how long one call to the serving HTTP API takes on a kept-alive connection.

Every pipeline step makes several such calls (generate, score, weight update), so a fixed per-call stall
(e.g. Nagle's algorithm meeting the client's delayed ACK: ~40 ms) is paid many times per step. The bench
starts what a run starts, the way a run starts it: a private local Ray cluster, the embedded rollout
engine and one teacher replica as Ray actors serving HTTP on 127.0.0.1, a learner rank joined to the
engine through the gloo weight-sync group. The checkpoints are randomly initialised models of the
configured shapes (latency does not depend on the weights, so `asyncopd prepare` is not needed). Each call
goes through the run's own clients, whose per-thread connection stays alive across calls:

- `health`: GET /health on the rollout engine;
- `generate`: a 1-token /generate of one task prompt;
- `score`: teacher /score of that prompt and token (the estimator's top-k);
- `weight_update`: `WeightSync.sync`, as the run calls it after every learner step: a Ray call makes the
  learner gather and broadcast its weights over the gloo group while the engine receives them through
  /update_weights_from_distributed (one bucket for the tiny student); timed until both have returned.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from asyncopd.bench.args import positive_int
from asyncopd.bench.report import box_plot, write_report
from asyncopd.bench.table import format_table
from asyncopd.config.schema import ModelConfig

TABLE = [("call", "call", "s"), ("n", "n", "d"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
         ("mean_ms", "mean ms", ".2f"), ("max_ms", "max ms", ".2f")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=positive_int, default=200,
                   help="timed calls per endpoint (after one warm-up call)")
    p.add_argument("--out", default="", help="directory for latency.json and latency.png")


def random_artifacts(model_cfg: ModelConfig, root: Path) -> Path:
    """`asyncopd prepare`'s artifacts layout (teacher/, student/, tokenizer) in the configured shapes, untrained."""
    from asyncopd.data.tokenizer import build_tiny_tokenizer
    from asyncopd.model.build import build_model, save_checkpoint

    tok = build_tiny_tokenizer()
    for name, spec, seed in (("teacher", model_cfg.teacher, 0), ("student", model_cfg.student, 1)):
        save_checkpoint(build_model(spec, len(tok), seed, tok.pad_token_id, tok.eos_token_id), root / name)
    return root


def time_calls(call: Callable[[], object], n: int) -> list[float]:
    """Milliseconds of each of `n` calls, after one untimed call (it opens the connection)."""
    call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summarize(name: str, samples_ms: list[float]) -> dict:
    """One table row: the median and tail (p99) that a step pays per call, with the raw samples for plots."""
    a = np.asarray(samples_ms)
    return {"call": name, "n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "max_ms": float(a.max()), "samples_ms": [float(x) for x in a]}


def run(args: argparse.Namespace) -> list[dict]:
    """Start the serving side and the learner as a run does, time each call, print and save the table."""
    import ray

    from asyncopd.config.ray_cluster import start_ray
    from asyncopd.data.task import test_problems
    from asyncopd.data.tokenizer import load_tokenizer
    from asyncopd.learner.group import LearnerGroup
    from asyncopd.model.paths import resolve_model_paths
    from asyncopd.pipeline.fleet import Fleet
    from asyncopd.pipeline.placements import reserve
    from asyncopd.rollout.backends import weight_sync_config
    from asyncopd.validation import load_config
    from asyncopd.weights.sync import WeightSync

    with tempfile.TemporaryDirectory(prefix="asyncopd-latency-", ignore_cleanup_errors=True) as tmp:
        cfg = load_config()
        cfg.model.artifacts_dir = str(random_artifacts(cfg.model, Path(tmp)))
        paths = resolve_model_paths(cfg.model)
        owns_ray = start_ray(cfg.cluster, tmp)
        fleet = learner = sync = None
        try:
            placed = reserve(cfg)  # the run's order (asyncopd.pipeline.placements)
            fleet = Fleet.launch(cfg, paths, placed.rollout, placed.teachers)
            learner = LearnerGroup.launch(cfg, paths.student, placed.learner)
            sync = WeightSync(weight_sync_config(cfg), learner, fleet.engines)
            sync.init_group()
            engine = fleet.engines[0]
            prompt = load_tokenizer(paths.tokenizer).encode(test_problems(cfg.task)[0].prompt, add_special_tokens=False)

            def generate() -> list:
                return engine.generate([prompt], max_new_tokens=1, temperature=cfg.rollout.temperature)

            rollouts = generate()
            versions = iter(range(1, args.requests + 2))
            calls = {
                "health": engine.health,
                "generate": generate,
                "score": lambda: fleet.teacher.score(rollouts, top_k=cfg.estimator.top_k),
                "weight_update": lambda: sync.sync(next(versions)),
            }
            rows = [summarize(name, time_calls(call, args.requests)) for name, call in calls.items()]
        finally:
            if sync is not None:
                sync.close()
            if fleet is not None:  # engines leave the weight group while its rank 0 (the learner) still exists
                fleet.shutdown()
            if learner is not None:
                learner.shutdown()
            if owns_ray:
                ray.shutdown()
    # per-call latency on a shared machine follows its load: say what it was
    load, cpus = os.getloadavg()[0], os.cpu_count()
    print(f"HTTP latency on a kept-alive connection, {args.requests} calls each (after one warm-up call); "
          f"1-min load average {load:.1f} on {cpus} CPUs")
    print(format_table(rows, TABLE))
    if args.out:
        saved = {"requests": args.requests, "load_average_1min": load, "cpus": cpus, "calls": rows}
        write_report(args.out, "latency", saved, lambda path: plot(rows, path))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Each call's latency distribution on a log scale (a 40 ms stall stands out by two decades)."""
    box_plot([r["samples_ms"] for r in rows], [r["call"] for r in rows], "ms per call (box: quartiles, whiskers: "
             "p1-p99)", "AsyncOPD: HTTP call latency on a kept-alive connection", path, whis=(1, 99), log=True)
