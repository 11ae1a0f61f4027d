from dataclasses import dataclass


@dataclass
class LearnerConfig:
    """The student learner: optimizer recipe and parallel layout."""

    backend: str = "torch"  # torch | megatron
    lr: float = 1e-3
    warmup_steps: int = 0  # linear lr warmup over the first optimizer steps (counted by the weight version)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    threads: int = 1
    gpus_per_rank: float = 0.0  # Ray GPUs per learner rank (1 on a GPU cluster; Ray hides GPUs from 0)
    seed: int = 0
    tp: int = 1
    pp: int = 1
    fp8: bool = False  # FP8 GEMMs through Transformer Engine (megatron backend; megatron_patches.fp8)
    fp8_recipe: str = "delayed"  # delayed (DelayedScaling) | current (Float8CurrentScaling, per-tensor)
    fp8_format: str = "hybrid"  # hybrid (E4M3 forward, E5M2 backward) | e4m3
    fp8_margin: int = 0  # delayed: scale margin (powers of two)
    fp8_amax_history_len: int = 1024  # delayed: amax history window
    fp8_amax_compute_algo: str = "max"  # delayed: max | most_recent
    vocab_divisible_by: int = 128  # megatron: pad the vocabulary to a multiple of this times tp (sliced off)
