"""The rollout backend table: what each engine kind can do and how one is started.

Validation reads the capabilities before anything starts; the fleet starts engines through `host()`.
Both speak SGLang's HTTP API, so the client and the weight sync are the same for either.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncopd.config.schema import Config, WeightSyncConfig


@dataclass(frozen=True)
class RolloutBackend:
    name: str
    host: Callable[[], Any]  # -> the Ray actor class serving one engine (imported on use: ray, sglang)
    needs: tuple[str, ...]  # modules that must be importable where it runs
    max_tp: int | None  # tensor-parallel size one engine can have (None: any the model's heads allow)
    mc_samples: bool  # draws M i.i.d. samples per position (our /generate extension; mc_rkl needs it)
    uses_gpu: bool  # runs on GPUs (one per TP shard); False: the CPU, whatever Ray reserves
    pause_mode: str  # weights.pause_mode=auto: none if it swaps a whole update in at once, else how SGLang pauses


def _embedded() -> Any:
    from asyncopd.rollout.actor import RolloutEngineActor

    return RolloutEngineActor


def _sglang() -> Any:
    from asyncopd.rollout.sglang_launcher import SGLangServerActor

    return SGLangServerActor


ROLLOUT_BACKENDS: dict[str, RolloutBackend] = {b.name: b for b in (
    RolloutBackend("embedded", _embedded, needs=(), max_tp=1, mc_samples=True, uses_gpu=False, pause_mode="none"),
    # abort: the requests in flight end and the dispatcher resumes each from its partial output under the new weights
    # (asyncopd.rollout.dispatch); the flush after it cannot be refused, as it can after retract under load, and
    # in_place would keep KV of the old weights
    RolloutBackend("sglang", _sglang, needs=("sglang",), max_tp=None, mc_samples=False, uses_gpu=True,
                   pause_mode="abort"),
)}


def weight_sync_config(cfg: Config) -> WeightSyncConfig:
    """`cfg.weights` with `pause_mode=auto` resolved for the configured rollout backend: what a WeightSync gets."""
    if cfg.weights.pause_mode != "auto":
        return cfg.weights
    return dataclasses.replace(cfg.weights, pause_mode=ROLLOUT_BACKENDS[cfg.rollout.backend].pause_mode)
