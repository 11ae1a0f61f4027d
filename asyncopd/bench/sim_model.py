"""The cost model behind `asyncopd simulate`: how long each role takes for one batch, from first principles on
GPUs (FLOPs, HBM bandwidth) or from measured seconds per sample. Pure arithmetic, no simulation state.

Both cost classes answer the same four questions the simulator asks (`Costs`), for sequences described by their
context length: a rollout engine decoding some sequences, the teacher scoring a batch, the learner training on it,
and one weight sync. `shared_cores > 0` says the roles share that many CPU cores (the embedded tier); 0 that each
role has devices of its own (the GPU cluster)."""

import math
import random
from collections import deque
from dataclasses import dataclass
from heapq import heappop, heappush
from statistics import NormalDist
from typing import Protocol

from asyncopd.config.resources import Arch, param_count


class Costs(Protocol):
    engines: int
    shared_cores: float

    def engine_seconds(self, seqs: list[tuple[int, int]]) -> float:
        """One engine decoding `seqs` = (context at the start, tokens to decode) in this round."""

    def teacher_seconds(self, contexts: list[int]) -> float:
        """Teacher-scoring a batch of samples of these total lengths (prompt + response)."""

    def learner_seconds(self, contexts: list[int]) -> float:
        """One learner step on a batch of samples of these total lengths."""

    def sync_seconds(self) -> float:
        """One weight sync, learner to every engine; the engines stand still meanwhile."""


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense (no 2:4 sparsity)
    hbm_gbps: float
    memory_gb: float


# NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16 1,979 TFLOPS "with sparsity" (989 dense), HBM3 3.35 TB/s,
# 80 GB. H200 datasheet, SXM column: the same Hopper compute, HBM3e 4.8 TB/s, 141 GB.
GPUS = {"h100": Gpu("H100 SXM 80GB", 989.0, 3350.0, 80.0), "h200": Gpu("H200 SXM 141GB", 989.0, 4800.0, 141.0)}


@dataclass(frozen=True)
class Transformer:
    """What the cost model needs of a model: parameters (read per decode step, synced), parameters a token
    passes through (MoE: the routed experts only), attention width and KV bytes per token."""

    params: float
    active_params: float
    layers: int
    attn_width: int  # num_heads * head_dim: causal attention costs 2 * layers * attn_width * ctx^2 FLOPs forward
    kv_bytes_per_token: int  # layers * 2 (k, v) * kv_heads * head_dim * 2 bytes (bf16)

    @classmethod
    def of(cls, arch: Arch, experts_per_token: int = 0) -> "Transformer":
        """From the shapes `asyncopd validate` uses (configs/model/*.yaml: each checkpoint's config.json)."""
        total = param_count(arch)
        idle = arch.num_experts - experts_per_token if arch.num_experts else 0
        active = total - arch.num_layers * 3 * arch.hidden_size * arch.moe_intermediate_size * idle
        return cls(float(total), float(active), arch.num_layers, arch.num_heads * arch.dim,
                   arch.num_layers * 2 * arch.num_kv_heads * arch.dim * 2)

    def forward_flops(self, ctx: int) -> float:
        """One forward over a sequence of `ctx` tokens: 2 FLOPs per active parameter per token, plus attention."""
        return 2 * self.active_params * ctx + 2 * self.layers * self.attn_width * ctx * ctx


# configs/model/qwen3_1p7b_from_30b.yaml (Qwen3-1.7B and Qwen3-30B-A3B-Instruct-2507 config.json); the MoE routes
# each token to 8 of its 128 experts (config.json num_experts_per_tok = 8): 30.5e9 parameters, 3.3e9 active.
QWEN3_1P7B = Transformer.of(Arch(num_layers=28, hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128,
                                 intermediate_size=6144, vocab_size=151936, tie_embeddings=True, qk_norm=True))
QWEN3_30B_A3B = Transformer.of(Arch(num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128,
                                    intermediate_size=6144, vocab_size=151936, qk_norm=True, num_experts=128,
                                    moe_intermediate_size=768), experts_per_token=8)


@dataclass(frozen=True)
class GpuCosts:
    """Stage costs on GPUs from FLOPs and bytes. Peaks are datasheet figures; every efficiency below is an
    assumption with its reasoning, not a measurement of this project's GPU tier: the first thing to replace with
    measured figures (or MeasuredCosts) once runs on GPUs exist."""

    student: Transformer
    teacher: Transformer
    teacher_gpus: int
    rollout_gpus: int  # one engine per GPU (tp = 1: a 1.7B student fits one GPU many times over)
    learner_gpus: int
    gpu: Gpu = GPUS["h100"]
    # Decode reads every weight and every live KV entry once per step. Well-tuned decode kernels reach 70-80% of
    # HBM bandwidth (FlashInfer / FlashAttention decode benchmarks); 0.7 leaves room for the scheduler's gaps.
    hbm_efficiency: float = 0.7
    # Compute floor of a decode step (matters only for very large running batches): GEMMs at small M.
    decode_mfu: float = 0.3
    # Prefill (rollout prompts, teacher scoring) is compute bound; dense prefill kernels reach ~50% MFU, a MoE's
    # routed experts (128 small GEMMs of width 768 per layer) less: 0.3 for the teacher, 0.45 for the student.
    prefill_mfu: float = 0.45
    teacher_mfu: float = 0.3
    # Megatron training of a 1.7B dense model at 16k tokens per micro-batch: 35-40% MFU is typical for small
    # models (Megatron-LM reports 40-52% for large ones, arXiv 2104.04473); full recomputation adds a forward.
    learner_mfu: float = 0.35
    recompute: bool = True  # configs/experiment/qwen3_1p7b_from_30b.yaml: learner.recompute = full
    pp: int = 1  # learner pipeline stages; the bubble (pp - 1) / (m + pp - 1) stretches each step
    micro_batch: int = 1  # the paper config's learner.micro_batch_size (one 16k-token sequence per micro-batch)
    # Weight sync: NCCL broadcast of bf16 weights over NVLink (nccl-tests reach ~350 GB/s bus bandwidth on H100
    # NVSwitch for GB-sized messages); SGLang's bucketed load into the model and the pause / flush / resume round
    # trips cost more: 100 GB/s effective plus 0.5 s per update.
    sync_gbps: float = 100.0
    sync_latency_s: float = 0.5
    # SGLang's default mem_fraction_static on an 80 GB GPU is ~0.88 (weights + KV pool); the KV pool bounds how many
    # sequences an engine runs at once. It admits by expected length, so the cap is pool / (prompt + mean length).
    kv_fraction: float = 0.88
    mean_context: float = 0.0  # prompt + mean response tokens, for that cap (0: no cap)

    shared_cores = 0.0  # each role on GPUs of its own

    @property
    def engines(self) -> int:
        return self.rollout_gpus

    @property
    def max_running(self) -> int:
        """Sequences one engine runs at once: its KV pool over a sequence's expected footprint."""
        if not self.mean_context:
            return 1 << 30
        pool = self.gpu.memory_gb * 1e9 * self.kv_fraction - 2 * self.student.params
        return max(1, int(pool / (self.mean_context * self.student.kv_bytes_per_token)))

    def _flops(self, mfu: float) -> float:
        return self.gpu.bf16_tflops * 1e12 * mfu

    def engine_seconds(self, seqs: list[tuple[int, int]]) -> float:
        """Prefill every sequence's context, then decode; continuous batching of at most `max_running` at once.

        A decode step costs max(weight read, compute of the running batch) + reading every running sequence's
        KV cache; between two finishes the running set is fixed and its contexts grow by one token a step, so
        the sum over those steps has a closed form (no per-step loop over 16k steps)."""
        bw = self.gpu.hbm_gbps * 1e9 * self.hbm_efficiency
        weights = 2 * self.student.params / bw
        per_seq = 2 * self.student.active_params / self._flops(self.decode_mfu)
        kv = self.student.kv_bytes_per_token / bw
        seconds = sum(self.student.forward_flops(ctx) for ctx, _ in seqs) / self._flops(self.prefill_mfu)
        pending, running = deque(seqs), []  # running: (step it ends, context minus the step it started)
        t = offsets = 0
        while pending or running:
            while pending and len(running) < self.max_running:
                ctx, n = pending.popleft()
                if n > 0:
                    heappush(running, (t + n, ctx - t))
                    offsets += ctx - t
            if not running:
                break
            end = running[0][0]
            a, dt = len(running), end - t
            # sum over steps u in [t, end) of: max(weights, a * per_seq) + kv * sum_i (offset_i + u)
            seconds += dt * max(weights, a * per_seq) + kv * (offsets * dt + a * (t + end - 1) * dt / 2)
            t = end
            while running and running[0][0] == t:
                offsets -= heappop(running)[1]
        return seconds

    def teacher_seconds(self, contexts: list[int]) -> float:
        """Prefill-only scoring of every position, spread over the teacher's replicas (one GPU each)."""
        flops = sum(self.teacher.forward_flops(c) for c in contexts)
        return flops / (self.teacher_gpus * self._flops(self.teacher_mfu))

    def learner_seconds(self, contexts: list[int]) -> float:
        """Forward + backward (3 forwards' FLOPs, 4 with full recomputation) over dp x pp GPUs, with the bubble."""
        passes = 4 if self.recompute else 3
        flops = passes * sum(self.student.forward_flops(c) for c in contexts)
        dp = max(1, self.learner_gpus // self.pp)
        m = max(1, math.ceil(len(contexts) / (dp * self.micro_batch)))  # micro-batches per pipeline
        stretch = (m + self.pp - 1) / m  # = 1 / (1 - bubble), bubble = (pp - 1) / (m + pp - 1)
        return flops / (dp * self.pp * self._flops(self.learner_mfu)) * stretch

    def sync_seconds(self) -> float:
        return 2 * self.student.params / (self.sync_gbps * 1e9) + self.sync_latency_s


@dataclass(frozen=True)
class MeasuredCosts:
    """Stage costs given directly, in seconds per sample (what `--calibrate` fits from a measured sync run).

    `shared_cores > 0`: the roles run on that many shared CPU cores, one thread each (the embedded tier's
    engine, teacher and learner each use one torch thread); concurrently busy roles split the cores evenly."""

    rollout_s_per_sample: float
    teacher_s_per_sample: float
    learner_s_per_sample: float
    sync_s: float = 0.0  # per update; the embedded bench's busy learner time already includes its sync
    shared_cores: float = 0.0
    engines: int = 1

    def engine_seconds(self, seqs: list[tuple[int, int]]) -> float:
        return self.rollout_s_per_sample * len(seqs)

    def teacher_seconds(self, contexts: list[int]) -> float:
        return self.teacher_s_per_sample * len(contexts)

    def learner_seconds(self, contexts: list[int]) -> float:
        return self.learner_s_per_sample * len(contexts)

    def sync_seconds(self) -> float:
        return self.sync_s


@dataclass(frozen=True)
class Lengths:
    """Response lengths: lognormal (median, sigma) capped at max_new_tokens; sigma = 0 gives every sample the
    median. Reasoning traces are long-tailed: a batch's longest sample runs to the cap while most stop well
    before it (the premise of partial rollouts in Kimi k1.5, arXiv 2501.12599, and of AReaL, arXiv 2505.24298)."""

    prompt_tokens: int = 512
    median_tokens: int = 4096
    sigma: float = 0.8
    max_new_tokens: int = 16384

    def draw(self, rng: random.Random) -> int:
        if self.sigma == 0:
            return min(self.median_tokens, self.max_new_tokens)
        return max(1, min(self.max_new_tokens, round(rng.lognormvariate(math.log(self.median_tokens), self.sigma))))

    def quantile(self, q: float) -> int:
        """The length below which a share q of responses end (the cap clips the upper tail)."""
        z = NormalDist().inv_cdf(q) if 0 < q < 1 else 0.0
        return max(1, min(self.max_new_tokens, round(self.median_tokens * math.exp(self.sigma * z))))

    def mean(self, draws: int = 20000, seed: int = 0) -> float:
        """Mean response length (of the capped distribution, by sampling)."""
        rng = random.Random(seed)
        return sum(self.draw(rng) for _ in range(draws)) / draws
