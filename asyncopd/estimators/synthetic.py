"""An EstimatorBatch drawn from known full distributions, as the rollout engine and teacher would fill it.

Used by `asyncopd analyze-estimators`, `asyncopd bench memory` and the tests: the rollout-time
student pi_old samples the response token (and M i.i.d. Monte Carlo draws per position, column 0
being the response token) and records its top-k; the teacher returns its top-k, the logprob of the
response token, and the logprobs of the query ids (MC draws, student top-k).
"""

from __future__ import annotations

import torch

from asyncopd.core.types import EstimatorBatch
from asyncopd.estimators.base import Requirements


def _shared(x: torch.Tensor) -> torch.Tensor:
    """[1, T, V] when every batch row is the same distribution (an expanded view), else x itself."""
    return x[:1] if x.shape[0] > 1 and x.stride(0) == 0 else x


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax (computed in float64), once per distinct row, broadcast back to [B, T, V]."""
    return torch.log_softmax(_shared(logits).double(), dim=-1).float().expand(logits.shape)


def sample(logprobs: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, T, n] i.i.d. draws from each row of logprobs [B, T, V] (inverse CDF in float64)."""
    b, t, v = logprobs.shape
    base = _shared(logprobs)
    cdf = torch.cumsum(base.double().exp(), dim=-1)
    if base.shape[0] == 1 and b > 1:  # one distribution per position: draw all rows at once
        u = torch.rand(t, b * n, generator=generator, dtype=torch.float64) * cdf[0, :, -1:]
        ids = torch.searchsorted(cdf[0], u, right=True).reshape(t, b, n).permute(1, 0, 2)
    else:
        u = torch.rand(b, t, n, generator=generator, dtype=torch.float64) * cdf[..., -1:]
        ids = torch.searchsorted(cdf, u, right=True)
    return ids.clamp_(max=v - 1).contiguous()


@torch.no_grad()
def draw_batch(teacher_logits: torch.Tensor, old_logits: torch.Tensor, req: Requirements, *,
               mask: torch.Tensor | None = None, prox_logits: torch.Tensor | None = None,
               response_ids: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> EstimatorBatch:
    """A batch with exactly the fields `req` asks for, from teacher and rollout-time student logits [B, T, V].

    `prox_logits` (the learner's pre-update student) fills prox_logprobs when req.needs_prox
    (default: old_logits, i.e. no update since the rollout). Logits expanded along the batch
    dimension (one distribution per position, many replicates) are processed once per position.
    """
    b, t, v = old_logits.shape
    t_lp = _log_softmax(teacher_logits)
    o_lp = _log_softmax(old_logits)
    mask = torch.ones((b, t), dtype=torch.bool) if mask is None else mask.bool()
    if response_ids is None:
        draws = sample(o_lp, max(req.mc_samples, 1), generator)
    else:
        draws = response_ids.long().unsqueeze(-1)
        if req.mc_samples > 1:
            draws = torch.cat([draws, sample(o_lp, req.mc_samples - 1, generator)], dim=-1)
    y = draws[..., 0]

    def at(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.gather(lp, -1, ids)

    def topk(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        vals, ids = torch.topk(_shared(lp), min(k, v), dim=-1)
        return vals.expand(b, t, -1).contiguous(), ids.expand(b, t, -1).contiguous()

    batch = EstimatorBatch(mask=mask, response_ids=y, old_logprobs=at(o_lp, y.unsqueeze(-1)).squeeze(-1),
                           teacher_token_logprob=at(t_lp, y.unsqueeze(-1)).squeeze(-1))
    if req.teacher_top_k:
        batch.teacher_topk_logprobs, batch.teacher_topk_ids = topk(t_lp, req.teacher_top_k)
    if req.mc_samples:
        batch.mc_ids = draws
        batch.mc_old_logprobs = at(o_lp, draws)
        batch.teacher_mc_logprobs = at(t_lp, draws)
    if req.student_top_k:
        _, batch.student_topk_ids = topk(o_lp, req.student_top_k)
        if req.teacher_scores_student_topk:
            batch.teacher_student_topk_logprobs = at(t_lp, batch.student_topk_ids)
    if req.needs_prox:
        p_lp = o_lp if prox_logits is None else _log_softmax(prox_logits)
        batch.prox_logprobs = at(p_lp, y.unsqueeze(-1)).squeeze(-1)
    return batch
