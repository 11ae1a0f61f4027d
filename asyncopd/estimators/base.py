"""The estimator seam: a registry of pure loss functions and what each one needs fetched."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncopd.estimators.batch import EstimatorBatch
from asyncopd.estimators.config import EstimatorConfig

LossFn = Callable[[torch.Tensor, EstimatorBatch, EstimatorConfig], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Requirements:
    """The fields an estimator needs, so a run fetches (and pays for) nothing else."""

    teacher_top_k: int = 0  # teacher top-k cache size
    mc_samples: int = 0  # rollout engine draws M samples/position; teacher scores them
    student_top_k: int = 0  # rollout engine records the student's top-k support
    needs_prox: bool = False  # learner recomputes log pi_prox before the update


@dataclass(frozen=True)
class Estimator:
    name: str
    loss: LossFn  # (student logits [B, T, V] at response positions, batch, cfg) -> (loss, metrics)
    requirements: Callable[[EstimatorConfig], Requirements]


_REGISTRY: dict[str, Estimator] = {}


def register(estimator: Estimator) -> Estimator:
    _REGISTRY[estimator.name] = estimator
    return estimator


def build(cfg: EstimatorConfig) -> Estimator:
    """Look an estimator up by `estimator.name`, with a clear error listing the choices."""
    import asyncopd.estimators.family  # noqa: F401  (registers every estimator)

    if cfg.name not in _REGISTRY:
        raise ValueError(
            f"estimator.name={cfg.name!r} is not a known estimator; choose one of {sorted(_REGISTRY)}"
        )
    return _REGISTRY[cfg.name]
