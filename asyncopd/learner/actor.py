"""The learner as a Ray actor: trains, and is rank 0 of the weight-broadcast group."""

import time

import ray

from asyncopd.config.schema import Config
from asyncopd.learner.build import build_learner
from asyncopd.learner.collate import LearnerBatch
from asyncopd.weights.broadcast import bucket_request, send_bucket
from asyncopd.weights.process_group import init_weights_group


@ray.remote
class LearnerActor:
    def __init__(self, cfg: Config, model_path: str):
        self.learner = build_learner(cfg, model_path)
        self.group = None

    def version(self) -> int:
        return self.learner.version

    def train_step(self, batch: LearnerBatch) -> dict[str, float]:
        return self.learner.train_step(batch)

    def weight_buckets(self, bucket_bytes: int, group_name: str) -> list[dict]:
        """The /update_weights_from_distributed payload of every bucket, in send order."""
        return [bucket_request(bucket, group_name=group_name)
                for bucket in self.learner.named_weights_for_rollout(bucket_bytes)]

    def init_weight_group(self, master_address: str, master_port: int, world_size: int,
                          group_name: str, backend: str, timeout_s: float) -> None:
        self.group = init_weights_group(master_address, master_port, world_size, rank=0,
                                        group_name=group_name, backend=backend, timeout_s=timeout_s)

    def broadcast_weights(self, bucket_bytes: int) -> float:
        """Send every bucket in order; engines receive them through /update_weights_from_distributed."""
        t0 = time.perf_counter()
        for bucket in self.learner.named_weights_for_rollout(bucket_bytes):
            send_bucket(self.group, [t for _, t in bucket])
        return time.perf_counter() - t0

    def save(self, path: str) -> None:
        self.learner.save(path)

    def load(self, path: str) -> int:
        self.learner.load(path)
        return self.learner.version
