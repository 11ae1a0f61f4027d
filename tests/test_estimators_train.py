"""Each estimator trains: a small student that samples its own responses learns toward a fixed teacher.

The student is a per-position logit table [T, V] (a differentiable policy over a small vocabulary);
each step it samples B responses on-policy (torch.multinomial through draw_batch), the teacher
scores them (top-k, token and query logprobs), and a few Adam steps on the estimator's loss must
lower the exact full-vocabulary KL to the teacher.
"""

import pytest
import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.estimators.registry import build
from asyncopd.estimators.synthetic import draw_batch

T, V, B, STEPS = 6, 16, 64, 30

CONFIGS = {
    "forward_kl": dict(name="forward_kl", top_k=8),
    "forward_kl_renorm": dict(name="forward_kl", top_k=8, renormalize=True),
    "forward_kl_tail": dict(name="forward_kl", top_k=8, tail_bucket=True),
    "sparse_rkl_teacher": dict(name="sparse_rkl", top_k=8),
    "sparse_rkl_student": dict(name="sparse_rkl", sparse_support="student", student_top_k=8),
    "sampled_rkl": dict(name="sampled_rkl"),
    "sampled_rkl_recompute": dict(name="sampled_rkl", recompute=True),
    "mc_rkl": dict(name="mc_rkl", mc_samples=8),
    "ppo_clip": dict(name="ppo_clip"),
    "tis": dict(name="tis"),
    "decoupled_ppo": dict(name="decoupled_ppo"),
    "m2po": dict(name="m2po"),
    "gkd": dict(name="gkd", top_k=8, gkd_beta=0.5, tail_bucket=True),
}


def kls(table: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """(exact reverse KL, exact forward KL), averaged over positions."""
    lp, tl = torch.log_softmax(table, -1), torch.log_softmax(teacher, -1)
    rev = (lp.exp() * (lp - tl)).sum(-1).mean()
    fwd = (tl.exp() * (tl - lp)).sum(-1).mean()
    return float(rev), float(fwd)


def train(case: str, steps: int = STEPS, seed: int = 0, lag: int = 0):
    """Train from uniform; rollouts come from the student `lag` optimizer steps ago (0 = on-policy)."""
    g = torch.Generator().manual_seed(seed)
    teacher = 3.0 * torch.randn(T, V, generator=g)
    table = torch.zeros(T, V, requires_grad=True)  # uniform student
    cfg = EstimatorConfig(chunk_tokens=128, **CONFIGS[case])
    est = build(cfg)
    req = est.requirements(cfg)
    opt = torch.optim.Adam([table], lr=0.1)
    start = kls(table.detach(), teacher)
    history = [table.detach().clone()] * (lag + 1)
    for _ in range(steps):
        cur = table.detach().expand(B, T, V)
        old = history[0].expand(B, T, V)  # the rollout-time student
        batch = draw_batch(teacher.expand(B, T, V), old, req, prox_logits=cur, generator=g)
        loss, metrics = est.loss(table.expand(B, T, V), batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history = history[1:] + [table.detach().clone()]
    return start, kls(table.detach(), teacher), metrics


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_estimator_trains(case):
    (rev0, fwd0), (rev1, fwd1), metrics = train(case)
    assert all(v == v for v in metrics.values())  # no NaN after training
    if case == "sparse_rkl_teacher":
        # The known bias: on the teacher's top-k the truncated objective is minimised by
        # pi_theta = p_T / e there and the rest of the mass off the support, so the student learns
        # the teacher's shape on K (forward KL halves) while the exact reverse KL stalls near its
        # start (verl removed this loss as unstable). Pin both, so a change in behaviour shows.
        assert fwd1 < 0.6 * fwd0, (fwd0, fwd1)
        assert rev1 > 0.8 * rev0, (rev0, rev1)
        return
    assert rev1 < rev0 and fwd1 < fwd0, ((rev0, rev1), (fwd0, fwd1))
    if CONFIGS[case]["name"] in ("forward_kl", "gkd"):
        assert fwd1 < 0.35 * fwd0, (fwd0, fwd1)
    else:
        assert rev1 < 0.35 * rev0, (rev0, rev1)


STALE = ["sampled_rkl", "sampled_rkl_recompute", "mc_rkl", "ppo_clip", "tis", "decoupled_ppo", "m2po"]


@pytest.mark.parametrize("case", STALE)
def test_sampled_estimators_train_from_stale_rollouts(case):
    """Rollouts 3 optimizer steps old (pi_old != pi_theta): the importance-weighted estimators still train."""
    (rev0, _), (rev1, _), _ = train(case, lag=3)
    assert rev1 < 0.4 * rev0, (rev0, rev1)
