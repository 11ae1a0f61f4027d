"""`asyncopd bench prepare`: the prepare recipe from scratch over seeds x torch thread counts.

A gate cleared on one machine with one seed is not cleared: the same recipe gave a 92.2% and an 88.2% teacher
on two machines of one kind. Each cell trains teacher and student from scratch in its own process, with seed
s setting both the initialisation (``model.prepare.seed=s``) and the data order (``task.train_seed`` + s), so
seed 0 is exactly the recipe of the shipped models. Cells are packed so the threads of the cells running at
once never exceed ``--cores``: each cell has the cores it asks for, and its wall time means what it says.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from asyncopd.bench.args import available_cores, positive_int
from asyncopd.bench.table import format_table

TABLE = [("seed", "seed", "d"), ("threads", "threads", "d"), ("teacher_accuracy", "teacher", ".3f"),
         ("teacher_steps", "t steps", "d"), ("teacher_near_ties", "t ties", "d"),
         ("student_accuracy", "student", ".3f"), ("student_steps", "s steps", "d"),
         ("student_in_range", "s in range", "s"), ("wall_s", "wall s", ".0f"), ("status", "status", "s")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1 (initialisation and data order)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--cores", type=positive_int, default=available_cores(),
                   help="cores the cells share; concurrent cells never ask for more threads than this")
    p.add_argument("--out", default="runs/bench_prepare", help="directory for cells/, prepare_bench.json and .png")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every cell (e.g. another recipe)")


def run_cell(overrides: list[str], seed: int, threads: int, artifacts_dir: str) -> dict:
    """One cell, from scratch (runs in a worker process)."""
    from asyncopd.model.prepare import PrepareError, run_prepare
    from asyncopd.validation import load_config

    cfg = load_config([*overrides, f"model.prepare.seed={seed}", f"model.prepare.threads={threads}",
                       f"model.artifacts_dir={artifacts_dir}"])
    cfg.task.train_seed += seed
    row = {"seed": seed, "threads": threads, "teacher_steps": 0, "teacher_near_ties": 0, "student_accuracy": 0.0,
           "student_steps": 0, "student_in_range": "-", "matches_shipped": None}
    try:
        info = run_prepare(cfg, progress=False, force=True)
    except PrepareError as e:
        return {**row, "teacher_accuracy": e.teacher_accuracy or 0.0, "wall_s": 0.0, "status": "FAIL",
                "error": str(e)}
    t, s = info["teacher"], info["student"]
    return {**row, "teacher_accuracy": t["accuracy"], "teacher_steps": t["steps"],
            "teacher_near_ties": t["near_ties"], "student_accuracy": s["accuracy"], "student_steps": s["steps"],
            "student_in_range": "yes" if s["in_range"] else "NO", "wall_s": info["total_wall_s"],
            "teacher_train_s": t["train_wall_s"], "matches_shipped": info["matches_shipped"],
            "status": "ok" if s["in_range"] else "FAIL"}


def run_cells(cells: list[tuple[int, int]], cores: int, submit_args: Callable[[int, int], tuple],
              cell: Callable[..., dict] = run_cell) -> list[dict]:
    """Run (seed, threads) cells as ``cell(*submit_args(seed, threads))`` in worker processes, starting each
    when the running cells leave it enough cores."""
    pending = sorted(cells, key=lambda c: (-c[1], c[0]))
    running: dict[Future, int] = {}
    rows = []
    ctx = multiprocessing.get_context("spawn")  # fresh interpreter per worker: no inherited torch thread pool
    with ProcessPoolExecutor(max_workers=max(1, cores), mp_context=ctx, max_tasks_per_child=1) as pool:
        while pending or running:
            while pending and (not running or sum(running.values()) + pending[0][1] <= cores):
                seed, threads = pending.pop(0)
                running[pool.submit(cell, *submit_args(seed, threads))] = threads
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                running.pop(f)
                row = f.result()
                print(f"bench prepare: seed {row['seed']} threads {row['threads']}: teacher "
                      f"{row['teacher_accuracy']:.1%}, student {row['student_accuracy']:.1%} ({row['status']})",
                      flush=True)
                rows.append(row)
    return sorted(rows, key=lambda r: (r["threads"], r["seed"]))


def summarize(rows: list[dict], gate: float, student_range: list[float], margin: float = 0.03) -> dict:
    """The verdict the README quotes: worst teacher against its gate (+ margin), students inside range."""
    worst = min(r["teacher_accuracy"] for r in rows)
    return {
        "cells": len(rows),
        "teacher_gate": gate,
        "teacher_worst": worst,
        "teacher_best": max(r["teacher_accuracy"] for r in rows),
        "teacher_margin_points": round(100 * (worst - gate), 1),
        "required_margin_points": round(100 * margin, 1),
        "student_range": list(student_range),
        "students_in_range": sum(r["student_in_range"] == "yes" for r in rows),
        "passed": worst >= gate + margin and all(r["status"] == "ok" for r in rows),
    }


def run(args: argparse.Namespace) -> dict:
    from asyncopd.validation import load_config

    out = Path(args.out)
    threads = [int(t) for t in args.threads.split(",")]
    cfg = load_config(args.overrides)  # fail on a bad override before any cell starts
    p = cfg.model.prepare
    cells = [(s, t) for s in range(args.seeds) for t in threads]
    print(f"bench prepare: {len(cells)} cells ({args.seeds} seeds x threads {threads}) on {args.cores} cores",
          flush=True)
    rows = run_cells(cells, args.cores,
                     lambda s, t: (list(args.overrides), s, t, str(out / "cells" / f"s{s}-t{t}")))
    verdict = summarize(rows, p.min_teacher_accuracy, p.student_accuracy_range)
    print(format_table(rows, TABLE))
    print(f"teacher worst {verdict['teacher_worst']:.1%} (best {verdict['teacher_best']:.1%}): gate "
          f"{verdict['teacher_gate']:.0%} + {verdict['teacher_margin_points']} points (required + "
          f"{verdict['required_margin_points']}); students in {student_range_text(verdict)}: "
          f"{verdict['students_in_range']}/{verdict['cells']}; {'PASS' if verdict['passed'] else 'FAIL'}")
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "verdict": verdict, "cores": args.cores, "overrides": list(args.overrides)}
    (out / "prepare_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, verdict, out / "prepare_bench.png")
    print(f"wrote {out / 'prepare_bench.json'} and {out / 'prepare_bench.png'}")
    return result


def student_range_text(verdict: dict) -> str:
    lo, hi = verdict["student_range"]
    return f"[{lo:.0%}, {hi:.0%}]"


def plot(rows: list[dict], verdict: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = [f"s{r['seed']}/t{r['threads']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["teacher_accuracy"] for r in rows], 0.4, label="teacher")
    ax.bar([i + 0.2 for i in x], [r["student_accuracy"] for r in rows], 0.4, label="student")
    ax.axhline(verdict["teacher_gate"], color="r", ls="--", label="teacher gate")
    ax.axhspan(*verdict["student_range"], color="tab:orange", alpha=0.15, label="student range")
    ax.set_xticks(list(x), labels, rotation=45)
    ax.set_ylim(0, 1)
    ax.set_ylabel("greedy test accuracy")
    ax.legend(loc="center right", fontsize=8)
    fig.suptitle("asyncopd prepare from scratch: seed / torch threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
