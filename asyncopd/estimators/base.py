"""The estimator seam: a pure loss function and what it needs fetched (asyncopd.estimators.registry lists them)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.types import EstimatorBatch

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

