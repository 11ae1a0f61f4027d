"""A tiny Qwen2 checkpoint and a hand-made learner batch, shared by the learner tests."""

from pathlib import Path

import numpy as np
import torch

from asyncopd.estimators.config import EstimatorConfig
from asyncopd.learner.collate import LearnerBatch, collate
from asyncopd.rollout.types import Rollout
from asyncopd.teacher.types import TeacherScores

VOCAB = 19
ESTIMATOR = EstimatorConfig(name="forward_kl", top_k=4)


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


def make_batch(seed: int = 1) -> LearnerBatch:
    """Three right-padded samples of different prompt/response lengths, teacher top-4 over a random teacher."""
    rng = np.random.default_rng(seed)
    pairs = []
    for P, T in ((3, 4), (2, 6), (5, 2)):
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
