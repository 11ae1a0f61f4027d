"""One learner rank as a Ray actor: trains, exports weights; rank 0 is also rank 0 of the weight-broadcast group.

A learner with tp * pp * dp ranks is that many of these actors forming their own default torch.distributed group
(asyncopd.learner.group.LearnerGroup drives them); a single rank needs no rendezvous and is ready once built.
Every rank takes part in the collective calls (train_step, weight export, save), only rank 0 sends weights.
"""

import time

import ray
import torch
import torch.distributed as dist

from asyncopd.config.schema import Config
from asyncopd.core.types import LearnerBatch, StepResult
from asyncopd.learner.backends import build_trainer
from asyncopd.weights.broadcast import broadcast_buckets, bucket_requests, str_to_dtype
from asyncopd.weights.process_group import destroy_weights_group, find_free_port, init_weights_group


@ray.remote
class LearnerActor:
    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"learner rank {rank} is outside world_size={world_size}")
        self.cfg = cfg
        self.model_path = model_path
        self.rank = rank
        self.world_size = world_size
        self.group = None
        self.trainer = build_trainer(cfg, model_path) if world_size == 1 else None

    def node_id(self) -> str:
        """The Ray node this rank runs on (summary.json's ray_nodes)."""
        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a port free on it): where the ranks' default process group meets (asked of rank 0)."""
        host = ray.util.get_node_ip_address()
        return host, find_free_port(host)

    def start(self, master_address: str, master_port: int) -> None:
        """Join the learners' default process group (every rank at once), then build this rank's trainer."""
        if self.trainer is not None:
            raise RuntimeError("this learner rank is already started")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master_address}:{master_port}", rank=self.rank,
                                world_size=self.world_size)
        self.trainer = build_trainer(self.cfg, self.model_path)

    def version(self) -> int:
        return self.trainer.version

    def train_step(self, batch: LearnerBatch) -> StepResult:
        return self.trainer.train_step(batch)

    def weight_buckets(self, bucket_bytes: int, group_name: str, dtype: str = "", load_format: str = "") -> list[dict]:
        """The /update_weights_from_distributed payload of every bucket, in send order, as `dtype` on the wire
        ("" = the trainer's own). Collective."""
        return bucket_requests(self.trainer.named_weights_for_rollout(bucket_bytes), group_name,
                               str_to_dtype(dtype) if dtype else None, load_format)

    def init_weight_group(self, master_address: str, master_port: int, world_size: int,
                          group_name: str, backend: str, timeout_s: float) -> None:
        """Host the weight-sync group as its rank 0 (learner rank 0 only; the engines are ranks 1..). A group formed
        before is left first: the driver re-forms the group when engines were lost or restarted (torch.distributed
        groups cannot change members)."""
        if self.rank != 0:
            raise RuntimeError(f"learner rank {self.rank} asked to join the weight-sync group: only rank 0 sends")
        destroy_weights_group(self.group)
        self.group = None
        self.group = init_weights_group(master_address, master_port, world_size, rank=0,
                                        group_name=group_name, backend=backend, timeout_s=timeout_s)

    def broadcast_weights(self, bucket_bytes: int, dtype: str = "", load_format: str = "") -> float:
        """Every rank gathers the buckets (collective); rank 0 casts each to the wire `dtype` and sends it, in
        order, to the engines. Seconds it took."""
        if self.rank == 0 and self.group is None:
            raise RuntimeError("broadcast_weights before init_weight_group: the weight-sync group does not exist")
        t0 = time.perf_counter()
        weights = self.trainer.named_weights_for_rollout(bucket_bytes)
        try:
            broadcast_buckets(self.group if self.rank == 0 else None, weights, str_to_dtype(dtype) if dtype else None,
                              load_format)
        except Exception:
            # an engine died mid-broadcast: leaving the group closes our side, so the engines still receiving fail
            # at once instead of waiting out the group timeout; the driver re-forms the group
            if self.rank == 0:
                destroy_weights_group(self.group)
                self.group = None
            raise
        return time.perf_counter() - t0

    def save(self, path: str) -> None:
        self.trainer.save(path)

    def load(self, path: str) -> int:
        self.trainer.load(path)
        return self.trainer.version
