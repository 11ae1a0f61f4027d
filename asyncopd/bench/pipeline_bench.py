"""`asyncopd bench`: strict sync vs async (k = 1, 2, 4) at equal learner steps, data and resources."""

import argparse
import json
from pathlib import Path

from asyncopd.bench.table import format_table
from asyncopd.config.load import load_config

QUICK = ["pipeline.steps=30", "pipeline.eval_every=0", "run.progress=false"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="30 learner steps per mode (a few minutes in all)")
    p.add_argument("--staleness", default="0,1,2,4", help="comma-separated k values; 0 is strict sync")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode; the median is reported")
    p.add_argument("--out", default="", help="directory for bench.json and bench.png")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every mode")


def run_pipeline_bench(args: argparse.Namespace) -> list[dict]:
    from asyncopd.pipeline.runner import run_training

    out = Path(args.out) if args.out else None
    ks = [int(k) for k in args.staleness.split(",")]
    rows = []
    for k in ks:
        runs = []
        for r in range(args.repeats):
            overrides = [*(QUICK if args.quick else []), *args.overrides, f"pipeline.max_staleness={k}"]
            if out:
                overrides.append(f"run.dir={out / f'k{k}-r{r}'}")
            runs.append(run_training(load_config(overrides)))
        runs.sort(key=lambda s: s["samples_per_s"])
        median = runs[len(runs) // 2]
        rows.append({
            "mode": "sync" if k == 0 else "async",
            "max_staleness": k,
            "samples_per_s": median["samples_per_s"],
            "samples_per_s_all": [s["samples_per_s"] for s in runs],
            "ideal_speedup": median["ideal_speedup"],
            "final_accuracy": median["final_accuracy"],
            "max_observed_staleness": median["max_observed_staleness"],
            "busy_s": {role: median[f"busy_{role}_s"] for role in ("rollout", "teacher", "learner")},
            "train_wall_s": median["train_wall_s"],
        })
    base = next((r["samples_per_s"] for r in rows if r["max_staleness"] == 0), rows[0]["samples_per_s"])
    for row in rows:
        row["speedup_vs_sync"] = row["samples_per_s"] / base
        row["efficiency"] = row["speedup_vs_sync"] / max(row["ideal_speedup"], 1e-9)
    print(format_table(rows, TABLE))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(rows, indent=2))
        plot(rows, out / "bench.png")
        print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return rows


TABLE = [("mode", "mode", "s"), ("max_staleness", "k", "d"), ("samples_per_s", "samples/s", ".2f"),
         ("speedup_vs_sync", "vs sync", ".2f"), ("ideal_speedup", "ideal", ".2f"), ("efficiency", "eff", ".2f"),
         ("final_accuracy", "accuracy", ".3f"), ("max_observed_staleness", "max lag", "d")]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"k={r['max_staleness']}" if r["max_staleness"] else "sync" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(labels, [r["speedup_vs_sync"] for r in rows], label="achieved")
    ax1.plot(labels, [r["ideal_speedup"] for r in rows], "ro--", label="ideal overlap bound")
    ax1.set_ylabel("speed-up vs sync (samples/s)")
    ax1.legend()
    ax2.bar(labels, [r["final_accuracy"] for r in rows], color="tab:green")
    ax2.set_ylabel("final greedy test accuracy")
    ax2.set_ylim(0, 1)
    fig.suptitle("AsyncOPD: strict sync vs bounded-staleness async, same steps and data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
