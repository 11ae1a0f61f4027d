"""HF Qwen2 <-> megatron GPTModel weight conversion: QKV interleaving, TP sharding and its exact inverse."""

import pytest
import torch
import transformers

from asyncopd.learner.megatron.convert import (
    Qwen2Layout,
    hf_to_megatron,
    interleave_qkv,
    merge_megatron_shards,
    name_map,
    split_qkv,
)


def _config(**kw):
    base = dict(vocab_size=19, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, tie_word_embeddings=True)
    return transformers.Qwen2Config(**{**base, **kw})


def _hf_state(config):
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_layout_from_config_pads_vocab_and_checks_tp():
    layout = Qwen2Layout.from_hf_config(_config(), tp=2, vocab_divisible_by=4)
    assert (layout.heads, layout.groups, layout.head_dim, layout.ffn) == (4, 2, 8, 64)
    assert layout.vocab == 19 and layout.padded_vocab == 24 and layout.tied
    assert Qwen2Layout.from_hf_config(_config(), tp=1, vocab_divisible_by=128).padded_vocab == 128
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        Qwen2Layout.from_hf_config(_config(), tp=4)
    with pytest.raises(NotImplementedError, match="sliding"):
        Qwen2Layout.from_hf_config(_config(use_sliding_window=True, sliding_window=4))


def test_qkv_interleaving_is_per_group():
    layout = Qwen2Layout.from_hf_config(_config(), tp=1)
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


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", [True, False])
def test_shard_then_merge_is_exact(tp, tied):
    config = _config(tie_word_embeddings=tied)
    layout = Qwen2Layout.from_hf_config(config, tp=tp, vocab_divisible_by=8)
    hf = _hf_state(config)
    if not tied:
        assert "lm_head.weight" in hf
    shards = [dict(hf_to_megatron(hf, layout, rank, tp)) for rank in range(tp)]
    assert set(shards[0]) == set(name_map(layout))
    emb = shards[0]["embedding.word_embeddings.weight"]
    assert emb.shape == (layout.padded_vocab // tp, 32)
    assert shards[0]["decoder.layers.0.self_attention.linear_proj.weight"].shape == (32, 32 // tp)
    merged = merge_megatron_shards(shards, layout)
    assert set(merged) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(merged[name], tensor), name


def test_fc1_shard_is_gate_then_up_of_the_rank():
    config = _config()
    layout = Qwen2Layout.from_hf_config(config, tp=2, vocab_divisible_by=4)  # 19 -> 24 rows, 12 per rank
    hf = _hf_state(config)
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    shard = dict(hf_to_megatron(hf, layout, 1, 2))["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(shard, torch.cat([gate[32:], up[32:]]))
    padded = dict(hf_to_megatron(hf, layout, 1, 2))["embedding.word_embeddings.weight"]
    assert torch.equal(padded[:7], hf["model.embed_tokens.weight"][12:]) and not padded[7:].any()


def test_transformer_engine_names_fuse_the_norms():
    layout = Qwen2Layout.from_hf_config(_config(), tp=1)
    te = name_map(layout, norms_fused=True)
    qkv_norm, fc1_norm = "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    assert te[f"decoder.layers.0.{qkv_norm}"] == ("model.layers.0.input_layernorm.weight",)
    assert te[f"decoder.layers.1.{fc1_norm}"] == ("model.layers.1.post_attention_layernorm.weight",)
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te)
