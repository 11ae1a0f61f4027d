"""Patch `torch.cuda.current_device` to return the CPU device when no CUDA GPU is present.

Why: megatron-core 0.16.1 allocates many tensors with `device=torch.cuda.current_device()` even when the
model lives on the CPU: the attention score buffer (parallel_state.GlobalMemoryBuffer.get_tensor, used by
DotProductAttention on every forward), the all-gather outputs of tensor-parallel mappings
(tensor_parallel/mappings.py `_gather_along_last_dim` etc., used by the vocab-parallel output gather), the
rotary-embedding frequencies and several tensor_parallel/layers.py buffers. On a CPU-only torch build the
call raises "Torch not compiled with CUDA enabled", so megatron's GPTModel cannot run forward with gloo.
Returning torch.device("cpu") makes all those allocations land on the CPU, where the model is.

Scope: process-wide (megatron looks the function up as `torch.cuda.current_device` at call time, so
patching the attribute is the only hook). It is applied only when `torch.cuda.is_available()` is False, where
the original could only raise, so code that works today cannot be broken by it.
"""

import torch

NAME = "cpu_current_device"
_CPU = torch.device("cpu")


def _cpu_current_device() -> torch.device:
    return _CPU


_cpu_current_device._megatron_patches = NAME  # marks the patched function (idempotence)


def should_apply(cuda_available: bool) -> bool:
    """The patch is for CPU-only processes; with a CUDA GPU megatron's own device logic is right."""
    return not cuda_available


def is_applied() -> bool:
    return getattr(torch.cuda.current_device, "_megatron_patches", None) == NAME


def apply(cuda_available: bool) -> bool:
    """Patch if needed; returns True when the patch is in effect after the call."""
    if not should_apply(cuda_available):
        return False
    if not is_applied():
        torch.cuda.current_device = _cpu_current_device
    return True
