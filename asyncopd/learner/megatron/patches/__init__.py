"""Small, named patches to megatron-core 0.16.1: the ones that let it train on the CPU with gloo, and a fix.

`apply()` applies each patch whose condition holds, checks the megatron-core version first (the patches touch
private internals: see each module's docstring for why it exists) and is idempotent. The CPU patches
(cpu_current_device, cpu_rng_tracker, adam_step_load; cpu_cuda_calls is a scope the learner enters around megatron
calls) apply only without CUDA: with a GPU megatron's own CUDA code paths run unchanged. reshardable_offsets fixes
megatron's fully_reshardable optimizer checkpoints and applies everywhere.

    from asyncopd.learner.megatron import patches
    patches.apply()   # before building megatron models

`patches.fp8` holds the FP8 switch (`fp8_context(cfg)`), which needs Transformer Engine.
"""

import torch

from asyncopd.learner.megatron.patches import (
    adam_step_load,
    cpu_current_device,
    cpu_rng_tracker,
    reshardable_offsets,
)
from asyncopd.learner.megatron.patches._version import PINNED_VERSION, MegatronVersionError, check_megatron_version

PATCHES = (cpu_current_device, cpu_rng_tracker, adam_step_load, reshardable_offsets)

__all__ = ["PATCHES", "PINNED_VERSION", "MegatronVersionError", "apply", "applied", "check_megatron_version"]


def apply(cuda_available: bool | None = None, strict_version: bool = True) -> list[str]:
    """Apply every patch whose condition holds; returns the names in effect afterwards.

    `cuda_available` defaults to `torch.cuda.is_available()`; passing it is for tests of the conditions.
    With `strict_version=False` a different megatron-core version only warns.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not any(patch.should_apply(cuda_available) for patch in PATCHES):
        return []
    check_megatron_version(strict=strict_version)
    return [patch.NAME for patch in PATCHES if patch.apply(cuda_available)]


def applied() -> list[str]:
    """Names of the patches currently in effect in this process."""
    return [patch.NAME for patch in PATCHES if patch.is_applied()]
