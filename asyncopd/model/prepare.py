"""`asyncopd prepare`: tokenizer + SFT teacher (>= min accuracy) + weaker SFT student, cached on disk.

Layout of ``model.artifacts_dir``::

    teacher/        Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)
    student/        same
    data/           the task as a dataset (train.jsonl, val.jsonl) that runs read like any user's files
    prepare.json    config hash, accuracies and their near-tie bounds, weight sha256s, wall times, ...

A second call with the same relevant config (task, both model shapes, the recipe) finds prepare.json and
both checkpoints and returns at once. Everything is seeded, so a rebuild on one machine gives the same
models bit for bit; another CPU rounds differently and SFT amplifies it (the same recipe gave a 92.2% and an
88.2% teacher on two machines of one kind). So the default config's models ship with the package
(``SHIPPED_DIR``, built by this recipe with ``model.prepare.seed=0, threads=2``): prepare installs them and
re-measures both accuracies, which may differ from the recorded ones only on near-tie prompts
(``evaluate.TIE_DELTA``). ``asyncopd prepare --rebuild`` trains from scratch instead, and says whether the
result matches the shipped weights bit for bit; `asyncopd bench prepare` measures the recipe over seeds
and thread counts.
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

from asyncopd.data.task import TrainStream, export_task, max_response_tokens, test_problems
from asyncopd.data.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer, load_tokenizer, tokenizer_fingerprint
from asyncopd.model.build import build_model, load_model, num_parameters, save_checkpoint
from asyncopd.model.evaluate import GreedyEval, greedy_eval
from asyncopd.model.paths import DATA_DIR
from asyncopd.model.sft import train_sft

if TYPE_CHECKING:  # pragma: no cover
    from asyncopd.config.schema import Config

log = logging.getLogger(__name__)

RECIPE_VERSION = 5  # bump when the training code changes what a given config produces
PREPARE_FILE = "prepare.json"
SHIPPED_DIR = Path(__file__).parent / "shipped" / "tiny_cpu"
WEIGHTS_FILE = "model.safetensors"


class PrepareError(RuntimeError):
    """The recipe did not produce usable models, or shipped models failed their check; the message says
    what to do. ``teacher_accuracy`` is the teacher's last measured accuracy, when one was measured."""

    def __init__(self, message: str, teacher_accuracy: float | None = None):
        super().__init__(message)
        self.teacher_accuracy = teacher_accuracy


# the ModelSpec fields `model.build.build_model` reads (the rest size real checkpoints for `asyncopd validate`)
BUILT_FROM = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
              "max_position_embeddings", "tie_embeddings")


def prepare_hash(cfg: Config) -> str:
    """Hash of everything that determines the prepared models (threads excluded: speed only)."""
    prep = dataclasses.asdict(cfg.model.prepare)
    prep.pop("threads", None)
    task = dataclasses.asdict(cfg.task)
    task.pop("num_train", None)  # how many prompts the exported dataset holds; SFT streams its own
    blob = {
        "recipe_version": RECIPE_VERSION,
        "task": task,
        "teacher": {k: getattr(cfg.model.teacher, k) for k in BUILT_FROM},
        "student": {k: getattr(cfg.model.student, k) for k in BUILT_FROM},
        "prepare": prep,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _is_checkpoint(d: Path) -> bool:
    """Weights, config and today's tokenizer files: artifacts from before the chat template would render
    prompts without the task's frame, so they are installed again rather than used."""
    if not ((d / "config.json").exists() and any(d.glob("*.safetensors")) and (d / "tokenizer.json").exists()):
        return False
    try:
        return json.loads((d / "tokenizer_config.json").read_text()).get("chat_template") == CHAT_TEMPLATE
    except (OSError, json.JSONDecodeError):
        return False


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


def _swap_in(root: Path, name: str, write) -> None:
    """``write(tmp)`` fills a temp dir that then replaces ``root/name``: a half-written checkpoint never
    sits where a run looks."""
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    dst = root / name
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def run_prepare(cfg: Config, *, progress: bool = True, force: bool = False,
                shipped: Path | None = SHIPPED_DIR) -> dict:
    """Find cached, install shipped, or build tokenizer, teacher and student under ``cfg.model.artifacts_dir``,
    and export the task as the dataset runs read (``data/train.jsonl``, ``data/val.jsonl``).

    Returns the prepare.json record (``"cached": True`` on a cache hit; ``"source"`` says "shipped" or
    "trained"). ``force`` trains from scratch even when cached or shipped models match the config. Raises
    PrepareError if the teacher stays below ``model.prepare.min_teacher_accuracy`` or shipped models fail
    their check.
    """
    info = _prepare_models(cfg, progress, force, shipped)
    files = export_task(cfg.task, Path(cfg.model.artifacts_dir) / DATA_DIR)
    if progress and not info["cached"]:
        print(f"prepare: exported the task as {files['train']} and {files['val']}", flush=True)
    return info


def _prepare_models(cfg: Config, progress: bool, force: bool, shipped: Path | None) -> dict:
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
        record = _shipped_record(shipped, cfg) if shipped is not None else None
        if record is not None and not force:
            return install_shipped(cfg, shipped, progress)
        return _build(cfg, progress, record)
    finally:
        torch.set_num_threads(old_threads)


def _shipped_record(src: Path, cfg: Config) -> dict | None:
    """The shipped prepare.json if ``src`` holds models built from exactly this config, else None."""
    try:
        info = json.loads((src / PREPARE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if info.get("config_hash") == prepare_hash(cfg) else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(name: str, recorded: dict, measured: GreedyEval, num_test: int) -> None:
    """Measured accuracy may differ from the recorded one only by the prompts that were near ties where the
    models were built or are near ties here (each flips at most one prompt)."""
    ties = max(int(recorded["near_ties"]), measured.near_ties())
    if abs(measured.accuracy - recorded["accuracy"]) > ties / num_test + 1e-12:
        raise PrepareError(
            f"shipped {name}: greedy test accuracy here is {measured.accuracy:.1%}, recorded "
            f"{recorded['accuracy']:.1%}; near ties allow at most {ties} of {num_test} prompts to differ. "
            "The shipped checkpoint or the evaluation changed; run `asyncopd prepare --rebuild` to train "
            "the models on this machine")


def install_shipped(cfg: Config, src: Path, progress: bool = True) -> dict:
    """Copy the shipped checkpoints into artifacts_dir after checking their bytes and re-measuring both
    accuracies here; prepare.json records both measurements."""
    record = _shipped_record(src, cfg)
    if record is None:
        raise PrepareError(f"{src} holds no models built from this config (prepare.json missing or its "
                           "config_hash differs); run `asyncopd prepare --rebuild`")
    t0 = time.perf_counter()
    root = Path(cfg.model.artifacts_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / PREPARE_FILE).unlink(missing_ok=True)
    tok = load_tokenizer(src / "student", field="shipped student")
    tests = test_problems(cfg.task)
    here = {}
    for name in ("teacher", "student"):
        if _sha256(src / name / WEIGHTS_FILE) != record[name]["sha256"]:
            raise PrepareError(f"shipped {name} weights {src / name / WEIGHTS_FILE} do not match the sha256 "
                               "recorded in prepare.json; restore them from git or run `asyncopd prepare "
                               "--rebuild`")
        measured = greedy_eval(load_model(src / name, field=f"shipped {name}"), tests, tok,
                               batch_size=cfg.model.prepare.eval_batch_size,
                               max_new_tokens=max_response_tokens(cfg.task))
        _check(name, record[name], measured, len(tests))
        here[name] = {"accuracy": measured.accuracy, "near_ties": measured.near_ties()}
    for name in ("teacher", "student"):
        _swap_in(root, name, lambda tmp, name=name: shutil.copytree(src / name, tmp))
    # the accuracies a run reports are this machine's; the recorded ones stay beside them
    info = {**record, "source": "shipped", "install_wall_s": round(time.perf_counter() - t0, 2),
            **{name: {**record[name], **here[name], "recorded_accuracy": record[name]["accuracy"],
                      "path": str(root / name)} for name in ("teacher", "student")}}
    (root / PREPARE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    t, s = info["teacher"], info["student"]
    msg = (f"prepare: installed the shipped models in {root} in {info['install_wall_s']:.0f} s: greedy test "
           f"accuracy here teacher {t['accuracy']:.1%}, student {s['accuracy']:.1%} (recorded "
           f"{t['recorded_accuracy']:.1%}, {s['recorded_accuracy']:.1%})")
    log.info(msg)
    if progress:
        print(msg, flush=True)
    return {**info, "cached": False}


def _build(cfg: Config, progress: bool, shipped: dict | None) -> dict:
    p = cfg.model.prepare
    t_start = time.perf_counter()
    root = Path(cfg.model.artifacts_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / PREPARE_FILE).unlink(missing_ok=True)  # a half-built directory must never look cached
    tok = build_tiny_tokenizer()
    tests = test_problems(cfg.task)
    max_new = max_response_tokens(cfg.task)  # any well-formed response fits; longer ones are wrong

    def evaluate(model) -> tuple[GreedyEval, float]:
        t0 = time.perf_counter()
        ev = greedy_eval(model, tests, tok, batch_size=p.eval_batch_size, max_new_tokens=max_new)
        return ev, time.perf_counter() - t0

    def say(msg: str) -> None:
        log.info(msg)
        if progress:
            print(msg, flush=True)

    def train_until(model, stream: TrainStream, *, max_steps: int, first_eval: int, every: int, target: float,
                    batch_size: int, lr: float, warmup_steps: int, desc: str) -> tuple[int, GreedyEval, float, float]:
        """Constant-rate SFT (after warmup), evaluated every `every` steps from `first_eval` and at the last
        step; stops at the first evaluation reaching `target`. -> (steps, evaluation, train s, eval s)."""
        ev, eval_s = None, 0.0

        def reached(step: int, _loss: float) -> bool:
            nonlocal ev, eval_s
            if step < max_steps and (step < first_eval or step % every):
                return False
            ev, dt = evaluate(model)
            model.train()
            eval_s += dt
            log.info("prepare: %s after %d steps: %.3f", desc, step, ev.accuracy)
            return ev.accuracy >= target

        res = train_sft(model, stream, tok, steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                        weight_decay=p.weight_decay, final_lr_frac=1.0, desc=desc, progress=progress,
                        max_buckets=p.length_buckets, callback=reached)
        return res.steps, ev, res.wall_s - eval_s, eval_s

    # ---- teacher: cosine schedule over teacher_steps; if short of the bar, a low constant rate until it is ----
    teacher = build_model(cfg.model.teacher, len(tok), p.seed, tok.pad_token_id, tok.eos_token_id)
    stream = TrainStream(cfg.task, exclude=tests)
    res = train_sft(teacher, stream, tok, steps=p.teacher_steps, batch_size=p.teacher_batch_size, lr=p.teacher_lr,
                    warmup_steps=p.warmup_steps, weight_decay=p.weight_decay, desc="prepare teacher",
                    progress=progress, max_buckets=p.length_buckets)
    t_train, steps = res.wall_s, p.teacher_steps
    t_ev, t_eval = evaluate(teacher)
    say(f"prepare: teacher {num_parameters(teacher) / 1e6:.2f} M params, {steps} steps in {t_train:.0f} s: "
        f"greedy test accuracy {t_ev.accuracy:.1%}")
    extra = 0
    if t_ev.accuracy < p.teacher_target_accuracy and p.teacher_extra_steps > 0:
        extra, t_ev, dt_train, dt_eval = train_until(
            teacher, stream, max_steps=p.teacher_extra_steps, first_eval=p.extra_eval_every, every=p.extra_eval_every,
            target=p.teacher_target_accuracy, batch_size=p.teacher_batch_size, lr=p.teacher_lr * p.extra_lr_frac,
            warmup_steps=0, desc="teacher extra")
        t_train, t_eval = t_train + dt_train, t_eval + dt_eval
        say(f"prepare: teacher after {extra} extra steps: {t_ev.accuracy:.1%}")
    t_acc = t_ev.accuracy
    if t_acc < p.min_teacher_accuracy:
        raise PrepareError(
            f"teacher reached only {t_acc:.1%} greedy test accuracy after {steps + extra} steps, below "
            f"model.prepare.min_teacher_accuracy={p.min_teacher_accuracy}; raise model.prepare.teacher_steps "
            f"(now {p.teacher_steps}) or model.prepare.teacher_extra_steps, or use a larger model.teacher", t_acc)

    # ---- student: same data stream from its start, constant rate, stopped once it reaches the target ----
    student = build_model(cfg.model.student, len(tok), p.seed + 1, tok.pad_token_id, tok.eos_token_id)
    s_steps, s_ev, s_train, s_eval = train_until(
        student, TrainStream(cfg.task, exclude=tests), max_steps=p.student_max_steps, first_eval=p.student_min_steps,
        every=p.student_eval_every, target=p.student_stop_accuracy, batch_size=p.student_batch_size,
        lr=p.student_lr, warmup_steps=p.warmup_steps, desc="prepare student")
    s_acc = s_ev.accuracy
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
        _swap_in(root, name, lambda tmp, model=model: save_checkpoint(model, tmp))
    fp_t, fp_s = tokenizer_fingerprint(root / "teacher"), tokenizer_fingerprint(root / "student")
    assert fp_t == fp_s
    sha = {name: _sha256(root / name / WEIGHTS_FILE) for name in ("teacher", "student")}
    info = {
        "config_hash": prepare_hash(cfg),
        "recipe_version": RECIPE_VERSION,
        "tokenizer_fingerprint": fp_t,
        "vocab_size": len(tok),
        "num_test": len(tests),
        "threads": p.threads,
        "teacher": {
            "path": str(root / "teacher"), "accuracy": t_acc, "near_ties": t_ev.near_ties(),
            "sha256": sha["teacher"], "steps": steps + extra, "extra_steps": extra,
            "params": num_parameters(teacher), "train_wall_s": round(t_train, 2), "eval_wall_s": round(t_eval, 2),
            "spec": {k: getattr(cfg.model.teacher, k) for k in BUILT_FROM},
        },
        "student": {
            "path": str(root / "student"), "accuracy": s_acc, "near_ties": s_ev.near_ties(),
            "sha256": sha["student"], "steps": s_steps, "in_range": in_range,
            "params": num_parameters(student), "train_wall_s": round(s_train, 2),
            "eval_wall_s": round(s_eval, 2), "spec": {k: getattr(cfg.model.student, k) for k in BUILT_FROM},
        },
        "source": "trained",
        "matches_shipped": None if shipped is None else all(shipped[n]["sha256"] == sha[n] for n in sha),
        "total_wall_s": round(time.perf_counter() - t_start, 2),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }
    (root / PREPARE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    say(f"prepare: wrote {root} in {info['total_wall_s']:.0f} s")
    if shipped is not None:
        say("prepare: the rebuilt weights " + ("match the shipped ones bit for bit" if info["matches_shipped"] else
            "differ from the shipped ones (another CPU or thread count rounds differently)"))
    return {**info, "cached": False}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
