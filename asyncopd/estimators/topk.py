"""The teacher's top-k cache as a set of outcomes, shared by forward_kl and gkd.

Per token the teacher cache holds log p_T(v) for v in its top-k K_T (normalised over the whole
teacher vocabulary, so their mass P_T < 1). Three readings, each giving per-outcome log-masses
`teacher` [n, C] and `student` [n, C] (student values differentiable):
- plain: the K outcomes as they are (a partial sum of the divergence's pointwise terms);
- renormalize: the teacher is taken to be p_T / P_T on K_T and zero elsewhere; one extra outcome
  holds the student's mass outside K_T (teacher log-mass -inf), so the divergence is exact over
  the full vocabulary against that renormalised teacher;
- tail_bucket: both distributions coarse-grained to K + 1 outcomes, the last holding the mass
  outside K_T (teacher 1 - P_T, student 1 - sum_{K_T} pi_theta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.estimators.common import Tokens, first_columns, log1mexp, need, weighted


def check_topk(cfg: EstimatorConfig) -> None:
    if cfg.top_k < 1:
        raise ValueError(f"estimator.top_k={cfg.top_k}: estimator {cfg.name} needs the teacher's top-k "
                         f"cache (set estimator.top_k >= 1, e.g. 8)")
    if cfg.renormalize and cfg.tail_bucket:
        raise ValueError("estimator.renormalize and estimator.tail_bucket are exclusive: pick one reading "
                         "of the teacher's missing mass")


@dataclass
class Outcomes:
    teacher: torch.Tensor  # [n, C] teacher log-mass per outcome (no grad)
    student: torch.Tensor  # [n, C] student log-mass per outcome (differentiable)
    entropy: torch.Tensor  # [n] student entropy
    teacher_topk_mass: torch.Tensor  # [n] P_T
    student_topk_mass: torch.Tensor  # [n] sum over K_T of pi_theta


def outcomes(tok: Tokens, who: str) -> Outcomes:
    cfg, batch = tok.cfg, tok.batch
    why = f"teacher top-k, estimator.top_k={cfg.top_k}"
    ids = tok.pick(first_columns(need(batch, "teacher_topk_ids", who, why), cfg.top_k,
                                 "teacher_topk_ids", "top_k"))
    t_lp = tok.pick(first_columns(need(batch, "teacher_topk_logprobs", who, why), cfg.top_k,
                                  "teacher_topk_logprobs", "top_k")).to(torch.float32).detach()
    extra = cfg.renormalize or cfg.tail_bucket
    st = tok.student(ids, ids if extra else None)
    t_lp = t_lp.to(st.logprobs.dtype)
    t_mass_log = torch.logsumexp(t_lp, dim=-1)
    s_mass = torch.exp(st.logprobs).sum(dim=-1)
    teacher, student = t_lp, st.logprobs
    if cfg.renormalize:
        teacher = torch.cat([t_lp - t_mass_log.unsqueeze(-1),
                             torch.full_like(t_mass_log, float("-inf")).unsqueeze(-1)], dim=-1)
        student = torch.cat([st.logprobs, st.tail_logprob.unsqueeze(-1)], dim=-1)
    elif cfg.tail_bucket:
        teacher = torch.cat([t_lp, log1mexp(t_mass_log).unsqueeze(-1)], dim=-1)
        student = torch.cat([st.logprobs, st.tail_logprob.unsqueeze(-1)], dim=-1)
    return Outcomes(teacher, student, st.entropy, torch.exp(t_mass_log), s_mass.detach())


def kl_terms(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (log p_c - log q_c) per token, with 0 log 0 = 0 (also when q_c = 0 and p_c = 0)."""
    return weighted(p_log, p_log - q_log).sum(dim=-1)


def generalized_jsd(teacher: torch.Tensor, student: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD per token over the outcomes (the TRL GKD convention).

    beta = 0: KL(teacher || student); beta = 1: KL(student || teacher); otherwise with the mixture
    m = beta * teacher + (1 - beta) * student: beta KL(teacher || m) + (1 - beta) KL(student || m).
    """
    if beta == 0.0:
        return kl_terms(teacher, student)
    if beta == 1.0:
        return kl_terms(student, teacher)
    b = torch.tensor(beta, dtype=student.dtype, device=student.device)
    mix = torch.logaddexp(teacher + torch.log(b), student + torch.log1p(-b))
    return beta * kl_terms(teacher, mix) + (1.0 - beta) * kl_terms(student, mix)
