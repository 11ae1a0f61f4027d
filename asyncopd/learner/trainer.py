"""The one train_step every learner backend runs: staleness check, loss, backward, clip, AdamW, version + 1.

What differs per backend (the model, where the batch lives, the logits, the gradient-norm reduction, weight
export and checkpoint files) sits behind `ModelBackend`; the trainer owns the optimizer, the lr schedule and
the version, so both backends step identically and a resumed run continues the same schedule.

Every distribution the learner computes is over the student tokenizer's ids only, as the rollout engine's
(asyncopd.rollout.engine): a checkpoint may pad its embedding past them (Qwen3: 151669 tokens, 151936 rows), and a
log pi over the padded rows too would differ from the behaviour logprobs the engine reported, skewing every
importance ratio and the KL itself. The padded rows stay in the model and in its exported weights.
"""

import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from asyncopd.config.schema import EstimatorConfig, LearnerConfig
from asyncopd.core.types import LearnerBatch, StepResult
from asyncopd.estimators.common import Tokens
from asyncopd.estimators.registry import build as build_estimator
from asyncopd.learner.collate import response_logits
from asyncopd.learner.staleness import check_staleness, token_staleness
from asyncopd.model.scorer import token_vocab
from asyncopd.net.server import vocabulary_card

Weights = Iterator[list[tuple[str, torch.Tensor]]]  # buckets of (Hugging Face name, full tensor)


def student_vocab(model_path: str, hf_config) -> int:
    """Ids the student's distribution ranges over, counted as the rollout engine counts them: its tokenizer's
    (every embedding row when the checkpoint has no tokenizer files), at most `hf_config.vocab_size` rows."""
    rows = int(hf_config.vocab_size)
    return token_vocab(hf_config, vocabulary_card(model_path, rows)["tokenizer_vocab_size"])


class ModelBackend(Protocol):
    """The student model as one backend runs it (asyncopd.learner.hf, asyncopd.learner.megatron.model)."""

    module: torch.nn.Module  # the parameters the optimizer steps (this rank's shards under TP)
    vocab_size: int  # student_vocab: the logits' last dimension; embedding rows past it are padding

    def to_device(self, batch: LearnerBatch) -> LearnerBatch:
        """The batch where the model lives."""

    def forward_logits(self, batch: LearnerBatch) -> torch.Tensor:
        """float32 [B, L, vocab_size] logits over the tokenizer's ids (padded rows dropped), before the sampling
        temperature."""

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip by the global gradient norm over the full model; returns the norm before clipping."""

    def named_weights_for_rollout(self, bucket_bytes: int) -> Weights:
        """Full weights under Hugging Face names, in buckets of about `bucket_bytes`. Collective."""

    def save(self, path: str, state: dict[str, Any]) -> None:
        """Write the weights and the trainer's `state` (optimizer, version) under `path`. Collective."""

    def load(self, path: str) -> dict[str, Any]:
        """Restore the weights from `path`; returns the trainer state saved with them."""

    def close(self) -> None: ...


class Trainer:
    """One optimizer step per batch on a `ModelBackend`; `version` counts the steps (the staleness clock)."""

    def __init__(self, cfg: LearnerConfig, estimator_cfg: EstimatorConfig, model: ModelBackend,
                 max_staleness: int, temperature: float = 1.0):
        self.cfg = cfg
        self.estimator_cfg = estimator_cfg
        self.estimator = build_estimator(estimator_cfg)
        self.requirements = self.estimator.requirements(estimator_cfg)
        self.max_staleness = max_staleness
        self.temperature = temperature if temperature > 0 else 1.0
        self.model = model
        self.version = 0
        self.optimizer = torch.optim.AdamW(
            [p for p in model.module.parameters() if p.requires_grad], lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
        )

    def logits(self, batch: LearnerBatch) -> torch.Tensor:
        """[B, L, V] logits of the sampling distribution (V: the tokenizer's ids): the rollout temperature applied."""
        return self.model.forward_logits(batch) / self.temperature

    @torch.no_grad()
    def prox_logprobs(self, batch: LearnerBatch) -> torch.Tensor:
        """log pi_prox(y_t) under the weights before this update (decoupled PPO), chunked over tokens."""
        tokens = Tokens.of(response_logits(self.logits(batch), batch.response_index), batch.est, self.estimator_cfg)
        prox = torch.zeros(batch.est.mask.shape, device=tokens.logits.device)
        ids = tokens.pick(batch.est.response_ids).unsqueeze(-1)
        prox.view(-1)[tokens.rows] = tokens.student(ids).logprobs[:, 0].float()
        return prox

    def train_step(self, batch: LearnerBatch) -> StepResult:
        t0 = time.perf_counter()
        batch = self.model.to_device(batch)
        lags = check_staleness(self.version, batch.versions, self.max_staleness)
        token_lags = token_staleness(self.version, batch.token_versions)
        if self.requirements.needs_prox:
            batch.est.prox_logprobs = self.prox_logprobs(batch)
        logits = response_logits(self.logits(batch), batch.response_index)
        loss, metrics = self.estimator.loss(logits, batch.est, self.estimator_cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.model.clip_grad_norm(self.cfg.grad_clip)
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.version += 1
        metrics = {**metrics, "grad_norm": grad_norm, "lr": lr, "tokens": float(batch.est.mask.sum()),
                   "learner_time_s": time.perf_counter() - t0}
        return StepResult(version=self.version, metrics=metrics, staleness=dict(lags), token_staleness=dict(token_lags))

    def _lr(self) -> float:
        """Learning rate of the step that makes version + 1: linear warmup, then constant.

        Keyed on the version so a resumed run continues the schedule where it stopped."""
        w = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (self.version + 1) / w) if w > 0 else self.cfg.lr

    def named_weights_for_rollout(self, bucket_bytes: int) -> Weights:
        return self.model.named_weights_for_rollout(bucket_bytes)

    def save(self, path: str) -> None:
        self.model.save(path, {"version": self.version, "optimizer": self.optimizer.state_dict()})

    def load(self, path: str) -> None:
        """Resume weights, optimizer and version: the version must survive resume (staleness accounting)."""
        state = self.model.load(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])

    def close(self) -> None:
        self.model.close()
