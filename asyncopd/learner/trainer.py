"""The one train_step every learner backend runs: staleness check, lr, the backend's optimizer step, version + 1.

The trainer owns the loss of a micro-batch (the estimator over the response positions, at the rollout
temperature, on the full vocabulary or one rank's shard of it), the lr schedule and the version; the backend
(`ModelBackend`) owns the model, the optimizer and how a batch becomes forward and backward passes (micro-batches,
pipeline stages, data-parallel replicas, gradient reduction and clipping). Every backend minimises the same
objective: the token mean of the estimator's per-token loss over the whole batch, so the hf and megatron
learners step identically on the same batch, and a resumed run continues the same schedule.

Every distribution the learner computes is over the student tokenizer's ids only, as the rollout engine's
(asyncopd.rollout.engine): a checkpoint may pad its embedding past them (Qwen3: 151669 tokens, 151936 rows), and a
log pi over the padded rows too would differ from the behaviour logprobs the engine reported, skewing every
importance ratio and the KL itself. The padded rows stay in the model and in its exported weights.
"""

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from asyncopd.config.schema import EstimatorConfig, LearnerConfig
from asyncopd.core.types import LearnerBatch, StepResult
from asyncopd.estimators.common import Tokens
from asyncopd.estimators.registry import build as build_estimator
from asyncopd.estimators.vocab_parallel import VocabShard
from asyncopd.learner.collate import response_logits
from asyncopd.learner.staleness import check_staleness, token_staleness
from asyncopd.model.scorer import token_vocab
from asyncopd.net.server import vocabulary_card

Weights = Iterator[list[tuple[str, torch.Tensor]]]  # buckets of (Hugging Face name, full tensor)
# (logits [b, L, V or this rank's vocabulary shard] over the tokenizer's ids, the micro-batch, the shard or None)
#   -> (the micro-batch's token-mean loss, its metrics)
LossFn = Callable[[torch.Tensor, LearnerBatch, VocabShard | None], tuple[torch.Tensor, dict[str, float]]]


def student_vocab(model_path: str, hf_config) -> int:
    """Ids the student's distribution ranges over, counted as the rollout engine counts them: its tokenizer's
    (every embedding row when the checkpoint has no tokenizer files), at most `hf_config.vocab_size` rows."""
    rows = int(hf_config.vocab_size)
    return token_vocab(hf_config, vocabulary_card(model_path, rows)["tokenizer_vocab_size"])


class ModelBackend(Protocol):
    """The student model and its optimizer as one backend runs them (asyncopd.learner.hf,
    asyncopd.learner.megatron.model). Micro-batching, the data-parallel split, gradient reduction and clipping
    are the backend's; the loss of a micro-batch is the trainer's `LossFn`."""

    vocab_size: int  # student_vocab: the logits' last dimension; embedding rows past it are padding

    def to_device(self, batch: LearnerBatch) -> LearnerBatch:
        """The batch where the model lives."""

    def train_step(self, batch: LearnerBatch, loss_fn: LossFn, lr: float) -> dict[str, float]:
        """One optimizer step at learning rate `lr` on the token mean of `loss_fn` over the whole batch (every
        rank passes the same batch); the batch's metrics (token-weighted over micro-batches and DP replicas) and
        `grad_norm`, the global norm before clipping. Collective."""

    def forward_only(self, batch: LearnerBatch, fn: Callable[[torch.Tensor, LearnerBatch, VocabShard | None], Any]
                     ) -> list[Any]:
        """fn(logits, micro-batch, shard) for every micro-batch of this rank's share, no grad (results on the
        ranks that hold the logits: the last pipeline stage). Collective."""

    def named_weights_for_rollout(self, bucket_bytes: int) -> Weights:
        """Full weights under Hugging Face names, in buckets of about `bucket_bytes` (on the rank that sends to the
        rollout fleet; the others yield nothing but take part). Collective."""

    def save(self, path: str, state: dict[str, Any]) -> None:
        """Write the weights, the optimizer and the trainer's `state` (the version) under `path`. Collective."""

    def load(self, path: str) -> dict[str, Any]:
        """Restore the weights and the optimizer from `path`; returns the trainer state saved with them."""

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

    def _response(self, logits: torch.Tensor, mb: LearnerBatch, shard: VocabShard | None) -> Tokens:
        est = dataclasses.replace(mb.est, vocab_shard=shard)
        return Tokens.of(response_logits(logits / self.temperature, mb.response_index), est, self.estimator_cfg)

    def _token_logprobs(self, tokens: Tokens) -> torch.Tensor:
        """[B, T] log pi(y_t) at the real positions (0 elsewhere), no grad: the sampling distribution's."""
        out = torch.zeros(tokens.batch.mask.shape, device=tokens.logits.device)
        ids = tokens.pick(tokens.batch.response_ids).unsqueeze(-1)
        with torch.no_grad():
            out.view(-1)[tokens.rows] = tokens.student(ids).logprobs[:, 0].float()
        return out

    def loss(self, logits: torch.Tensor, mb: LearnerBatch, shard: VocabShard | None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The estimator's loss on one micro-batch (a LossFn). Decoupled PPO's proximal policy is the weights before
        this update, which are the weights of this very forward (one optimizer step per batch): its log pi_prox
        is this forward's log pi, detached, so it costs no second forward."""
        tokens = self._response(logits, mb, shard)
        if self.requirements.needs_prox:
            tokens.batch.prox_logprobs = self._token_logprobs(tokens)
        return self.estimator.loss(tokens.logits, tokens.batch, self.estimator_cfg)

    def prox_logprobs(self, batch: LearnerBatch) -> torch.Tensor:
        """[B, T] log pi(y_t) under the current weights, for each sample of this rank's share (the last pipeline
        stage's; an empty tensor elsewhere)."""
        def fn(logits, mb, shard):
            return self._token_logprobs(self._response(logits, mb, shard))

        parts = self.model.forward_only(self.model.to_device(batch), fn)
        T = batch.est.mask.shape[1]
        return torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in parts]) if parts \
            else torch.zeros(0, T)

    def train_step(self, batch: LearnerBatch) -> StepResult:
        t0 = time.perf_counter()
        batch = self.model.to_device(batch)
        lags = check_staleness(self.version, batch.versions, self.max_staleness)
        token_lags = token_staleness(self.version, batch.token_versions)
        lr = self._lr()
        metrics = self.model.train_step(batch, self.loss, lr)
        self.version += 1
        metrics = {**metrics, "lr": lr, "tokens": float(batch.est.mask.sum()),
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
        self.model.save(path, {"version": self.version})

    def load(self, path: str) -> None:
        """Resume weights, optimizer and version: the version must survive resume (staleness accounting)."""
        state = self.model.load(path)
        self.version = int(state["version"])

    def close(self) -> None:
        self.model.close()
