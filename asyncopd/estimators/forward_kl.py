"""Forward KL on the teacher's top-k cache: sum_{v in K_T} p_T(v) [log p_T(v) - log pi_theta(v)].

Teacher-weighted, so it needs no sample from the student and is insensitive to how stale the
rollout was (only the positions come from the rollout). Three readings of the missing teacher mass
(asyncopd.estimators.topk): plain (the partial sum; the truncation drops the teacher's tail),
renormalize (exact KL from the renormalised top-k teacher), tail_bucket (a K + 1 outcome KL).
"""

from __future__ import annotations

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.types import EstimatorBatch
from asyncopd.estimators.base import Estimator, Requirements
from asyncopd.estimators.common import Tokens, check_common, metrics
from asyncopd.estimators.topk import check_topk, kl_terms, outcomes

NAME = "forward_kl"


def requirements(cfg: EstimatorConfig) -> Requirements:
    check_common(cfg)
    check_topk(cfg)
    return Requirements(teacher_top_k=cfg.top_k)


def loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    tok = Tokens.of(logits, batch, cfg)
    out = outcomes(tok, NAME)
    per_token = kl_terms(out.teacher, out.student)
    value = tok.mean(per_token)
    return value, metrics(value, per_token, out.entropy, teacher_topk_mass=out.teacher_topk_mass,
                          student_topk_mass=out.student_topk_mass)


ESTIMATOR = Estimator(NAME, loss, requirements)
