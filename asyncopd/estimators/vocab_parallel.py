"""Vocabulary-parallel helpers: the output layer's vocabulary sharded across tensor-parallel ranks.

As Megatron shards its output layer, rank r holds the logits of the contiguous id range
[start, start + V_r). Every reduction over the vocabulary (max, sum of exponentials, a gathered
value) becomes a local reduction plus one all-reduce across the TP group. Ids stay global
everywhere; a rank only touches the ids it owns.

Gradient convention (as in Megatron's vocab-parallel cross entropy): a value that was all-reduced
in forward is replicated on every rank, and so is the loss built from it, so its incoming gradient
is the same on every rank and the backward of the all-reduce is the identity (no communication).
A sharded output (the log-softmax itself) needs one all-reduce in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, start + size) of a vocabulary of `vocab_size` ids, and its TP group."""

    start: int
    size: int
    vocab_size: int
    group: Any = None  # torch.distributed process group; None = the default group

    @classmethod
    def even(cls, vocab_size: int, group: Any = None) -> VocabShard:
        """Megatron's split: ceil(V / tp) ids per rank, the last rank takes what is left."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        per = -(-vocab_size // world)
        start = min(rank * per, vocab_size)
        return cls(start=start, size=min(per, vocab_size - start), vocab_size=vocab_size, group=group)

    @classmethod
    def partition(cls, per_partition: int, group: Any = None) -> VocabShard:
        """Megatron's padded layout: rank r holds ids [r * per_partition, (r + 1) * per_partition) of a
        vocabulary padded to tp * per_partition. Ids past the real vocabulary (megatron's padding, a
        checkpoint's rows past its tokenizer) are not part of the softmax: the caller sets their logits to
        -inf, which gives them no mass and no gradient, on a rank that holds nothing else too."""
        world = dist.get_world_size(group)
        return cls(start=dist.get_rank(group) * per_partition, size=per_partition,
                   vocab_size=world * per_partition, group=group)

    def local_index(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local ids with every id this rank does not own sent to the dummy column `size`, owned mask)."""
        local = ids - self.start
        owned = (local >= 0) & (local < self.size)
        return torch.where(owned, local, torch.full_like(local, self.size)), owned


def local_index(ids: torch.Tensor, shard: VocabShard | None, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`VocabShard.local_index`, or every id owned when the vocabulary is not sharded."""
    if shard is None:
        return ids, torch.ones_like(ids, dtype=torch.bool)
    return shard.local_index(ids)


def all_reduce_sum(t: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    if shard is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t


def all_reduce_max(t: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    if shard is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=shard.group)
    return t


def logsumexp(x: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """log sum_v exp(x_v) over the last dim of the whole (possibly sharded) vocabulary, no grad."""
    if shard is None:
        return torch.logsumexp(x, dim=-1)
    m = all_reduce_max(x.amax(dim=-1), shard)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = all_reduce_sum(torch.exp(x - m_safe.unsqueeze(-1)).sum(dim=-1), shard)
    return torch.log(s) + m_safe


def gather(x: torch.Tensor, ids: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """x[..., ids] for global ids (replicated result), no grad."""
    local, owned = local_index(ids, shard, x.shape[-1])
    vals = torch.gather(x, -1, local.clamp(max=x.shape[-1] - 1))
    if shard is None:
        return vals
    return all_reduce_sum(torch.where(owned, vals, torch.zeros_like(vals)), shard)


class _VocabParallelLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = xf - logsumexp(xf, shard).unsqueeze(-1)
        ctx.shard = shard
        ctx.save_for_backward(out)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (out,) = ctx.saved_tensors
        gf = g.to(out.dtype)
        total = all_reduce_sum(gf.sum(dim=-1, keepdim=True), ctx.shard)  # sum over the whole vocabulary
        return (gf - out.exp() * total).to(g.dtype), None


def vocab_parallel_log_softmax(logits_shard: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """log_softmax over the full vocabulary of a vocabulary-sharded logits tensor (differentiable).

    Materialises the full shard; the estimators use the chunked `logsoftmax.token_logprobs` instead.
    """
    return _VocabParallelLogSoftmax.apply(logits_shard, shard)


class _VocabParallelGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
        local, owned = local_index(ids, shard, x.shape[-1])
        ctx.save_for_backward(local, owned)
        ctx.shape = x.shape
        return gather(x, ids, shard)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        local, owned = ctx.saved_tensors
        shape = ctx.shape
        grad = torch.zeros((*shape[:-1], shape[-1] + 1), dtype=g.dtype, device=g.device)
        grad.scatter_add_(-1, local, torch.where(owned, g, torch.zeros_like(g)))
        return grad[..., : shape[-1]], None, None


def vocab_parallel_gather(values_shard: torch.Tensor, ids: torch.Tensor,
                          shard: VocabShard | None) -> torch.Tensor:
    """values[..., ids] for global ids [..., K] from a vocabulary-sharded tensor (differentiable).

    The result is replicated on every rank; its gradient lands on the rank that owns each id.
    """
    return _VocabParallelGather.apply(values_shard, ids, shard)


@torch.no_grad()
def vocab_parallel_topk(values_shard: torch.Tensor, k: int,
                        shard: VocabShard | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, global ids) of the k largest entries over the full vocabulary, descending, replicated.

    Each rank takes its local top-k, the candidates are all-gathered (k per rank), and the global
    top-k is taken among them: exact, and only k * tp values per position cross the wire.
    """
    if shard is None:
        return torch.topk(values_shard, k, dim=-1)
    kk = min(k, values_shard.shape[-1])
    vals, idx = torch.topk(values_shard, kk, dim=-1)
    if kk < k:  # a small shard: pad with -inf so every rank sends the same shape
        pad = (*vals.shape[:-1], k - kk)
        vals = torch.cat([vals, vals.new_full(pad, float("-inf"))], dim=-1)
        idx = torch.cat([idx, idx.new_zeros(pad)], dim=-1)
    world = dist.get_world_size(shard.group)
    all_vals = [torch.empty_like(vals) for _ in range(world)]
    all_ids = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_vals, vals.contiguous(), group=shard.group)
    dist.all_gather(all_ids, (idx + shard.start).contiguous(), group=shard.group)
    cand_vals, cand_ids = torch.cat(all_vals, dim=-1), torch.cat(all_ids, dim=-1)
    top_vals, pos = torch.topk(cand_vals, k, dim=-1)
    return top_vals, torch.gather(cand_ids, -1, pos)
