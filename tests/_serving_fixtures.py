"""Tiny random Qwen2 checkpoints for the serving tests (rollout engine, teacher, weight sync)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 19
EOS = 1
PAD = 0


def tiny_config(**overrides):
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
              max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    kw.update(overrides)
    return transformers.Qwen2Config(**kw)


def tiny_model(seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(tiny_config(**overrides)).float().eval()
    # Larger-than-default weights so the distribution is far from uniform (greedy is well defined).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model


def save_tiny(path: Path, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    tiny_model(seed, **overrides).save_pretrained(path)
    return path


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Brute force: log-softmax over the full vocabulary at every position of one sequence, fp64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)
