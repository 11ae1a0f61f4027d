"""The rollout backend table: what each engine kind can do and how one is started.

Validation reads the capabilities before anything starts; the fleet starts engines through `host()`.
Both speak SGLang's HTTP API, so the client and the weight sync are the same for either.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RolloutBackend:
    name: str
    host: Callable[[], Any]  # -> the Ray actor class serving one engine (imported on use: ray, sglang)
    needs: tuple[str, ...]  # modules that must be importable where it runs
    max_tp: int | None  # tensor-parallel size one engine can have (None: any the model's heads allow)
    mc_samples: bool  # draws M i.i.d. samples per position (our /generate extension; mc_rkl needs it)
    pause_for_weight_update: bool  # loads each weight bucket at once: pause generation around an update
    uses_gpu: bool  # runs on GPUs (one per TP shard); False: the CPU, whatever Ray reserves


def _embedded() -> Any:
    from asyncopd.rollout.actor import RolloutEngineActor

    return RolloutEngineActor


def _sglang() -> Any:
    from asyncopd.rollout.sglang_launcher import SGLangServerActor

    return SGLangServerActor


ROLLOUT_BACKENDS: dict[str, RolloutBackend] = {b.name: b for b in (
    RolloutBackend("embedded", _embedded, needs=(), max_tp=1, mc_samples=True, pause_for_weight_update=False,
                   uses_gpu=False),
    RolloutBackend("sglang", _sglang, needs=("sglang",), max_tp=None, mc_samples=False,
                   pause_for_weight_update=True, uses_gpu=True),
)}
