"""The learner backend table: what each `learner.backend` can run and how to build it.

Construction (`build_trainer`), the rank count (`learner.group.learner_ranks`) and config validation all read
this one table, so a backend's limits are stated once. Builders import their backend lazily: the hf learner
runs without megatron-core installed.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncopd.config.schema import Config, LearnerConfig
from asyncopd.core.errors import ConfigError
from asyncopd.learner.trainer import ModelBackend, Trainer


@dataclass(frozen=True)
class LearnerBackend:
    name: str  # the learner.backend value
    build: Callable[[LearnerConfig, str], ModelBackend]  # (learner cfg, model path) -> backend; imports lazily
    max_tp: int | None  # largest learner.tp it runs; None = any
    max_pp: int | None  # pipeline stages implemented; None = any
    max_dp: int | None  # data-parallel replicas implemented; None = any
    fp8: bool  # can run learner.fp8=true (megatron: through Transformer Engine's layers)
    needs: tuple[str, ...]  # importable modules it needs
    families: frozenset[str] | None  # Hugging Face model_types it can train (None: any causal LM)
    replicates_kv_heads: bool  # tp may exceed the KV heads (each rank a copy); False: tp must divide them
    uses_gpu: bool  # each rank drives a GPU when there is one; False: the model stays on the CPU


def _build_hf(cfg: LearnerConfig, model_path: str) -> ModelBackend:
    from asyncopd.learner.hf import HFBackend

    return HFBackend(cfg, model_path)


def _build_megatron(cfg: LearnerConfig, model_path: str) -> ModelBackend:
    from asyncopd.learner.megatron.model import MegatronBackend

    return MegatronBackend(cfg, model_path)


LEARNER_BACKENDS: dict[str, LearnerBackend] = {b.name: b for b in (
    LearnerBackend("hf", _build_hf, max_tp=1, max_pp=1, max_dp=1, fp8=False, needs=(), families=None,
                   replicates_kv_heads=True, uses_gpu=False),
    LearnerBackend("megatron", _build_megatron, max_tp=None, max_pp=None, max_dp=None, fp8=True,
                   needs=("megatron.core", "psutil"),  # psutil: dist_checkpointing's writer hangs without it
                   families=frozenset({"qwen2", "qwen3", "llama"}),  # the FAMILIES megatron/convert.py maps
                   replicates_kv_heads=False, uses_gpu=True),  # and splits their KV heads evenly over the TP ranks
)}


def learner_backend(name: str) -> LearnerBackend:
    """The table entry for `learner.backend`, or a ConfigError listing the choices."""
    if name not in LEARNER_BACKENDS:
        raise ConfigError(f"learner.backend={name!r} is unknown: choose one of {sorted(LEARNER_BACKENDS)}")
    return LEARNER_BACKENDS[name]


def build_trainer(cfg: Config, model_path: str) -> Trainer:
    """The Trainer over `learner.backend`'s model, seeded and threaded from the learner config."""
    backend = learner_backend(cfg.learner.backend)
    torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.learner.seed)  # before the model: a backend's initialisation draws from it
    model = backend.build(cfg.learner, model_path)
    try:
        return Trainer(cfg.learner, cfg.estimator, model, max_staleness=cfg.pipeline.max_staleness,
                       temperature=cfg.rollout.temperature)
    except BaseException:
        model.close()  # a megatron backend holds process groups
        raise
