"""`asyncopd bench router`: what sglang-router adds to one /generate, against the same call made to an engine directly.

rollout.router=sglang_router puts a process between the pipeline and the engines; this measures its price per
request. Two embedded rollout engines serve a randomly initialised student of the configured shape on 127.0.0.1
(latency does not depend on the weights), and sglang-router runs in front of them as a run starts it
(asyncopd.rollout.sglang_router: power_of_two, 127.0.0.1). One 1-token /generate of one task prompt is timed on
a kept-alive connection, directly on engine 0 and through the router, alternately (so both see the same load on a
shared machine). The router's overhead is the difference of the two rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from asyncopd.bench.args import positive_int
from asyncopd.bench.latency import TABLE, random_artifacts, summarize
from asyncopd.bench.table import format_table

ENGINES = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=positive_int, default=500, help="timed calls per path (after one warm-up)")
    p.add_argument("--out", default="", help="directory for router.json")


def time_alternately(calls: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Milliseconds of `n` calls of each, taken in turn (one untimed call each first: it opens the connection)."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(n):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    """Start the engines and the router, time both paths, print and save the table; rows: direct, router."""
    from asyncopd.data.task import test_problems
    from asyncopd.data.tokenizer import load_tokenizer
    from asyncopd.model.build import load_model
    from asyncopd.model.paths import resolve_model_paths
    from asyncopd.rollout.client import SGLangClient
    from asyncopd.rollout.engine import RolloutEngine
    from asyncopd.rollout.http_server import RolloutServer
    from asyncopd.rollout.sglang_router import ROUTER_VERSION, SGLangRouter
    from asyncopd.validation import load_config

    with tempfile.TemporaryDirectory(prefix="asyncopd-router-", ignore_cleanup_errors=True) as tmp:
        cfg = load_config()
        cfg.model.artifacts_dir = str(random_artifacts(cfg.model, Path(tmp)))
        paths = resolve_model_paths(cfg.model)
        servers = [RolloutServer(RolloutEngine(load_model(paths.student), str(paths.student))).start()
                   for _ in range(ENGINES)]
        router = SGLangRouter([s.url for s in servers], log_dir=tmp)
        try:
            direct, routed = SGLangClient(servers[0].url), SGLangClient(router.start())
            prompt = load_tokenizer(paths.tokenizer).encode(test_problems(cfg.task)[0].prompt, add_special_tokens=False)
            samples = time_alternately({
                "direct": lambda: direct.generate([prompt], max_new_tokens=1, temperature=1.0, seed=0),
                "router": lambda: routed.generate([prompt], max_new_tokens=1, temperature=1.0, seed=0),
            }, args.requests)
        finally:
            router.stop()
            for s in servers:
                s.stop()
    rows = [summarize(name, ms) for name, ms in samples.items()]
    load, cpus = os.getloadavg()[0], os.cpu_count()
    print(f"1-token /generate on a kept-alive connection, {args.requests} calls per path, alternately; "
          f"sglang-router {ROUTER_VERSION} over {ENGINES} embedded engines; 1-min load average {load:.1f} "
          f"on {cpus} CPUs")
    print(format_table(rows, TABLE))
    d, r = rows
    print(f"router overhead: p50 {r['p50_ms'] - d['p50_ms']:+.2f} ms, p99 {r['p99_ms'] - d['p99_ms']:+.2f} ms")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        saved = {"requests": args.requests, "engines": ENGINES, "router_version": ROUTER_VERSION,
                 "load_average_1min": load, "cpus": cpus, "calls": rows}
        (out / "router.json").write_text(json.dumps(saved, indent=2))
        print(f"wrote {out / 'router.json'}")
    return rows
