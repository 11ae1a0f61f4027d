"""`asyncopd simulate`: a discrete-event model of the async OPD pipeline at cluster scale.

The model is the real scheduler's (`pipeline.scheduler.run_stages`) with stage times from a cost model
(`bench.sim_model`) in place of the stages: one rollout loop generates batch s once admission allows it (the fleet
holds weight version >= s - k, `pipeline.admission`), a teacher loop scores batches in order, and the learner trains
step s on batch s, then syncs version s + 1 to the engines, which stand still during the sync. Roles on devices of
their own run at full speed; roles sharing CPU cores (the embedded tier) split them evenly while busy together
(processor sharing). Without partial rollouts a round ends with its longest sample; with them it ends at a length
quantile and unfinished samples resume in the next round, charged (as the learner charges them) to the version of
their oldest token, so a sample is deferred only while that keeps it within k.

    asyncopd simulate --calibrate DIR/bench.json  # fit per-role costs to a measured sync run, predict every mode
    asyncopd simulate --project paper --out DIR   # the paper's 8-GPU setting: every GPU split x k x partial
"""

import argparse
import json
import random
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from asyncopd.bench.args import positive_int
from asyncopd.bench.report import write_report
from asyncopd.bench.sim_model import GPUS, QWEN3_1P7B, QWEN3_30B_A3B, Costs, GpuCosts, Lengths, MeasuredCosts
from asyncopd.bench.table import format_table
from asyncopd.core.errors import ConfigError

ROLES = ("rollout", "teacher", "learner", "sync")


@dataclass
class Sample:
    length: int  # response tokens it ends with
    version: int  # weight version of its oldest token
    engine: int
    done: int = 0  # response tokens generated so far


@dataclass(frozen=True)
class SimConfig:
    batch_size: int  # prompts per round (with partial rollouts: slots, fresh prompts fill what carried ones leave)
    steps: int  # learner steps
    max_staleness: int  # k: batch s starts once the engines hold version >= s - k
    lengths: Lengths = Lengths()
    partial: bool = False  # rounds stop at the cut_quantile length; unfinished samples resume in the next round
    cut_quantile: float = 0.8
    seed: int = 0  # response lengths: the i-th prompt of a run gets the i-th draw


@dataclass
class SimResult:
    samples: int = 0
    tokens: int = 0  # response tokens trained, as the run's tokens/s counts them
    wall_s: float = 0.0
    busy_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))  # wall time a job was on
    work_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))  # uncontended seconds
    staleness: Counter = field(default_factory=Counter)  # lag (consuming step - oldest token's version) -> samples
    step_end_s: list[float] = field(default_factory=list)  # when each step's sync completed
    step_samples: list[int] = field(default_factory=list)  # samples each step trained on
    step_tokens: list[int] = field(default_factory=list)
    deferred: int = 0  # sample-rounds a partial-rollout cut carried into the next round

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def steady(self, skip: int) -> tuple[float, float]:
        """(samples/s, tokens/s) after the first `skip` steps: a long run's rate, without the pipeline's fill or
        the partial-rollout carry-over building up (and with no end effects: the rate runs to the last step)."""
        if skip <= 0 or skip >= len(self.step_end_s):
            return self.samples_per_s, self.tokens_per_s
        span = self.step_end_s[-1] - self.step_end_s[skip - 1]
        return sum(self.step_samples[skip:]) / span, sum(self.step_tokens[skip:]) / span

    def summary(self) -> dict:
        steps = max(1, len(self.step_end_s))
        return {"samples_per_s": self.samples_per_s, "tokens_per_s": self.tokens_per_s, "wall_s": self.wall_s,
                "samples": self.samples, "busy_fraction": {r: b / self.wall_s for r, b in self.busy_s.items()},
                "stage_s_per_step": {r: w / steps for r, w in self.work_s.items()},
                "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
                "max_staleness_seen": max(self.staleness, default=0), "deferred": self.deferred}


class Rollouts:
    """What each round decodes: fresh prompts (and, with partial rollouts, samples carried over from the last
    round) spread evenly over the engines, for as many tokens as the round's cut allows."""

    def __init__(self, cfg: SimConfig, costs: Costs):
        self.cfg, self.costs = cfg, costs
        self.rng = random.Random(cfg.seed)  # prompt i gets the same length in every config compared
        self.carried: list[Sample] = []
        self.cut = cfg.lengths.quantile(cfg.cut_quantile) if cfg.partial else None

    def round(self, s: int, version: int) -> tuple[float, list[Sample], int]:
        """Roll out batch s under `version`: (engine seconds, finished samples, samples deferred to s + 1)."""
        per_engine = Counter(x.engine for x in self.carried)
        batch = list(self.carried)
        for _ in range(self.cfg.batch_size - len(batch)):
            engine = min(range(self.costs.engines), key=per_engine.__getitem__)  # the least loaded, lowest first
            per_engine[engine] += 1
            batch.append(Sample(self.cfg.lengths.draw(self.rng), version, engine))
        left = [x.length - x.done for x in batch]
        steps = max(left)
        if self.cut is not None:  # a sample that would exceed k if deferred runs to its end
            must = max((r for x, r in zip(batch, left, strict=True)
                        if s + 1 - x.version > self.cfg.max_staleness), default=0)
            steps = min(steps, max(self.cut, must, min(left)))
        by_engine: list[list[tuple[int, int]]] = [[] for _ in range(self.costs.engines)]
        for x, r in zip(batch, left, strict=True):
            by_engine[x.engine].append((self.cfg.lengths.prompt_tokens + x.done, min(r, steps)))
            x.done += min(r, steps)
        seconds = max(self.costs.engine_seconds(seqs) for seqs in by_engine)
        self.carried = [x for x in batch if x.done < x.length]
        return seconds, [x for x in batch if x.done >= x.length], len(self.carried)


def simulate(cfg: SimConfig, costs: Costs) -> SimResult:
    """Run `cfg.steps` learner steps through the three loops of `run_stages`; deterministic given cfg.seed."""
    rollouts, k, out = Rollouts(cfg, costs), cfg.max_staleness, SimResult()
    prompt = cfg.lengths.prompt_tokens
    jobs: dict[str, list] = {}  # role -> [remaining uncontended seconds, (step, samples)]
    to_score: deque = deque()
    scored: dict[int, list[Sample]] = {}
    t, published, next_round = 0.0, 0, 0

    def start(role: str, seconds: float, payload: tuple) -> None:
        jobs[role] = [seconds, payload]
        out.work_s[role] += seconds

    while len(out.step_end_s) < cfg.steps:
        if "rollout" not in jobs and next_round < cfg.steps and published >= next_round - k:  # admission
            seconds, finished, deferred = rollouts.round(next_round, published)
            out.deferred += deferred
            start("rollout", seconds, (next_round, finished))
            next_round += 1
        if "teacher" not in jobs and to_score:
            s, batch = to_score.popleft()
            start("teacher", costs.teacher_seconds([prompt + x.length for x in batch]), (s, batch))
        step = len(out.step_end_s)
        if "learner" not in jobs and "sync" not in jobs and step in scored:
            batch = scored.pop(step)
            start("learner", costs.learner_seconds([prompt + x.length for x in batch]), (step, batch))
        # rates: a sync pauses the engines; roles on shared cores split them while busy together
        rate = {role: 0.0 if role == "rollout" and "sync" in jobs else 1.0 for role in jobs}
        if costs.shared_cores:
            running = [r for r in jobs if rate[r] > 0]
            share = min(1.0, costs.shared_cores / max(1, len(running)))
            rate = {r: v * share for r, v in rate.items()}
        dt = min((jobs[r][0] / v for r, v in rate.items() if v > 0), default=None)
        if dt is None:
            raise RuntimeError(f"simulation stalled at t={t:.3f}: no job can run (a bug, not a config)")
        t += dt
        done = []
        for role, v in rate.items():
            out.busy_s[role] += dt
            jobs[role][0] -= v * dt
            if jobs[role][0] <= 1e-9 * max(1.0, t):
                done.append(role)
        for role in done:
            s, payload = jobs.pop(role)[1]
            if role == "rollout":
                to_score.append((s, payload))
            elif role == "teacher":
                scored[s] = payload
            elif role == "learner":
                out.staleness.update(s - x.version for x in payload)
                out.step_samples.append(len(payload))
                out.step_tokens.append(sum(x.length for x in payload))
                out.samples += out.step_samples[-1]
                out.tokens += out.step_tokens[-1]
                start("sync", costs.sync_seconds(), (s, []))
            else:
                published = s + 1
                out.step_end_s.append(t)
    out.wall_s = t
    return out


# --- calibration: fit per-role costs to a measured sync run, predict every mode -------------------------------

def _read_bench(path: str) -> dict:
    """bench.json as `asyncopd bench --out DIR` writes it, checked for what calibration needs."""
    try:
        bench = json.loads(Path(path).read_text())
        rows = {int(r["max_staleness"]): r for r in bench["rows"]}
        cores = float(bench["bounds"]["cores"])
        base = rows[0]
        numbers = [base["samples_per_s"], base["train_wall_s"], *(base["busy_s"][r] for r in ROLES[:3]),
                   *(r["samples_per_s"] for r in rows.values())]
    except FileNotFoundError:
        raise ConfigError(f"--calibrate {path}: no such file (write one with `asyncopd bench --quick --out DIR`: "
                          "DIR/bench.json)") from None
    except OSError as e:
        raise ConfigError(f"--calibrate {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--calibrate {path}: not JSON ({e})") from None
    except KeyError as e:
        raise ConfigError(f"--calibrate {path}: not an `asyncopd bench` result with a sync run (missing {e}; "
                          "run the bench with k=0 among --staleness: its busy seconds are each role's "
                          "uncontended work)") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--calibrate {path}: not an `asyncopd bench` result ({e})") from None
    if not all(isinstance(x, int | float) and x > 0 for x in [cores, *numbers]):
        raise ConfigError(f"--calibrate {path}: samples/s, busy seconds, wall time and cores must be positive numbers")
    return {"rows": rows, "cores": cores}


def calibrate(path: str, batch_size: int = 64, background_cores: float = 0.0) -> dict:
    """Per-role seconds per sample from the sync run's busy seconds (roles take turns there, so each is that
    role's uncontended work), then every measured mode simulated at the bench's steps and batch.

    The driver process is a CPU consumer too (dispatch, batching, decoding the teacher's wire format): the sync
    run measures its CPU seconds per sample, and in every mode it takes that many cores' worth at the rate the
    run goes (in sync that fits beside the one busy role; in async it competes with them). The predicted rate is
    the fixed point of that, found by bisection."""
    bench = _read_bench(path)
    rows, cores = bench["rows"], bench["cores"] - background_cores
    if cores <= 0:
        raise ConfigError(f"--background-cores {background_cores}: leaves no core of the bench's {bench['cores']:g}")
    base = rows[0]
    steps = max(1, round(base["samples_per_s"] * base["train_wall_s"] / batch_size))
    n = steps * batch_size
    per_sample = [base["busy_s"][role] / n for role in ROLES[:3]]
    driver = base.get("driver_cpu_s", 0.0) / n  # absent from benches before it was measured: 0
    work = sum(per_sample)  # core-seconds of role work per sample

    def at(rate: float, k: int) -> SimResult:
        costs = MeasuredCosts(*per_sample, shared_cores=max(cores - driver * rate, 1e-3))
        return simulate(SimConfig(batch_size, steps, k, Lengths(sigma=0)), costs)

    out = []
    for k, row in sorted(rows.items()):
        lo, hi = 0.0, at(0.0, k).samples_per_s  # the rate with the driver's CPU free bounds it from above
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at(mid, k).samples_per_s > mid else (lo, mid)
        sim = at(lo, k)
        out.append({"max_staleness": k, "mode": "sync" if k == 0 else "async",
                    "measured_samples_per_s": row["samples_per_s"], "predicted_samples_per_s": sim.samples_per_s,
                    "error": sim.samples_per_s / row["samples_per_s"] - 1,
                    "measured_speedup": row["samples_per_s"] / base["samples_per_s"],
                    # cores' worth of role work done per second: what the roles got of the shared cores
                    "measured_cores": row["samples_per_s"] * work, "predicted_cores": sim.samples_per_s * work,
                    "driver_cores": driver * sim.samples_per_s,
                    "measured_max_lag": row.get("max_observed_staleness", -1), **sim.summary()})
    for r in out:
        r["predicted_speedup"] = r["predicted_samples_per_s"] / out[0]["predicted_samples_per_s"]
    return {"bench": str(path), "steps": steps, "batch_size": batch_size, "cores": cores,
            "costs": {**dict(zip(("rollout_s_per_sample", "teacher_s_per_sample", "learner_s_per_sample"),
                                 per_sample, strict=True)), "driver_cpu_s_per_sample": driver},
            "rows": out, "max_abs_error": max(abs(r["error"]) for r in out)}


def format_calibration(result: dict) -> str:
    c = result["costs"]
    columns = [("mode", "mode", "s"), ("max_staleness", "k", "d"), ("measured_samples_per_s", "measured/s", ".1f"),
               ("predicted_samples_per_s", "predicted/s", ".1f"), ("error", "error", "+.1%"),
               ("measured_speedup", "measured x", ".2f"), ("predicted_speedup", "predicted x", ".2f"),
               ("measured_cores", "cores used", ".2f"), ("predicted_cores", "predicted", ".2f"),
               ("driver_cores", "driver", ".2f"),
               ("measured_max_lag", "max lag", "d"), ("max_staleness_seen", "predicted", "d")]
    worst = max(result["rows"], key=lambda r: abs(r["error"]))
    verdict = f"max |error| {result['max_abs_error']:.1%} (bar: 15%)"
    if result["max_abs_error"] > 0.15:
        verdict += (f"; at k={worst['max_staleness']} the roles did {worst['measured_cores']:.2f} cores' worth of "
                    f"their sync-run work per second where the model gives them {worst['predicted_cores']:.2f}: "
                    "the gap is CPU the roles did not get beyond the driver's share, which a sync run cannot reveal "
                    "(one role busy at a time leaves the other core to everything else: other jobs, Ray); bench on "
                    "an idle machine with --repeats, or model other load with --background-cores")
    return "\n".join([
        f"calibrated from {result['bench']}'s sync run: seconds per sample rollout {c['rollout_s_per_sample']:.2e}, "
        f"teacher {c['teacher_s_per_sample']:.2e}, learner {c['learner_s_per_sample']:.2e} (the learner's include "
        f"its weight sync), driver CPU {c['driver_cpu_s_per_sample']:.2e}; {result['steps']} steps x "
        f"{result['batch_size']}; the roles and the driver share {result['cores']:g} cores (processor sharing)", "",
        format_table(result["rows"], columns), "", verdict])


# --- projection: the paper's 8-GPU setting over every GPU split, k and partial rollouts --------------------------

PAPER_SPLIT = (1, 4, 3)  # teacher / rollout / trainer GPUs in the paper's setting


def splits(gpus: int) -> list[tuple[int, int, int]]:
    """Every (teacher, rollout, trainer) split of `gpus` with at least one GPU each."""
    return [(t, r, gpus - t - r) for t in range(1, gpus - 1) for r in range(1, gpus - t)]


def parse_split(text: str, gpus: int) -> tuple[int, int, int]:
    try:
        split = tuple(int(x) for x in text.split(","))
    except ValueError:
        split = ()
    if len(split) != 3 or min(split) < 1 or sum(split) != gpus:
        raise ConfigError(f"--split {text}: want teacher,rollout,trainer GPUs, each >= 1, summing to --gpus {gpus} "
                          f"(e.g. {','.join(map(str, PAPER_SPLIT))} of 8)")
    return split  # type: ignore[return-value]


def project(args: argparse.Namespace) -> dict:
    """Simulate each split at k = 0 (the baseline) and every k in --staleness, partial rollouts off and on."""
    lengths = Lengths(args.prompt_tokens, args.median_tokens, args.sigma, args.max_new_tokens)
    mean_len = lengths.mean(seed=args.seed)
    ks = sorted({0, *args.staleness})
    modes = [(0, False), *((k, False) for k in ks if k), *((k, True) for k in ks if k)]  # k=0 defers nothing
    skip = args.steps // 4
    rows, per_split = [], []
    for split in [parse_split(args.split, args.gpus)] if args.split else splits(args.gpus):
        costs = GpuCosts(QWEN3_1P7B, QWEN3_30B_A3B, *split, gpu=GPUS[args.gpu], mean_context=args.prompt_tokens
                         + mean_len)
        runs = []
        for k, partial in modes:
            sim = simulate(SimConfig(args.batch_size, args.steps, k, lengths, partial, args.cut_quantile, args.seed),
                           costs)
            samples_per_s, tokens_per_s = sim.steady(skip)
            runs.append({"split": "/".join(map(str, split)), "mode": f"k={k}{' partial' if partial else ''}"
                         if k else "sync", "max_staleness": k, "partial": partial, **sim.summary(),
                         "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
                         "speedup": tokens_per_s / (runs[0]["tokens_per_s"] if runs else tokens_per_s)})
        rows += runs
        sync = runs[0]
        # the long tail: a sync round against the same round with every sample at the mean length
        share = -(-args.batch_size // split[1])
        flat = costs.engine_seconds([(args.prompt_tokens, round(mean_len))] * share)
        stages = sync["stage_s_per_step"]
        best = max(runs, key=lambda r: r["tokens_per_s"])
        no_partial = max((r for r in runs if not r["partial"]), key=lambda r: r["tokens_per_s"])
        per_split.append({"split": sync["split"], "sync_tokens_per_s": sync["tokens_per_s"],
                          **{f"{r}_s": stages[r] for r in ROLES}, "tail_factor": stages["rollout"] / flat,
                          "bottleneck": max(ROLES[:3], key=lambda r: stages[r]),
                          "overlap_bound": sum(stages.values()) / max(stages.values()),
                          "async_speedup": no_partial["speedup"], "async_mode": no_partial["mode"],
                          "best_mode": best["mode"], "best_speedup": best["speedup"],
                          "best_tokens_per_s": best["tokens_per_s"]})
    best_sync = max(r["tokens_per_s"] for r in rows if r["mode"] == "sync")
    for r in rows:
        r["vs_best_sync"] = r["tokens_per_s"] / best_sync
    return {"setting": {"gpu": GPUS[args.gpu].name, "gpus": args.gpus, "batch_size": args.batch_size,
                        "steps": args.steps, "steady_after_step": skip, "lengths": asdict(lengths),
                        "mean_response_tokens": mean_len, "cut_quantile": args.cut_quantile,
                        "cut_tokens": lengths.quantile(args.cut_quantile),
                        "costs": {k: v for k, v in asdict(costs).items()
                                  if k not in ("student", "teacher", "teacher_gpus", "rollout_gpus", "learner_gpus")},
                        "student": asdict(QWEN3_1P7B), "teacher": asdict(QWEN3_30B_A3B)},
            "rows": rows, "splits": per_split}


def format_projection(result: dict, top: int) -> str:
    st, rows, per_split = result["setting"], result["rows"], result["splits"]
    ln = st["lengths"]
    ranked = sorted(rows, key=lambda r: -r["tokens_per_s"])
    paper = "/".join(map(str, PAPER_SPLIT))
    shown = ranked[:top] + [r for r in rows if r["split"] == paper and r not in ranked[:top]]
    columns = [("split", "T/R/L", "s"), ("mode", "mode", "s"), ("samples_per_s", "samples/s", ".2f"),
               ("tokens_per_s", "tokens/s", ".0f"), ("speedup", "vs own sync", ".2f"),
               ("vs_best_sync", "vs best sync", ".2f"), ("max_staleness_seen", "max lag", "d")]
    busy = [(f"busy_{r}", f"busy {r[:5]}", ".0%") for r in ROLES[:3]]
    stage = [(f"{r}_s", f"{r[:5]} s", ".1f") for r in ROLES[:3]]
    flat_rows = [{**r, **{f"busy_{k}": v for k, v in r["busy_fraction"].items()}} for r in shown]
    split_cols = [("split", "T/R/L", "s"), ("sync_tokens_per_s", "sync tok/s", ".0f"), *stage,
                  ("bottleneck", "bottleneck", "s"), ("tail_factor", "tail x", ".2f"),
                  ("overlap_bound", "sum/max", ".2f"), ("async_mode", "async", "s"), ("async_speedup", "x", ".2f"),
                  ("best_mode", "best", "s"), ("best_speedup", "x", ".2f")]
    best = max(per_split, key=lambda s: s["best_tokens_per_s"])
    mine = next((s for s in per_split if s["split"] == paper), None)
    lines = [
        f"{st['gpus']} x {st['gpu']}, split teacher/rollout/trainer (T/R/L); Qwen3-1.7B student, Qwen3-30B-A3B "
        f"teacher; batch {st['batch_size']}, prompts {ln['prompt_tokens']} tokens, responses lognormal (median "
        f"{ln['median_tokens']}, sigma {ln['sigma']}) capped at {ln['max_new_tokens']} (mean "
        f"{st['mean_response_tokens']:.0f}); partial rollouts cut at the {st['cut_quantile']:.0%} quantile "
        f"({st['cut_tokens']} tokens); rates over steps {st['steady_after_step'] + 1}-{st['steps']} "
        "(trained response tokens/s; speed-ups in tokens/s)", "",
        f"top {top} by tokens/s" + (f" (+ the paper's split {paper})" if mine else ""),
        format_table(flat_rows, columns + busy), "",
        "per split: stage seconds per step (sync), the long tail (sync rollout round / the same round at the mean "
        "length), the overlap bound sum/max, the best async mode without and with partial rollouts",
        format_table(sorted(per_split, key=lambda s: -s["best_tokens_per_s"]), split_cols), "",
        f"best split {best['split']}: {best['best_mode']} at {best['best_tokens_per_s']:.0f} tokens/s, "
        f"{best['best_speedup']:.2f}x its sync = {best['async_speedup']:.2f}x from overlapping the roles "
        f"({best['async_mode']} without partial rollouts; bound sum/max {best['overlap_bound']:.2f}x) x "
        f"{best['best_speedup'] / best['async_speedup']:.2f}x from cutting the long tail (partial rollouts; a sync "
        f"rollout round lasts {best['tail_factor']:.2f}x the same round at the mean length); the bottleneck is "
        + ", ".join(f"{role} in {n} of {len(per_split)} splits"
                    for role, n in Counter(s["bottleneck"] for s in per_split).most_common())]
    if mine:
        lines.append(f"paper split {paper}: sync {mine['sync_tokens_per_s']:.0f} tokens/s, {mine['async_mode']} "
                     f"{mine['async_speedup']:.2f}x, {mine['best_mode']} {mine['best_speedup']:.2f}x; bottleneck "
                     f"{mine['bottleneck']}")
    return "\n".join(lines)


def plot_projection(result: dict, path: Path) -> None:
    """Left: tokens/s per split for sync, the best async mode without and with partial rollouts. Right: each
    mode's speed-up over its split's sync, split by split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_split, rows = result["splits"], result["rows"]
    names = [s["split"] for s in per_split]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    grid = [[next(r["speedup"] for r in rows if r["split"] == n and r["mode"] == m) for n in names] for m in modes]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, 0.5 * len(names) + 2), 8))
    x = range(len(names))
    for label, key in (("sync", "sync_tokens_per_s"), ("best async", "best_tokens_per_s")):
        ax1.plot(x, [s[key] for s in per_split], marker="o", label=label)
    ax1.plot(x, [s["sync_tokens_per_s"] * s["async_speedup"] for s in per_split], marker="s",
             label="best async, no partial rollouts")
    ax1.set_xticks(list(x), names, rotation=60, fontsize=7)
    ax1.set_ylabel("trained tokens/s")
    ax1.set_title(f"{result['setting']['gpus']} x {result['setting']['gpu']}: split teacher/rollout/trainer")
    ax1.legend(fontsize=8)
    im = ax2.imshow(grid, aspect="auto", cmap="viridis")
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            ax2.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 1.5 else "black")
    ax2.set_xticks(list(x), names, rotation=60, fontsize=7)
    ax2.set_yticks(range(len(modes)), modes, fontsize=8)
    ax2.set_title("speed-up over the same split's strict sync (tokens/s)")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = ["sync" if r["max_staleness"] == 0 else f"k={r['max_staleness']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [r["measured_samples_per_s"] for r in rows], 0.4, label="measured (bench)")
    ax.bar([i + 0.2 for i in x], [r["predicted_samples_per_s"] for r in rows], 0.4, label="simulated")
    for i, r in zip(x, rows, strict=True):
        ax.text(i + 0.2, r["predicted_samples_per_s"], f"{r['error']:+.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("samples/s")
    ax.set_title(f"simulator vs the embedded bench ({result['cores']:g} shared cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"want comma-separated k >= 0, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--calibrate", metavar="BENCH_JSON",
                      help="fit per-role costs to this `asyncopd bench --out DIR` result's sync run and predict "
                           "every mode it measured")
    what.add_argument("--project", choices=["paper"],
                      help="paper: 8 GPUs, Qwen3-1.7B from Qwen3-30B-A3B, every split x k x partial rollouts")
    p.add_argument("--out", default="", help="directory for simulate.json and simulate.png")
    p.add_argument("--batch-size", type=positive_int, default=0,
                   help="samples per step (default: the paper config's 256; with --calibrate the bench's 64)")
    p.add_argument("--background-cores", type=float, default=0.0,
                   help="--calibrate: cores' worth of other work beside the roles (driver, Ray, other jobs)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--gpus", type=positive_int, default=8)
    p.add_argument("--split", default="", help="teacher,rollout,trainer GPUs: only this split (default: all)")
    p.add_argument("--staleness", type=_ints, default=[0, 1, 2, 4], help="k values (k=0, strict sync, always runs)")
    p.add_argument("--steps", type=positive_int, default=32, help="learner steps per simulated run")
    p.add_argument("--prompt-tokens", type=positive_int, default=512)
    p.add_argument("--median-tokens", type=positive_int, default=4096, help="median response length")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of response lengths (0: all median)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16384)
    p.add_argument("--cut-quantile", type=float, default=0.8,
                   help="partial rollouts: a round stops at this quantile of the response length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=positive_int, default=12, help="rows of the ranked table")


def run(args: argparse.Namespace) -> dict:
    """Calibrate against a bench or project a setting; print the tables, write JSON and PNG with --out."""
    if args.calibrate:
        result = calibrate(args.calibrate, args.batch_size or 64, args.background_cores)
        print(format_calibration(result))
        plot = plot_calibration
    else:
        if args.gpus < 3:
            raise ConfigError(f"--gpus {args.gpus}: teacher, rollout and trainer need at least one GPU each")
        if not 0 < args.cut_quantile < 1 or args.sigma < 0:
            raise ConfigError(f"--cut-quantile {args.cut_quantile} must lie in (0, 1) and --sigma {args.sigma} >= 0")
        result = project(argparse.Namespace(**{**vars(args), "batch_size": args.batch_size or 256}))
        print(format_projection(result, args.top))
        plot = plot_projection
    if args.out:
        write_report(args.out, "simulate", result, lambda path: plot(result, path))
    return result
