"""Every estimator's value and gradient against a brute-force full-vocabulary computation.

The references below are written from the formulas (REFERENCES.md), on the full log-softmax with
plain autograd, in float64; the library runs chunked (chunk_tokens=2 over a ragged mask), so the
comparison also covers the chunked forward/backward.
"""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from asyncopd.config.schema import EstimatorConfig
from asyncopd.estimators.base import Requirements
from asyncopd.estimators.registry import build
from asyncopd.estimators.stabilisers import m2po_threshold
from asyncopd.estimators.synthetic import draw_batch
from tests._tolerances import EPS32, EPS_BF16, FP32_ESTIMATOR, FP64_ESTIMATOR

B, T, V = 3, 7, 23

CASES = {
    "forward_kl": dict(name="forward_kl", top_k=5),
    "forward_kl_renorm": dict(name="forward_kl", top_k=5, renormalize=True),
    "forward_kl_tail": dict(name="forward_kl", top_k=5, tail_bucket=True),
    "sparse_rkl_teacher": dict(name="sparse_rkl", top_k=5),
    "sparse_rkl_student": dict(name="sparse_rkl", sparse_support="student", student_top_k=4),
    "sampled_stale_is": dict(name="sampled_rkl"),
    "sampled_stale_nois": dict(name="sampled_rkl", importance_ratio=False),
    "sampled_recompute_is": dict(name="sampled_rkl", recompute=True),
    "sampled_recompute_nois": dict(name="sampled_rkl", recompute=True, importance_ratio=False),
    "mc_rkl": dict(name="mc_rkl", mc_samples=6),
    "mc_rkl_nois": dict(name="mc_rkl", mc_samples=6, importance_ratio=False),
    "ppo_clip": dict(name="ppo_clip", clip_eps=0.2),
    "ppo_clip_recompute": dict(name="ppo_clip", clip_eps=0.2, recompute=True),
    "tis": dict(name="tis", tis_cap=1.2),
    "decoupled_ppo": dict(name="decoupled_ppo", behave_cap=1.5),
    "decoupled_ppo_clipcap": dict(name="decoupled_ppo", behave_cap=1.5, behave_cap_mode="clip"),
    "m2po": dict(name="m2po", m2po_budget=0.01),
    "gkd": dict(name="gkd", top_k=5, gkd_beta=0.3),
    "gkd_renorm": dict(name="gkd", top_k=5, gkd_beta=0.7, renormalize=True),
    "gkd_tail": dict(name="gkd", top_k=5, gkd_beta=0.5, tail_bucket=True),
    "gkd_beta0": dict(name="gkd", top_k=5, gkd_beta=0.0),
    "gkd_beta1_tail": dict(name="gkd", top_k=5, gkd_beta=1.0, tail_bucket=True),
}


def setup(case: str, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cfg = EstimatorConfig(chunk_tokens=2, **CASES[case])
    est = build(cfg)
    req = est.requirements(cfg)
    teacher = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    old = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    cur = old + 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)  # pi_theta != pi_old
    prox = old + 0.8 * (cur - old)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    batch = draw_batch(teacher, old, req, mask=mask, prox_logits=prox, generator=g)
    return cfg, est, batch, cur.to(dtype), teacher


# --- brute force -------------------------------------------------------------------------------------

def xlogy_terms(p_log, q_log):
    """sum p (log p - log q) with 0 log 0 = 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def gjsd(a, b, beta):
    if beta == 0:
        return xlogy_terms(a, b)
    if beta == 1:
        return xlogy_terms(b, a)
    m = torch.log(beta * a.exp() + (1 - beta) * b.exp())
    return beta * xlogy_terms(a, m) + (1 - beta) * xlogy_terms(b, m)


def dense_teacher_outcomes(cfg, batch, lp):
    """Teacher and student log-mass per outcome, built densely over the full vocabulary."""
    k = cfg.top_k
    ids = batch.teacher_topk_ids[..., :k]
    t_lp = batch.teacher_topk_logprobs[..., :k].double()
    in_k = torch.zeros_like(lp, dtype=torch.bool).scatter(-1, ids, True)
    if cfg.renormalize:  # dense renormalised teacher over all V ids, student as is
        t = torch.full_like(lp, -math.inf).scatter(-1, ids, t_lp - torch.logsumexp(t_lp, -1, keepdim=True))
        return t, lp
    s_k = lp.gather(-1, ids)
    if cfg.tail_bucket:
        t_tail = torch.log(1 - t_lp.exp().sum(-1, keepdim=True))
        s_tail = torch.log(torch.where(in_k, 0.0, lp.exp()).sum(-1, keepdim=True))
        return torch.cat([t_lp, t_tail], -1), torch.cat([s_k, s_tail], -1)
    return t_lp, s_k


def reference(cfg, batch, logits):
    """Per-token loss [B, T] from the full log-softmax."""
    lp = torch.log_softmax(logits.double(), -1)
    y = batch.response_ids
    logp = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    old, teach = batch.old_logprobs.double(), batch.teacher_token_logprob.double()
    name = cfg.name
    if name in ("forward_kl", "gkd"):
        t, s = dense_teacher_outcomes(cfg, batch, lp)
        return gjsd(t, s, 0.0 if name == "forward_kl" else cfg.gkd_beta)
    if name == "sparse_rkl":
        if cfg.sparse_support == "teacher":
            ids, t = batch.teacher_topk_ids[..., : cfg.top_k], batch.teacher_topk_logprobs[..., : cfg.top_k]
        else:
            ids, t = batch.student_topk_ids, batch.teacher_student_topk_logprobs
        s = lp.gather(-1, ids)
        return (s.exp() * (s - t.double())).sum(-1)
    if name == "mc_rkl":
        s = lp.gather(-1, batch.mc_ids)
        adv = (batch.teacher_mc_logprobs.double() - s).detach()
        w = torch.exp(s - batch.mc_old_logprobs.double()) if cfg.importance_ratio else 1 + s - s.detach()
        return -(w * adv).mean(-1)
    adv = (teach - (logp.detach() if cfg.recompute else old))
    ratio = torch.exp(logp - old)
    if name == "sampled_rkl":
        # without the ratio: value -A (the ratio-1 surrogate), gradient -A grad log pi_theta
        return -adv * (ratio if cfg.importance_ratio else 1 + logp - logp.detach())
    if name == "ppo_clip":
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))
    if name == "tis":
        # value -A min(r, C), gradient -A min(r, C) grad log pi_theta
        return -adv * ratio.detach().clamp(max=cfg.tis_cap) * (1 + logp - logp.detach())
    if name == "decoupled_ppo":
        prox = batch.prox_logprobs.double()
        r = torch.exp(logp - prox)
        w = torch.exp(prox - old)
        w = torch.where(w > cfg.behave_cap, 0.0, w) if cfg.behave_cap_mode == "mask" else w.clamp(max=cfg.behave_cap)
        return w * torch.maximum(-adv * r, -adv * r.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))
    if name == "m2po":
        d = (logp - old).detach()
        harmful = ((adv > 0) & (d > 0)) | ((adv < 0) & (d < 0))
        harmful &= batch.mask
        d2 = d[harmful] ** 2
        lo, hi = 0.0, 100.0  # bisection for mean(min(d2, tau^2)) = budget
        if d2.mean() <= cfg.m2po_budget:
            return -adv * ratio
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if d2.clamp(max=mid * mid).mean() < cfg.m2po_budget else (lo, mid)
        tau = 0.5 * (lo + hi)
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(math.exp(-tau), math.exp(tau)))
    raise AssertionError(name)


def run_library(est, cfg, batch, logits):
    x = logits.clone().requires_grad_()
    loss, metrics = est.loss(x, batch, cfg)
    loss.backward()
    return loss.detach(), x.grad, metrics


def run_reference(cfg, batch, logits):
    x = logits.clone().double().requires_grad_()
    per = reference(cfg, batch, x)
    loss = per[batch.mask].mean()
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient_match_brute_force(case):
    cfg, est, batch, cur, _ = setup(case)
    loss, grad, metrics = run_library(est, cfg, batch, cur)
    ref_loss, ref_grad = run_reference(cfg, batch, cur)
    # float64, chunked vs dense evaluation of one formula: FP64_ESTIMATOR (~3e-13), 1e10 below a dropped term
    assert torch.allclose(loss, ref_loss, rtol=0, atol=FP64_ESTIMATOR), (float(loss), float(ref_loss))
    assert torch.allclose(grad, ref_grad, rtol=0, atol=FP64_ESTIMATOR), (grad - ref_grad).abs().max()
    assert grad.abs().sum() > 0
    assert grad[~batch.mask].abs().max() == 0  # padded positions get no gradient
    assert metrics["loss"] == float(loss)  # the metric is the loss tensor's value
    assert {"loss", "kl", "entropy"} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.parametrize("case", ["forward_kl_tail", "mc_rkl", "m2po", "gkd_renorm", "decoupled_ppo"])
def test_float32_and_bfloat16_logits(case):
    cfg, est, batch, cur, _ = setup(case)
    tokens = int(batch.mask.sum())
    # The library computes in float32 for both (bfloat16 logits are exact in float32) against float64 on the same
    # rounded logits: FP32_ESTIMATOR (~1.5e-4) on the loss, 70x below a dropped term; a gradient entry carries
    # 1 / tokens of the terms. The bfloat16 gradient is then rounded once to bfloat16: + EPS_BF16 / 2 relative.
    for dtype, grad_rtol in ((torch.float32, 0.0), (torch.bfloat16, EPS_BF16 / 2)):
        logits = cur.to(dtype)
        loss, grad, _ = run_library(est, cfg, batch, logits)
        assert grad.dtype == dtype
        ref_loss, ref_grad = run_reference(cfg, batch, logits.double())
        assert abs(float(loss) - float(ref_loss)) <= FP32_ESTIMATOR
        assert torch.allclose(grad.double(), ref_grad, rtol=grad_rtol, atol=FP32_ESTIMATOR / tokens)


def test_chunk_size_does_not_change_the_result():
    cfg, est, batch, cur, _ = setup("mc_rkl")
    results = [run_library(est, replace(cfg, chunk_tokens=c), batch, cur)[:2] for c in (1, 3, 1024)]
    for loss, grad in results[1:]:  # float64, the same rows reduced in other chunks
        assert torch.allclose(loss, results[0][0], rtol=0, atol=FP64_ESTIMATOR)
        assert torch.allclose(grad, results[0][1], rtol=0, atol=FP64_ESTIMATOR)


def test_entropy_metric_is_exact():
    cfg, est, batch, cur, _ = setup("forward_kl")
    _, _, metrics = run_library(est, cfg, batch, cur)
    lp = torch.log_softmax(cur, -1)
    ent = -(lp.exp() * lp).sum(-1)[batch.mask].mean()
    assert metrics["entropy"] == pytest.approx(float(ent), rel=0, abs=FP64_ESTIMATOR)  # float64, lse - E[x] form


def test_empty_batch_gives_zero_loss_with_a_graph():
    cfg, est, batch, cur, _ = setup("sampled_stale_is")
    batch.mask[:] = False
    x = cur.clone().requires_grad_()
    loss, metrics = est.loss(x, batch, cfg)
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad.abs().max() == 0 and metrics["loss"] == 0.0


# --- analytic truncation bias of the sparse estimators --------------------------------------------------

def exact_reverse_kl_grad(cur, teacher, mask):
    x = cur.clone().requires_grad_()
    lp, tl = torch.log_softmax(x, -1), torch.log_softmax(teacher, -1)
    per = (lp.exp() * (lp - tl)).sum(-1)
    per[mask].mean().backward()
    return x.grad


@pytest.mark.parametrize("case", ["sparse_rkl_teacher", "sparse_rkl_student"])
def test_sparse_reverse_kl_bias_is_the_analytic_truncation_term(case):
    """grad f_S - grad f = the closed-form truncation bias, f the exact reverse KL, f_S its sum over S."""
    cfg, est, batch, cur, teacher = setup(case)
    _, grad, _ = run_library(est, cfg, batch, cur)
    exact = exact_reverse_kl_grad(cur, teacher, batch.mask)
    pi = torch.softmax(cur, -1)
    ell = torch.log_softmax(cur, -1) - torch.log_softmax(teacher, -1)  # log pi - log p_T
    kl = (pi * ell).sum(-1, keepdim=True)
    ids = batch.teacher_topk_ids[..., : cfg.top_k] if cfg.sparse_support == "teacher" else batch.student_topk_ids
    in_s = torch.zeros_like(cur, dtype=torch.bool).scatter(-1, ids, True)
    s_term = torch.where(in_s, pi * (ell + 1), 0.0).sum(-1, keepdim=True)
    bias = pi * (torch.where(in_s, ell + 1, 0.0) - s_term - ell + kl)  # per position, before the token mean
    bias = torch.where(batch.mask.unsqueeze(-1), bias, 0.0) / batch.mask.sum()
    # The batch holds the teacher's logprobs l on S rounded to float32 (|dl| <= EPS32 / 2 |l|), which the float64
    # `exact` and `bias` do not see; the gradient is linear in them with coefficients pi_k (delta_jk - pi_j),
    # summing to <= 2 per token, then averaged over the tokens.
    t_lp = batch.teacher_topk_logprobs if cfg.sparse_support == "teacher" else batch.teacher_student_topk_logprobs
    atol = FP64_ESTIMATOR + EPS32 * float(t_lp.abs().max()) / int(batch.mask.sum())
    assert torch.allclose(grad - exact, bias, rtol=0, atol=atol)
    assert bias.norm() > 1e-3 * exact.norm()  # truncation is a real bias here, far above that atol


def test_forward_kl_topk_bias_is_the_analytic_missing_mass_term():
    """Top-k forward KL gradient = exact forward-KL gradient + (P_T - 1) pi + p_T 1[v not in K]."""
    cfg, est, batch, cur, teacher = setup("forward_kl")
    _, grad, _ = run_library(est, cfg, batch, cur)
    pi, pt = torch.softmax(cur, -1), torch.softmax(teacher, -1)
    in_k = torch.zeros_like(cur, dtype=torch.bool).scatter(-1, batch.teacher_topk_ids[..., : cfg.top_k], True)
    p_k = torch.where(in_k, pt, 0.0).sum(-1, keepdim=True)
    exact = pi - pt
    expect = exact + (p_k - 1) * pi + torch.where(in_k, 0.0, pt)
    expect = torch.where(batch.mask.unsqueeze(-1), expect, 0.0) / batch.mask.sum()
    # The batch holds the teacher's top-k logprobs l rounded to float32 (|dl| <= EPS32 / 2 |l|), so each
    # p = e^l moves by <= p |l| EPS32 / 2 <= EPS32 / (2e); a gradient entry sums K + 1 of them over the tokens.
    atol = (cfg.top_k + 1) * EPS32 / (2 * math.e) / int(batch.mask.sum())
    assert torch.allclose(grad, expect, rtol=0, atol=atol)


def test_gkd_plain_endpoints_are_forward_kl_and_sparse_reverse_kl():
    _, _, batch, cur, _ = setup("forward_kl")
    fkl = EstimatorConfig(name="forward_kl", top_k=5)
    srkl = EstimatorConfig(name="sparse_rkl", top_k=5)
    for beta, other in ((0.0, fkl), (1.0, srkl)):
        g = EstimatorConfig(name="gkd", top_k=5, gkd_beta=beta)
        a = run_library(build(g), g, batch, cur)
        b = run_library(build(other), other, batch, cur)
        # float64, two formulas for one quantity
        assert torch.allclose(a[0], b[0], rtol=0, atol=FP64_ESTIMATOR)
        assert torch.allclose(a[1], b[1], rtol=0, atol=FP64_ESTIMATOR)


def test_mc_with_one_sample_is_sampled_rkl_with_recompute():
    cfg, _, batch, cur, _ = setup("mc_rkl")
    sampled = EstimatorConfig(name="sampled_rkl", recompute=True)
    one = replace(cfg, mc_samples=2)
    batch.mc_ids[..., 1] = batch.mc_ids[..., 0]  # two copies of the response token = one sample
    batch.mc_old_logprobs[..., 1] = batch.mc_old_logprobs[..., 0]
    batch.teacher_mc_logprobs[..., 1] = batch.teacher_mc_logprobs[..., 0]
    a = run_library(build(one), one, batch, cur)
    b = run_library(build(sampled), sampled, batch, cur)
    # float64, two formulas for one quantity
    assert torch.allclose(a[0], b[0], rtol=0, atol=FP64_ESTIMATOR)
    assert torch.allclose(a[1], b[1], rtol=0, atol=FP64_ESTIMATOR)


def test_m2po_threshold_water_filling():
    d2 = torch.tensor([0.001, 0.002, 0.05, 0.3, 1.2], dtype=torch.float64)
    tau = m2po_threshold(d2, 0.01)
    # float64: a closed-form tau and a 5-term mean of values <= 1.2
    assert float(d2.clamp(max=tau * tau).mean()) == pytest.approx(0.01, rel=0, abs=FP64_ESTIMATOR)
    assert m2po_threshold(d2, 10.0) == math.inf
    assert m2po_threshold(d2[:0], 0.01) == math.inf


def test_decoupled_ppo_is_plain_is_when_prox_is_current_and_nothing_is_capped():
    """At the first mini-batch pi_prox = pi_theta: ratio 1 inside the clip, weight pi_theta / pi_old."""
    cfg, est, batch, cur, _ = setup("decoupled_ppo")
    cfg = replace(cfg, behave_cap=1e9)
    batch.prox_logprobs = torch.log_softmax(cur, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    sampled = EstimatorConfig(name="sampled_rkl")
    a, b = run_library(est, cfg, batch, cur), run_library(build(sampled), sampled, batch, cur)
    # float64, two formulas for one quantity
    assert torch.allclose(a[0], b[0], rtol=0, atol=FP64_ESTIMATOR)
    assert torch.allclose(a[1], b[1], rtol=0, atol=FP64_ESTIMATOR)


# --- requirements: exactly the fields each estimator reads ---------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_requirements_are_exactly_what_the_loss_reads(case):
    cfg, est, batch, cur, _ = setup(case)
    req = est.requirements(cfg)
    optional = {"teacher_topk_ids", "teacher_topk_logprobs", "mc_ids", "mc_old_logprobs", "teacher_mc_logprobs",
                "student_topk_ids", "prox_logprobs", "teacher_student_topk_logprobs"}
    for field in optional - req.batch_fields():
        assert getattr(batch, field) is None  # the loss below ran without it
    est.loss(cur.clone().requires_grad_(), batch, cfg)
    for field in req.batch_fields():
        broken = replace(batch, **{field: None})
        with pytest.raises(ValueError, match=field):
            est.loss(cur.clone().requires_grad_(), broken, cfg)


def test_requirements_per_estimator():
    def req(**kw):
        cfg = EstimatorConfig(**kw)
        return build(cfg).requirements(cfg)

    assert req(name="forward_kl", top_k=8) == Requirements(teacher_top_k=8)
    assert req(name="gkd", top_k=4) == Requirements(teacher_top_k=4)
    assert req(name="sparse_rkl", top_k=8) == Requirements(teacher_top_k=8)
    assert req(name="sparse_rkl", sparse_support="student", student_top_k=8) == Requirements(
        student_top_k=8, teacher_scores_student_topk=True)
    for name in ("sampled_rkl", "ppo_clip", "tis", "m2po"):
        assert req(name=name) == Requirements()
    assert req(name="decoupled_ppo") == Requirements(needs_prox=True)
    assert req(name="mc_rkl", mc_samples=16) == Requirements(mc_samples=16)


@pytest.mark.parametrize("kw, field", [
    (dict(name="mc_rkl", mc_samples=1), "mc_samples"),
    (dict(name="mc_rkl", mc_samples=0), "mc_samples"),
    (dict(name="forward_kl", top_k=0), "top_k"),
    (dict(name="forward_kl", renormalize=True, tail_bucket=True), "tail_bucket"),
    (dict(name="gkd", gkd_beta=1.5), "gkd_beta"),
    (dict(name="gkd", gkd_beta=1.0, renormalize=True), "renormalize"),
    (dict(name="sparse_rkl", sparse_support="both"), "sparse_support"),
    (dict(name="sparse_rkl", sparse_support="student", student_top_k=0), "student_top_k"),
    (dict(name="sparse_rkl", top_k=0), "top_k"),
    (dict(name="ppo_clip", clip_eps=0.0), "clip_eps"),
    (dict(name="ppo_clip", importance_ratio=False), "importance_ratio"),
    (dict(name="tis", tis_cap=0.0), "tis_cap"),
    (dict(name="decoupled_ppo", behave_cap=-1.0), "behave_cap"),
    (dict(name="decoupled_ppo", behave_cap_mode="drop"), "behave_cap_mode"),
    (dict(name="m2po", m2po_budget=0.0), "m2po_budget"),
    (dict(name="sampled_rkl", chunk_tokens=0), "chunk_tokens"),
])
def test_bad_knobs_get_clear_errors(kw, field):
    cfg = EstimatorConfig(**kw)
    with pytest.raises(ValueError, match=f"estimator.{field}"):
        build(cfg).requirements(cfg)


def test_unknown_estimator_lists_the_choices():
    with pytest.raises(ValueError, match="mc_rkl"):
        build(EstimatorConfig(name="nope"))


def test_cache_smaller_than_requested_is_an_error():
    cfg, est, batch, cur, _ = setup("forward_kl")
    with pytest.raises(ValueError, match="top_k"):
        est.loss(cur.clone().requires_grad_(), batch, replace(cfg, top_k=9))


# --- Hydra group options -------------------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "estimator"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_group_option_is_a_valid_estimator(path):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EstimatorConfig), OmegaConf.load(path)))
    est = build(cfg)
    req = est.requirements(cfg)
    assert isinstance(req, Requirements)


def test_group_options_cover_every_estimator():
    names = {OmegaConf.load(p).name for p in CONFIG_DIR.glob("*.yaml")}
    from asyncopd.estimators.registry import ESTIMATORS

    assert names == set(ESTIMATORS)
