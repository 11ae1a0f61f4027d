"""Megatron learner checkpoints: megatron-core's dist_checkpointing, resharded on load to any TP / PP / DP layout.

    <ckpt>/learner_state.pt       the trainer state (the version: the staleness clock) and the layout saved at
    <ckpt>/config.json, tokenizer  the student's Hugging Face config and tokenizer (what `export-hf` writes next to)
    <ckpt>/megatron/              dist_checkpointing: the model and the optimizer, sharded by global tensor keys

The optimizer is saved in the distributed optimizer's `fully_reshardable` format (each parameter's Adam state in
its canonical shape), so a checkpoint saved at TP=2 resumes at PP=2 x DP=2 and so on. Publishing a checkpoint
atomically and keeping the last N is asyncopd.learner.checkpoints' job; `model.export_hf` turns any checkpoint
into a Hugging Face one in a single process.
"""

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asyncopd.data.tokenizer import copy_tokenizer_files

STATE_FILE = "learner_state.pt"
SHARDED_DIR = "megatron"
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_state(backend: Any) -> dict:
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(backend.chunks)}


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def save_checkpoint(backend: Any, path: str, state: dict[str, Any]) -> None:
    """Every rank writes its shards; rank 0 the trainer state, config and tokenizer. Collective."""
    from megatron.core import dist_checkpointing

    out = Path(path)
    (out / SHARDED_DIR).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model = _model_state(backend)
    sharded = {**model, "optimizer": backend.optimizer.sharded_state_dict(model, metadata=_OPTIMIZER_FORMAT)}
    dist_checkpointing.save(sharded, str(out / SHARDED_DIR))
    if dist.get_rank() == 0:
        c = backend.cfg
        torch.save({**state, "layout": {"tp": c.tp, "pp": c.pp, "dp": c.dp, "virtual_pp": c.virtual_pp},
                    "precision": c.precision}, out / STATE_FILE)
        backend.hf_config.save_pretrained(out)
        copy_tokenizer_files(backend.model_path, out)
    dist.barrier()


def read_state(path: str) -> dict[str, Any]:
    """The trainer state of a megatron checkpoint, or a clear error when `path` is not one."""
    state_file = Path(path) / STATE_FILE
    if not state_file.exists() or not (Path(path) / SHARDED_DIR).is_dir():
        raise FileNotFoundError(f"{path} is not a megatron learner checkpoint: {STATE_FILE} or {SHARDED_DIR}/ is "
                                "missing")
    return torch.load(state_file, weights_only=False)


def load_checkpoint(backend: Any, path: str, optimizer: bool = True) -> dict[str, Any]:
    """Restore the model and the optimizer from `path`, at this backend's layout; the saved trainer state.
    optimizer=False reads the model only (export: the optimizer's main weights are then stale)."""
    from megatron.core import dist_checkpointing

    state = read_state(path)
    if state.get("precision", "fp32") != backend.cfg.precision:
        raise ValueError(f"{path} was saved with learner.precision={state.get('precision')}, this learner has "
                         f"{backend.cfg.precision}: set learner.precision={state.get('precision')}")
    model = _model_state(backend)
    request = dict(model)
    if optimizer:
        for opt in _optimizers(backend.optimizer):
            init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
            if init is not None:  # the Adam state must exist (shapes) before a distributed optimizer can load it
                init()
        request["optimizer"] = backend.optimizer.sharded_state_dict(model, is_loading=True,
                                                                     metadata=_OPTIMIZER_FORMAT)
    loaded = dist_checkpointing.load(request, str(Path(path) / SHARDED_DIR))
    for i, chunk in enumerate(backend.chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=True)
    if optimizer:
        backend.optimizer.load_state_dict(loaded["optimizer"])
        _adam_steps(backend.optimizer, int(state["version"]))
    return state


def _adam_steps(optimizer, steps: int) -> None:
    """Give torch Adam's every parameter its own `step` after a load: megatron-core 0.16.1 restores one `step`
    tensor shared by all of them, which one optimizer step then advances once per parameter (Adam's bias
    correction silently wrong). The count is the version: one optimizer step per trainer step."""
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for param_state in (inner.state.values() if inner is not None else ()):
            if "step" in param_state:
                param_state["step"] = torch.tensor(float(steps))
