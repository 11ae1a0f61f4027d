"""The hf learner backend: the Hugging Face student in plain PyTorch, one process, on the CPU."""

from pathlib import Path
from typing import Any

import torch

from asyncopd.core.types import LearnerBatch
from asyncopd.data.tokenizer import copy_tokenizer_files
from asyncopd.learner.trainer import Weights, student_vocab
from asyncopd.model.build import load_model
from asyncopd.weights.broadcast import plan_buckets

STATE_FILE = "learner_state.pt"


class HFBackend:
    """Any Hugging Face causal LM (Qwen2, Qwen3 and Llama are tested) on the CPU, saved as Hugging Face checkpoints."""

    def __init__(self, model_path: str):
        self.module = load_model(model_path)
        self.module.train()
        self.vocab_size = student_vocab(model_path, self.module.config)
        self.model_path = model_path

    def to_device(self, batch: LearnerBatch) -> LearnerBatch:
        return batch  # the model stays on the CPU

    def forward_logits(self, batch: LearnerBatch) -> torch.Tensor:
        """Logits over the tokenizer's ids: padded embedding rows sliced off (exact: see asyncopd.model.scorer)."""
        logits = self.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits[..., : self.vocab_size].float()

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))

    def named_weights_for_rollout(self, bucket_bytes: int) -> Weights:
        params = {name: p.detach() for name, p in self.module.named_parameters()}
        for names in plan_buckets(params, bucket_bytes):
            yield [(name, params[name]) for name in names]

    def save(self, path: str, state: dict[str, Any]) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.module.save_pretrained(out)
        copy_tokenizer_files(self.model_path, out)
        torch.save(state, out / STATE_FILE)

    def load(self, path: str) -> dict[str, Any]:
        state_file = Path(path) / STATE_FILE
        if not state_file.exists():
            raise FileNotFoundError(f"{path} is not a learner checkpoint: {STATE_FILE} is missing")
        self.module.load_state_dict(load_model(path).state_dict())
        return torch.load(state_file, weights_only=False)

    def close(self) -> None:
        pass  # nothing held beyond the module
