"""Build, save and load the embedded tier's tiny Qwen2 models as Hugging Face checkpoints.

A checkpoint directory holds config.json + model.safetensors + the tokenizer files, so the same directory
loads with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` and could be served by SGLang.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from asyncopd.config.schema import ModelSpec
from asyncopd.data.tokenizer import VOCAB, save_tiny_tokenizer


def qwen2_config(spec: ModelSpec, vocab_size: int, pad_token_id: int, eos_token_id: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        use_cache=True,
        dtype="float32",
    )


def build_model(spec: ModelSpec, vocab_size: int, seed: int, pad_token_id: int = 0,
                eos_token_id: int = 1) -> Qwen2ForCausalLM:
    """A randomly initialised fp32 Qwen2ForCausalLM with tied embeddings; the init depends only on ``seed``."""
    cfg = qwen2_config(spec, vocab_size, pad_token_id, eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.float()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()


def save_checkpoint(model: Qwen2ForCausalLM, directory: str | Path, vocab: Sequence[str] = VOCAB) -> Path:
    """Weights, config and the tiny tokenizer over ``vocab``: a directory AutoModel/AutoTokenizer/SGLang load."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d), safe_serialization=True)
    save_tiny_tokenizer(d, vocab)
    return d


def load_model(path: str | Path, field: str = "model path", device: str | torch.device = "cpu"
               ) -> Qwen2ForCausalLM:
    """Load an fp32 checkpoint in eval mode; ``field`` names the config field in the error message."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").exists():
        why = "directory does not exist" if not p.is_dir() else "no config.json"
        raise FileNotFoundError(f"{field}={str(path)!r}: {why}; run `asyncopd prepare` first "
                                "(or point it at a Hugging Face checkpoint directory)")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise FileNotFoundError(f"{field}={str(path)!r}: config.json but no weights (*.safetensors); "
                                "the checkpoint is incomplete; rerun `asyncopd prepare`")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    return model.to(device).eval()
