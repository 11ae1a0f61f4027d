"""The hf learner backend: the Hugging Face student in plain PyTorch with torch AdamW, one process, on the CPU."""

from pathlib import Path
from typing import Any

import torch

from asyncopd.config.schema import LearnerConfig
from asyncopd.core.types import LearnerBatch
from asyncopd.data.tokenizer import copy_tokenizer_files
from asyncopd.learner.collate import merge_metrics, micro_batches
from asyncopd.learner.trainer import LossFn, Weights, student_vocab
from asyncopd.model.build import load_model
from asyncopd.weights.broadcast import plan_buckets

STATE_FILE = "learner_state.pt"


def adamw_param_groups(named_params, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, none on biases and norms (1-D parameters): megatron's default split, so both
    learners optimise the same objective."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    return [{"params": [p for _, p in params if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for _, p in params if p.dim() <= 1], "weight_decay": 0.0}]


class HFBackend:
    """Any Hugging Face causal LM (Qwen2, Qwen3 and Llama are tested) on the CPU, saved as Hugging Face checkpoints."""

    def __init__(self, cfg: LearnerConfig, model_path: str):
        self.cfg = cfg
        self.module = load_model(model_path)
        self.module.train()
        self.vocab_size = student_vocab(model_path, self.module.config)
        self.model_path = model_path
        self.optimizer = torch.optim.AdamW(adamw_param_groups(self.module.named_parameters(), cfg.weight_decay),
                                           lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))

    def to_device(self, batch: LearnerBatch) -> LearnerBatch:
        return batch  # the model stays on the CPU

    def _logits(self, batch: LearnerBatch) -> torch.Tensor:
        """Logits over the tokenizer's ids: padded embedding rows sliced off (exact: see asyncopd.model.scorer)."""
        logits = self.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits[..., : self.vocab_size].float()

    def train_step(self, batch: LearnerBatch, loss_fn: LossFn, lr: float) -> dict[str, float]:
        """Gradient accumulation over micro-batches, each weighted by its share of the batch's real tokens."""
        self.optimizer.zero_grad(set_to_none=True)
        total = int(batch.est.mask.sum())
        parts = []
        for mb in micro_batches(batch, self.cfg.micro_batch_size):
            loss, metrics = loss_fn(self._logits(mb), mb, None)
            n = int(mb.est.mask.sum())
            (loss * (n / total) if total else loss).backward()
            parts.append((metrics, n))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return {**merge_metrics(parts), "grad_norm": grad_norm}

    @torch.no_grad()
    def forward_only(self, batch: LearnerBatch, fn) -> list:
        return [fn(self._logits(mb), mb, None) for mb in micro_batches(batch, self.cfg.micro_batch_size)]

    def named_weights_for_rollout(self, bucket_bytes: int) -> Weights:
        params = {name: p.detach() for name, p in self.module.named_parameters()}
        for names in plan_buckets(params, bucket_bytes):
            yield [(name, params[name]) for name in names]

    def save(self, path: str, state: dict[str, Any]) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.module.save_pretrained(out)
        copy_tokenizer_files(self.model_path, out)
        torch.save({**state, "optimizer": self.optimizer.state_dict()}, out / STATE_FILE)

    def load(self, path: str) -> dict[str, Any]:
        state_file = Path(path) / STATE_FILE
        if not state_file.exists():
            raise FileNotFoundError(f"{path} is not a learner checkpoint: {STATE_FILE} is missing")
        self.module.load_state_dict(load_model(path).state_dict())
        state = torch.load(state_file, weights_only=False)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return state

    def close(self) -> None:
        pass  # nothing held beyond the module
