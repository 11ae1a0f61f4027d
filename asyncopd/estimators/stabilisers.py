"""The async-RL stabilisers the paper compares against, applied to the sampled reverse-KL estimator.

All four use the one-token signal of sampled_rkl (advantage sg[log p_T(y_t) - log pi_b(y_t)], with
pi_b = pi_old or, with recompute=true, sg[pi_theta]) and differ in how they treat the ratio
r_t = pi_theta(y_t) / pi_old(y_t):
- ppo_clip: -min(r A, clip(r, 1 - eps, 1 + eps) A) (PPO's pessimistic clipped surrogate);
- tis: truncated importance sampling, gradient -min(r, C) A grad log pi_theta (the weight is not
  differentiated);
- decoupled_ppo (AReaL): the proximal policy pi_prox (recomputed by the learner before the update)
  takes the place of pi_old inside the clip, and the behaviour weight pi_prox / pi_old multiplies
  the token: tokens whose weight exceeds behave_cap are masked out (behave_cap_mode=mask, AReaL) or
  the weight is capped (clip);
- m2po: a second-moment trust region. Over the "harmful" tokens (those PPO would clip: A > 0 with
  r > 1, or A < 0 with r < 1), if the mean of d^2 = (log pi_theta - log pi_old)^2 exceeds the budget,
  the threshold tau with mean(min(d^2, tau^2)) = budget is found (water-filling, exact) and the ratio
  is clipped to [exp(-tau), exp(tau)] in the PPO way; below the budget nothing is clipped.
"""

from __future__ import annotations

import math

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.types import EstimatorBatch
from asyncopd.estimators.base import Estimator, Requirements
from asyncopd.estimators.common import check_common, log_ratio, metrics, need, positive
from asyncopd.estimators.sampled_reverse_kl import Signal, signal

CAP_MODES = ("mask", "clip")


def _check(cfg: EstimatorConfig) -> None:
    check_common(cfg)
    if not cfg.importance_ratio:
        raise ValueError(f"estimator.importance_ratio=false: {cfg.name} is built on the ratio "
                         f"pi_theta / pi_old; use sampled_rkl for a plain policy gradient")


def _clipped(s: Signal, ratio: torch.Tensor, low, high) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(r A, clip(r, low, high) A) per token, mask of tokens where the clipped branch wins)."""
    unclipped = -s.advantage * ratio
    clipped = -s.advantage * torch.clamp(ratio, low, high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def _result(s: Signal, per_token: torch.Tensor, **extra):
    value = s.tok.mean(per_token)
    return value, metrics(value, s.kl(), s.entropy, advantage=s.advantage, ratio_mean=s.ratio.detach(),
                          **extra)


# --- PPO clip ---------------------------------------------------------------------------------------

def ppo_requirements(cfg: EstimatorConfig) -> Requirements:
    _check(cfg)
    positive(cfg.clip_eps, "clip_eps")
    return Requirements()


def ppo_loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    s = signal(logits, batch, cfg)
    per_token, clipped = _clipped(s, s.ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    return _result(s, per_token, clip_frac=clipped.float())


# --- truncated importance sampling -------------------------------------------------------------------

def tis_requirements(cfg: EstimatorConfig) -> Requirements:
    _check(cfg)
    positive(cfg.tis_cap, "tis_cap")
    return Requirements()


def tis_loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    s = signal(logits, batch, cfg)
    r = s.ratio
    capped = torch.clamp(r.detach(), max=cfg.tis_cap)
    # value -A min(r, C); gradient -A min(r, C) grad log pi_theta
    per_token = -s.advantage * capped * torch.exp(s.logp - s.logp.detach())
    return _result(s, per_token, truncated_frac=(r.detach() > cfg.tis_cap).float())


# --- decoupled PPO (AReaL) ----------------------------------------------------------------------------

def decoupled_requirements(cfg: EstimatorConfig) -> Requirements:
    _check(cfg)
    positive(cfg.clip_eps, "clip_eps")
    positive(cfg.behave_cap, "behave_cap")
    if cfg.behave_cap_mode not in CAP_MODES:
        raise ValueError(f"estimator.behave_cap_mode={cfg.behave_cap_mode!r}: choose one of {CAP_MODES}")
    return Requirements(needs_prox=True)


def decoupled_loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    s = signal(logits, batch, cfg)
    prox = s.tok.pick(need(batch, "prox_logprobs", "decoupled_ppo",
                           "log pi_prox(y_t) recomputed by the learner before the update")).to(s.logp.dtype)
    prox = prox.detach()
    per_token, clipped = _clipped(s, torch.exp(log_ratio(s.logp, prox)), 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    behave = torch.exp(log_ratio(prox, s.old))
    over = behave > cfg.behave_cap
    if cfg.behave_cap_mode == "mask":
        weight = torch.where(over, torch.zeros_like(behave), behave)
    else:
        weight = torch.clamp(behave, max=cfg.behave_cap)
    return _result(s, weight * per_token, clip_frac=clipped.float(), behave_weight=behave,
                   behave_capped_frac=over.float())


# --- M2PO --------------------------------------------------------------------------------------------

def m2po_requirements(cfg: EstimatorConfig) -> Requirements:
    _check(cfg)
    positive(cfg.m2po_budget, "m2po_budget")
    return Requirements()


def m2po_threshold(d2: torch.Tensor, budget: float) -> float:
    """tau >= 0 with mean(min(d2, tau^2)) = budget (inf when mean(d2) <= budget already)."""
    h = d2.numel()
    if h == 0 or float(d2.mean()) <= budget:
        return math.inf
    s, _ = torch.sort(d2.double())
    below = torch.cumsum(s, 0) - s  # sum of the values strictly before index k
    filled = below + (h - torch.arange(h, dtype=s.dtype, device=s.device)) * s  # mean*h if tau^2 = s_k
    target = budget * h
    k = int(torch.searchsorted(filled, torch.tensor([target], dtype=s.dtype, device=s.device)))
    k = min(k, h - 1)
    return math.sqrt(max(float((target - below[k]) / (h - k)), 0.0))


def m2po_loss(logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig):
    s = signal(logits, batch, cfg)
    delta = log_ratio(s.logp, s.old).detach()
    harmful = ((s.advantage > 0) & (delta > 0)) | ((s.advantage < 0) & (delta < 0))
    d2 = delta[harmful] ** 2
    tau = m2po_threshold(d2, cfg.m2po_budget)
    if math.isinf(tau):
        per_token, clipped = -s.advantage * s.ratio, torch.zeros_like(harmful)
        m2_after = d2
    else:
        per_token, clipped = _clipped(s, s.ratio, math.exp(-tau), math.exp(tau))
        m2_after = torch.clamp(d2, max=tau * tau)
    return _result(s, per_token, clip_frac=clipped.float(), m2_before=d2, m2_after=m2_after,
                   harmful_frac=harmful.float(), tau=tau if math.isfinite(tau) else -1.0)


PPO_CLIP = Estimator("ppo_clip", ppo_loss, ppo_requirements)
TIS = Estimator("tis", tis_loss, tis_requirements)
DECOUPLED_PPO = Estimator("decoupled_ppo", decoupled_loss, decoupled_requirements)
M2PO = Estimator("m2po", m2po_loss, m2po_requirements)
