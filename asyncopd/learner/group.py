"""The learner as the driver sees it: `learner.tp * learner.pp * learner.dp` LearnerActor ranks behind synchronous
calls.

The ranks form their own default torch.distributed group (gloo on CPU, NCCL on GPU) at rank 0's address.
Every call is fanned out to all ranks with the same arguments, in the same order (a lock keeps driver threads
from interleaving two fan-outs, which would cross the ranks' collectives), and rank 0's answer is returned.
Only rank 0 joins the weight-sync group and sends; the other ranks take part in gathering the weights.
"""

import threading
from typing import Any

import ray

from asyncopd.config.ray_cluster import placement
from asyncopd.config.schema import Config, LearnerConfig
from asyncopd.core.errors import ConfigError
from asyncopd.core.types import LearnerBatch, StepResult
from asyncopd.learner.actor import LearnerActor
from asyncopd.learner.backends import LEARNER_BACKENDS, learner_backend


def learner_ranks(cfg: LearnerConfig) -> int:
    """How many processes the learner needs: tp * pp * dp, within what `learner.backend` implements."""
    backend = learner_backend(cfg.backend)
    if min(cfg.tp, cfg.pp, cfg.dp) < 1:
        raise ConfigError(f"learner.tp={cfg.tp}, learner.pp={cfg.pp} and learner.dp={cfg.dp} must all be >= 1")
    for knob, value, limit in (("tp", cfg.tp, backend.max_tp), ("pp", cfg.pp, backend.max_pp),
                               ("dp", cfg.dp, backend.max_dp)):
        if limit is not None and value > limit:
            fits = [b.name for b in LEARNER_BACKENDS.values() if getattr(b, f"max_{knob}") is None]
            fix = "".join(f"learner.backend={name}, or " for name in fits)
            raise ConfigError(f"learner.{knob}={value} with learner.backend={cfg.backend}: that learner runs at most "
                              f"{knob}={limit}; set {fix}learner.{knob}={limit}")
    return cfg.tp * cfg.pp * cfg.dp


def learner_placement(cfg: Config) -> list[dict]:
    """Each rank's Ray options (asyncopd.config.ray_cluster.placement): one bundle per TP group, ranks
    i * tp .. (i + 1) * tp - 1 in bundle i, since megatron's rank order ("tp-cp-ep-dp-pp") makes TP the fastest
    varying and so a TP group consecutive ranks; its all-reduces then never leave a node."""
    lr = cfg.learner
    return placement(cfg.cluster, "learner", learner_ranks(lr), lr.gpus_per_rank, per_bundle=lr.tp,
                     sized_by="learner.tp, learner.pp, learner.dp, learner.gpus_per_rank")


def _gather(refs: list) -> list:
    """ray.get, but a failing rank raises at once rather than after its peers (stuck in a collective) time out."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


class LearnerGroup:
    """Synchronous twin of LearnerActor's methods over every rank; `launch` builds one from the config."""

    def __init__(self, actors: list):
        self.actors = actors  # index = rank
        self._lock = threading.Lock()
        self._weight_group = False

    @classmethod
    def launch(cls, cfg: Config, model_path: str, placed: list[dict] | None = None) -> "LearnerGroup":
        """Start the ranks and wait until every one has built its trainer (errors surface here). `placed`: each
        rank's options, reserved beforehand with the other roles' (asyncopd.pipeline.placements); None reserves
        them now."""
        placed = learner_placement(cfg) if placed is None else placed
        world, gpus = len(placed), cfg.learner.gpus_per_rank
        actors = [LearnerActor.options(num_cpus=0, num_gpus=gpus, **options).remote(cfg, model_path, rank, world)
                  for rank, options in enumerate(placed)]
        try:
            if world == 1:
                _gather([actors[0].version.remote()])
            else:
                address, port = ray.get(actors[0].rendezvous_address.remote())
                _gather([a.start.remote(address, port) for a in actors])
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        return cls(actors)

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def _all(self, method: str, *args: Any) -> Any:
        """Call `method` on every rank (same arguments, same order); rank 0's result."""
        with self._lock:
            return _gather([getattr(a, method).remote(*args) for a in self.actors])[0]

    def _rank0(self, method: str, *args: Any) -> Any:
        with self._lock:
            return ray.get(getattr(self.actors[0], method).remote(*args))

    def version(self) -> int:
        return self._rank0("version")

    def node_ids(self) -> list[str]:
        """The Ray node of every rank, by rank."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def rendezvous_address(self) -> tuple[str, int]:
        """(rank 0's node IP, a port free there): where the weight-sync group meets when weights.master_addr is
        empty, so it is hosted where rank 0 runs, whichever node Ray placed it on."""
        return self._rank0("rendezvous_address")

    def train_step(self, batch: LearnerBatch) -> StepResult:
        """One optimizer step on every rank with the same batch (sent to the object store once)."""
        return self._all("train_step", ray.put(batch))

    def weight_buckets(self, bucket_bytes: int, group_name: str, dtype: str = "", load_format: str = "") -> list[dict]:
        return self._all("weight_buckets", bucket_bytes, group_name, dtype, load_format)

    def init_weight_group(self, master_address: str, master_port: int, world_size: int,
                          group_name: str, backend: str, timeout_s: float) -> None:
        """Rank 0 hosts the weight-sync group; returns once the engines have joined it too."""
        self._rank0("init_weight_group", master_address, master_port, world_size, group_name, backend, timeout_s)
        self._weight_group = True

    def broadcast_weights(self, bucket_bytes: int, dtype: str = "", load_format: str = "") -> float:
        """Seconds rank 0 took to gather, cast and send every bucket."""
        if not self._weight_group:  # checked here: a rank-0 failure would leave the other ranks in a gather
            raise RuntimeError("broadcast_weights before init_weight_group: the weight-sync group does not exist")
        return self._all("broadcast_weights", bucket_bytes, dtype, load_format)

    def save(self, path: str) -> None:
        """Every rank writes its part (megatron: rank 0 the HF checkpoint, each rank its optimizer shard)."""
        self._all("save", path)

    def load(self, path: str) -> int:
        """Resume every rank; returns the restored version."""
        return self._all("load", path)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
