"""Tiny random checkpoints of each family the megatron learner converts, built locally from a transformers config
(no downloads). What sets a family apart is present and not at its default value: Qwen2's q/k/v biases, Qwen3's
q/k norms and a head_dim apart from hidden / heads, Llama 3's llama3 RoPE scaling in all three of its bands."""

from pathlib import Path

import torch
import transformers

FAMILIES = ("qwen2", "qwen3", "llama")
VOCAB = 19  # tests._learner_fixtures.make_batch draws tokens below it

# head_dim 8 at rope_theta 10000: inverse frequencies 1, 0.1, 0.01, 0.001 (wavelengths 6, 63, 628, 6283). With
# original_max_position_embeddings 1024 the first two are kept (< 1024 / high_freq_factor), the third is smoothed
# and the fourth divided by the factor (> 1024 / low_freq_factor).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
_CLASSES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),  # hidden / heads = 8
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_scaling": LLAMA3_ROPE}),
}


def family_class(family: str) -> type[transformers.PreTrainedModel]:
    """The transformers causal-LM class of `family`."""
    return _CLASSES[family][1]


def family_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """2 layers, hidden 32, 4 query heads over 2 KV groups (TP=2 splits them), tied embeddings unless overridden."""
    config_cls, _, extra = _CLASSES[family]
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, tie_word_embeddings=True, **extra)
    return config_cls(**{**kw, **overrides})


def family_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random model of `family`. Biases and norm gains move off HF's initial zeros and ones, so a bias or a
    q/k norm dropped or swapped in a conversion changes the logits."""
    torch.manual_seed(seed)
    model = family_class(family)(family_config(family, **overrides)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_family_checkpoint(path: Path, family: str, seed: int = 0, **overrides) -> Path:
    family_model(family, seed, **overrides).save_pretrained(path)
    return path
