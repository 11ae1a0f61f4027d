"""Sampled reverse KL, one token per position: a policy gradient on the rollout's own token y_t.

Advantage A_t = sg[log p_T(y_t) - log pi_b(y_t)] with pi_b = pi_old (stale signal, recompute=false)
or pi_b = sg[pi_theta] (recomputed at learner time, recompute=true). Loss per token
-A_t * pi_theta(y_t) / pi_old(y_t) (importance_ratio=true; the gradient is -A_t r_t grad log pi_theta)
or -A_t * log pi_theta(y_t) (importance_ratio=false: plain REINFORCE, unbiased only on-policy).
With recompute and the ratio this is the one-sample case of mc_rkl: unbiased for the reverse-KL
gradient at any staleness. The stabilisers (asyncopd.estimators.stabilisers) reuse `signal`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.types import EstimatorBatch
from asyncopd.estimators.base import Estimator, Requirements
from asyncopd.estimators.common import Tokens, check_common, log_ratio, metrics

NAME = "sampled_rkl"


@dataclass
class Signal:
    """Per real token: the quantities every sampled-token estimator is built from."""

    tok: Tokens
    logp: torch.Tensor  # [n] log pi_theta(y_t), differentiable
    old: torch.Tensor  # [n] log pi_old(y_t)
    teacher: torch.Tensor  # [n] log p_T(y_t)
    advantage: torch.Tensor  # [n] sg[log p_T - log pi_b]
    entropy: torch.Tensor  # [n]

    @property
    def ratio(self) -> torch.Tensor:
        """pi_theta / pi_old, differentiable (log ratio clamped to +-20)."""
        return torch.exp(log_ratio(self.logp, self.old))

    def kl(self) -> torch.Tensor:
        """Per-token k1 estimate of KL(pi_theta || p_T), importance-weighted from pi_old samples."""
        return self.ratio.detach() * (self.logp.detach() - self.teacher)


def signal(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig) -> Signal:
    tok = Tokens.of(logits, batch, cfg)
    st = tok.student(tok.pick(batch.response_ids).unsqueeze(-1))
    logp = st.logprobs.squeeze(-1)
    old = tok.pick(batch.old_logprobs).to(logp.dtype).detach()
    teacher = tok.pick(batch.teacher_token_logprob).to(logp.dtype).detach()
    baseline = logp.detach() if cfg.recompute else old
    return Signal(tok, logp, old, teacher, teacher - baseline, st.entropy)


def requirements(cfg: EstimatorConfig) -> Requirements:
    check_common(cfg)
    return Requirements()


def loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    s = signal(logits, batch, cfg)
    if cfg.importance_ratio:
        weight = s.ratio  # value r, gradient r * grad log pi_theta
    else:
        weight = torch.exp(s.logp - s.logp.detach())  # value 1, gradient grad log pi_theta
    per_token = -s.advantage * weight
    value = s.tok.mean(per_token)
    r = s.ratio.detach()
    return value, metrics(value, s.kl(), s.entropy, advantage=s.advantage, ratio_mean=r,
                          ratio_max=float(r.max()) if r.numel() else 0.0)


ESTIMATOR = Estimator(NAME, loss, requirements)
