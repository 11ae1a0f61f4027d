"""asyncopd.config.resources against the real thing: Hugging Face models' parameters, Megatron's own layout checks,
Megatron's documented optimizer bytes, and per-rank shards and saved tensors enumerated here from tensor shapes.

Every byte count here is an integer computed in float64 from integers far below 2**53, and every division is
exact for the layouts used, so byte counts are compared with ==.
"""

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from asyncopd.config.resources import (
    Arch,
    check_layout,
    engine_memory,
    format_bytes,
    learner_memory,
    param_count,
)

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
TINY = [  # (family, arch): GQA / MHA / MQA, tied and untied, head_dim != hidden // heads
    ("llama", Arch(2, 64, 8, 2, 96, 101)),
    ("llama", Arch(3, 48, 4, 4, 80, 97, tie_embeddings=True)),
    ("llama", Arch(2, 64, 4, 1, 96, 90, head_dim=24)),
    ("qwen2", Arch(2, 64, 8, 2, 96, 101, qkv_bias=True)),
    ("qwen2", Arch(4, 64, 8, 4, 128, 101, tie_embeddings=True, qkv_bias=True)),
    ("qwen3", Arch(2, 64, 8, 2, 96, 101, head_dim=32, qk_norm=True)),
    ("qwen3", Arch(4, 64, 4, 2, 96, 101, head_dim=40, tie_embeddings=True, qk_norm=True)),
]
LLAMA_70B = Arch(80, 8192, 64, 8, 28672, 128256)  # Llama-3.1 / 3.3-70B config.json
_models: dict = {}


def hf_model(family: str, arch: Arch) -> torch.nn.Module:
    assert arch.qkv_bias == (family == "qwen2") and arch.qk_norm == (family == "qwen3")  # what each family has
    if (family, arch) not in _models:
        config_cls, model_cls = FAMILIES[family]
        head_dim = {"head_dim": arch.dim} if family != "qwen2" or arch.head_dim else {}
        config = config_cls(num_hidden_layers=arch.num_layers, hidden_size=arch.hidden_size,
                            num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                            intermediate_size=arch.intermediate_size, vocab_size=arch.vocab_size,
                            tie_word_embeddings=arch.tie_embeddings, **head_dim)
        _models[family, arch] = model_cls(config)
    return _models[family, arch]


@pytest.mark.parametrize("family,arch", TINY)
def test_param_count_equals_hugging_face(family, arch):
    model = hf_model(family, arch)
    assert param_count(arch) == sum(p.numel() for p in model.parameters())


def test_param_count_published_sizes():
    # Hugging Face Hub safetensors totals: meta-llama/Llama-3.1-70B 70.55e9, Llama-3.1-405B 405.85e9; within 1%.
    assert param_count(LLAMA_70B) == pytest.approx(70.55e9, rel=0.01)
    assert param_count(Arch(126, 16384, 128, 8, 53248, 128256)) == pytest.approx(405.85e9, rel=0.01)
    # Qwen3-1.7B model card: 1.7B parameters, 1.4B non-embedding (both rounded to 0.1B); its embedding is tied,
    # so model.parameters() counts it once. The Hub's "2.03B params" counts the safetensors tensors, which store
    # lm_head.weight separately: that is the untied count, within 1%.
    qwen3 = Arch(28, 2048, 16, 8, 6144, 151936, head_dim=128, tie_embeddings=True, qk_norm=True)
    assert round(param_count(qwen3) / 1e8) == 17
    assert round((param_count(qwen3) - 151936 * 2048) / 1e8) == 14
    assert param_count(Arch(**{**qwen3.__dict__, "tie_embeddings": False})) == pytest.approx(2.03e9, rel=0.01)


def test_check_layout_fields_and_messages():
    heads64 = Arch(4, 512, 64, 8, 1024, 1000)
    (problem,) = check_layout("learner", heads64, tp=3)
    assert problem.field == "learner.tp" and "learner.tp=3" in problem.message and "num_heads=64" in problem.message
    assert "[1, 2, 4, 8, 16, 32, 64]" in problem.message  # the fix: the values that would work
    assert [p.field for p in check_layout("rollout", heads64, tp=3)] == ["rollout.tp"]
    assert check_layout("learner", heads64, tp=16) == []  # 8 KV heads replicated over 16 ranks
    assert [p.field for p in check_layout("teacher", heads64, tp=8, pp=3)] == ["teacher.pp"]
    assert [p.field for p in check_layout("learner", heads64, tp=0, pp=0)] == ["learner.tp", "learner.pp"]
    assert [p.field for p in check_layout("learner", Arch(4, 512, 48, 6, 1024, 1000), tp=4)] == ["learner.tp"]
    assert [p.field for p in check_layout("learner", Arch(4, 512, 64, 8, 1000, 1000), tp=16)] == ["learner.tp"]
    assert check_layout("learner", LLAMA_70B, tp=8, pp=4) == []
    # interleaving: each stage's layers split evenly into virtual_pp chunks
    assert check_layout("learner", LLAMA_70B, tp=8, pp=4, virtual_pp=5) == []
    (problem,) = check_layout("learner", LLAMA_70B, tp=8, pp=4, virtual_pp=3)
    assert problem.field == "learner.virtual_pp" and "[1, 2, 4, 5, 10, 20]" in problem.message
    assert [p.field for p in check_layout("learner", heads64, tp=8, pp=3, virtual_pp=3)] == ["learner.pp"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # megatron-core's deprecation notices
def test_check_layout_agrees_with_megatron():
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.transformer_config import TransformerConfig

    for heads, kv in [(64, 8), (48, 6), (12, 12), (32, 1), (28, 4), (40, 8)]:
        for tp in range(1, 17):
            arch = Arch(2, 4 * heads, heads, kv, 720720, 1000)  # 720720 = lcm(1..16): only heads can fail
            try:
                TransformerConfig(num_layers=2, hidden_size=4 * heads, num_attention_heads=heads,
                                  num_query_groups=kv, tensor_model_parallel_size=tp)
                megatron_ok = True
            except ValueError:
                megatron_ok = False
            assert (check_layout("learner", arch, tp) == []) == megatron_ok, (heads, kv, tp)


def sharded_params(family: str, arch: Arch, tp: int, pp: int, sglang: bool) -> list[float]:
    """Per-stage parameters of one TP rank, from the HF model's tensors: norms replicated, everything else split
    over tp, except that SGLang keeps max(1, kv // tp) whole KV heads per rank (replicated when kv < tp)."""
    per_stage, stages = arch.num_layers // pp, [0.0] * pp
    for name, p in hf_model(family, arch).named_parameters():  # a tied lm_head is listed once, as embed_tokens
        if "norm" in name:
            n = p.numel()
        elif sglang and re.search(r"\.[kv]_proj\.", name):
            n = p.numel() // arch.num_kv_heads * max(1, arch.num_kv_heads // tp)
        else:
            n = p.numel() / tp
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer:
            stages[int(layer[1]) // per_stage] += n
        elif "embed_tokens" in name:
            stages[0] += n
            if arch.tie_embeddings and pp > 1:
                stages[-1] += n  # Megatron keeps a copy of a shared embedding on the last stage
        else:  # lm_head, final norm
            stages[-1] += n
    return stages


def saved_tensors_per_layer(arch: Arch, tp: int, b: int, s: int, flash: bool, e: int = 2) -> tuple[int, int]:
    """The tensors one Megatron layer keeps for backward on one rank, listed (Korthikanti et al. 2022, Sec. 4.1), in
    e-byte activations (1-byte dropout masks, an fp32 log-sum-exp): (outside core attention, core attention's)."""
    h, d, a = arch.hidden_size, arch.dim, arch.num_heads // tp
    q, kv, f = a * d, max(1, arch.num_kv_heads // tp) * d, arch.intermediate_size // tp
    tensors = [s * b * h * e, s * b * h * e,  # input norm's input, QKV projection's input
               s * b * q * e, s * b * kv * e, s * b * kv * e,  # Q, K (for QK^T), V
               s * b * q * e, s * b * h,  # attention output (output projection's input), its dropout mask
               s * b * h * e, s * b * h * e,  # pre-MLP norm's input, fc1's input
               s * b * 2 * f * e, s * b * f * e, s * b * h]  # gate|up (SwiGLU input), fc2 input, dropout mask
    core = [a * s * b * 4] if flash else [a * s * s * b * e, a * s * s * b, a * s * s * b * e]  # lse | softmax
    return sum(tensors), sum(core)


def saved_bytes_per_layer(arch: Arch, tp: int, b: int, s: int, flash: bool, e: int = 2) -> int:
    return sum(saved_tensors_per_layer(arch, tp, b, s, flash, e))


def test_activations_reduce_to_korthikanti_for_gpt_shape():
    # q = kv = h (MHA, head_dim h/a) and I = 8h/3 make SwiGLU's 6I equal GeLU's 16h: sbh(10 + 24/t + 5as/(ht))
    arch, s, b = Arch(3, 48, 4, 4, 128, 100), 32, 2
    for tp in (1, 2, 4):
        est = learner_memory(arch, tp=tp, pp=1, dp=1, micro_batch=b, seq_len=s)
        paper = s * b * arch.hidden_size * (10 + 24 / tp + 5 * 4 * s / (arch.hidden_size * tp))
        assert est.activations_bytes - 4 * s * b * arch.vocab_size / tp == 3 * paper


@pytest.mark.parametrize("family,arch", TINY)
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (2, 2), (1, 2), (2, 4)])
@pytest.mark.parametrize("recompute,flash", [("none", False), ("full", False), ("selective", False), ("none", True),
                                             ("selective", True)])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_learner_memory_matches_brute_force(family, arch, tp, pp, recompute, flash, precision):
    if check_layout("learner", arch, tp, pp):
        pytest.skip("layout Megatron refuses")
    b, s, L = 2, 16, arch.num_layers
    pb, e = (2, 2) if precision == "bf16" else (4, 4)  # activations in the parameters' dtype
    body, core = saved_tensors_per_layer(arch, tp, b, s, flash, e)
    kept, working = {"none": (body + core, 0), "selective": (body, core),
                     "full": (e * s * b * arch.hidden_size, body + core)}[recompute]
    logits = 4 * s * b * arch.vocab_size / tp
    params = sharded_params(family, arch, tp, pp, sglang=False)
    acts = [pp * (L // pp) * kept + working, (L // pp) * kept + working]  # 1F1B: pp micro-batches on stage 0
    acts = [acts[0] + logits] if pp == 1 else [acts[0], acts[1] + logits]
    stages = [(params[0], acts[0])] if pp == 1 else [(params[0], acts[0]), (params[-1], acts[1])]
    opt = 12 if precision == "bf16" else 8  # fp32 main weights (bf16 only) + two fp32 Adam moments
    for dp in (1, 4):
        expected = max(((p * pb, p * 4, p * opt / dp, a) for p, a in stages), key=sum)
        est = learner_memory(arch, tp=tp, pp=pp, dp=dp, micro_batch=b, seq_len=s, param_bytes=pb, grad_bytes=4,
                             recompute=recompute, flash_attention=flash)
        assert (est.params_bytes, est.grads_bytes, est.optimizer_bytes, est.activations_bytes) == expected
        assert est.kv_cache_bytes == 0 and est.total_bytes == sum(expected) and est.role == "learner"


def test_learner_memory_bf16_distributed_optimizer_by_hand():
    """Llama, 2 layers, h=64, 8 heads of 8, 2 KV heads, I=96, V=101, untied; tp=pp=1, dp=4, b=2, s=16, bf16."""
    arch = Arch(2, 64, 8, 2, 96, 101)
    # per layer: q,o 2*64*64 + k,v 2*64*16 + MLP 3*64*96 + 2 norms 2*64 = 28800; + final norm 64 + embedding and
    # lm_head 2*101*64 = 12928
    P = 2 * 28800 + 64 + 12928
    assert P == 70592 == param_count(arch)
    # per layer, bf16: s*b*(10h + 4q + 4kv + 6I) = 32*(640 + 256 + 64 + 576) = 49152, + 5as^2b = 5*8*256*2 = 20480;
    # 2 layers, then the fp32 logits 4*s*b*V = 12928
    est = learner_memory(arch, tp=1, pp=1, dp=4, micro_batch=2, seq_len=16, param_bytes=2, grad_bytes=4,
                         distributed_optimizer=True)
    assert (est.params_bytes, est.grads_bytes, est.optimizer_bytes) == (2 * P, 4 * P, 12 * P / 4)
    assert est.activations_bytes == 2 * (49152 + 20480) + 12928
    assert est.total_bytes == 2 * P + 4 * P + 3 * P + 152192
    # full recomputation keeps each layer's bf16 input 2*s*b*h = 4096 and recomputes one layer at a time
    full = learner_memory(arch, tp=1, pp=1, dp=4, micro_batch=2, seq_len=16, recompute="full")
    assert full.activations_bytes == 2 * 4096 + (49152 + 20480) + 12928
    # fp32: 4 + 4 bytes, two moments (8) over dp; activations 4-byte: 32*(18h + 8q + 8kv + 12I) + 9as^2b
    fp32 = learner_memory(arch, tp=1, pp=1, dp=4, micro_batch=2, seq_len=16, param_bytes=4, grad_bytes=4)
    assert (fp32.params_bytes, fp32.grads_bytes, fp32.optimizer_bytes) == (4 * P, 4 * P, 8 * P / 4)
    assert fp32.activations_bytes == 2 * (32 * (18 * 64 + 8 * 64 + 8 * 16 + 12 * 96) + 9 * 8 * 256 * 2) + 12928


def test_pipeline_schedules_in_flight():
    """Stage 0's micro-batches in flight, as megatron-core's get_pp_rank_microbatches counts warm-up + 1."""
    arch, b, s = Arch(16, 64, 8, 8, 128, 10), 1, 32
    kept = saved_bytes_per_layer(arch, 1, b, s, False)
    kw = dict(tp=1, pp=4, dp=1, micro_batch=b, seq_len=s)
    # 1F1B: pp micro-batches of L/pp layers = L layers' worth; fewer micro-batches than stages hold fewer
    assert learner_memory(arch, **kw).activations_bytes == 16 * kept
    assert learner_memory(arch, num_microbatches=8, **kw).activations_bytes == 16 * kept
    assert learner_memory(arch, num_microbatches=2, **kw).activations_bytes == 2 * 4 * kept
    # interleaved, virtual_pp=2: 2(pp - 1) + (vpp - 1)pp + 1 = 11 chunks of 2 layers = L(1 + (pp - 1)/(pp*vpp)) = 22
    for vpp, layers in ((2, 22), (4, 19)):
        est = learner_memory(arch, virtual_pp=vpp, num_microbatches=8, **kw)
        assert est.activations_bytes == layers * kept == 16 * (1 + 3 / (4 * vpp)) * kept
        assert f"x {4 // vpp} layers" in est.formula


def test_learner_memory_scaling():
    kw = dict(pp=4, micro_batch=1, seq_len=4096)
    base = learner_memory(LLAMA_70B, tp=8, dp=1, **kw)
    dp8 = learner_memory(LLAMA_70B, tp=8, dp=8, **kw)
    assert (dp8.params_bytes, dp8.grads_bytes, dp8.activations_bytes) == (
        base.params_bytes, base.grads_bytes, base.activations_bytes)
    assert dp8.optimizer_bytes == base.optimizer_bytes / 8
    assert learner_memory(LLAMA_70B, tp=8, dp=8, distributed_optimizer=False, **kw) == base
    tp4 = learner_memory(LLAMA_70B, tp=4, dp=1, **kw)
    assert tp4.params_bytes > base.params_bytes and tp4.activations_bytes > base.activations_bytes
    assert learner_memory(LLAMA_70B, tp=8, dp=1, recompute="full", **kw).activations_bytes < base.activations_bytes
    assert learner_memory(LLAMA_70B, tp=8, dp=1, recompute="selective", **kw).activations_bytes < \
        base.activations_bytes
    assert learner_memory(LLAMA_70B, tp=8, dp=1, flash_attention=True, **kw).activations_bytes < base.activations_bytes


def test_optimizer_bytes_match_megatron_docs():
    # Megatron-LM docs/source/api-guide/dist_optimizer.md: bytes/param, non-distributed | distributed over d ranks
    arch, d = Arch(2, 64, 8, 8, 128, 100), 4
    for param_b, grad_b, plain, dist in [(2, 2, 20, 4 + 16 / d), (2, 4, 18, 6 + 12 / d), (4, 4, 16, 8 + 8 / d)]:
        for distributed, per_param in ((False, plain), (True, dist)):
            est = learner_memory(arch, tp=1, pp=1, dp=d, micro_batch=1, seq_len=8, param_bytes=param_b,
                                 grad_bytes=grad_b, distributed_optimizer=distributed)
            assert est.params_bytes + est.grads_bytes + est.optimizer_bytes == per_param * param_count(arch)


@pytest.mark.parametrize("family,arch", TINY)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_engine_memory_matches_brute_force(family, arch, tp):
    if check_layout("rollout", arch, tp):
        pytest.skip("layout SGLang refuses")
    kv_tokens = 1000
    est = engine_memory(arch, tp=tp, kv_tokens=kv_tokens, role="teacher")
    (params,) = sharded_params(family, arch, tp, 1, sglang=True)
    heads = max(1, arch.num_kv_heads // tp)  # SGLang's pool: per layer a k and a v buffer [tokens, heads, dim]
    pool = [torch.empty(kv_tokens, heads, arch.dim, dtype=torch.bfloat16, device="meta")
            for _ in range(2 * arch.num_layers)]
    assert est.params_bytes == 2 * params and est.role == "teacher"
    assert est.kv_cache_bytes == sum(t.numel() * t.element_size() for t in pool)
    assert est.total_bytes == est.params_bytes + est.kv_cache_bytes
    assert est.grads_bytes == est.optimizer_bytes == est.activations_bytes == 0


def test_engine_kv_heads_replicated_past_kv_heads():
    at8 = engine_memory(LLAMA_70B, tp=8, kv_tokens=4096).kv_cache_bytes
    assert engine_memory(LLAMA_70B, tp=4, kv_tokens=4096).kv_cache_bytes == 2 * at8
    assert engine_memory(LLAMA_70B, tp=16, kv_tokens=4096).kv_cache_bytes == at8  # one head per rank either way


def test_format_bytes():
    assert format_bytes(1.23 * 2**30) == "1.23 GiB"
    assert (format_bytes(512), format_bytes(1536), format_bytes(3 * 2**40)) == ("512 B", "1.50 KiB", "3.00 TiB")


def test_param_count_of_a_real_qwen3_moe():
    """Mixture of experts (the paper's Qwen3-30B-A3B teacher): experts, router, no dense MLP, exact."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    arch = Arch(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=50,
                head_dim=16, qk_norm=True, num_experts=4, moe_intermediate_size=24)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=50, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False))
    assert param_count(arch) == sum(p.numel() for p in model.parameters())
    # Qwen3-30B-A3B: 30.5B parameters in all (its model card)
    big = Arch(num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4, intermediate_size=6144,
               vocab_size=151936, head_dim=128, qk_norm=True, num_experts=128, moe_intermediate_size=768)
    assert abs(param_count(big) - 30.5e9) / 30.5e9 < 0.01
