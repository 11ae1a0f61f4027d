"""Tiny random checkpoints for the serving tests (rollout engine, teacher, weight sync): Qwen2 by default, and
Qwen3 (q/k norms, explicit head_dim) and Llama 3 (no QKV bias, llama3 RoPE scaling) built from their configs."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 19
EOS = 1
PAD = 0


FAMILIES = ("qwen2", "qwen3", "llama")
# what sets each family apart, at tiny size: Qwen3's head_dim differs from hidden / heads
_FAMILY = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}}),
}


def tiny_config(family: str = "qwen2", **overrides):
    import transformers

    config_cls, _, extra = _FAMILY[family]
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
              max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None, **extra)
    kw.update(overrides)
    return getattr(transformers, config_cls)(**kw)


def tiny_model(seed: int = 0, family: str = "qwen2", **overrides):
    import transformers

    torch.manual_seed(seed)
    model_cls = getattr(transformers, _FAMILY[family][1])
    model = model_cls(tiny_config(family, **overrides)).float().eval()
    # Larger-than-default weights so the distribution is far from uniform (greedy is well defined).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model


def save_tiny(path: Path, seed: int = 0, family: str = "qwen2", **overrides) -> Path:
    path = Path(path)
    tiny_model(seed, family, **overrides).save_pretrained(path)
    return path


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Brute force: log-softmax over the full vocabulary at every position of one sequence, fp64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)
