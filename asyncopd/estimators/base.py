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
    # the teacher scores the student's top-k ids as per-position query ids (sparse_rkl on the
    # student support): fills batch.teacher_student_topk_logprobs
    teacher_scores_student_topk: bool = False

    def batch_fields(self) -> frozenset[str]:
        """The optional EstimatorBatch fields these requirements fill (the always-present ones aside)."""
        fields: set[str] = set()
        if self.teacher_top_k:
            fields |= {"teacher_topk_ids", "teacher_topk_logprobs"}
        if self.mc_samples:
            fields |= {"mc_ids", "mc_old_logprobs", "teacher_mc_logprobs"}
        if self.student_top_k:
            fields.add("student_topk_ids")
        if self.teacher_scores_student_topk:
            fields.add("teacher_student_topk_logprobs")
        if self.needs_prox:
            fields.add("prox_logprobs")
        return frozenset(fields)


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
