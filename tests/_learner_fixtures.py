"""A tiny Qwen2 checkpoint and a hand-made learner batch, shared by the learner tests."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncopd.config.schema import Config, EstimatorConfig, LearnerConfig, PipelineConfig
from asyncopd.core.types import LearnerBatch, Rollout, TeacherScores
from asyncopd.learner.backends import build_trainer
from asyncopd.learner.collate import collate
from asyncopd.learner.trainer import Trainer
from tests._tolerances import (
    EPS32,
    FP32_ESTIMATOR,
    adam_first_step_tol,
    assert_within,
    grad_tol,
    logit_tol,
    rounding_tol,
)
from tests.conftest import TEST_THREADS

VOCAB = 19
ESTIMATOR = EstimatorConfig(name="forward_kl", top_k=4)


def learner_config(**knobs) -> LearnerConfig:
    """A LearnerConfig at the suite's thread count (a learner sets torch's threads from its config)."""
    return LearnerConfig(threads=TEST_THREADS, **knobs)


def make_trainer(learner: LearnerConfig, estimator: EstimatorConfig, model_path: str, max_staleness: int) -> Trainer:
    """The Trainer a learner rank builds, from these sections (rollout temperature 1)."""
    cfg = Config(learner=learner, estimator=estimator, pipeline=PipelineConfig(max_staleness=max_staleness))
    return build_trainer(cfg, model_path)


def make_checkpoint(path: Path) -> Path:
    import transformers

    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # random q/k/v biases (HF initialises them to zero) so the QKV bias mapping is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


SHAPES = ((3, 4), (2, 6), (5, 2))  # (prompt, response) tokens per sample
EIGHT = (*SHAPES, (4, 3), (1, 5), (2, 2), (6, 1), (3, 3))  # enough samples for 2 replicas x 4 micro-batches


def make_batch(seed: int = 1, shapes: tuple[tuple[int, int], ...] = SHAPES) -> LearnerBatch:
    """Right-padded samples of different prompt/response lengths, teacher top-4 over a random teacher."""
    rng = np.random.default_rng(seed)
    pairs = []
    for P, T in shapes:
        teacher = torch.log_softmax(torch.from_numpy(rng.normal(size=(T, VOCAB)) * 2), -1).float()
        top = teacher.topk(4, dim=-1)
        response = rng.integers(1, VOCAB, T).astype(np.int32)
        pairs.append((
            Rollout(prompt_ids=rng.integers(1, VOCAB, P).astype(np.int32), response_ids=response,
                    logprobs=np.full(T, -1.0, np.float32), version_start=0, version_end=0, finish_reason="stop"),
            TeacherScores(topk_ids=top.indices.numpy().astype(np.int32), topk_logprobs=top.values.numpy(),
                          token_logprob=teacher.gather(-1, torch.from_numpy(response).long()[:, None])[:, 0].numpy()),
        ))
    return collate(pairs, pad_id=0)


def assert_same_step(metrics: dict, weights: dict, reference: Trainer, expected: dict, batch: LearnerBatch,
                     grads: dict | None = None) -> None:
    """A learner's first train_step on `batch` (its `metrics`, new `weights` and, if given, clipped `grads`, by
    Hugging Face name) is the hf Trainer `reference`'s (`expected` metrics, its model and .grad) up to float32
    rounding: the two run the same math with other reductions (another model implementation, TP partial sums)."""
    model, ids = reference.model.module, batch.input_ids
    # Forward KL is 2-Lipschitz in the logits' max norm (its logit gradient sums to <= 2 per token); the
    # estimator's own reductions (vocabulary-sharded under TP) round within FP32_ESTIMATOR on this smaller batch.
    loss_tol = 2 * logit_tol(model, ids.shape[1]) + FP32_ESTIMATOR
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=0, abs=loss_tol)
    params = dict(model.named_parameters())
    g_tols = {name: grad_tol(model, ids, p.grad) for name, p in params.items()}
    # The norm moves by at most the norm of the gradients' errors, plus its own sum over every entry; the clip
    # factor (grad_clip / norm) carries the same relative error into every clipped entry.
    norm = math.sqrt(sum(float(p.grad.square().sum()) for p in params.values()))  # clipped: the ratio is the same
    moved = math.sqrt(sum(p.numel() * g_tols[name] ** 2 for name, p in params.items()))
    norm_rtol = moved / norm + rounding_tol(EPS32, sum(p.numel() for p in params.values()), 1.0)
    assert metrics["grad_norm"] == pytest.approx(expected["grad_norm"], rel=norm_rtol, abs=0)
    lr = reference.cfg.lr
    for name, p in params.items():
        if grads is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=norm_rtol, atol=g_tols[name], msg=name)
        step_tol = adam_first_step_tol(p.grad, g_tols[name] + norm_rtol * p.grad.abs(), lr, p.detach())
        assert_within(weights[name], p.detach(), step_tol, name)
