"""The Learner seam: what the pipeline asks of any learner backend (PyTorch, megatron-core)."""

from collections.abc import Iterator
from typing import Protocol

import torch

from asyncopd.learner.collate import LearnerBatch


class Learner(Protocol):
    version: int  # number of optimizer steps applied

    def train_step(self, batch: LearnerBatch) -> dict[str, float]:
        """One optimizer step on the batch; returns scalar metrics; bumps `version`."""

    def named_weights_for_rollout(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full (gathered) weights under Hugging Face names, in buckets of about `bucket_bytes`."""

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...
