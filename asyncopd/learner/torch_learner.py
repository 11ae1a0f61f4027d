"""The embedded learner: a PyTorch student on a Hugging Face checkpoint, one optimizer step per batch."""

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from asyncopd.estimators.base import build as build_estimator
from asyncopd.estimators.common import Tokens
from asyncopd.estimators.config import EstimatorConfig
from asyncopd.learner.collate import LearnerBatch, response_logits
from asyncopd.learner.config import LearnerConfig
from asyncopd.learner.staleness import check_staleness
from asyncopd.model.build import load_model
from asyncopd.weights.broadcast import plan_buckets

_STATE_FILE = "learner_state.pt"


class TorchLearner:
    """Subclasses (megatron) override `_forward_logits`, the weight export and checkpointing."""

    def __init__(self, cfg: LearnerConfig, estimator_cfg: EstimatorConfig, model_path: str,
                 max_staleness: int, temperature: float = 1.0):
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.estimator_cfg = estimator_cfg
        self.estimator = build_estimator(estimator_cfg)
        self.requirements = self.estimator.requirements(estimator_cfg)
        self.max_staleness = max_staleness
        self.temperature = temperature if temperature > 0 else 1.0
        self.version = 0
        self.model = self._build_model(model_path)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
        )

    def _build_model(self, model_path: str) -> torch.nn.Module:
        model = load_model(model_path)
        model.train()
        return model

    def _forward_logits(self, batch: LearnerBatch) -> torch.Tensor:
        """[B, L, V] logits of the sampling distribution (divided by the rollout temperature)."""
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits.float() / self.temperature

    def _clip_grad_norm(self) -> float:
        """Clip by the global gradient norm; sharded backends reduce the norm across their ranks."""
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))

    def _to_device(self, batch: LearnerBatch) -> LearnerBatch:
        """Move the batch where the model lives (the embedded learner is CPU-only)."""
        return batch

    @torch.no_grad()
    def _prox_logprobs(self, batch: LearnerBatch) -> torch.Tensor:
        """log pi_prox(y_t) under the weights before this update (decoupled PPO), chunked over tokens."""
        tokens = Tokens.of(response_logits(self._forward_logits(batch), batch.response_index), batch.est,
                           self.estimator_cfg)
        prox = torch.zeros(batch.est.mask.shape, device=tokens.logits.device)
        ids = tokens.pick(batch.est.response_ids).unsqueeze(-1)
        prox.view(-1)[tokens.rows] = tokens.student(ids).logprobs[:, 0].float()
        return prox

    def train_step(self, batch: LearnerBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = self._to_device(batch)
        lags = check_staleness(self.version, batch.versions, self.max_staleness)
        if self.requirements.needs_prox:
            batch.est.prox_logprobs = self._prox_logprobs(batch)
        logits = response_logits(self._forward_logits(batch), batch.response_index)
        loss, metrics = self.estimator.loss(logits, batch.est, self.estimator_cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._clip_grad_norm()
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.version += 1
        metrics = {**metrics, "grad_norm": grad_norm, "lr": lr, "tokens": float(batch.est.mask.sum()),
                   "learner_time_s": time.perf_counter() - t0}
        for lag, count in lags.items():
            metrics[f"staleness/{lag}"] = float(count)
        return metrics

    def _lr(self) -> float:
        """Learning rate of the step that makes version + 1: linear warmup, then constant.

        Keyed on the version so a resumed run continues the schedule where it stopped."""
        w = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (self.version + 1) / w) if w > 0 else self.cfg.lr

    def named_weights_for_rollout(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        for names in plan_buckets(params, bucket_bytes):
            yield [(name, params[name]) for name in names]

    def save(self, path: str) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        torch.save({"version": self.version, "optimizer": self.optimizer.state_dict()}, out / _STATE_FILE)

    def load(self, path: str) -> None:
        """Resume weights, optimizer and version: the version must survive resume (staleness accounting)."""
        state_file = Path(path) / _STATE_FILE
        if not state_file.exists():
            raise FileNotFoundError(f"{path} is not a learner checkpoint: {_STATE_FILE} is missing")
        self.model.load_state_dict(load_model(path).state_dict())
        state = torch.load(state_file, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
