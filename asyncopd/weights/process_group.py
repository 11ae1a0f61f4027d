"""A NON-default torch.distributed process group for learner -> rollout weight broadcasts.

It never touches the default group, so a learner that already runs its own default group (megatron's
TP/PP/DP groups) and a rollout engine can both join it. The rendezvous is SGLang's: a TCP store
hosted by rank 0 at master_address:master_port, keys namespaced by `group_name`, then a gloo or NCCL
group built on it. So a learner that calls `init_weights_group(rank=0)` forms a group with a real SGLang
server answering `/init_weights_update_group` just as it does with our embedded engine.
"""

from __future__ import annotations

import inspect
import socket
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    Backend,
    PrefixStore,
    _new_process_group_helper,
    _world,
    rendezvous,
)

from asyncopd.config.schema import WeightSyncConfig

BACKENDS = ("gloo", "nccl")


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (for master_port = 0 in the config)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_group_args(master_address: str, master_port: int, world_size: int, rank: int, group_name: str,
                     backend: str) -> None:
    """Raise ValueError naming the bad field; used by the engine to answer 400 before joining."""
    if not isinstance(master_address, str) or not master_address:
        raise ValueError("master_address must be a non-empty host string (e.g. '127.0.0.1')")
    if type(master_port) is not int or not 0 < master_port < 65536:
        raise ValueError(f"master_port must be an int in 1..65535, got {master_port!r}")
    if type(world_size) is not int or world_size < 2:
        raise ValueError(f"world_size must be an int >= 2 (rank 0 is the learner), got {world_size!r}")
    if type(rank) is not int or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if not isinstance(group_name, str) or not group_name:
        raise ValueError("group_name must be a non-empty string")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("backend 'nccl' is not available in this torch build; use backend='gloo'")


def init_weights_group(master_address: str, master_port: int, world_size: int, rank: int, group_name: str,
                       backend: str = "gloo", timeout_s: float = WeightSyncConfig.timeout_s) -> dist.ProcessGroup:
    """Join (rank > 0) or host (rank 0) the weight-sync group; returns once every rank has joined.

    All ranks must call this concurrently; it raises (after `timeout_s`) if some rank never comes.
    """
    check_group_args(master_address, master_port, world_size, rank, group_name, backend)
    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    params = inspect.signature(_new_process_group_helper).parameters
    options_kw = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      timeout=timeout, **{options_kw: None})
    # Register ranks so torch.distributed.broadcast(..., group=pg) maps group ranks (identity).
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weights_group(pg: dist.ProcessGroup | None) -> None:
    """Tear the group down (idempotent). Peers must rebuild with `init_weights_group` to sync again."""
    if pg is None:
        return
    try:
        dist.destroy_process_group(pg)
    except (ValueError, RuntimeError, AssertionError, KeyError):
        # The default group is not initialised in a plain engine process: drop our registrations and
        # shut the backend down directly.
        for registry in (_world.pg_group_ranks, _world.pg_map, _world.pg_names, _world.pg_backend_config,
                         _world.pg_to_tag):
            registry.pop(pg, None)
        shutdown = getattr(pg, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError:
                pass
