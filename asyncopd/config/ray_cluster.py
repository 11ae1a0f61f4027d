"""Start (or join) the Ray cluster a run uses, keeping a local one private to the run directory."""

import os
from pathlib import Path

from asyncopd.config.cluster import ClusterConfig


def start_ray(cfg: ClusterConfig, run_dir: str | Path) -> bool:
    """Local: a loopback-only cluster whose session files live under `run_dir/ray`. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, namespace=cfg.namespace, log_to_driver=True)
        return True
    temp_dir = Path(run_dir).resolve() / "ray"
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=cfg.num_cpus,
        namespace=cfg.namespace,
        include_dashboard=cfg.include_dashboard,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp_dir),
        log_to_driver=True,
        configure_logging=False,
    )
    return True
