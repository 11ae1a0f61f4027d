"""Vocabulary-parallel log-softmax, top-k gather and every estimator on 2 real gloo ranks vs the unsharded result.

torch.multiprocessing spawns 2 processes that form a real torch.distributed gloo group on loopback;
each holds its slice of the vocabulary (an uneven split, 12 + 11 of 23 ids, as Megatron's last rank
may hold fewer) and checks values and gradients against the same computation on the full logits.
"""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asyncopd.config.schema import EstimatorConfig
from asyncopd.estimators.registry import build
from asyncopd.estimators.synthetic import draw_batch
from asyncopd.estimators.vocab_parallel import (
    VocabShard,
    vocab_parallel_gather,
    vocab_parallel_log_softmax,
    vocab_parallel_topk,
)
from tests._tolerances import FP64_ESTIMATOR
from tests.conftest import TEST_THREADS

B, T, V, WORLD = 2, 5, 23, 2

CASES = [
    dict(name="forward_kl", top_k=5),
    dict(name="forward_kl", top_k=5, renormalize=True),
    dict(name="forward_kl", top_k=5, tail_bucket=True),
    dict(name="sparse_rkl", top_k=5),
    dict(name="sparse_rkl", sparse_support="student", student_top_k=4),
    dict(name="sampled_rkl"),
    dict(name="sampled_rkl", recompute=True, importance_ratio=False),
    dict(name="mc_rkl", mc_samples=6),
    dict(name="ppo_clip"),
    dict(name="tis", tis_cap=1.2),
    dict(name="decoupled_ppo", behave_cap=1.5),
    dict(name="m2po"),
    dict(name="gkd", top_k=5, gkd_beta=0.4, tail_bucket=True),
    dict(name="gkd", top_k=5, gkd_beta=0.6, renormalize=True),
]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    old = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    cur = old + 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    return g, teacher, old, cur, mask


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float64, sharded (all-reduced partial max and sums) vs unsharded evaluation of one formula."""
    torch.testing.assert_close(got, want, rtol=0, atol=FP64_ESTIMATOR)


def _check_primitives(shard: VocabShard, cur: torch.Tensor, report: dict) -> None:
    sl = slice(shard.start, shard.start + shard.size)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, T, 4), generator=g)
    weights = torch.randn(B, T, V, generator=g, dtype=torch.float64)

    # log-softmax: values of the shard, and the gradient of a loss over the full vocabulary
    full = cur.clone().requires_grad_()
    ref = torch.log_softmax(full, -1)
    (ref * weights).sum().backward()
    part = cur[..., sl].clone().requires_grad_()
    out = vocab_parallel_log_softmax(part, shard)
    (out * weights[..., sl]).sum().backward()  # each rank's share of the same loss
    _close(out, ref[..., sl].detach())
    _close(part.grad, full.grad[..., sl])

    # top-k gather of the log-softmax at global ids (replicated values, gradient on the owner)
    full = cur.clone().requires_grad_()
    ref = torch.log_softmax(full, -1).gather(-1, ids)
    (ref ** 2).sum().backward()
    part = cur[..., sl].clone().requires_grad_()
    got = vocab_parallel_gather(vocab_parallel_log_softmax(part, shard), ids, shard)
    (got ** 2).sum().backward()
    _close(got, ref.detach())
    _close(part.grad, full.grad[..., sl])

    # the teacher's / student's top-k over a sharded vocabulary
    vals, top = vocab_parallel_topk(torch.log_softmax(cur, -1)[..., sl], 6, shard)
    ref_vals, ref_top = torch.topk(torch.log_softmax(cur, -1), 6, dim=-1)
    assert torch.equal(vals, ref_vals) and torch.equal(top, ref_top)  # the same entries, copied: exact
    report["primitives"] = True


def _check_estimators(shard: VocabShard, report: dict) -> None:
    sl = slice(shard.start, shard.start + shard.size)
    for i, kw in enumerate(CASES):
        g, teacher, old, cur, mask = _data(seed=i)
        cfg = EstimatorConfig(chunk_tokens=3, **kw)
        est = build(cfg)
        batch = draw_batch(teacher, old, est.requirements(cfg), mask=mask, prox_logits=cur, generator=g)
        full = cur.clone().requires_grad_()
        ref_loss, ref_metrics = est.loss(full, batch, cfg)
        ref_loss.backward()
        batch.vocab_shard = shard
        part = cur[..., sl].clone().requires_grad_()
        loss, metrics = est.loss(part, batch, cfg)
        loss.backward()
        _close(loss.detach(), ref_loss.detach())
        _close(part.grad, full.grad[..., sl])
        assert metrics.keys() == ref_metrics.keys()
        for key in metrics:
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=0, abs=FP64_ESTIMATOR), key
        report.setdefault("estimators", []).append(kw["name"])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(TEST_THREADS)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        shard = VocabShard.even(V)
        assert shard.size == (12 if rank == 0 else 11)
        report: dict = {"rank": rank, "start": shard.start, "size": shard.size}
        _, _, _, cur, _ = _data()
        _check_primitives(shard, cur, report)
        _check_estimators(shard, report)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_matches_unsharded_on_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["start"], r["size"]) for r in reports] == [(0, 12), (12, 11)]
    for r in reports:
        assert r["primitives"] and len(r["estimators"]) == len(CASES)


def test_unsharded_topk_and_gather_fall_back_to_plain_ops():
    _, _, _, cur, _ = _data()
    vals, ids = vocab_parallel_topk(cur, 3, None)
    assert torch.equal(ids, torch.topk(cur, 3, dim=-1).indices)
    assert torch.equal(vocab_parallel_gather(cur, ids, None), vals)  # the same entries: exact
    _close(vocab_parallel_log_softmax(cur, None), torch.log_softmax(cur, -1))  # x - logsumexp(x) vs torch's
