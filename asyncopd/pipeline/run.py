"""An OPD run around the loop: start Ray, the fleet, the teacher and the learner, resume, evaluate, summarise,
and tear it all down. The loop itself (prompt -> gradient) is pipeline/loop.py."""

import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import ray

from asyncopd.config.load import to_yaml
from asyncopd.config.ray_cluster import start_ray
from asyncopd.config.schema import Config
from asyncopd.core.errors import ConfigError
from asyncopd.core.protocols import LearnerHandle
from asyncopd.data.task import test_problems
from asyncopd.data.tokenizer import CharTokenizer
from asyncopd.learner.group import LearnerGroup
from asyncopd.model.evaluate import greedy_accuracy
from asyncopd.model.paths import resolve_model_paths
from asyncopd.pipeline.fleet import Fleet
from asyncopd.pipeline.loop import OPDLoop, train
from asyncopd.pipeline.run_logger import RunLogger
from asyncopd.pipeline.scheduler import StageTimes
from asyncopd.rollout.backends import ROLLOUT_BACKENDS
from asyncopd.validation.rules import validate
from asyncopd.weights.sync import WeightSync


def make_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.dir or f"runs/{cfg.run.experiment}-{stamp}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def evaluate_student(fleet: Fleet, tokenizer: CharTokenizer, problems) -> float:
    """Greedy test accuracy of whatever weights the rollout fleet holds now."""

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        return [r.response_ids.tolist() for r in fleet.generate(prompts, temperature=0.0)]

    return greedy_accuracy(generate, problems, tokenizer, batch_size=len(problems))


def resume(cfg: Config, learner: LearnerHandle, sync: WeightSync) -> int:
    """Load `run.resume_from` (weights, optimizer, version) and push it to the fleet; returns the version.

    The version is the staleness clock, so it must survive a resume: the next batch is `version`, its
    prompts are the ones the original run would have used next, and admission starts from there."""
    if not cfg.run.resume_from:
        return 0
    version = learner.load(cfg.run.resume_from)
    if version >= cfg.pipeline.steps:
        raise ConfigError(f"run.resume_from={cfg.run.resume_from!r} is at version {version}, already >= "
                         f"pipeline.steps={cfg.pipeline.steps}: raise pipeline.steps to train further")
    sync.sync(version)
    return version


def run_training(cfg: Config) -> dict:
    """The whole run; returns the summary (also written to run_dir/summary.json)."""
    validate(cfg, host=True)  # this machine can run it: modules, CUDA, checkpoints, before anything starts
    paths = resolve_model_paths(cfg.model)
    run_dir = make_run_dir(cfg)
    tokenizer = CharTokenizer.load(paths.tokenizer)
    owns_ray = start_ray(cfg.cluster, run_dir)
    logger = RunLogger(run_dir, cfg.pipeline.steps, cfg.run.tensorboard, cfg.run.progress)
    # the learner's processes start (imports, model load) while the fleet loads, not after it
    launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner-launch")
    learner_launch = launcher.submit(LearnerGroup.launch, cfg, paths.student)
    launcher.shutdown(wait=False)
    fleet = learner = sync = None
    try:
        fleet = Fleet.launch(cfg, paths)
        fleet.check_vocabularies()
        learner = learner_launch.result()
        sync = WeightSync(cfg.weights, learner, fleet.engines,
                          pause_engines=ROLLOUT_BACKENDS[cfg.rollout.backend].pause_for_weight_update)
        sync.init_group()
        start = resume(cfg, learner, sync)
        problems = test_problems(cfg.task)[: cfg.pipeline.eval_prompts]
        acc0 = evaluate_student(fleet, tokenizer, problems)
        logger.scalars(start, {"eval/accuracy": acc0})
        loop = OPDLoop(cfg, fleet, learner, sync, tokenizer, logger.step, start)
        evals = [(start, acc0)]
        eval_time = 0.0
        checkpoint = str(run_dir / "checkpoint")

        def after_step(s: int, times: StageTimes) -> None:
            nonlocal eval_time
            step = s + 1
            i = s - start
            logger.scalars(s, {"time/rollout_s": times.rollout[i], "time/teacher_s": times.teacher[i],
                               "time/learner_s": times.learner[i]})
            if cfg.pipeline.eval_every and step % cfg.pipeline.eval_every == 0 and step < cfg.pipeline.steps:
                t0 = time.perf_counter()
                acc = evaluate_student(fleet, tokenizer, problems)
                eval_time += time.perf_counter() - t0
                evals.append((step, acc))
                logger.scalars(step, {"eval/accuracy": acc})
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                learner.save(checkpoint)

        times = train(loop, start, after_step)
        final = evaluate_student(fleet, tokenizer, problems)
        evals.append((cfg.pipeline.steps, final))
        logger.scalars(cfg.pipeline.steps, {"eval/accuracy": final})
        learner.save(checkpoint)
        summary = _summary(cfg, run_dir, times, eval_time, loop, evals, fleet.teacher_accuracy)
        print(logger.summary(summary))
        return summary
    finally:
        logger.close()
        if sync is not None:
            sync.close()
        if fleet is not None:
            fleet.shutdown()
        if learner is None:  # the fleet failed first: the learner launched beside it must not outlive the run
            learner = _launched_or_none(learner_launch)
        if learner is not None:
            learner.shutdown()
        if owns_ray:
            ray.shutdown()


def _summary(cfg: Config, run_dir: Path, times: StageTimes, eval_time: float, loop: OPDLoop,
             evals: list[tuple[int, float]], teacher_accuracy: float | None) -> dict:
    train_wall = times.wall_s - eval_time
    per_role = {role: float(np.sum(getattr(times, role))) for role in ("rollout", "teacher", "learner")}
    last = loop.history[-1] if loop.history else {}
    return {
        "run_dir": str(run_dir),
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
        "ideal_speedup": times.ideal_speedup(),
        "staleness_histogram": dict(sorted(loop.staleness.items())),
        "max_observed_staleness": max(loop.staleness) if loop.staleness else 0,
        "initial_accuracy": evals[0][1],
        "final_accuracy": evals[-1][1],
        "teacher_accuracy": teacher_accuracy,
        "gap_closed": _gap_closed(evals[0][1], evals[-1][1], teacher_accuracy),
        "accuracy_curve": evals,
        "final_loss": last.get("loss"),
    }


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
