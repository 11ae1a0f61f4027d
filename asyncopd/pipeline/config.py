from dataclasses import dataclass


@dataclass
class PipelineConfig:
    """The OPD loop: batch size, length, and the staleness bound k (0 = strict synchronous)."""

    max_staleness: int = 2
    batch_size: int = 64
    steps: int = 200
    eval_every: int = 50
    eval_prompts: int = 500
    seed: int = 0  # rollout sampling: batch s samples with seed * 2**32 + 64 * s (+ engine index)
    time_limit_s: float = 0.0  # stop early after this many seconds of training (0 = no limit)
