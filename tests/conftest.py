"""Shared fixtures: tiny teacher/student checkpoints built in seconds (the real ones come from prepare).

Every test runs with torch's intra-op thread count set to ``ASYNCOPD_TEST_THREADS`` (default 1), and so do
the learners, Ray actors and worker processes whose results a test compares (they are given
``TEST_THREADS``), so ``ASYNCOPD_TEST_THREADS=2 make test`` runs the suite with its reductions split another
way. The end-to-end pipeline runs keep their configs' per-role thread budgets. Numeric tolerances hold at any
thread count: see tests/_tolerances.py.
"""

import os
from pathlib import Path

import pytest
import torch

from asyncopd.config.schema import ModelSpec
from asyncopd.data.tokenizer import EOS_TOKEN, PAD_TOKEN, VOCAB
from asyncopd.model.build import build_model, save_checkpoint

TEST_THREADS = int(os.environ.get("ASYNCOPD_TEST_THREADS", "1"))
TINY_TEACHER = ModelSpec(num_layers=1, hidden_size=48, num_heads=2, num_kv_heads=2, intermediate_size=96)
TINY_STUDENT = ModelSpec(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=64)


def make_artifacts(root: Path, vocab: tuple[str, ...] = VOCAB) -> Path:
    """artifacts_dir layout of `asyncopd prepare`: teacher/ and student/ HF checkpoints with the tiny tokenizer
    over ``vocab``, and the task exported as data/train.jsonl and data/val.jsonl."""
    from asyncopd.config.schema import TaskConfig
    from asyncopd.data.task import export_task

    for name, spec, seed in (("teacher", TINY_TEACHER, 1), ("student", TINY_STUDENT, 2)):
        model = build_model(spec, len(vocab), seed, vocab.index(PAD_TOKEN), vocab.index(EOS_TOKEN))
        save_checkpoint(model, root / name, vocab)
    export_task(TaskConfig(num_train=2000), root / "data")
    return root


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    return make_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(autouse=True)
def _test_threads():
    torch.set_num_threads(TEST_THREADS)
