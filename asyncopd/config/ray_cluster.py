"""Start (or join) the Ray cluster a run uses, keeping a local one private to the run directory."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from asyncopd.config.schema import ClusterConfig
from asyncopd.core.errors import ConfigError

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


NODE_RESOURCE = "asyncopd_node_"  # slurm/asyncopd_70b.sh starts each raylet with {"asyncopd_node_<slurm node>": 1}


def ray_node_labels() -> dict[str, str]:
    """Ray node id -> a readable name: the Slurm node its raylet was started for (NODE_RESOURCE), else its IP and
    id prefix (on one host several raylets share the IP)."""
    import ray

    labels = {}
    for node in ray.nodes():
        named = [r[len(NODE_RESOURCE):] for r in node.get("Resources", {}) if r.startswith(NODE_RESOURCE)]
        labels[node["NodeID"]] = named[0] if named else f"{node['NodeManagerAddress']}/{node['NodeID'][:8]}"
    return labels


STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def placement(cfg: ClusterConfig, role: str, count: int, gpus: float, *, sized_by: str, per_bundle: int = 1,
              timeout_s: float = 600.0) -> list[dict]:
    """Ray `.options()` for each of a role's `count` actors: with cluster.placement_groups on, actor i in bundle
    i // per_bundle of one placement group with the role's strategy (cluster.<role>_placement), else nothing (Ray's
    default). Actors that must share a node share a bundle (the learner's TP groups): PACK alone is best effort.

    Returns once the group is placed; raises ConfigError naming the group, the cluster's resources and the fields
    that size it (`sized_by`) if it is not placed in `timeout_s`."""
    if not cfg.placement_groups or count == 0:
        return [{} for _ in range(count)]
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = getattr(cfg, f"{role}_placement")
    # a bundle needs some resource; CPU actors ask for none, so theirs is a sliver of CPU
    bundle = {"GPU": gpus * per_bundle} if gpus else {"CPU": 0.01 * per_bundle}
    bundles = [dict(bundle) for _ in range(count // per_bundle)]
    group = placement_group(bundles, strategy=strategy)  # unnamed: one per teacher service
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)  # a pending group would take resources whenever they free up
        loosen = f", cluster.{role}_placement={strategy.removeprefix('STRICT_')}" if "STRICT" in strategy else ""
        raise ConfigError(
            f"the {role} placement group ({len(bundles)} x {bundle}, cluster.{role}_placement={strategy}) "
            f"was not placed in {timeout_s:g} s: the cluster has {_listed(ray.cluster_resources())}, of which "
            f"{_listed(ray.available_resources())} are free. Ask for less ({sized_by}){loosen}, give the cluster "
            "more nodes or GPUs, or set cluster.placement_groups=false (Ray's default placement)")
    return [{"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b)}
            for b in range(len(bundles)) for _ in range(per_bundle)]


def _listed(resources: dict[str, float]) -> dict[str, float]:
    """Ray's resources without the per-node `node:<ip>` markers (ours, NODE_RESOURCE, count the nodes)."""
    return {k: v for k, v in sorted(resources.items()) if not k.startswith("node:")}
