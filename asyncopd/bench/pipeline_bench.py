"""`asyncopd bench`: strict sync vs async (k = 1, 2, 4) at equal learner steps, data and resources.

Speed-ups are measured against two bounds, both from the sync run's per-role busy seconds (in sync the roles
take turns, so those seconds are each role's uncontended work): the overlap bound sum / max, reachable only
with a core (or device) per role, and the resource-aware bound sum / max(max_role, sum / cores) for the cores
the roles actually share."""

import argparse
import json
from pathlib import Path
from statistics import median

from asyncopd.bench.args import available_cores, positive_int
from asyncopd.bench.table import format_table
from asyncopd.pipeline.scheduler import speedup_bound
from asyncopd.validation import load_config

ROLES = ("rollout", "teacher", "learner")
# --quick: at 30 steps a mode trained ~5-8 s on a fast machine, so the pipeline's fill and drain and any hiccup in
# the machine's load moved the ratio by tens of percent (30-step windows of one 150-step run differed by 15-25%).
# 150 steps is tens of seconds per mode even on a 2x-faster machine, and `--quick --repeats 3` over k = 0,1,2,4
# (12 runs, ~20 s start-up each) stays near 10 minutes on an otherwise idle 2-core machine.
QUICK_STEPS = 150
QUICK = [f"pipeline.steps={QUICK_STEPS}", "pipeline.eval_every=0", "run.progress=false"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_STEPS} learner steps per mode, no intermediate evaluation")
    p.add_argument("--staleness", default="0,1,2,4", help="comma-separated k values; 0 is strict sync")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="runs per mode, interleaved across modes; medians and spreads are reported")
    p.add_argument("--cores", type=positive_int, default=available_cores(),
                   help="CPU cores the three roles share, for the resource-aware bound (default: the cores this "
                        "process may run on, %(default)s here). With a core or device per role (one GPU each) "
                        "pass 3: the bound is then the overlap bound sum / max")
    p.add_argument("--out", default="", help="directory for bench.json and bench.png")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every mode")


def run_pipeline_bench(args: argparse.Namespace) -> dict:
    """Run every mode `--repeats` times and report; repeat r of all modes runs before repeat r + 1, so a
    change in the machine's load hits every mode alike and each repeat's speed-ups compare neighbours."""
    from asyncopd.pipeline.run import run_training

    out = Path(args.out) if args.out else None
    ks = [int(k) for k in args.staleness.split(",")]
    runs: dict[int, list[dict]] = {k: [] for k in ks}
    for r in range(args.repeats):
        for k in ks:
            overrides = [*(QUICK if args.quick else []), *args.overrides, f"pipeline.max_staleness={k}"]
            if out:
                overrides.append(f"run.dir={out / f'k{k}-r{r}'}")
            runs[k].append(run_training(load_config(overrides)))
    result = assemble(runs, args.cores)
    print(format_report(result))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "bench.png")
        print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return result


def spread(values: list[float]) -> float:
    """Relative spread (max - min) / median: how far apart the repeats landed, as a share of the median."""
    return (max(values) - min(values)) / median(values)


def assemble(runs: dict[int, list[dict]], cores: int) -> dict:
    """The bench result from each mode's run summaries (`runs[k][r]`: repeat r of staleness k).

    Speed-ups pair repeat r of each mode with repeat r of the baseline: sync (k = 0), else the smallest k."""
    base_k = 0 if 0 in runs else min(runs)
    base = runs[base_k]
    busy = {role: median(s[f"busy_{role}_s"] for s in base) for role in ROLES}
    bounds = {
        "baseline_k": base_k,
        "repeats": len(base),
        "cores": cores,
        "busy_s": busy,
        "overlap_bound": speedup_bound(list(busy.values()), cores=len(ROLES)),
        "resource_bound": speedup_bound(list(busy.values()), cores=cores),
    }
    rows = []
    for k, summaries in runs.items():
        samples = [s["samples_per_s"] for s in summaries]
        speedups = [s["samples_per_s"] / b["samples_per_s"] for s, b in zip(summaries, base, strict=True)]
        accuracy = [s["final_accuracy"] for s in summaries]
        speedup = median(speedups)
        rows.append({
            "mode": "sync" if k == 0 else "async",
            "max_staleness": k,
            "samples_per_s": median(samples),
            "samples_per_s_spread": spread(samples),
            "samples_per_s_all": samples,
            "speedup": speedup,
            "speedup_spread": spread(speedups),
            "speedup_all": speedups,
            "efficiency_overlap": speedup / bounds["overlap_bound"],
            "efficiency_resource": speedup / bounds["resource_bound"],
            "final_accuracy": median(accuracy),
            "final_accuracy_all": accuracy,
            "max_observed_staleness": max(s["max_observed_staleness"] for s in summaries),
            "busy_s": {role: median(s[f"busy_{role}_s"] for s in summaries) for role in ROLES},
            "train_wall_s": median(s["train_wall_s"] for s in summaries),
            "driver_cpu_s": median(s["driver_cpu_s"] for s in summaries),
        })
    return {"bounds": bounds, "rows": rows}


def _baseline_name(k: int) -> str:
    return "sync" if k == 0 else f"k={k}"


def format_report(result: dict) -> str:
    """The table, preceded by where its bounds come from (and a warning when there is no sync run)."""
    b = result["bounds"]
    base = _baseline_name(b["baseline_k"])
    busy = ", ".join(f"{role} {s:.2f}" for role, s in b["busy_s"].items())
    lines = []
    if b["baseline_k"] != 0:
        lines.append(f"note: no sync (k=0) mode was run; speed-ups and both bounds are relative to {base}, whose "
                     "busy seconds include time the roles lost to each other, so the bounds are only indicative")
    lines += [
        f"per-role busy seconds in {base} (median of {b['repeats']}): {busy}; the roles share {b['cores']} cores",
        f"overlap bound sum/max = {b['overlap_bound']:.2f}x (a core or device per role); resource-aware bound "
        f"sum/max(max, sum/{b['cores']}) = {b['resource_bound']:.2f}x",
        f"median over {b['repeats']} repeat(s), modes interleaved; repeat r's speed-up is over {base}'s repeat r; "
        "spread = (max - min) / median; eff = speed-up / bound",
        "",
    ]
    columns = [("mode", "mode", "s"), ("max_staleness", "k", "d"),
               ("samples_per_s", "samples/s", ".1f"), ("samples_per_s_spread", "spread", ".1%"),
               ("speedup", f"vs {base}", ".2f"), ("speedup_spread", "spread", ".1%"),
               ("overlap_bound", "overlap bound", ".2f"), ("efficiency_overlap", "eff", ".2f"),
               ("resource_bound", f"{b['cores']}-core bound", ".2f"), ("efficiency_resource", "eff", ".2f"),
               ("final_accuracy", "accuracy", ".3f"), ("max_observed_staleness", "max lag", "d")]
    return "\n".join(lines) + format_table([{**b, **row} for row in result["rows"]], columns)


def plot(result: dict, path: Path) -> None:
    """Speed-ups beside both bounds, so the gap to the reachable one is visible, and accuracy beside speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, rows = result["bounds"], result["rows"]
    labels = [_baseline_name(r["max_staleness"]) for r in rows]
    speedups = [r["speedup"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(labels, speedups, label="achieved (median, min-max)",
            yerr=[[s - min(r["speedup_all"]) for s, r in zip(speedups, rows, strict=True)],
                  [max(r["speedup_all"]) - s for s, r in zip(speedups, rows, strict=True)]], capsize=4)
    ax1.axhline(b["overlap_bound"], color="tab:red", ls="--",
                label=f"overlap bound {b['overlap_bound']:.2f}x (core per role)")
    ax1.axhline(b["resource_bound"], color="black", ls=":",
                label=f"resource-aware bound {b['resource_bound']:.2f}x ({b['cores']} cores)")
    ax1.set_ylabel(f"speed-up vs {_baseline_name(b['baseline_k'])} (samples/s)")
    ax1.set_ylim(0, max(b["overlap_bound"], *speedups) * 1.3)
    ax1.legend(fontsize=7, loc="upper left")
    ax2.bar(labels, [r["final_accuracy"] for r in rows], color="tab:green")
    ax2.set_ylabel("final greedy test accuracy")
    ax2.set_ylim(0, 1)
    fig.suptitle("AsyncOPD: strict sync vs bounded-staleness async, same steps and data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
