"""Save the distributed optimizer's `fully_reshardable` checkpoints with every parameter's own Adam state.

Why: megatron-core 0.16.1's DistributedOptimizer.sharded_param_state_fully_reshardable gathers the optimizer state
into one flat tensor per grad buffer with the padding between its buckets left out (get_parameter_state_dp_zero),
then slices each parameter out of it at the parameter's offset in the buffer, padding included
(buffer.param_index_map). Every parameter after the first bucket is read shifted by the padding before it: its
saved Adam moments and fp32 main weight are its neighbour's, and the last one runs past the end ("param range
exceeds unpadded buffer ... padded with zeros which can lead to data corruption"). A buffer has several buckets
whenever it outgrows DDP's bucket size (any large model) or, with tied embeddings over pipeline stages, always:
the shared embedding gets a bucket of its own. Resuming then continues from corrupted optimizer state, silently.

Mechanism: during that method only, the gathered flat tensors are laid back out at the buckets' real offsets
(`bucket.offset`, zeros in the padding), which is the indexing the method assumes. Loading reads the canonical
per-parameter tensors and needs no change.

Condition: a bug in megatron's own logic, on CPU and GPU alike: applied whenever the pinned version runs.
"""

import torch

NAME = "reshardable_offsets"


def should_apply(cuda_available: bool) -> bool:
    return True


def is_applied() -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return getattr(DistributedOptimizer.sharded_param_state_fully_reshardable, "_megatron_patches", None) == NAME


def _at_bucket_offsets(optimizer, state):
    """get_parameter_state_dp_zero's compact per-buffer tensors, spread back over the buffers' real layout."""
    if state is None:
        return state
    for gbuf_idx, by_dtype in state.items():
        if not isinstance(gbuf_idx, int):
            continue  # "buckets_coalesced"
        buffer = optimizer.buffers[gbuf_idx]
        for world in by_dtype.values():
            for key, compact in list(world.items()):
                if not isinstance(compact, torch.Tensor):
                    continue
                full = compact.new_zeros(buffer.numel)
                start = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    full[bucket.offset: bucket.offset + n] = compact[start: start + n]
                    start += n
                world[key] = full
    return state


def apply(cuda_available: bool) -> bool:
    if not should_apply(cuda_available):
        return False
    if is_applied():
        return True
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        gather = self.get_parameter_state_dp_zero
        self.get_parameter_state_dp_zero = lambda *a, **k: _at_bucket_offsets(self, gather(*a, **k))
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero  # the class's method again

    sharded_param_state_fully_reshardable._megatron_patches = NAME
    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state_fully_reshardable
    return True
