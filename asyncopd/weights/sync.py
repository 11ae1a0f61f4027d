"""Driver side of the weight sync: the learner broadcasts while every engine receives over HTTP."""

import time
from concurrent.futures import ThreadPoolExecutor

from asyncopd.config.schema import WeightSyncConfig
from asyncopd.core.protocols import WeightSink, WeightSource
from asyncopd.weights.process_group import find_free_port


class WeightSync:
    """Learner rank 0, engine i rank i + 1: one group, bucketed per-tensor broadcasts (SGLang's protocol)."""

    def __init__(self, cfg: WeightSyncConfig, learner: WeightSource, engines: list[WeightSink],
                 pause_engines: bool = False):
        self.cfg = cfg
        self.pause_engines = pause_engines  # stock SGLang loads each bucket at once: pause around the update
        self.learner = learner
        self.engines = engines
        self.bucket_bytes = int(cfg.bucket_mb * 2**20)
        self.pool = ThreadPoolExecutor(max_workers=max(len(engines), 1), thread_name_prefix="weight-sync")
        self.buckets: list[dict] = []

    def init_group(self) -> None:
        port = self.cfg.master_port or find_free_port(self.cfg.master_addr)
        world = len(self.engines) + 1
        joined = [
            self.pool.submit(e.init_weights_update_group, master_address=self.cfg.master_addr,
                             master_port=port, rank_offset=i + 1, world_size=world,
                             group_name=self.cfg.group_name, backend=self.cfg.backend)
            for i, e in enumerate(self.engines)
        ]
        self.learner.init_weight_group(self.cfg.master_addr, port, world, self.cfg.group_name, self.cfg.backend,
                                       self.cfg.timeout_s)
        for f in joined:
            f.result()
        self.buckets = self.learner.weight_buckets(self.bucket_bytes, self.cfg.group_name)

    def sync(self, version: int) -> float:
        """Push the learner's current weights as `version`; returns seconds until every engine has them."""
        t0 = time.perf_counter()

        def receive(engine: WeightSink) -> None:
            """Stage every bucket, swap them all in with the last one: no decode step sees a mix."""
            if self.pause_engines:
                engine.pause_generation()
            last = len(self.buckets) - 1
            for i, bucket in enumerate(self.buckets):
                engine.update_weights_from_distributed(
                    **bucket, commit=i == last, weight_version=str(version) if i == last else None)
            if self.pause_engines:
                engine.continue_generation()

        received = [self.pool.submit(receive, e) for e in self.engines]
        self.learner.broadcast_weights(self.bucket_bytes)
        for f in received:
            f.result()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.pool.shutdown(wait=False)
