"""`asyncopd prepare`: tokenizer + SFT teacher (>= min accuracy) + weaker SFT student, cached on disk.

Layout of ``model.artifacts_dir``::

    teacher/        Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)
    student/        same
    prepare.json    config hash, accuracies, wall times, parameter counts, tokenizer fingerprint

A second call with the same relevant config (task, both model shapes, the recipe) finds prepare.json and
both checkpoints and returns at once. Everything is seeded, so a rebuild gives the same models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from asyncopd.data.task import TrainStream, max_response_tokens, test_problems
from asyncopd.data.tokenizer import CharTokenizer, tokenizer_fingerprint
from asyncopd.model.build import build_model, num_parameters, save_checkpoint
from asyncopd.model.evaluate import greedy_accuracy
from asyncopd.model.sft import train_sft

if TYPE_CHECKING:  # pragma: no cover
    from asyncopd.config.schema import Config

log = logging.getLogger(__name__)

RECIPE_VERSION = 3  # bump when the training code changes what a given config produces
PREPARE_FILE = "prepare.json"


class PrepareError(RuntimeError):
    """The recipe did not produce usable models; the message says which knob to turn."""


def prepare_hash(cfg: Config) -> str:
    """Hash of everything that determines the prepared models (threads excluded: speed only)."""
    prep = dataclasses.asdict(cfg.model.prepare)
    prep.pop("threads", None)
    blob = {
        "recipe_version": RECIPE_VERSION,
        "task": dataclasses.asdict(cfg.task),
        "teacher": dataclasses.asdict(cfg.model.teacher),
        "student": dataclasses.asdict(cfg.model.student),
        "prepare": prep,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _is_checkpoint(d: Path) -> bool:
    return (d / "config.json").exists() and any(d.glob("*.safetensors")) and (d / "tokenizer.json").exists()


def cached_prepare(cfg: Config) -> dict | None:
    """The stored prepare.json if artifacts_dir holds both checkpoints built from this config, else None."""
    root = Path(cfg.model.artifacts_dir)
    f = root / PREPARE_FILE
    if not f.exists():
        return None
    try:
        info = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("config_hash") != prepare_hash(cfg):
        return None
    if not (_is_checkpoint(root / "teacher") and _is_checkpoint(root / "student")):
        return None
    return info


def _validate(cfg: Config) -> None:
    p = cfg.model.prepare
    lo_hi = list(p.student_accuracy_range)
    checks = [
        (p.teacher_steps >= 1, f"model.prepare.teacher_steps must be >= 1 (got {p.teacher_steps})"),
        (1 <= p.student_min_steps <= p.student_max_steps,
         f"model.prepare.student_min_steps must be in [1, student_max_steps] (got {p.student_min_steps}, "
         f"student_max_steps={p.student_max_steps})"),
        (p.student_eval_every >= 1, "model.prepare.student_eval_every must be >= 1"),
        (0 <= p.student_stop_accuracy <= 1, "model.prepare.student_stop_accuracy must be in [0, 1]"),
        (p.teacher_batch_size >= 1 and p.student_batch_size >= 1,
         "model.prepare.teacher_batch_size and model.prepare.student_batch_size must be >= 1"),
        (p.teacher_lr > 0 and p.student_lr > 0, "model.prepare.teacher_lr and model.prepare.student_lr must be > 0"),
        (p.threads >= 1, f"model.prepare.threads must be >= 1 (got {p.threads})"),
        (0 <= p.min_teacher_accuracy <= 1, "model.prepare.min_teacher_accuracy must be in [0, 1]"),
        (len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] <= 1,
         f"model.prepare.student_accuracy_range must be [low, high] within [0, 1] (got {lo_hi})"),
        (p.extra_eval_every >= 1, "model.prepare.extra_eval_every must be >= 1"),
        (cfg.task.num_test >= 1, "task.num_test must be >= 1 to measure accuracy"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)


def run_prepare(cfg: Config, *, progress: bool = True, force: bool = False) -> dict:
    """Build (or find cached) tokenizer, teacher and student under ``cfg.model.artifacts_dir``.

    Returns the prepare.json record (with ``"cached": True`` on a cache hit). Raises PrepareError if the
    teacher stays below ``model.prepare.min_teacher_accuracy``.
    """
    _validate(cfg)
    if not force:
        hit = cached_prepare(cfg)
        if hit is not None:
            log.info("prepare: cache hit in %s (teacher %.3f, student %.3f)", cfg.model.artifacts_dir,
                     hit["teacher"]["accuracy"], hit["student"]["accuracy"])
            if progress:
                print(f"prepare: using cached models in {cfg.model.artifacts_dir} "
                      f"(teacher {hit['teacher']['accuracy']:.1%}, student {hit['student']['accuracy']:.1%})")
            return {**hit, "cached": True}

    p = cfg.model.prepare
    old_threads = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        return _build(cfg, progress)
    finally:
        torch.set_num_threads(old_threads)


def _build(cfg: Config, progress: bool) -> dict:
    p = cfg.model.prepare
    t_start = time.perf_counter()
    root = Path(cfg.model.artifacts_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / PREPARE_FILE).unlink(missing_ok=True)  # a half-built directory must never look cached
    tok = CharTokenizer()
    tests = test_problems(cfg.task)
    max_new = max_response_tokens(cfg.task)  # any well-formed response fits; longer ones are wrong

    def accuracy(model) -> tuple[float, float]:
        t0 = time.perf_counter()
        acc = greedy_accuracy(model, tests, tok, batch_size=p.eval_batch_size, max_new_tokens=max_new)
        return acc, time.perf_counter() - t0

    def say(msg: str) -> None:
        log.info(msg)
        if progress:
            print(msg, flush=True)

    def train_until(model, stream: TrainStream, *, max_steps: int, first_eval: int, every: int, target: float,
                    batch_size: int, lr: float, warmup_steps: int, desc: str) -> tuple[int, float, float, float]:
        """Constant-rate SFT (after warmup), evaluated every `every` steps from `first_eval` and at the last
        step; stops at the first evaluation reaching `target`. -> (steps, accuracy, train s, eval s)."""
        acc, eval_s = 0.0, 0.0

        def reached(step: int, _loss: float) -> bool:
            nonlocal acc, eval_s
            if step < max_steps and (step < first_eval or step % every):
                return False
            acc, dt = accuracy(model)
            model.train()
            eval_s += dt
            log.info("prepare: %s after %d steps: %.3f", desc, step, acc)
            return acc >= target

        res = train_sft(model, stream, tok, steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                        weight_decay=p.weight_decay, final_lr_frac=1.0, desc=desc, progress=progress,
                        max_buckets=p.length_buckets, callback=reached)
        return res.steps, acc, res.wall_s - eval_s, eval_s

    # ---- teacher: cosine schedule over teacher_steps; if short of the bar, a low constant rate until it is ----
    teacher = build_model(cfg.model.teacher, tok.vocab_size, p.seed, tok.pad_token_id, tok.eos_token_id)
    stream = TrainStream(cfg.task, exclude=tests)
    res = train_sft(teacher, stream, tok, steps=p.teacher_steps, batch_size=p.teacher_batch_size, lr=p.teacher_lr,
                    warmup_steps=p.warmup_steps, weight_decay=p.weight_decay, desc="prepare teacher",
                    progress=progress, max_buckets=p.length_buckets)
    t_train, steps = res.wall_s, p.teacher_steps
    t_acc, t_eval = accuracy(teacher)
    say(f"prepare: teacher {num_parameters(teacher) / 1e6:.2f} M params, {steps} steps in {t_train:.0f} s: "
        f"greedy test accuracy {t_acc:.1%}")
    extra = 0
    if t_acc < p.min_teacher_accuracy and p.teacher_extra_steps > 0:
        extra, t_acc, dt_train, dt_eval = train_until(
            teacher, stream, max_steps=p.teacher_extra_steps, first_eval=p.extra_eval_every, every=p.extra_eval_every,
            target=p.min_teacher_accuracy, batch_size=p.teacher_batch_size, lr=p.teacher_lr * p.extra_lr_frac,
            warmup_steps=0, desc="teacher extra")
        t_train, t_eval = t_train + dt_train, t_eval + dt_eval
        say(f"prepare: teacher after {extra} extra steps: {t_acc:.1%}")
    if t_acc < p.min_teacher_accuracy:
        raise PrepareError(
            f"teacher reached only {t_acc:.1%} greedy test accuracy after {steps + extra} steps, below "
            f"model.prepare.min_teacher_accuracy={p.min_teacher_accuracy}; raise model.prepare.teacher_steps "
            f"(now {p.teacher_steps}) or model.prepare.teacher_extra_steps, or use a larger model.teacher")

    # ---- student: same data stream from its start, constant rate, stopped once it reaches the target ----
    student = build_model(cfg.model.student, tok.vocab_size, p.seed + 1, tok.pad_token_id, tok.eos_token_id)
    s_steps, s_acc, s_train, s_eval = train_until(
        student, TrainStream(cfg.task, exclude=tests), max_steps=p.student_max_steps, first_eval=p.student_min_steps,
        every=p.student_eval_every, target=p.student_stop_accuracy, batch_size=p.student_batch_size,
        lr=p.student_lr, warmup_steps=p.warmup_steps, desc="prepare student")
    lo, hi = p.student_accuracy_range
    in_range = lo <= s_acc <= hi
    say(f"prepare: student {num_parameters(student) / 1e6:.2f} M params, {s_steps} steps in "
        f"{s_train:.0f} s: greedy test accuracy {s_acc:.1%}")
    if not in_range:
        log.warning("prepare: student accuracy %.3f is outside model.prepare.student_accuracy_range %s after %d "
                    "steps; adjust model.prepare.student_stop_accuracy (now %s) or student_eval_every (now %d)",
                    s_acc, [lo, hi], s_steps, p.student_stop_accuracy, p.student_eval_every)
        if progress:
            print(f"prepare: WARNING student accuracy {s_acc:.1%} is outside [{lo:.0%}, {hi:.0%}]; adjust "
                  f"model.prepare.student_stop_accuracy or model.prepare.student_eval_every", flush=True)

    # ---- write: checkpoints into temp dirs, swapped in, prepare.json last ----
    for name, model in (("teacher", teacher), ("student", student)):
        tmp = root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_checkpoint(model, tok, tmp)
        _replace_dir(tmp, root / name)
    fp_t, fp_s = tokenizer_fingerprint(root / "teacher"), tokenizer_fingerprint(root / "student")
    assert fp_t == fp_s
    info = {
        "config_hash": prepare_hash(cfg),
        "recipe_version": RECIPE_VERSION,
        "tokenizer_fingerprint": fp_t,
        "vocab_size": tok.vocab_size,
        "num_test": len(tests),
        "threads": p.threads,
        "teacher": {
            "path": str(root / "teacher"), "accuracy": t_acc, "steps": steps + extra, "extra_steps": extra,
            "params": num_parameters(teacher), "train_wall_s": round(t_train, 2), "eval_wall_s": round(t_eval, 2),
            "spec": dataclasses.asdict(cfg.model.teacher),
        },
        "student": {
            "path": str(root / "student"), "accuracy": s_acc, "steps": s_steps, "in_range": in_range,
            "params": num_parameters(student), "train_wall_s": round(s_train, 2),
            "eval_wall_s": round(s_eval, 2), "spec": dataclasses.asdict(cfg.model.student),
        },
        "total_wall_s": round(time.perf_counter() - t_start, 2),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }
    (root / PREPARE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    say(f"prepare: wrote {root} in {info['total_wall_s']:.0f} s")
    return {**info, "cached": False}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
