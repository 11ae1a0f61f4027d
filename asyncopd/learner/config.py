from dataclasses import dataclass


@dataclass
class LearnerConfig:
    """The student learner: optimizer recipe and parallel layout."""

    backend: str = "torch"  # torch | megatron
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    threads: int = 1
    seed: int = 0
    tp: int = 1
    pp: int = 1
    fp8: bool = False
