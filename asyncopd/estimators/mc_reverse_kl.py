"""Multi-sample Monte Carlo reverse KL (the AsyncOPD recipe).

At every position the rollout engine drew M i.i.d. tokens y_j ~ pi_old (column 0 is the sampled
continuation) and the teacher scored all M. The loss per position is
    -(1/M) sum_j r_j sg[log p_T(y_j) - log pi_theta(y_j)],   r_j = pi_theta(y_j) / pi_old(y_j),
whose gradient -(1/M) sum_j r_j sg[log p_T(y_j) - log pi_theta(y_j)] grad log pi_theta(y_j) is an
unbiased estimate of the reverse-KL gradient at that position whatever the staleness (the ratio
corrects for sampling from pi_old; the online advantage makes the baseline the current student),
with 1/M of the one-sample variance. importance_ratio=false drops r_j (biased when stale).
"""

from __future__ import annotations

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.types import EstimatorBatch
from asyncopd.estimators.base import Estimator, Requirements
from asyncopd.estimators.common import Tokens, check_common, first_columns, log_ratio, metrics, need

NAME = "mc_rkl"


def requirements(cfg: EstimatorConfig) -> Requirements:
    check_common(cfg)
    if cfg.mc_samples < 2:
        raise ValueError(f"estimator.mc_samples={cfg.mc_samples}: mc_rkl needs at least 2 samples per "
                         f"position (e.g. 16; with one sample use sampled_rkl with recompute=true)")
    return Requirements(mc_samples=cfg.mc_samples)


def loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    tok = Tokens.of(logits, batch, cfg)
    m = cfg.mc_samples
    why = f"Monte Carlo samples, estimator.mc_samples={m}"
    cols = {f: tok.pick(first_columns(need(batch, f, NAME, why), m, f, "mc_samples"))
            for f in ("mc_ids", "mc_old_logprobs", "teacher_mc_logprobs")}
    st = tok.student(cols["mc_ids"])
    logp = st.logprobs  # [n, M]
    old = cols["mc_old_logprobs"].to(logp.dtype).detach()
    teacher = cols["teacher_mc_logprobs"].to(logp.dtype).detach()
    advantage = teacher - logp.detach()
    ratio = torch.exp(log_ratio(logp, old))
    weight = ratio if cfg.importance_ratio else torch.exp(logp - logp.detach())
    per_token = -(advantage * weight).mean(dim=-1)
    value = tok.mean(per_token)
    r = ratio.detach()
    kl = (r * -advantage).mean(dim=-1)  # importance-weighted k1 estimate of KL(pi_theta || p_T)
    return value, metrics(value, kl, st.entropy, ratio_mean=r, ratio_max=float(r.max()) if r.numel() else 0.0,
                          distinct_samples=_distinct(cols["mc_ids"]))


def _distinct(ids: torch.Tensor) -> torch.Tensor:
    """Distinct ids among the M draws per position (how much of the support the samples cover)."""
    if ids.numel() == 0:
        return ids.new_zeros(0, dtype=torch.float32)
    s, _ = torch.sort(ids, dim=-1)
    return 1.0 + (s[:, 1:] != s[:, :-1]).float().sum(dim=-1)


ESTIMATOR = Estimator(NAME, loss, requirements)
