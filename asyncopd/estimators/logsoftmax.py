"""Chunked full-vocabulary log-softmax, reduced per token to the few numbers an estimator needs.

Every estimator needs, at each real response position, the student's log-probabilities of a few
ids (the sampled token, the teacher's top-k, the MC draws, a frozen student support) and sometimes
the log of the student's mass outside a set of ids (a tail bucket). `token_logprobs` computes them
from the raw logits [B, T, V] without ever holding more than one chunk of `chunk_tokens` positions
of full-vocabulary float32 values: forward reduces each chunk and keeps only per-token numbers;
backward recomputes each chunk's softmax and writes that chunk's gradient straight into the
logits gradient. So autograd keeps nothing of size [tokens, V] but the logits (the caller's) and
their gradient (unavoidable). It also returns the student's exact per-token entropy (no grad),
used as a metric.

With `shard` (asyncopd.estimators.vocab_parallel.VocabShard) the logits are this rank's vocabulary
slice; the per-token numbers are all-reduced and replicated, and backward needs no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncopd.estimators.vocab_parallel import VocabShard, all_reduce_max, all_reduce_sum, local_index


@dataclass
class TokenLogprobs:
    """Per real token n (row-major over the mask), all replicated across TP ranks."""

    logprobs: torch.Tensor  # [n, K] log pi_theta(ids), differentiable
    tail_logprob: torch.Tensor | None  # [n] log pi_theta(V minus tail_ids), differentiable
    entropy: torch.Tensor  # [n] exact entropy of pi_theta, no grad


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_softmax(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(x - lse) into a [c, V + 1] buffer whose last (dummy) column absorbs ids a rank does not own."""
    p = torch.empty((x.shape[0], x.shape[1] + 1), dtype=x.dtype, device=x.device)
    torch.sub(x, lse.unsqueeze(-1), out=p[:, :-1])  # in place: no third [c, V] temporary
    p[:, :-1].exp_()
    p[:, -1] = 0
    return p


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, ids, tail_ids, chunk, shard):
        flat = logits.reshape(-1, logits.shape[-1])
        n, k = ids.shape
        cdt = _compute_dtype(logits.dtype)
        lp = torch.empty((n, k), dtype=cdt, device=logits.device)
        lse_all = torch.empty(n, dtype=cdt, device=logits.device)
        ent = torch.empty(n, dtype=cdt, device=logits.device)
        tail_mass = torch.empty(n if tail_ids is not None else 0, dtype=cdt, device=logits.device)
        vocab = flat.shape[-1]
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            x = flat.index_select(0, rows[a:b]).to(cdt)  # the one [c, V] float chunk (a copy)
            x.clamp_(min=torch.finfo(cdt).min)  # -inf logits (masked ids): keep 0 * x finite in the entropy
            # softmax and its log-normaliser in one sweep: p = exp(x - max) / sum, lse = max + log sum
            top = all_reduce_max(x.amax(dim=-1), shard)
            p = _chunk_softmax(x, top)
            total = all_reduce_sum(p.sum(dim=-1), shard)  # the dummy column is 0
            p.div_(total.unsqueeze(-1))
            lse = top + torch.log(total)
            lse_all[a:b] = lse
            local, owned = local_index(ids[a:b], shard, vocab)
            g = torch.gather(x, 1, local.clamp(max=vocab - 1))
            g = torch.where(owned, g, torch.zeros_like(g))
            lp[a:b] = all_reduce_sum(g, shard) - lse.unsqueeze(-1)
            px = all_reduce_sum(torch.linalg.vecdot(p[:, :-1], x), shard)
            ent[a:b] = lse - px
            if tail_ids is not None:
                tl, _ = local_index(tail_ids[a:b], shard, vocab)
                p.scatter_(1, tl, 0.0)  # drop the set's own (owned) mass: a sum of what is left, no cancellation
                tail_mass[a:b] = all_reduce_sum(p[:, :-1].sum(dim=-1), shard)
            del x, p
        ctx.save_for_backward(logits, rows, ids, lse_all,
                              tail_ids if tail_ids is not None else ids.new_empty(0), tail_mass)
        ctx.has_tail, ctx.chunk, ctx.shard = tail_ids is not None, chunk, shard
        ctx.mark_non_differentiable(ent)
        tail = torch.log(tail_mass) if tail_ids is not None else None
        return lp, tail, ent

    @staticmethod
    def backward(ctx, g_lp, g_tail, _g_ent):
        logits, rows, ids, lse_all, tail_ids, tail_mass = ctx.saved_tensors
        shard, chunk = ctx.shard, ctx.chunk
        flat = logits.reshape(-1, logits.shape[-1])
        vocab = flat.shape[-1]
        cdt = lse_all.dtype
        grad = torch.zeros_like(flat)
        if g_lp is None:
            g_lp = torch.zeros(ids.shape, dtype=cdt, device=logits.device)
        g_lp = g_lp.to(cdt)
        use_tail = ctx.has_tail and g_tail is not None
        if use_tail:
            # d log T / dx_j = [j outside the set] p_j / T - p_j; an empty tail (T = 0) gets no gradient
            g_tail = g_tail.to(cdt)
            g_over_t = torch.where(tail_mass > 0, g_tail / tail_mass, torch.zeros_like(g_tail))
        for a in range(0, ids.shape[0], chunk):
            b = min(a + chunk, ids.shape[0])
            x = flat.index_select(0, rows[a:b]).to(cdt)
            p = _chunk_softmax(x, lse_all[a:b])
            del x
            coef = -g_lp[a:b].sum(dim=-1)  # d lp_k / dx_j = [j = id_k] - p_j
            if use_tail:
                coef = coef - g_tail[a:b]
                tl, _ = local_index(tail_ids[a:b], shard, vocab)
                p_set = torch.gather(p, 1, tl)
                p.mul_((coef + g_over_t[a:b]).unsqueeze(-1))
                p.scatter_(1, tl, p_set * coef.unsqueeze(-1))  # inside the set: no tail term
            else:
                p.mul_(coef.unsqueeze(-1))
            local, owned = local_index(ids[a:b], shard, vocab)
            p.scatter_add_(1, local, torch.where(owned, g_lp[a:b], torch.zeros_like(g_lp[a:b])))
            grad.index_copy_(0, rows[a:b], p[:, :-1].to(grad.dtype))
            del p
        return grad.view_as(logits), None, None, None, None, None


def real_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (row-major over [B, T]) of the real response positions."""
    return mask.reshape(-1).nonzero().squeeze(-1)


def token_logprobs(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                   tail_ids: torch.Tensor | None = None, *, chunk_tokens: int = 1024,
                   shard: VocabShard | None = None) -> TokenLogprobs:
    """Student log-probs at `ids` [n, K] for the flat positions `rows` [n] of `logits` [B, T, V(_shard)].

    `tail_ids` [n, Kt]: also return log of the student mass outside that id set (duplicates fine).
    Values are float32 (float64 for float64 logits); the gradient comes back in the logits' dtype.
    """
    if chunk_tokens < 1:
        raise ValueError(f"estimator.chunk_tokens={chunk_tokens}: must be >= 1")
    if ids.dim() != 2 or ids.shape[0] != rows.shape[0]:
        raise ValueError(f"ids must be [n, K] with n = {rows.shape[0]} real tokens, got {tuple(ids.shape)}")
    lp, tail, ent = _TokenLogprobs.apply(logits, rows, ids.long(), None if tail_ids is None else tail_ids.long(),
                                         int(chunk_tokens), shard)
    return TokenLogprobs(lp, tail, ent)
