from dataclasses import dataclass


@dataclass
class WeightSyncConfig:
    """Learner -> rollout weight broadcast over a torch.distributed group."""

    backend: str = "gloo"  # gloo | nccl
    bucket_mb: float = 128.0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = pick a free port
    timeout_s: float = 120.0
