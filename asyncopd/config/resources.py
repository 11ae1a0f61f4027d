"""Will this config run, and will it fit? Pure arithmetic behind `asyncopd validate` (no GPUs, no torch).

Shapes follow Hugging Face Llama / Qwen2 / Qwen3 checkpoints; sharding follows Megatron-LM (learner) and SGLang
(rollout / teacher engines). Estimates are per GPU, in bytes. Vocabulary padding (Megatron pads to a multiple of
128 * tp, SGLang to 64) is ignored: it is a few hundred rows, 0.6% of Llama-3's embedding at tp=8.
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


def check_layout(prefix: str, arch: Arch, tp: int, pp: int = 1) -> list[Problem]:
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
    return problems


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


def _layer_activations(arch: Arch, tp: int, micro_batch: int, seq_len: int, flash_attention: bool) -> float:
    """Bytes one layer saves for backward for one micro-batch (Korthikanti et al. 2022, Sec. 4, no sequence parallel).

    The paper counts, in 2-byte activations and 1-byte dropout masks: outside the TP region 10sbh (two norm inputs
    4sbh, QKV and MLP inputs 4sbh, two dropout masks 2sbh); inside it, per rank, Q and K for QK^T, V, and the
    attention output that feeds the output projection, then the MLP's hidden activations, plus 5as^2b for softmax
    output, its dropout mask and dropout output. With GQA and head_dim d, Q and the output are q = a*d wide and K, V
    are kv = g*d wide (one head, d, per rank when g < tp, as Megatron replicates); SwiGLU's fc1 output is 2I wide and
    its fc2 input I wide. Per layer: s*b*(10h + (4q + 4kv + 6I)/t) + 5as^2b/t. For q = kv = h and I = 8h/3 (the
    GeLU MLP's 16h) this is the paper's sbh(10 + 24/t + 5as/(ht)). flash_attention keeps no s^2 tensor, only the fp32
    softmax log-sum-exp, 4asb/t.
    """
    s, b, h, t, d = seq_len, micro_batch, arch.hidden_size, tp, arch.dim
    q, kv, ffn = arch.num_heads * d / t, max(arch.num_kv_heads / t, 1) * d, arch.intermediate_size / t
    attention = 4 * arch.num_heads * s * b / t if flash_attention else 5 * arch.num_heads * s * s * b / t
    return s * b * (10 * h + 4 * q + 4 * kv + 6 * ffn) + attention


def learner_memory(arch: Arch, *, tp: int, pp: int, dp: int, micro_batch: int, seq_len: int,
                   param_bytes: int = 2, grad_bytes: int = 4, distributed_optimizer: bool = True,
                   recompute: bool = False, flash_attention: bool = False) -> MemoryEstimate:
    """Per-GPU bytes of Megatron mixed-precision Adam training on the worst pipeline stage (first or last).

    Optimizer: Adam's two fp32 moments (8 bytes/param), an fp32 master copy when params are not fp32 (+4) and an
    fp32 main grad when grads are not (+4): the "6 + 12/d" of Megatron's docs/source/api-guide/dist_optimizer.md
    for bf16 params and fp32 grads; divided by dp with the distributed optimizer (params and grads are not).
    Parameters per rank: layers/pp layers sharded by tp (norms replicated, K/V split evenly over tp even when
    kv heads < tp), the embedding shard V*h/t on the first stage, final norm and output shard V*h/t on the last
    (a tied embedding is kept as a copy there when pp > 1). Activations: 1F1B holds pp micro-batches in flight on
    stage 0 (so pp * layers/pp = all layers' worth, as Korthikanti et al. note; assumes >= pp micro-batches) and one
    on the last stage, which adds its fp32 logits 4*s*b*V/t. recompute (full) keeps only each layer's input 2sbh,
    plus one layer's activations while it is recomputed.
    """
    h, v, nl = arch.hidden_size, arch.vocab_size, math.ceil(arch.num_layers / pp)
    layer_p = _layer_params(arch, tp, arch.num_kv_heads / tp)
    layer_a = _layer_activations(arch, tp, micro_batch, seq_len, flash_attention)
    kept = 2 * seq_len * micro_batch * h if recompute else layer_a
    working = layer_a if recompute else 0.0
    logits, shard = 4 * seq_len * micro_batch * v / tp, v * h / tp
    if pp == 1:
        stages = [(0, nl * layer_p + shard * (1 if arch.tie_embeddings else 2) + h, nl * kept + working + logits)]
    else:
        stages = [(0, nl * layer_p + shard, pp * nl * kept + working),
                  (pp - 1, nl * layer_p + shard + h, nl * kept + working + logits)]
    opt = 8 + (4 if param_bytes < 4 else 0) + (4 if grad_bytes < 4 else 0)
    shards = dp if distributed_optimizer else 1
    best = None
    for stage, p, act in stages:
        est = MemoryEstimate(
            "learner", p * param_bytes, p * grad_bytes, p * opt / shards, act, 0.0,
            f"worst stage {stage} of pp={pp}: P = {nl} layers x {layer_p:.0f} + embedding/output shards "
            f"= {p:.0f} params; params = P*{param_bytes}; grads = P*{grad_bytes}; optimizer = P*{opt}/{shards}; "
            f"activations = {pp if stage == 0 else 1} micro-batches x {nl} layers x "
            + ("2sbh + one recomputed layer" if recompute else "s*b*(10h + (4q + 4kv + 6I)/t)")
            + (" + 4asb/t" if flash_attention else " + 5as^2b/t") + (" + 4sbV/t logits" if stage == pp - 1 else ""))
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
