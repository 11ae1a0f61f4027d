"""The teacher backend table: what each scoring server can return and how one is started and spoken to.

Validation checks an estimator's needs against `per_position_queries` before anything starts; the fleet
starts replicas through `host()` and talks to them through `client`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncopd.teacher.client import SGLangTeacherClient, TeacherClient


@dataclass(frozen=True)
class TeacherBackend:
    name: str
    host: Callable[[], Any]  # -> the Ray actor class serving one replica (imported on use)
    client: type[TeacherClient]
    needs: tuple[str, ...]  # modules that must be importable where it runs
    max_tp: int | None  # tensor-parallel size of one replica (None: any the model's heads allow)
    # scores per-position query ids (MC samples, the student's top-k): stock SGLang scores one fixed id
    # list per request (token_ids_logprob), not a different one at every position
    per_position_queries: bool
    uses_gpu: bool  # runs on GPUs (one per TP shard); False: the CPU


def _embedded() -> Any:
    from asyncopd.teacher.actor import TeacherActor

    return TeacherActor


def _sglang() -> Any:
    from asyncopd.rollout.sglang_launcher import SGLangServerActor

    return SGLangServerActor


TEACHER_BACKENDS: dict[str, TeacherBackend] = {b.name: b for b in (
    TeacherBackend("embedded", _embedded, TeacherClient, needs=(), max_tp=1, per_position_queries=True,
                   uses_gpu=False),
    TeacherBackend("sglang", _sglang, SGLangTeacherClient, needs=("sglang",), max_tp=None,
                   per_position_queries=False, uses_gpu=True),
)}
