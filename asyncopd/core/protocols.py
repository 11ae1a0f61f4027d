"""The handles the pipeline drives, as Protocols: whatever backend sits behind them, the loop sees only these.

    LearnerHandle  (learner.group.LearnerGroup: Ray actor ranks of the hf or megatron trainer)
      is a WeightSource: hosts the weight-sync group as rank 0 and broadcasts bucketed weights
    WeightSink     (rollout.client.SGLangClient: an embedded engine or a real SGLang server)
      joins that group and receives the buckets through SGLang's weight-update endpoints
    TeacherService (teacher.router.TeacherRouter over named teacher.client.TeacherClient / SGLangTeacherClient:
      replicas behind one client, each sample's teacher chosen by its data.teacher_key column)
      scores rollouts into TeacherScores
"""

from collections.abc import Sequence
from typing import Protocol

from asyncopd.core.types import LearnerBatch, Rollout, StepResult, TeacherScores


class WeightSource(Protocol):
    """The learner side of a weight sync (rank 0 of the group)."""

    def rendezvous_address(self) -> tuple[str, int]:
        """(address, free port) on the node that hosts rank 0: the group meets there (weights.master_addr="")."""

    def init_weight_group(self, master_address: str, master_port: int, world_size: int, group_name: str,
                          backend: str, timeout_s: float) -> None: ...

    def weight_buckets(self, bucket_bytes: int, group_name: str, dtype: str = "", load_format: str = "") -> list[dict]:
        """The /update_weights_from_distributed payload of every bucket, in send order, as `dtype` on the wire
        ("" = the learner's own) in `load_format` ("" or "flattened_bucket")."""

    def broadcast_weights(self, bucket_bytes: int, dtype: str = "", load_format: str = "") -> float:
        """Cast and send every bucket, in order; seconds it took."""


class WeightSink(Protocol):
    """An engine receiving weights through SGLang 0.5.23's HTTP API (ranks rank_offset.. of the group, one per TP
    shard): asyncopd.weights.sync drives these calls in SGLang's order."""

    def server_info(self, refresh: bool = ...) -> dict:
        """SGLang's /server_info: its `dtype` and `tp_size` are read."""

    def model_info(self) -> dict: ...

    def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = ..., backend: str = ...) -> dict: ...

    def pause_generation(self, mode: str = ...) -> dict: ...

    def flush_cache(self, timeout_s: float = ...) -> bool: ...

    def begin_weight_update(self) -> dict: ...

    def update_weights_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str = ...,
                                        flush_cache: bool = ..., weight_version: str | int | None = ...,
                                        load_format: str | None = ...) -> dict: ...

    def end_weight_update(self) -> dict: ...

    def continue_generation(self) -> dict: ...


class LearnerHandle(WeightSource, Protocol):
    """The learner as the loop sees it: synchronous calls, whatever its ranks and backend."""

    @property
    def world_size(self) -> int: ...

    def version(self) -> int:
        """Optimizer steps applied: the staleness clock."""

    def train_step(self, batch: LearnerBatch) -> StepResult: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> int:
        """Resume weights, optimizer and version; returns the version."""

    def shutdown(self) -> None: ...


class TeacherService(Protocol):
    """Prefill-only scoring of finished rollouts, at every response position."""

    def score(self, rollouts: Sequence[Rollout], top_k: int, with_queries: bool = False,
              with_student_topk: bool = False) -> list[TeacherScores]: ...

    def model_info(self) -> list[dict]:
        """One /model_info per replica (its tokenizer fingerprint and id count are checked against the student's)."""

    def close(self) -> None: ...
