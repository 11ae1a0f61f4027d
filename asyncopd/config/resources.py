"""Will this config run, and will it fit? Pure arithmetic behind `asyncopd validate` (no GPUs, no torch).

Shapes follow Hugging Face Llama / Qwen2 / Qwen3 checkpoints; sharding follows Megatron-LM (learner) and SGLang
(rollout / teacher engines). Estimates are per GPU, in bytes. Vocabulary padding (Megatron pads to a multiple of
learner.vocab_divisible_by * tp, SGLang to 64) is left out of the byte counts: it is a few hundred rows, 0.6% of
Llama-3's embedding at tp=8 (a TP rank may hold padding only: the learner masks it).
"""

import math
from dataclasses import dataclass

from asyncopd.core.errors import Problem


@dataclass(frozen=True)
class Arch:
    """Decoder-only transformer shape (Llama / Qwen2 / Qwen3 families, Hugging Face conventions)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0 = hidden_size // num_heads
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has q/k/v bias; Llama and Qwen3 do not
    qk_norm: bool = False  # Qwen3 has per-head RMSNorm on q and k (weights of size head_dim each)
    num_experts: int = 0  # mixture of experts (Qwen3-MoE): every layer's MLP is num_experts SwiGLU experts
    moe_intermediate_size: int = 0  # one expert's width (the MoE layer has no dense MLP and no shared expert)

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


def _layer_params(arch: Arch, tp: int, kv_heads_per_rank: float) -> float:
    """One decoder layer's parameters on one TP rank: q/o, k/v and the SwiGLU MLP are sharded, norms replicated."""
    h, d = arch.hidden_size, arch.dim
    q, kv = arch.num_heads * d / tp, kv_heads_per_rank * d
    if arch.num_experts:  # experts sharded over tp (SGLang's TP MoE); the router h x E is replicated
        mlp = 3 * h * arch.moe_intermediate_size * arch.num_experts / tp + h * arch.num_experts
    else:
        mlp = 3 * h * arch.intermediate_size / tp  # gate, up, down
    sharded = 2 * h * q + 2 * h * kv + mlp  # q,o + k,v + MLP
    bias = (q + 2 * kv) if arch.qkv_bias else 0
    return sharded + bias + 2 * h + (2 * d if arch.qk_norm else 0)  # + input/post-attention norms (+ q/k norms)


def param_count(arch: Arch) -> int:
    """Exact count of Llama / Qwen2 / Qwen3 / Qwen3-MoE ForCausalLM (a tied lm_head counts once)."""
    embed = arch.vocab_size * arch.hidden_size
    total = arch.num_layers * _layer_params(arch, 1, arch.num_kv_heads) + arch.hidden_size  # + final norm
    return round(total + embed * (1 if arch.tie_embeddings else 2))


def _tp_ok(arch: Arch, tp: int) -> bool:
    kv = arch.num_kv_heads
    return (arch.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)
            and arch.intermediate_size % tp == 0)


def check_layout(prefix: str, arch: Arch, tp: int, pp: int = 1, virtual_pp: int = 1) -> list[Problem]:
    """Parallel layouts Megatron-LM and SGLang refuse at start-up, found before any GPU is asked for.

    Read in megatron-core 0.16.1 (the version pyproject pins) and SGLang's main branch. tp (same rule in both):
    - num_heads % tp == 0: Megatron megatron/core/transformer/transformer_config.py (TransformerConfig.__post_init__,
      "num_attention_heads must be a multiple of tensor_model_parallel_size"); SGLang
      python/sglang/srt/models/llama.py (LlamaAttention asserts total_num_heads % tp_size == 0).
    - num_kv_heads % tp == 0 or tp % num_kv_heads == 0: Megatron's same __post_init__ ("num_query_groups must be a
      multiple or divisor of tensor_model_parallel_size"; megatron/core/transformer/attention.py gives each rank
      one group when groups < tp); SGLang's LlamaAttention splits KV heads when kv >= tp, else asserts
      tp % kv == 0 and replicates them (python/sglang/srt/configs/model_config.py: max(1, kv // tp) per rank).
    - intermediate_size % tp == 0: column-parallel layers divide their output evenly (Megatron
      megatron/core/tensor_parallel/layers.py, SGLang python/sglang/srt/layers/linear.py, both `divide`).
    pp: num_layers % pp == 0, Megatron's default even split (megatron/core/transformer/transformer_block.py,
    get_num_layers_to_build). SGLang can split unevenly; we ask for an even split everywhere.
    virtual_pp (interleaved schedule): num_layers % (pp * virtual_pp) == 0, each stage's layers split evenly into
    virtual_pp model chunks (transformer_block.py, "num_layers_per_pipeline_rank ... should be divisible by
    vp_size").
    """
    problems = []
    field = f"{prefix}.tp"
    if tp < 1:
        problems.append(Problem(field, f"{field}={tp} must be >= 1; use {field}=1 for no tensor parallelism"))
    elif not _tp_ok(arch, tp):
        good = [t for t in range(1, arch.num_heads + 1) if _tp_ok(arch, t)]
        problems.append(Problem(field, (
            f"{field}={tp} does not fit num_heads={arch.num_heads}, num_kv_heads={arch.num_kv_heads}, "
            f"intermediate_size={arch.intermediate_size} (tp must divide the heads and the MLP width, and divide "
            f"or be a multiple of the KV heads): use {field} in {good}")))
    field = f"{prefix}.pp"
    if pp < 1:
        problems.append(Problem(field, f"{field}={pp} must be >= 1; use {field}=1 for no pipeline parallelism"))
    elif arch.num_layers % pp:
        good = [p for p in range(1, arch.num_layers + 1) if arch.num_layers % p == 0]
        problems.append(Problem(field, (
            f"{field}={pp} does not divide num_layers={arch.num_layers}: use {field} in {good}")))
    elif virtual_pp >= 1 and arch.num_layers % (pp * virtual_pp):
        field = f"{prefix}.virtual_pp"
        good = [v for v in range(1, arch.num_layers // pp + 1) if arch.num_layers % (pp * v) == 0]
        problems.append(Problem(field, (
            f"{field}={virtual_pp}: {prefix}.pp x {field} = {pp * virtual_pp} does not divide "
            f"num_layers={arch.num_layers} (each of the {pp} stages splits its layers into {virtual_pp} model "
            f"chunks): use {field} in {good}")))
    return problems


# learner.precision -> (parameter, gradient) bytes: megatron's bf16 keeps fp32 gradients (and fp32 main weights in
# the optimizer); fp32 trains fp32 throughout
PRECISION = {"fp32": (4, 4), "bf16": (2, 4)}


@dataclass(frozen=True)
class MemoryEstimate:
    role: str
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    kv_cache_bytes: float
    formula: str  # human-readable, states each term's formula

    @property
    def total_bytes(self) -> float:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
                + self.kv_cache_bytes)


RECOMPUTE = ("none", "full", "selective")  # learner.recompute: Megatron's activation recomputation granularities


def _layer_activations(arch: Arch, tp: int, micro_batch: int, seq_len: int, flash_attention: bool,
                       act_bytes: int = 2) -> tuple[float, float]:
    """Bytes one layer saves for backward for one micro-batch (Korthikanti et al. 2022, Sec. 4, no sequence parallel),
    as (outside core attention, core attention's own).

    The paper counts, in 2-byte activations and 1-byte dropout masks: outside the TP region 10sbh (two norm inputs
    4sbh, QKV and MLP inputs 4sbh, two dropout masks 2sbh); inside it, per rank, Q and K for QK^T, V, and the
    attention output that feeds the output projection, then the MLP's hidden activations, plus 5as^2b for softmax
    output, its dropout mask and dropout output. With GQA and head_dim d, Q and the output are q = a*d wide and K, V
    are kv = g*d wide (one head, d, per rank when g < tp, as Megatron replicates); SwiGLU's fc1 output is 2I wide and
    its fc2 input I wide. Per layer: s*b*(10h + (4q + 4kv + 6I)/t) + 5as^2b/t. For q = kv = h and I = 8h/3 (the
    GeLU MLP's 16h) this is the paper's sbh(10 + 24/t + 5as/(ht)). flash_attention keeps no s^2 tensor, only the fp32
    softmax log-sum-exp, 4asb/t. With e-byte activations (act_bytes: 2 in bf16, 4 in fp32; masks stay 1 byte, the
    log-sum-exp 4): s*b*((4e + 2)h + e(2q + 2kv + 3I)/t) + (2e + 1)as^2b/t.
    """
    s, b, h, t, d, e = seq_len, micro_batch, arch.hidden_size, tp, arch.dim, act_bytes
    q, kv, ffn = arch.num_heads * d / t, max(arch.num_kv_heads / t, 1) * d, arch.intermediate_size / t
    attention = 4 * arch.num_heads * s * b / t if flash_attention else (2 * e + 1) * arch.num_heads * s * s * b / t
    return s * b * ((4 * e + 2) * h + e * (2 * q + 2 * kv + 3 * ffn)), attention


def _in_flight(pp: int, virtual_pp: int, num_microbatches: int | None, stage: int) -> int:
    """Model chunks (of layers/(pp*virtual_pp) layers each) whose activations `stage` holds at once under Megatron's
    schedules (megatron/core/pipeline_parallel/schedules.py, get_pp_rank_microbatches): the warm-up forwards plus
    the one in 1F1B, capped at the step's total. Without interleaving, stage r warms up pp - r - 1 micro-batches;
    interleaved, 2(pp - r - 1) + (virtual_pp - 1) * pp chunks (micro-batch groups of pp), so stage 0 holds
    pp*virtual_pp + pp - 1 chunks = L(1 + (pp - 1)/(pp*virtual_pp)) layers: the factor of Korthikanti et al. 2022
    (Sec. 4.2.3) for the interleaved schedule of Narayanan et al. 2021 (Sec. 2.2), over 1F1B's L."""
    if pp == 1:
        return 1  # forward_backward_no_pipelining: one micro-batch at a time, gradients accumulated
    if virtual_pp == 1:
        warmup = pp - stage - 1
    else:
        warmup = 2 * (pp - stage - 1) + (virtual_pp - 1) * pp
    total = None if num_microbatches is None else num_microbatches * virtual_pp
    return warmup + 1 if total is None else min(warmup + 1, total)


def learner_memory(arch: Arch, *, tp: int, pp: int, dp: int, micro_batch: int, seq_len: int,
                   param_bytes: int = 2, grad_bytes: int = 4, distributed_optimizer: bool = True,
                   recompute: str = "none", flash_attention: bool = False, virtual_pp: int = 1,
                   num_microbatches: int | None = None) -> MemoryEstimate:
    """Per-GPU bytes of Megatron mixed-precision Adam training on the worst pipeline stage (first or last).

    Optimizer: Adam's two fp32 moments (8 bytes/param), an fp32 master copy when params are not fp32 (+4) and an
    fp32 main grad when grads are not (+4): the "6 + 12/d" of Megatron's docs/source/api-guide/dist_optimizer.md
    for bf16 params and fp32 grads (learner.precision=bf16: megatron accumulates gradients in an fp32 buffer), 4 + 4
    + 8 for fp32 (no separate main copy); divided by dp with the distributed optimizer (params and grads are not).
    Parameters per rank: layers/pp layers sharded by tp (norms replicated, K/V split evenly over tp even when
    kv heads < tp), the embedding shard V*h/t on the first stage, final norm and output shard V*h/t on the last
    (a tied embedding is kept as a copy there when pp > 1).

    Activations, in the parameters' dtype (param_bytes: 2 in bf16, 4 in fp32): each stage holds the chunks
    `_in_flight` counts (1F1B: pp micro-batches on stage 0, so pp * layers/pp = all layers' worth, as Korthikanti
    et al. note, when the step has >= pp micro-batches; the interleaved schedule, virtual_pp > 1, holds
    L(1 + (pp - 1)/(pp*virtual_pp)) layers' worth there), one micro-batch of `micro_batch` sequences each; the last
    stage adds its fp32 logits 4*s*b*V/t. recompute: "full" keeps only each layer's input e*s*b*h, plus one layer's
    activations while it is recomputed; "selective" (Megatron's core-attention recomputation) drops the attention
    term (5as^2b/t, or flash's 4asb/t) of every kept layer, plus one layer's while it is recomputed.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: use one of {RECOMPUTE}")
    h, v, nl, e = arch.hidden_size, arch.vocab_size, math.ceil(arch.num_layers / pp), param_bytes
    chunk = nl / virtual_pp  # layers of one model chunk
    layer_p = _layer_params(arch, tp, arch.num_kv_heads / tp)
    body, attention = _layer_activations(arch, tp, micro_batch, seq_len, flash_attention, e)
    kept, working = {"none": (body + attention, 0.0), "selective": (body, attention),
                     "full": (e * seq_len * micro_batch * h, body + attention)}[recompute]
    logits, shard = 4 * seq_len * micro_batch * v / tp, v * h / tp
    if pp == 1:
        stages = [(0, nl * layer_p + shard * (1 if arch.tie_embeddings else 2) + h)]
    else:
        stages = [(0, nl * layer_p + shard), (pp - 1, nl * layer_p + shard + h)]
    opt = 8 + (4 if param_bytes < 4 else 0) + (4 if grad_bytes < 4 else 0)
    shards = dp if distributed_optimizer else 1
    per_layer = {"none": f"s*b*({4 * e + 2}h + ({2 * e}q + {2 * e}kv + {3 * e}I)/t)"
                         + (" + 4asb/t" if flash_attention else f" + {2 * e + 1}as^2b/t"),
                 "selective": f"s*b*({4 * e + 2}h + ({2 * e}q + {2 * e}kv + {3 * e}I)/t) + one layer's attention "
                              "recomputed",
                 "full": f"{e}sbh + one recomputed layer"}[recompute]
    best = None
    for stage, p in stages:
        chunks = _in_flight(pp, virtual_pp, num_microbatches, stage)
        last = stage == pp - 1
        act = chunks * chunk * kept + working + (logits if last else 0.0)
        est = MemoryEstimate(
            "learner", p * param_bytes, p * grad_bytes, p * opt / shards, act, 0.0,
            f"worst stage {stage} of pp={pp}: P = {nl} layers x {layer_p:.0f} + embedding/output shards "
            f"= {p:.0f} params; params = P*{param_bytes}; grads = P*{grad_bytes}; optimizer = P*{opt}/{shards}; "
            f"activations ({e} B) = {chunks} {'micro-batch chunk' if virtual_pp > 1 else 'micro-batch'}(s) in "
            f"flight x {chunk:g} layers x {per_layer}"
            + (" + 4sbV/t logits" if last else "") + f", b={micro_batch} s={seq_len}")
        if best is None or est.total_bytes > best.total_bytes:
            best = est
    return best


def engine_memory(arch: Arch, *, tp: int, kv_tokens: int, param_bytes: int = 2, kv_bytes: int = 2,
                  role: str = "rollout") -> MemoryEstimate:
    """Per-GPU bytes of an SGLang-style inference server: weights + a KV pool of kv_tokens tokens.

    SGLang holds max(1, kv // tp) KV heads per rank (python/sglang/srt/configs/model_config.py get_num_kv_heads):
    split when kv >= tp, else each rank keeps one replicated head, in both the k/v weights and the KV cache.
    Activations, CUDA graphs and the allocator's slack are not counted (SGLang leaves them 1 - mem_fraction_static).
    """
    h, d, kvh = arch.hidden_size, arch.dim, max(1, arch.num_kv_heads // tp)
    p = arch.num_layers * _layer_params(arch, tp, kvh) + h + arch.vocab_size * h / tp * (
        1 if arch.tie_embeddings else 2)
    kv_cache = kv_tokens * arch.num_layers * 2 * kvh * d * kv_bytes
    return MemoryEstimate(role, p * param_bytes, 0.0, 0.0, 0.0, kv_cache, (
        f"params = {p:.0f} per rank x {param_bytes} B (layers, embedding and lm_head sharded by tp={tp}, "
        f"{kvh} KV head(s) per rank); kv_cache = kv_tokens x layers x 2 (k, v) x {kvh} heads x {d} x {kv_bytes} B"))


def format_bytes(n: float) -> str:
    """1.23 GiB: binary units, as nvidia-smi and torch.cuda report memory."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
