"""HF Qwen2 / Qwen3 / Llama <-> megatron GPTModel weight conversion: the layout each config gives, QKV interleaving,
TP sharding and its exact inverse, and a clear error for what the conversion cannot express."""

import pytest
import torch
import transformers

from asyncopd.learner.megatron.convert import (
    DecoderLayout,
    Llama3Rope,
    hf_to_megatron,
    interleave_qkv,
    merge_megatron_shards,
    name_map,
    split_qkv,
)
from tests._families import FAMILIES, family_config, family_model


def _hf_state(family: str, **overrides) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in family_model(family, **overrides).named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_from_config_pads_vocab_and_checks_tp(family):
    layout = DecoderLayout.from_hf_config(family_config(family), tp=2, vocab_divisible_by=4)
    assert (layout.family, layout.heads, layout.groups, layout.ffn) == (family, 4, 2, 64)
    assert layout.head_dim == (16 if family == "qwen3" else 8)  # Qwen3's is set apart from hidden / heads
    assert (layout.qkv_bias, layout.qk_norm) == (family == "qwen2", family == "qwen3")
    assert layout.llama3_rope == (Llama3Rope(8.0, 1.0, 4.0, 1024) if family == "llama" else None)
    assert layout.vocab == 19 and layout.padded_vocab == 24 and layout.tied
    assert DecoderLayout.from_hf_config(family_config(family), tp=1, vocab_divisible_by=128).padded_vocab == 128
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        DecoderLayout.from_hf_config(family_config(family), tp=4)


@pytest.mark.parametrize("config, error, field", [
    (transformers.Qwen2Config(use_sliding_window=True, sliding_window=4), NotImplementedError, "use_sliding_window"),
    (transformers.Qwen2Config(layer_types=["sliding_attention"], num_hidden_layers=1), NotImplementedError,
     "layer_types"),
    (transformers.Qwen3MoeConfig(), ValueError, "model_type='qwen3_moe'"),
    (transformers.Qwen2Config(rope_scaling={"rope_type": "linear", "factor": 2.0}), NotImplementedError,
     r"rope_parameters\['rope_type'\]='linear'"),
    (transformers.LlamaConfig(attention_bias=True), NotImplementedError, "attention_bias"),
    (transformers.LlamaConfig(mlp_bias=True), NotImplementedError, "mlp_bias"),
    (transformers.Qwen3Config(hidden_act="gelu"), NotImplementedError, "hidden_act='gelu'"),
], ids=["sliding_window", "layer_types", "moe", "rope_type", "attention_bias", "mlp_bias", "hidden_act"])
def test_layout_names_the_field_it_cannot_express(config, error, field):
    with pytest.raises(error, match=field):
        DecoderLayout.from_hf_config(config)


def test_qkv_interleaving_is_per_group():
    layout = DecoderLayout.from_hf_config(family_config("qwen2"), tp=1)
    hn = layout.head_dim
    # rows tagged by origin: q head h -> 100 + h, k group g -> 200 + g, v group g -> 300 + g
    q = torch.arange(4).repeat_interleave(hn).float().add(100).unsqueeze(1)
    k = torch.arange(2).repeat_interleave(hn).float().add(200).unsqueeze(1)
    v = torch.arange(2).repeat_interleave(hn).float().add(300).unsqueeze(1)
    qkv = interleave_qkv(q, k, v, layout)
    heads = qkv[::hn, 0].tolist()
    assert heads == [100, 101, 200, 300, 102, 103, 201, 301]  # q1 q2 k1 v1 | q3 q4 k2 v2
    for a, b in zip(split_qkv(qkv, layout), (q, k, v), strict=True):
        assert torch.equal(a, b)
    bias = torch.randn(64)  # 1-D biases follow the same rows
    first_group = interleave_qkv(bias[:32], bias[32:48], bias[48:], layout)[:32]  # q1 q2 k1 v1
    assert torch.equal(first_group, torch.cat([bias[:16], bias[32:40], bias[48:56]]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", [True, False])
def test_shard_then_merge_is_exact(family, tp, tied):
    layout = DecoderLayout.from_hf_config(family_config(family, tie_word_embeddings=tied), tp=tp,
                                          vocab_divisible_by=8)
    hf = _hf_state(family, tie_word_embeddings=tied)
    assert ("lm_head.weight" in hf) == (not tied)
    shards = [dict(hf_to_megatron(hf, layout, rank, tp)) for rank in range(tp)]
    names = name_map(layout)
    assert set(shards[0]) == set(names)
    assert any(n.endswith("linear_qkv.bias") for n in names) == (family == "qwen2")
    assert any(n.endswith("q_layernorm.weight") for n in names) == (family == "qwen3")
    emb = shards[0]["embedding.word_embeddings.weight"]
    assert emb.shape == (layout.padded_vocab // tp, 32)
    attn_width = layout.heads * layout.head_dim  # 64 for Qwen3, not the hidden size
    assert shards[0]["decoder.layers.0.self_attention.linear_proj.weight"].shape == (32, attn_width // tp)
    if layout.qk_norm:  # one norm over head_dim, the same on every rank
        assert all(torch.equal(s["decoder.layers.1.self_attention.k_layernorm.weight"],
                               hf["model.layers.1.self_attn.k_norm.weight"]) for s in shards)
    merged = merge_megatron_shards(shards, layout)
    assert set(merged) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(merged[name], tensor), name


def test_fc1_shard_is_gate_then_up_of_the_rank():
    layout = DecoderLayout.from_hf_config(family_config("qwen2"), tp=2, vocab_divisible_by=4)  # 19 -> 24, 12/rank
    hf = _hf_state("qwen2")
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    shard = dict(hf_to_megatron(hf, layout, 1, 2))["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(shard, torch.cat([gate[32:], up[32:]]))
    padded = dict(hf_to_megatron(hf, layout, 1, 2))["embedding.word_embeddings.weight"]
    assert torch.equal(padded[:7], hf["model.embed_tokens.weight"][12:]) and not padded[7:].any()


def test_transformer_engine_names_fuse_the_norms():
    layout = DecoderLayout.from_hf_config(family_config("qwen3"), tp=1)
    te = name_map(layout, norms_fused=True)
    qkv_norm, fc1_norm = "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    assert te[f"decoder.layers.0.{qkv_norm}"] == ("model.layers.0.input_layernorm.weight",)
    assert te[f"decoder.layers.1.{fc1_norm}"] == ("model.layers.1.post_attention_layernorm.weight",)
    assert te["decoder.layers.0.self_attention.q_layernorm.weight"] == ("model.layers.0.self_attn.q_norm.weight",)
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te)
