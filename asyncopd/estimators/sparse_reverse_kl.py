"""Sparse reverse KL on a support S: sum_{v in S} pi_theta(v) [log pi_theta(v) - log p_T(v)].

Differentiated through pi_theta. S is the teacher's top-k (sparse_support=teacher, top_k) or the
student's top-k frozen at rollout time (sparse_support=student, student_top_k; the teacher scores
those ids). Biased: it ignores the student's mass outside S, and the student can lower it by
moving mass off S (the unconstrained optimum on S is pi_theta = p_T / e).
"""

from __future__ import annotations

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.types import EstimatorBatch
from asyncopd.estimators.base import Estimator, Requirements
from asyncopd.estimators.common import Tokens, check_common, first_columns, metrics, need
from asyncopd.estimators.topk import kl_terms

NAME = "sparse_rkl"
SUPPORTS = ("teacher", "student")


def requirements(cfg: EstimatorConfig) -> Requirements:
    check_common(cfg)
    if cfg.sparse_support not in SUPPORTS:
        raise ValueError(f"estimator.sparse_support={cfg.sparse_support!r}: choose one of {SUPPORTS}")
    if cfg.sparse_support == "teacher":
        if cfg.top_k < 1:
            raise ValueError(f"estimator.top_k={cfg.top_k}: sparse_rkl on the teacher support needs "
                             f"top_k >= 1")
        return Requirements(teacher_top_k=cfg.top_k)
    if cfg.student_top_k < 1:
        raise ValueError(f"estimator.student_top_k={cfg.student_top_k}: sparse_rkl with "
                         f"sparse_support=student needs the student's top-k frozen at rollout "
                         f"(set estimator.student_top_k >= 1, e.g. 8)")
    return Requirements(student_top_k=cfg.student_top_k, teacher_scores_student_topk=True)


def support(tok: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(support ids [n, K], teacher log-probs there [n, K])."""
    cfg, batch = tok.cfg, tok.batch
    if cfg.sparse_support == "teacher":
        why = f"teacher top-k support, estimator.top_k={cfg.top_k}"
        ids = first_columns(need(batch, "teacher_topk_ids", NAME, why), cfg.top_k, "teacher_topk_ids", "top_k")
        t_lp = first_columns(need(batch, "teacher_topk_logprobs", NAME, why), cfg.top_k,
                             "teacher_topk_logprobs", "top_k")
    else:
        why = f"student top-k support, estimator.student_top_k={cfg.student_top_k}"
        k = cfg.student_top_k
        ids = first_columns(need(batch, "student_topk_ids", NAME, why), k, "student_topk_ids", "student_top_k")
        t_lp = first_columns(need(batch, "teacher_student_topk_logprobs", NAME, why), k,
                             "teacher_student_topk_logprobs", "student_top_k")
    return tok.pick(ids), tok.pick(t_lp).detach()


def loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    tok = Tokens.of(logits, batch, cfg)
    ids, t_lp = support(tok)
    st = tok.student(ids)
    per_token = kl_terms(st.logprobs, t_lp.to(st.logprobs.dtype))
    value = tok.mean(per_token)
    return value, metrics(value, per_token, st.entropy,
                          student_support_mass=torch.exp(st.logprobs).sum(dim=-1),
                          teacher_support_mass=torch.exp(t_lp.float()).sum(dim=-1))


ESTIMATOR = Estimator(NAME, loss, requirements)
