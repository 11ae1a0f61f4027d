"""Start (or join) the Ray cluster a run uses, keeping a local one private to the run directory."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from asyncopd.config.schema import ClusterConfig

# Ray puts unix sockets at <temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store, and a socket
# path may hold at most 107 bytes; the session part takes up to ~70 of them.
_SOCKET_PATH_MAX = 107
_SESSION_SUFFIX = 70


def ray_temp_dir(run_dir: str | Path) -> Path:
    """`run_dir/ray`, reached through a short symlink in the system temp dir when its path is too long.

    The session files still live in the run directory; only the link (removed at exit) is outside it."""
    temp_dir = Path(run_dir).resolve() / "ray"
    temp_dir.mkdir(parents=True, exist_ok=True)
    if len(str(temp_dir)) + _SESSION_SUFFIX <= _SOCKET_PATH_MAX:
        return temp_dir
    holder = Path(tempfile.mkdtemp(prefix="aopd-"))
    link = holder / "ray"
    link.symlink_to(temp_dir, target_is_directory=True)
    atexit.register(shutil.rmtree, holder, ignore_errors=True)  # removes the link, never its target
    return link


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
    ray.init(
        num_cpus=cfg.num_cpus,
        namespace=cfg.namespace,
        include_dashboard=cfg.include_dashboard,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(ray_temp_dir(run_dir)),
        log_to_driver=True,
        configure_logging=False,
    )
    return True
