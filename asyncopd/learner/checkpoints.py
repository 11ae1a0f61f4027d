"""A run's learner checkpoints on disk: whole or absent, the newest one linked, the last N kept.

    <run>/checkpoints/step-00000050/    one complete checkpoint (HF weights + tokenizer + learner_state*.pt)
    <run>/checkpoints/step-00000100/
    <run>/checkpoint -> checkpoints/step-00000100      the newest: resume from it, serve it

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `step-N` only once every learner rank has
written its part, so a run killed mid-save leaves the previous checkpoint intact and no half-written one under a
real name. `checkpoint` is a relative symlink replaced atomically (a new link, then rename over the old one), so
`run.resume_from=<run>/checkpoint` and tools that read `<run>/checkpoint/config.json` keep working as before.
The driver and the learner's rank 0 must see the same `run.dir` (they do on one node or a shared filesystem).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

LATEST = "checkpoint"
HISTORY = "checkpoints"
_STEP = re.compile(r"step-(\d+)$")


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temp dirs of an interrupted save are not among them)."""
    root = Path(run_dir) / HISTORY
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()] \
        if root.is_dir() else []
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | Path, step: int, write: Callable[[str], None], keep: int) -> Path:
    """`write(tmp_dir)` (every learner rank writes its part), then publish it as step `step`: rename, relink
    `checkpoint`, drop all but the newest `keep` (>= 1). Returns the published directory."""
    if keep < 1:
        raise ValueError(f"run.keep_checkpoints must be >= 1, got {keep}")
    run_dir = Path(run_dir)
    root = run_dir / HISTORY
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was interrupted
    write(str(tmp))
    old_final = None
    if final.exists():  # the same step saved again (a resumed run re-reaching it): moved aside, never missing
        old_final = root / f".old-step-{step:08d}-{os.getpid()}"
        os.rename(final, old_final)
    os.rename(tmp, final)
    _link_latest(run_dir, final)
    if old_final is not None:
        shutil.rmtree(old_final, ignore_errors=True)
    # a run resumed from an earlier step in the same run dir: the steps past this one belong to the abandoned
    # future, and pruning by step number must never drop the checkpoint just published
    for old in [d for d in step_dirs(run_dir) if d != final and int(_STEP.match(d.name).group(1)) > step]:
        shutil.rmtree(old, ignore_errors=True)
    for old in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _link_latest(run_dir: Path, target: Path) -> None:
    """Point <run>/checkpoint at `target` atomically; a real directory there (a run dir of the old layout, reused)
    moves into checkpoints/ first."""
    link = run_dir / LATEST
    if link.is_dir() and not link.is_symlink():
        os.rename(link, run_dir / HISTORY / f"legacy-{os.getpid()}")
    tmp = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.relative_to(run_dir))
    os.replace(tmp, link)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint `run.resume_from` names: a checkpoint itself (<run>/checkpoint, a step dir, a checkpoint of
    the old layout), or a run dir / its checkpoints/ dir (the newest complete step)."""
    p = Path(path)
    if any(p.glob("learner_state*.pt")):
        return p
    if (p / LATEST).exists():
        return p / LATEST
    steps = step_dirs(p.parent if p.name == HISTORY else p)
    return steps[-1] if steps else p
