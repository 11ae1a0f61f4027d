"""An OPD run around the loop: start Ray, the fleet, the teacher and the learner, resume, evaluate, summarise,
and tear it all down. The loop itself (prompt -> gradient) is pipeline/loop.py."""

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
import ray

from asyncopd.config.load import to_yaml
from asyncopd.config.ray_cluster import ray_node_labels, start_ray
from asyncopd.config.schema import Config
from asyncopd.core.errors import ConfigError, Preempted
from asyncopd.core.protocols import LearnerHandle
from asyncopd.data.dataset import PromptSet, Sample, load_prompts
from asyncopd.data.tokenizer import load_tokenizer
from asyncopd.data.verifiers import avg_at_k, build_verifier
from asyncopd.learner.checkpoints import resolve_checkpoint, save_checkpoint, step_dirs
from asyncopd.learner.group import LearnerGroup
from asyncopd.model.paths import ModelPaths, resolve_data_files, resolve_model_paths, teacher_services
from asyncopd.pipeline.fleet import Fleet
from asyncopd.pipeline.loop import OPDLoop, train
from asyncopd.pipeline.placements import reserve
from asyncopd.pipeline.run_logger import RunLogger
from asyncopd.pipeline.scheduler import StageTimes
from asyncopd.pipeline.supervisor import Supervisor
from asyncopd.validation.rules import validate


def make_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.dir or f"runs/{cfg.run.experiment}-{stamp}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


log = logging.getLogger(__name__)
EVAL_SEED = 2**31  # avg@k samples: above every training batch's seed offset (64 * step)


def prompt_budget(cfg: Config, paths: ModelPaths) -> int:
    """`data.max_prompt_length`, or what the student's context leaves after `rollout.max_new_tokens`."""
    if cfg.data.max_prompt_length:
        return cfg.data.max_prompt_length
    context = json.loads((Path(paths.student) / "config.json").read_text()).get("max_position_embeddings", 0)
    budget = context - cfg.rollout.max_new_tokens
    if budget <= 0:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                          f"student's {context}-token context: lower it or set data.max_prompt_length")
    return budget


def load_data(cfg: Config, paths: ModelPaths, tokenizer) -> tuple[PromptSet, PromptSet | None]:
    """Train and val prompts, rendered and tokenized once, before anything starts: bad data costs nothing."""
    train_files, val_files = resolve_data_files(cfg)
    kw = {"tokenizer_path": paths.tokenizer, "max_prompt_length": prompt_budget(cfg, paths)}
    train = load_prompts(train_files, cfg.data, tokenizer, field="data.train_files",
                         teachers=[t.name for t in teacher_services(cfg)], **kw)  # only training data is scored
    val = load_prompts(val_files, cfg.data, tokenizer, field="data.val_files", **kw) if val_files else None
    for name, s in (("train", train), ("val", val)):
        if s is not None and cfg.run.progress:
            print(f"data: {len(s.samples)} {name} prompts from {', '.join(s.files)}"
                  + (f" ({s.dropped_long} longer than {s.max_prompt_length} tokens dropped)" if s.dropped_long else ""),
                  flush=True)
    return train, val


def evaluate_student(fleet: Fleet, tokenizer, samples: list[Sample], verifier: Callable[[str, str], bool], k: int,
                     seed: int) -> dict[str, float]:
    """pass@1 (greedy) and, for k > 0, avg@k and pass@k over k samples at the rollout temperature, of whatever
    weights the rollout fleet holds now."""

    def correct(prompts: list[list[int]], answers: list[str], **kw) -> list[bool]:
        outs = fleet.generate(prompts, **kw)
        texts = tokenizer.batch_decode([r.response_ids.tolist() for r in outs], skip_special_tokens=True)
        return [verifier(t, a) for t, a in zip(texts, answers, strict=True)]

    prompts, answers = [list(s.prompt_ids) for s in samples], [s.answer for s in samples]
    out = {"eval/pass@1": float(np.mean(correct(prompts, answers, temperature=0.0)))}
    if k:
        flat = correct([p for p in prompts for _ in range(k)], [a for a in answers for _ in range(k)], seed=seed)
        per_prompt = [flat[i:i + k] for i in range(0, len(flat), k)]
        out[f"eval/avg@{k}"] = avg_at_k(per_prompt)
        out[f"eval/pass@{k}"] = float(np.mean([any(c) for c in per_prompt]))
    return out


def resume(cfg: Config, learner: LearnerHandle, sync: Supervisor) -> int:
    """Load `run.resume_from` (weights, optimizer, version) and push it to the fleet; returns the version.

    The version is the staleness clock, so it must survive a resume: the next batch is `version`, its
    prompts are the ones the original run would have used next, and admission starts from there."""
    if not cfg.run.resume_from:
        return 0
    version = learner.load(str(resolve_checkpoint(cfg.run.resume_from)))
    if version >= cfg.pipeline.steps:
        raise ConfigError(f"run.resume_from={cfg.run.resume_from!r} is at version {version}, already >= "
                         f"pipeline.steps={cfg.pipeline.steps}: raise pipeline.steps to train further")
    sync.sync(version)
    return version


def run_training(cfg: Config) -> dict:
    """The whole run; returns the summary (also written to run_dir/summary.json)."""
    validate(cfg, host=True)  # this machine can run it: modules, CUDA, checkpoints, before anything starts
    paths = resolve_model_paths(cfg.model)
    tokenizer = load_tokenizer(paths.tokenizer)
    verifier = build_verifier(cfg.data.verifier)
    train_set, val_set = load_data(cfg, paths, tokenizer)
    run_dir = make_run_dir(cfg)
    owns_ray = start_ray(cfg.cluster, run_dir)
    logger = RunLogger(run_dir, cfg.pipeline.steps, cfg.run.tensorboard, cfg.run.progress)
    fleet = learner = sync = learner_launch = placed = None
    terminated, restore = _on_sigterm()
    try:
        placed = reserve(cfg)  # every role's placement group, in one order, before any actor starts
        # the learner's processes start (imports, model load) while the fleet loads, not after it
        launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner-launch")
        learner_launch = launcher.submit(LearnerGroup.launch, cfg, paths.student, placed.learner)
        launcher.shutdown(wait=False)
        fleet = Fleet.launch(cfg, paths, placed.rollout, placed.teachers)
        fleet.check_vocabularies()
        learner = learner_launch.result()
        sync = Supervisor(cfg, fleet, learner)  # the weight sync over the live engines; restarts lost servers
        sync.init_group()
        start = resume(cfg, learner, sync)
        val = val_set.samples[: cfg.pipeline.eval_prompts] if val_set else []
        evals: list[tuple[int, dict[str, float]]] = []
        eval_time = 0.0

        def evaluate(step: int) -> float:
            """Evaluate, log, and return the seconds it took (mid-run ones are not training time)."""
            if not val:
                return 0.0
            t0 = time.perf_counter()
            metrics = evaluate_student(fleet, tokenizer, val, verifier, cfg.pipeline.eval_k,
                                       cfg.pipeline.seed * 2**32 + EVAL_SEED)
            evals.append((step, metrics))
            logger.scalars(step, metrics)
            return time.perf_counter() - t0

        evaluate(start)
        loop = OPDLoop(cfg, fleet, learner, sync, tokenizer, train_set.samples, verifier, logger.step, start)
        saved = [start]

        def save(step: int) -> None:
            save_checkpoint(run_dir, step, learner.save, cfg.run.keep_checkpoints)
            saved.append(step)

        def after_step(s: int, times: StageTimes) -> None:
            nonlocal eval_time
            step = s + 1
            i = s - start
            logger.scalars(s, {"time/rollout_s": times.rollout[i], "time/teacher_s": times.teacher[i],
                               "time/learner_s": times.learner[i]})
            if terminated.is_set():  # checkpoint the step just taken, then stop (run_stages closes the stages)
                if saved[-1] != step:
                    save(step)
                raise Preempted(step, str(run_dir / "checkpoint"))
            if cfg.pipeline.eval_every and step % cfg.pipeline.eval_every == 0 and step < cfg.pipeline.steps:
                eval_time += evaluate(step)
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                save(step)

        cpu0 = time.process_time()  # the driver's own CPU (all its threads): a consumer beside the roles
        times = train(loop, start, after_step)
        driver_cpu_s = time.process_time() - cpu0  # with any mid-run evaluation's (the stages run on meanwhile)
        evaluate(cfg.pipeline.steps)
        if saved[-1] != cfg.pipeline.steps:
            save(cfg.pipeline.steps)
        builtin = not (cfg.data.train_files or cfg.data.val_files)  # the teacher was measured on the task's val
        summary = _summary(cfg, run_dir, times, eval_time, driver_cpu_s, loop, evals,
                           fleet.teacher_accuracy if builtin else None,
                           {"train": train_set.summary(), "val": val_set.summary() if val_set else None}, sync,
                           _ray_nodes(fleet, learner))
        print(logger.summary(summary))
        return summary
    finally:
        restore()
        logger.close()
        if sync is not None:
            sync.close()
        if fleet is not None:
            fleet.shutdown()
        # the fleet failed first: the learner launched beside it must not outlive the run
        if learner is None and learner_launch is not None:
            learner = _launched_or_none(learner_launch)
        if learner is not None:
            learner.shutdown()
        if placed is not None:
            placed.release()
        if owns_ray:
            ray.shutdown()


def _on_sigterm() -> tuple[threading.Event, Callable[[], None]]:
    """(set once SIGTERM arrives, restore the previous handler). Slurm's scancel and preemption send SIGTERM, then
    SIGKILL after KillWait: the run finishes its step, checkpoints and stops. Only the main thread can take
    signals; elsewhere (a run inside a test's thread) the event never fires."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return event, lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    return event, lambda: signal.signal(signal.SIGTERM, previous)


def _ray_nodes(fleet: Fleet, learner: LearnerGroup) -> dict[str, list[str]]:
    """Which Ray node each role's actors ran on, by readable node name (asyncopd.config.ray_cluster)."""
    labels = ray_node_labels()
    ids = {"learner": learner.node_ids(), **fleet.node_ids()}
    return {role: [labels.get(n, n) for n in nodes] for role, nodes in ids.items()}


def _summary(cfg: Config, run_dir: Path, times: StageTimes, eval_time: float, driver_cpu_s: float, loop: OPDLoop,
             evals: list[tuple[int, dict[str, float]]], teacher_accuracy: float | None, data: dict,
             supervisor: Supervisor, ray_nodes: dict[str, list[str]]) -> dict:
    train_wall = times.wall_s - eval_time
    per_role = {role: float(np.sum(getattr(times, role))) for role in ("rollout", "teacher", "learner")}
    last = loop.history[-1] if loop.history else {}
    first, final = (evals[0][1]["eval/pass@1"], evals[-1][1]["eval/pass@1"]) if evals else (None, None)
    return {
        "run_dir": str(run_dir),
        "ray_nodes": ray_nodes,  # role -> the Ray node of each actor (learner: by rank)
        # the Slurm job the run was (sbatch, or one point of a submitit sweep), if any
        "slurm": {k: os.environ[v] for k, v in (("job_id", "SLURM_JOB_ID"), ("nodes", "SLURM_JOB_NODELIST"),
                                                ("array_job_id", "SLURM_ARRAY_JOB_ID"),
                                                ("array_task_id", "SLURM_ARRAY_TASK_ID")) if v in os.environ},
        "estimator": cfg.estimator.name,
        "max_staleness": cfg.pipeline.max_staleness,
        "steps": cfg.pipeline.steps,
        "batch_size": cfg.pipeline.batch_size,
        "train_wall_s": train_wall,
        "samples_per_s": loop.samples / max(train_wall, 1e-9),
        "tokens_per_s": loop.tokens / max(train_wall, 1e-9),
        "busy_rollout_s": per_role["rollout"],
        "busy_teacher_s": per_role["teacher"],
        "busy_learner_s": per_role["learner"],
        "driver_cpu_s": driver_cpu_s,  # CPU the driver process spent training (dispatch, batching, wire decoding)
        "ideal_speedup": times.ideal_speedup(),
        "staleness_histogram": dict(sorted(loop.staleness.items())),  # by sample: its oldest token's lag
        "token_staleness_histogram": dict(sorted(loop.token_staleness.items())),
        "max_observed_staleness": max(loop.staleness) if loop.staleness else 0,
        "weight_sync": _sync_summary(loop.syncs),
        "data": data,
        "verifier": cfg.data.verifier,
        "initial_accuracy": first,
        "final_accuracy": final,
        "final_eval": evals[-1][1] if evals else None,
        "teacher_accuracy": teacher_accuracy,
        "gap_closed": None if first is None else _gap_closed(first, final, teacher_accuracy),
        "accuracy_curve": [(step, m["eval/pass@1"]) for step, m in evals],
        "final_loss": last.get("loss"),
        "teachers": loop.fleet.teacher.totals,  # per teacher: samples, tokens, seconds, bytes scored
        # each prompt trained exactly once, faults or not: both are (steps - resumed step) x batch
        "prompts_trained": len(loop.trained),
        "prompts_unique": len(set(loop.trained)),
        "faults": [asdict(f) for f in supervisor.faults],  # servers lost: role, index, step, time lost
        # trained samples a weight update aborted (weights.pause_mode=abort) that resumed from their partial output,
        # and the resume requests that took (asyncopd.rollout.dispatch)
        "resumed": loop.resumed,
        "resume_pieces": loop.resume_pieces,
        "redispatched_requests": loop.fleet.redispatched(),  # rollout requests moved off a lost engine
        "rollout_requests": loop.fleet.request_counts(),  # how /generate spread over the engines (and the router)
        "checkpoints": [p.name for p in step_dirs(run_dir)],
    }


def _sync_summary(syncs: list) -> dict | None:
    """Per-update weight-sync medians over the run (bytes, seconds, GB/s, engine stall) and their worst case."""
    if not syncs:
        return None
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {"updates": len(syncs), "bytes": syncs[-1].bytes, "buckets": syncs[-1].buckets,
            "median_s": med([x.seconds for x in syncs]), "max_s": max(x.seconds for x in syncs),
            "median_gbps": med([x.gbps for x in syncs]), "median_transfer_s": med([x.transfer_s for x in syncs]),
            "median_engine_stall_s": med([x.engine_stall_s for x in syncs]),
            "max_engine_stall_s": max(x.engine_stall_s for x in syncs)}


def _launched_or_none(launch: Future, timeout_s: float = 120.0) -> LearnerGroup | None:
    """The learner group a failed run started, to shut down; None if its launch failed too or never ends
    (an actor that cannot be placed; a cluster we own is torn down with ray.shutdown anyway)."""
    try:
        return launch.result(timeout=timeout_s)
    except Exception:  # the run's own error is already propagating; this one adds nothing
        return None


def _gap_closed(initial: float, final: float, teacher: float | None) -> float | None:
    """Share of the teacher-student accuracy gap the run closed (the demo's bar is 0.5)."""
    if teacher is None or teacher <= initial:
        return None
    return (final - initial) / (teacher - initial)
