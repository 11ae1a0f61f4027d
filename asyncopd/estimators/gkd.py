"""Generalised JSD (GKD; TRL's GKDTrainer convention) on the teacher's top-k cache.

beta = 0 is forward KL(teacher || student), beta = 1 reverse KL(student || teacher), and in
between beta KL(teacher || m) + (1 - beta) KL(student || m) with m = beta teacher + (1 - beta) student.
The top-k cache is read as in forward_kl (plain partial sums, renormalize, or tail_bucket); in the
plain reading beta = 0 is forward_kl and beta = 1 is sparse_rkl on the teacher's top-k.
"""

from __future__ import annotations

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.types import EstimatorBatch
from asyncopd.estimators.base import Estimator, Requirements
from asyncopd.estimators.common import Tokens, check_common, metrics
from asyncopd.estimators.topk import check_topk, generalized_jsd, outcomes

NAME = "gkd"


def requirements(cfg: EstimatorConfig) -> Requirements:
    check_common(cfg)
    check_topk(cfg)
    if not 0.0 <= cfg.gkd_beta <= 1.0:
        raise ValueError(f"estimator.gkd_beta={cfg.gkd_beta}: must be in [0, 1] (0 forward KL, 1 reverse KL)")
    if cfg.renormalize and cfg.gkd_beta == 1.0:
        raise ValueError("estimator.gkd_beta=1 with estimator.renormalize=true is infinite (the renormalised "
                         "teacher is zero outside its top-k); use tail_bucket or beta < 1")
    return Requirements(teacher_top_k=cfg.top_k)


def loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    tok = Tokens.of(logits, batch, cfg)
    out = outcomes(tok, NAME)
    per_token = generalized_jsd(out.teacher, out.student, float(cfg.gkd_beta))
    value = tok.mean(per_token)
    return value, metrics(value, per_token, out.entropy, teacher_topk_mass=out.teacher_topk_mass,
                          student_topk_mass=out.student_topk_mass)


ESTIMATOR = Estimator(NAME, loss, requirements)
