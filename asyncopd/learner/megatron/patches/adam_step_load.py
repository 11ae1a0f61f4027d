"""Let megatron-core 0.16.1's distributed optimizer load a `fully_reshardable` checkpoint into torch's Adam.

Why: without Apex or Transformer Engine, megatron falls back to `torch.optim.AdamW`, whose per-parameter state
holds a `step` next to `exp_avg` / `exp_avg_sq`. Loading (DistributedOptimizer.load_parameter_state_from_fully_
reshardable) leaves `step` out of the tensors it reads from the checkpoint, then `_set_main_param_and_optimizer_
states` copies into every key of the parameter's live state, `step` included: KeyError: 'step', so no checkpoint
of the fallback optimizer can be resumed. The patched method hides `step` from that copy and puts it back; the
learner then gives every parameter its own step count (asyncopd.learner.megatron.checkpoint._adam_steps).

Condition: without CUDA (like every patch here) and only when megatron runs the torch fallback (no Apex, no
Transformer Engine), where the original fails. The GPU tier installs Transformer Engine, whose FusedAdam keeps the
step in the param group: there the original is right. Idempotent.
"""

NAME = "adam_step_load"


def _fallback() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def should_apply(cuda_available: bool) -> bool:
    return not cuda_available and _fallback()


def is_applied() -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return getattr(DistributedOptimizer._set_main_param_and_optimizer_states, "_megatron_patches", None) == NAME


def apply(cuda_available: bool) -> bool:
    if not should_apply(cuda_available):
        return False
    if is_applied():
        return True
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    _set_main_param_and_optimizer_states._megatron_patches = NAME
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    return True
