"""Redirect megatron-core's remaining hard-coded CUDA calls to the CPU, inside a scope, when no GPU is present.

Why: beyond `torch.cuda.current_device()` (cpu_current_device) megatron-core 0.16.1 has ~30 literal CUDA calls
on the paths the learner uses: `device="cuda"` allocations (the schedules' token counters, schedules.py 596 / 983 /
2138; the optimizers' scale and overflow buffers, optimizer.py 481 / 485 / 907, clip_grads.py 103 / 174; the
grad-norm reduction, utils.py 1207), `.cuda()` on the tied output weight (language_module.py 244), CUDA type
checks on parameters and gradients (`param.type() == 'torch.cuda.FloatTensor'`: optimizer.py 671 / 690,
distrib_optimizer.py 361 / 420 / 582, clip_grads.py 167) and `torch.cuda.synchronize()` / stream calls
(p2p_communication.py 242 / 398, filesystem_async.py 230, the DDP's grad-sync streams), and the CUDA RNG state
that activation recomputation saves (tensor_parallel/random.py 447). On a CPU build each raises.

Mechanism: `scope()` is a `torch.overrides.TorchFunctionMode` that, while active, sends `device="cuda"` (and
`.to("cuda")`) to the CPU, makes `Tensor.cuda()` the identity, reports a CPU tensor's `type()` under its
`torch.cuda.*` name (the dtype checks then see the dtype they test for), and swaps the synchronise / stream calls
for no-ops. The learner enters it around every megatron call (build, schedule, optimizer, checkpoint), so code
outside megatron never sees it. With a GPU `scope()` is a null context: megatron's CUDA paths run unchanged.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

NAME = "cpu_cuda_calls"
_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _NullStream:
    """What `torch.cuda.current_stream()` / `Stream()` hand back on the CPU: every method a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _noop(*args, **kwargs):
    return None


def _null_stream(*args, **kwargs) -> _NullStream:
    return _NullStream()


def _no_cuda_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)  # restoring it is queued by torch.cuda._lazy_call, never run


# (module, attribute) -> stand-in, swapped while the scope is active (each raises on a CPU-only build). The CUDA RNG
# state is what activation recomputation saves and restores around the recomputed forward (tensor_parallel.random
# CheckpointFunction); the CPU generator's state, saved next to it, is the one that matters here.
_CUDA_ATTRS = {(torch.cuda, "synchronize"): _noop, (torch.cuda, "current_stream"): _null_stream,
               (torch.cuda, "default_stream"): _null_stream, (torch.cuda, "Stream"): _NullStream,
               (torch.cuda, "stream"): lambda s=None: contextlib.nullcontext(), (torch.cuda, "Event"): _NullStream,
               (torch.cuda.random, "get_rng_state"): _no_cuda_rng_state}


class _CpuCudaMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def should_apply(cuda_available: bool) -> bool:
    """Only without CUDA: with a GPU megatron's CUDA calls are right."""
    return not cuda_available


@contextlib.contextmanager
def scope(cuda_available: bool | None = None) -> Iterator[None]:
    """Megatron's CUDA calls land on the CPU inside this block (a null context when CUDA is available)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not should_apply(cuda_available):
        yield
        return
    saved = {key: getattr(*key) for key in _CUDA_ATTRS}
    for (module, name), value in _CUDA_ATTRS.items():
        setattr(module, name, value)
    try:
        with _CpuCudaMode():
            yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
