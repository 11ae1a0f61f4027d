"""A torch module as rank 0 of the weight-sync group, in this process: the learner's half of a sync without Ray.

LearnerActor is the run's WeightSource (its buckets come from the trainer, gathered across TP ranks); this one
serves the weights bench and the tests, which need a sender they can perturb and time directly. Both announce
and send buckets through the same functions (asyncopd.weights.broadcast), so they put the same bytes on the wire.
"""

from __future__ import annotations

import time

import torch

from asyncopd.weights.broadcast import broadcast_buckets, bucket_requests, plan_buckets, str_to_dtype
from asyncopd.weights.process_group import destroy_weights_group, find_free_port, init_weights_group


class ModuleWeightSource:
    """`module`'s named parameters (Hugging Face names), bucketed in order, sent by this process as rank 0."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.group = None

    def _buckets(self, bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
        params = {name: p.detach() for name, p in self.module.named_parameters()}
        return [[(name, params[name]) for name in names] for names in plan_buckets(params, bucket_bytes)]

    def rendezvous_address(self) -> tuple[str, int]:
        return "127.0.0.1", find_free_port()  # this process, on this machine

    def init_weight_group(self, master_address: str, master_port: int, world_size: int, group_name: str,
                          backend: str, timeout_s: float) -> None:
        self.group = init_weights_group(master_address, master_port, world_size, 0, group_name, backend,
                                        timeout_s=timeout_s)

    def weight_buckets(self, bucket_bytes: int, group_name: str, dtype: str = "", load_format: str = "") -> list[dict]:
        return bucket_requests(self._buckets(bucket_bytes), group_name, str_to_dtype(dtype) if dtype else None,
                               load_format)

    def broadcast_weights(self, bucket_bytes: int, dtype: str = "", load_format: str = "") -> float:
        if self.group is None:
            raise RuntimeError("broadcast_weights before init_weight_group: the weight-sync group does not exist")
        t0 = time.perf_counter()
        broadcast_buckets(self.group, self._buckets(bucket_bytes), str_to_dtype(dtype) if dtype else None,
                          load_format)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Leave the group (after the engines have left it: rank 0 hosts the store they talk to)."""
        destroy_weights_group(self.group)
        self.group = None
