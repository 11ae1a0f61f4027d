"""`asyncopd bench memory`: peak extra memory of each estimator's loss + backward, in logits tensors.

The logits [B, T, V] (requires_grad) and the batch exist before the measurement starts, as they
do in the learner; the figure is the peak of what the loss and its backward allocate on top,
divided by the size of one logits tensor. The gradient of the logits itself is one such tensor
and cannot be avoided, so a chunked estimator reads about 1 + (a few) x chunk_tokens / tokens; a
naive full-vocabulary float32 log-softmax with autograd (the `naive_full_log_softmax` row, the
same forward KL without chunking) reads several. On CPU the allocator's own record is read through
the PyTorch profiler (every allocation, kernel temporaries included); on CUDA, the CUDA allocator's
peak statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.estimators.registry import build
from asyncopd.estimators.synthetic import draw_batch

# (label, estimator knobs): every family and the variants that change what is computed per chunk
CASES: list[tuple[str, dict]] = [
    ("forward_kl", dict(name="forward_kl", top_k=8)),
    ("forward_kl tail", dict(name="forward_kl", top_k=8, tail_bucket=True)),
    ("sparse_rkl teacher", dict(name="sparse_rkl", top_k=8)),
    ("sparse_rkl student", dict(name="sparse_rkl", sparse_support="student", student_top_k=8)),
    ("sampled_rkl", dict(name="sampled_rkl")),
    ("mc_rkl M=16", dict(name="mc_rkl", mc_samples=16)),
    ("ppo_clip", dict(name="ppo_clip")),
    ("tis", dict(name="tis")),
    ("decoupled_ppo", dict(name="decoupled_ppo")),
    ("m2po", dict(name="m2po")),
    ("gkd tail", dict(name="gkd", top_k=8, tail_bucket=True)),
]
NAIVE = "naive_full_log_softmax"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8, help="sequences B")
    parser.add_argument("--seq", type=int, default=1024, help="response positions T per sequence")
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary size V")
    parser.add_argument("--chunk-tokens", type=int, default=EstimatorConfig.chunk_tokens,
                        help="estimator.chunk_tokens for the run (tokens per full-vocabulary chunk)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="logits dtype")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--estimators", default="", help="comma-separated labels to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--quick", action="store_true", help="small shapes (B=2, T=256, V=4096, chunk 64)")
    parser.add_argument("--out", default="", help="directory for estimator_memory.json")


class _PeakMeter:
    """Peak bytes allocated on top of what existed when the meter started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return False
        self.prof.__exit__(*exc)
        if exc[0] is None:
            self.peak = _cpu_peak(self.prof)
        return False


def _cpu_peak(prof) -> int:
    """Max of the allocator's running total over the profiled region (0 at its start)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    # the running total carries over from earlier profiled regions: rebase on the first event
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in mem) - base)


def _naive_loss(logits: torch.Tensor, batch, cfg: EstimatorConfig) -> torch.Tensor:
    """The same top-k forward KL written the obvious way: a full float32 log-softmax under autograd."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    s = torch.gather(lp, -1, batch.teacher_topk_ids[..., : cfg.top_k])
    t = batch.teacher_topk_logprobs[..., : cfg.top_k]
    per = (t.exp() * (t - s)).sum(-1)
    return per[batch.mask].mean()


def measure(label: str, knobs: dict, *, batch: int, seq: int, vocab: int, chunk_tokens: int,
            dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> dict:
    """One row: peak extra bytes of loss + backward, as a multiple of one logits tensor."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    cfg = replace(EstimatorConfig(**knobs), chunk_tokens=chunk_tokens)
    est = build(cfg)
    req = est.requirements(cfg)
    teacher = torch.randn(batch, seq, vocab, generator=g)
    student = torch.randn(batch, seq, vocab, generator=g)
    b = draw_batch(teacher, student, req, prox_logits=student, generator=g)
    del teacher
    for field in vars(b):
        value = getattr(b, field)
        if isinstance(value, torch.Tensor):
            setattr(b, field, value.to(dev))
    logits = student.to(device=dev, dtype=dtype).requires_grad_()
    del student
    logits_bytes = logits.numel() * logits.element_size()

    def step() -> None:
        loss = _naive_loss(logits, b, cfg) if label == NAIVE else est.loss(logits, b, cfg)[0]
        loss.backward()

    t0 = time.perf_counter()
    step()  # timed without the profiler
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    logits.grad = None
    with _PeakMeter(dev) as meter:
        step()
    tokens = batch * seq
    return {
        "estimator": label, "name": cfg.name, "batch": batch, "seq": seq, "vocab": vocab,
        "dtype": str(dtype).replace("torch.", ""), "device": device, "chunk_tokens": chunk_tokens,
        "chunk_fraction": min(chunk_tokens, tokens) / tokens, "logits_mb": logits_bytes / 2**20,
        "peak_extra_mb": meter.peak / 2**20, "peak_extra_x_logits": meter.peak / logits_bytes,
        "seconds": seconds,
    }


def run(args: argparse.Namespace) -> list[dict]:
    shape = dict(batch=args.batch, seq=args.seq, vocab=args.vocab, chunk_tokens=args.chunk_tokens)
    if args.quick:
        shape = dict(batch=2, seq=256, vocab=4096, chunk_tokens=64)
    wanted = [s.strip() for s in args.estimators.split(",") if s.strip()]
    cases = [*CASES, (NAIVE, dict(name="forward_kl", top_k=8))]
    if wanted:
        unknown = set(wanted) - {label for label, _ in cases}
        if unknown:
            raise SystemExit(f"--estimators: unknown {sorted(unknown)}; choose from {[c[0] for c in cases]}")
        cases = [c for c in cases if c[0] in wanted]
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = []
    tokens = shape["batch"] * shape["seq"]
    print(f"estimator memory: B={shape['batch']} T={shape['seq']} V={shape['vocab']} ({tokens} tokens), "
          f"{args.dtype} logits on {args.device}, chunk_tokens={shape['chunk_tokens']}")
    print(f"{'estimator':24s} {'peak extra MB':>14s} {'x logits':>9s} {'seconds':>8s}")
    for label, knobs in cases:
        row = measure(label, knobs, dtype=dtype, device=args.device, **shape)
        rows.append(row)
        print(f"{label:24s} {row['peak_extra_mb']:14.1f} {row['peak_extra_x_logits']:9.2f} {row['seconds']:8.2f}",
              flush=True)
    print(f"(one logits tensor = {rows[0]['logits_mb']:.1f} MB; the logits gradient alone is 1.00 x; "
          f"chunk = {rows[0]['chunk_fraction']:.3f} of the tokens)" if rows else "no estimator selected")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "estimator_memory.json").write_text(json.dumps(rows, indent=2))
        print(f"wrote {out / 'estimator_memory.json'}")
    return rows
