"""Tiny random checkpoints for the serving tests (rollout engine, teacher, weight sync): Qwen2 by default, and
Qwen3 (q/k norms, explicit head_dim) and Llama 3 (no QKV bias, llama3 RoPE scaling) built from their configs."""

from __future__ import annotations

from pathlib import Path

import torch

from tests._families import FAMILIES, VOCAB, family_class, family_config

__all__ = ["FAMILIES", "VOCAB"]
EOS = 1
PAD = 0


def tiny_config(family: str = "qwen2", **overrides):
    """1 layer, hidden 32, 2 heads: the serving tests' shape, over tests._families' family features."""
    kw = dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
              eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    return family_config(family, **{**kw, **overrides})


def tiny_model(seed: int = 0, family: str = "qwen2", **overrides):
    torch.manual_seed(seed)
    model = family_class(family)(tiny_config(family, **overrides)).float().eval()
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
