"""Shared fixtures: tiny teacher/student checkpoints built in seconds (the real ones come from prepare)."""

from pathlib import Path

import pytest
import torch

from asyncopd.data.tokenizer import CharTokenizer
from asyncopd.model.build import build_model, save_checkpoint
from asyncopd.model.config import ModelSpec

TINY_TEACHER = ModelSpec(num_layers=1, hidden_size=48, num_heads=2, num_kv_heads=2, intermediate_size=96)
TINY_STUDENT = ModelSpec(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=64)


def make_artifacts(root: Path, tokenizer: CharTokenizer | None = None) -> Path:
    """artifacts_dir layout of `asyncopd prepare`: teacher/ and student/ HF checkpoints with the tokenizer."""
    tok = tokenizer or CharTokenizer()
    for name, spec, seed in (("teacher", TINY_TEACHER, 1), ("student", TINY_STUDENT, 2)):
        model = build_model(spec, tok.vocab_size, seed, tok.pad_token_id, tok.eos_token_id)
        save_checkpoint(model, tok, root / name)
    return root


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    return make_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
