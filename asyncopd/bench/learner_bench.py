"""`asyncopd bench learner`: the megatron learner at each TP x PP x DP layout: tokens/s, peak memory per rank and
the weight export's GB/s (every stage's tensors, TP-gathered and streamed to rank 0: the learner's side of a sync).

Each layout is `tp * pp * dp` real processes over gloo (NCCL on GPUs), a random Qwen2 of the given shape saved as
a Hugging Face checkpoint, and one synthetic forward_kl batch (random prompts and responses, a teacher top-k). A
layout runs one warm-up step, then `--repeats` timed steps and exports; every figure is rank 0's clock between
barriers. Peak memory is each rank's high-water mark (CUDA: max_memory_allocated; CPU: peak RSS, which includes
the interpreter and the imports, so compare layouts, not absolute values); `logits/rank` is what the last stage
holds of one micro-batch's logits: its vocabulary shard only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from asyncopd.bench.args import positive_int
from asyncopd.bench.report import box_plot, write_report
from asyncopd.bench.table import format_table

LAYOUTS = ("tp1", "tp2", "pp2", "dp2", "tp2pp2")
TABLE = [("layout", "layout", "s"), ("ranks", "ranks", "d"), ("tokens_per_s", "tokens/s (p50)", ".0f"),
         ("step_min_s", "step min s", ".3f"), ("step_max_s", "step max s", ".3f"),
         ("peak_mib", "peak MiB/rank (max)", ".0f"), ("logits_mib", "logits MiB/rank", ".2f"),
         ("export_gbps", "export GB/s (p50)", ".3f"), ("export_s", "export s (p50)", ".3f")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="comma-separated layouts: tpN, ppN, dpN and products such as tp2pp2 or tp2dp2")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed steps and exports per layout")
    p.add_argument("--hidden", type=positive_int, default=256, help="model hidden size")
    p.add_argument("--layers", type=positive_int, default=4, help="decoder layers (divisible by every pp)")
    p.add_argument("--vocab", type=positive_int, default=8192, help="vocabulary")
    p.add_argument("--batch", type=positive_int, default=8, help="samples per step")
    p.add_argument("--micro-batch", type=positive_int, default=2, help="learner.micro_batch_size")
    p.add_argument("--prompt", type=positive_int, default=32, help="prompt tokens per sample")
    p.add_argument("--response", type=positive_int, default=96, help="response tokens per sample")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="learner.precision")
    p.add_argument("--out", default="", help="directory for learner.json and learner.png")


def parse_layout(text: str) -> dict[str, int]:
    """"tp2pp2" -> {"tp": 2, "pp": 2, "dp": 1}."""
    import re

    parts = re.findall(r"(tp|pp|dp)(\d+)", text)
    if not parts or "".join(f"{k}{v}" for k, v in parts) != text:
        raise argparse.ArgumentTypeError(f"layout {text!r}: write it as tpN, ppN, dpN or a product like tp2pp2")
    return {"tp": 1, "pp": 1, "dp": 1, **{k: int(v) for k, v in parts}}


def synthetic_batch(args: argparse.Namespace, top_k: int = 8, seed: int = 0):
    """`args.batch` finished samples of random tokens with a random teacher's top-k, collated for the learner."""
    import numpy as np

    from asyncopd.core.types import Rollout, TeacherScores
    from asyncopd.learner.collate import collate

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(args.batch):
        T = args.response
        logits = rng.normal(size=(T, top_k)).astype(np.float32)
        top = np.sort(logits, axis=1)[:, ::-1] - np.log(np.exp(logits).sum(axis=1, keepdims=True) + 1.0)
        pairs.append((Rollout(prompt_ids=rng.integers(1, args.vocab, args.prompt).astype(np.int32),
                              response_ids=rng.integers(1, args.vocab, T).astype(np.int32),
                              logprobs=np.full(T, -1.0, np.float32), version_start=0, version_end=0,
                              finish_reason="stop"),
                      TeacherScores(topk_ids=rng.integers(1, args.vocab, (T, top_k)).astype(np.int32),
                                    topk_logprobs=np.ascontiguousarray(top), token_logprob=top[:, 0].copy())))
    return collate(pairs, pad_id=0)


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rank(rank: int, world: int, init_file: str, ckpt: str, layout: dict, args: argparse.Namespace,
          result: str) -> None:
    import torch
    import torch.distributed as dist

    from asyncopd.config.schema import Config, EstimatorConfig, LearnerConfig
    from asyncopd.learner.backends import build_trainer

    torch.set_num_threads(1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    cfg = Config(learner=LearnerConfig(backend="megatron", micro_batch_size=args.micro_batch,
                                       precision=args.precision, vocab_divisible_by=128, **layout),
                 estimator=EstimatorConfig(name="forward_kl", top_k=8))
    cfg.pipeline.max_staleness = 10**6
    trainer = build_trainer(cfg, ckpt)
    try:
        batch = synthetic_batch(args)
        trainer.train_step(batch)  # warm-up
        steps, exports, nbytes = [], [], 0
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step(batch)
            dist.barrier()
            steps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            nbytes = sum(t.nbytes for bucket in trainer.named_weights_for_rollout(64 << 20) for _, t in bucket)
            dist.barrier()
            exports.append(time.perf_counter() - t0)
        peaks = [None] * world
        dist.all_gather_object(peaks, _peak_mib())
        if rank == 0:
            model = trainer.model
            per_mb = min(args.micro_batch, args.batch // layout["dp"])
            logits = per_mb * (args.prompt + args.response) * model.layout.padded_vocab // layout["tp"] * 4
            Path(result).write_text(json.dumps({"steps_s": steps, "exports_s": exports, "export_bytes": nbytes,
                                                "peak_mib": max(peaks), "logits_mib": logits / 2**20}))
    finally:
        trainer.close()
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from asyncopd.config.schema import ModelSpec
    from asyncopd.model.build import build_model

    args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})  # picklable, printable
    layouts = [(name, parse_layout(name)) for name in args.layouts.split(",") if name]
    spec = ModelSpec(num_layers=args.layers, hidden_size=args.hidden, num_heads=max(2, args.hidden // 64),
                     num_kv_heads=max(2, args.hidden // 64), intermediate_size=args.hidden * 11 // 4,
                     tie_embeddings=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="asyncopd-learner-bench-", ignore_cleanup_errors=True) as tmp:
        ckpt = str(Path(tmp) / "student")
        model = build_model(spec, args.vocab, seed=0)
        model.save_pretrained(ckpt)
        n_params = sum(p.numel() for p in model.parameters())
        tokens = int(synthetic_batch(args).est.mask.sum())
        for name, layout in layouts:
            world = layout["tp"] * layout["pp"] * layout["dp"]
            result = Path(tmp) / f"{name}.json"
            torch.multiprocessing.spawn(_rank, nprocs=world, args=(world, str(Path(tmp) / f"init-{name}"), ckpt,
                                                                   layout, args, str(result)))
            r = json.loads(result.read_text())
            step, export = statistics.median(r["steps_s"]), statistics.median(r["exports_s"])
            rows.append({"layout": name, "ranks": world, "tokens_per_s": tokens / step, "step_p50_s": step,
                         "step_min_s": min(r["steps_s"]), "step_max_s": max(r["steps_s"]),
                         "peak_mib": r["peak_mib"], "logits_mib": r["logits_mib"], "export_s": export,
                         "export_gbps": r["export_bytes"] / export / 1e9, "samples_step_s": r["steps_s"],
                         "samples_export_s": r["exports_s"]})
    load, cpus = os.getloadavg()[0], os.cpu_count()
    device = "CUDA" if torch.cuda.is_available() else f"CPU ({cpus} cores, gloo)"
    print(f"Megatron learner by layout: {n_params / 1e6:.1f} M parameters ({args.layers} layers, hidden "
          f"{args.hidden}, vocab {args.vocab}), {args.precision}, {args.batch} samples x {args.prompt}+"
          f"{args.response} tokens ({tokens} trained), micro-batches of {args.micro_batch}; {args.repeats} repeats "
          f"after one warm-up on {device}; 1-min load average {load:.1f}")
    print(format_table(rows, TABLE))
    if args.out:
        saved = {"parameters": n_params, "tokens": tokens, "args": vars(args), "device": device,
                 "load_average_1min": load, "layouts": rows}
        write_report(args.out, "learner", saved, lambda path: plot(rows, path))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Step seconds per layout (box: quartiles, whiskers: min-max)."""
    box_plot([r["samples_step_s"] for r in rows], [r["layout"] for r in rows], "seconds per learner step (box: "
             "quartiles, whiskers: min-max)", "AsyncOPD: megatron learner by layout", path)
