"""The prepared GPU check: a few megatron learner steps on CUDA in bf16 (and FP8 when Transformer Engine is there).

Run it on a lent GPU machine from the repository root (`python .ci/gpu_check.py`, ~2 minutes); never in CI. The
device image has torch but neither megatron-core nor Transformer Engine: carry a megatron-core 0.16.1 wheel (and
psutil) and `pip install --no-deps` it first. It prints one JSON line per check and exits 1 if any check that
could run failed; a check whose requirement is missing reports `skipped` with the reason.

Checks: the megatron learner at TP=1 on cuda:0 (NCCL, megatron's CUDA paths, no CPU patch) runs 3 forward_kl
steps on a random 4-layer Qwen2 (1) in bf16 with fp32 main weights and (2) with FP8 GEMMs (learner.fp8=true,
delayed scaling): finite losses, seconds and peak CUDA memory are reported.
"""

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _report(name: str, status: str, **extra) -> bool:
    print(json.dumps({"check": name, "status": status, **extra}), flush=True)
    return status != "failed"


def main() -> int:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        _report("cuda", "failed", why="no CUDA device")
        return 1
    _report("cuda", "ok", device=torch.cuda.get_device_name(0), torch=torch.__version__)
    if importlib.util.find_spec("megatron.core") is None:
        _report("megatron", "skipped", why="megatron-core not installed: pip install --no-deps megatron-core==0.16.1")
        return 0
    import argparse

    from asyncopd.bench.learner_bench import synthetic_batch
    from asyncopd.config.schema import Config, EstimatorConfig, LearnerConfig, ModelSpec
    from asyncopd.learner.backends import build_trainer
    from asyncopd.model.build import build_model

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSpec(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=704)
        build_model(spec, 4096, seed=0).save_pretrained(tmp)
        args = argparse.Namespace(batch=8, prompt=32, response=64, vocab=4096)
        for name, knobs, needs in (("bf16", {}, None), ("fp8", {"fp8": True}, "transformer_engine")):
            if needs and importlib.util.find_spec(needs) is None:
                ok &= _report(name, "skipped", why=f"{needs} not installed")
                continue
            try:
                cfg = Config(learner=LearnerConfig(backend="megatron", precision="bf16", micro_batch_size=4,
                                                   gpus_per_rank=1, lr=1e-4, **knobs),
                             estimator=EstimatorConfig(name="forward_kl", top_k=8))
                cfg.pipeline.max_staleness = 100
                trainer = build_trainer(cfg, tmp)
                t0 = time.perf_counter()
                losses = [trainer.train_step(synthetic_batch(args, seed=s)).metrics["loss"] for s in range(3)]
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() / 2**20
                trainer.close()
                good = all(x == x and abs(x) < 1e4 for x in losses)  # finite
                ok &= _report(name, "ok" if good else "failed", losses=losses, seconds=seconds, peak_mib=peak)
            except Exception:  # a check reports, the next one still runs
                ok &= _report(name, "failed", error=traceback.format_exc()[-2000:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
