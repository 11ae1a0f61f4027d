"""Replace megatron's CUDA RNG-states tracker with one that forks the CPU generator.

Why: megatron-core 0.16.1 wraps dropout in tensor-parallel regions (DotProductAttention, and weight init
when use_cpu_initialization=False) in `tensor_parallel.get_cuda_rng_tracker().fork()`, and
`model_parallel_cuda_manual_seed` registers the per-rank "model-parallel-rng" state with
`CudaRNGStatesTracker.add`. Both read and write CUDA generator states (torch.cuda.get_rng_state,
torch.cuda.default_generators) and fail on a CPU-only build. The replacement keeps the same semantics on the
CPU generator: `add(name, seed)` stores a fresh CPU generator state seeded with `seed`, `fork(name)` swaps it
in for the duration of the block and swaps the original back, so TP-region dropout still draws from a
per-rank stream and the default stream is left untouched.

Mechanism: `initialize_rng_tracker` builds its tracker from the module global
`megatron.core.tensor_parallel.random.CudaRNGStatesTracker`; we rebind that name to the CPU subclass (its
instances pass megatron's `isinstance(..., CudaRNGStatesTracker)` checks, which look the rebound name up) and
drop a tracker that was already built from the CUDA class.
"""

import contextlib

import torch

NAME = "cpu_rng_tracker"


def _tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    base = getattr(mrandom, "_megatron_patches_original_tracker", mrandom.CudaRNGStatesTracker)

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """CudaRNGStatesTracker with CPU generator states (asyncopd.learner.megatron.patches.cpu_rng_tracker)."""

        _megatron_patches = NAME

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def should_apply(cuda_available: bool) -> bool:
    """Only without CUDA: with a GPU the CUDA tracker is the right one (and TE may replace it)."""
    return not cuda_available


def is_applied() -> bool:
    from megatron.core.tensor_parallel import random as mrandom

    return getattr(mrandom.CudaRNGStatesTracker, "_megatron_patches", None) == NAME


def apply(cuda_available: bool) -> bool:
    if not should_apply(cuda_available):
        return False
    if is_applied():
        return True
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._megatron_patches_original_tracker = mrandom.CudaRNGStatesTracker
    mrandom.CudaRNGStatesTracker = _tracker_class()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, mrandom.CudaRNGStatesTracker):
        # built before the patch from the CUDA class: rebuild it from the CPU one on next use
        mrandom._CUDA_RNG_STATE_TRACKER = None
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    return True
