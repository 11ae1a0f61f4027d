"""Plumbing shared by the estimator families: batch checks, per-token selection, reduction, metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.types import EstimatorBatch
from asyncopd.estimators.logsoftmax import TokenLogprobs, real_rows, token_logprobs

LOG_RATIO_CLAMP = 20.0  # |log pi_theta - log pi_old| is clamped here before exponentiating a ratio


def need(batch: EstimatorBatch, field: str, estimator: str, why: str) -> torch.Tensor:
    """batch.<field>, or a clear error naming the estimator and the knob that makes it fetched."""
    value = getattr(batch, field)
    if value is None:
        raise ValueError(f"estimator {estimator!r} needs batch.{field} ({why}); it is None: fetch what "
                         f"estimator.requirements(cfg) asks for")
    return value


def first_columns(t: torch.Tensor, k: int, field: str, knob: str) -> torch.Tensor:
    """The first k columns of a [B, T, K'] cache (a larger cache serves a smaller k)."""
    if t.shape[-1] < k:
        raise ValueError(f"batch.{field} has {t.shape[-1]} columns but estimator.{knob}={k}")
    return t[..., :k]


def positive(value: float, knob: str) -> None:
    if not value > 0:
        raise ValueError(f"estimator.{knob}={value}: must be > 0")


def check_common(cfg: EstimatorConfig) -> None:
    if cfg.chunk_tokens < 1:
        raise ValueError(f"estimator.chunk_tokens={cfg.chunk_tokens}: must be >= 1 (tokens per chunk)")


@dataclass
class Tokens:
    """The real (masked) positions of a batch, flattened row-major over [B, T]."""

    logits: torch.Tensor
    batch: EstimatorBatch
    cfg: EstimatorConfig
    rows: torch.Tensor  # [n] flat indices into [B*T]

    @classmethod
    def of(cls, logits: torch.Tensor, batch: EstimatorBatch, cfg: EstimatorConfig) -> Tokens:
        if logits.dim() != 3 or logits.shape[:2] != batch.mask.shape:
            raise ValueError(f"logits must be [B, T, V] matching batch.mask {tuple(batch.mask.shape)}, "
                             f"got {tuple(logits.shape)}")
        return cls(logits, batch, cfg, real_rows(batch.mask.bool()).to(logits.device))

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    def pick(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [n, ...] at the real positions, on the logits' device."""
        return t.reshape(-1, *t.shape[2:]).index_select(0, self.rows.to(t.device)).to(self.logits.device)

    def student(self, ids: torch.Tensor, tail_ids: torch.Tensor | None = None) -> TokenLogprobs:
        """Student log-probs at per-token ids [n, K] (and the log tail mass outside tail_ids)."""
        return token_logprobs(self.logits, self.rows, ids, tail_ids, chunk_tokens=self.cfg.chunk_tokens,
                              shard=self.batch.vocab_shard)

    def mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """Token mean over the whole batch (a graph-connected zero when the batch has no real token)."""
        if self.n == 0:
            return self.logits.sum() * 0.0
        return per_token.sum() / self.n


def avg(t: torch.Tensor) -> float:
    return float(t.detach().double().mean()) if t.numel() else 0.0


def metrics(loss: torch.Tensor, kl: torch.Tensor, entropy: torch.Tensor, **extra: torch.Tensor | float
            ) -> dict[str, float]:
    """loss, kl (per-token estimate of the divergence being minimised), entropy, and family extras."""
    out = {"loss": float(loss.detach()), "kl": avg(kl), "entropy": avg(entropy)}
    for key, value in extra.items():
        out[key] = avg(value) if isinstance(value, torch.Tensor) else float(value)
    return out


def weighted(logw: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """exp(logw) * value, with 0 where the weight is exactly 0 (so 0 * inf terms vanish)."""
    zero = logw == float("-inf")
    safe = torch.where(zero, torch.zeros_like(value), value)
    return torch.where(zero, torch.zeros_like(value), torch.exp(logw) * safe)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurately; -inf at x >= 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_ratio(logp: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return (logp - base).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
