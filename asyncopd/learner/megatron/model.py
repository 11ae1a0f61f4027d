"""The megatron learner backend: the student as a megatron-core GPTModel, tensor parallel, one process per TP rank.

Every rank runs the same Trainer.train_step on the same batch (asyncopd.learner.group feeds them all), so the
loss, the logits and the replicated weights agree on every rank; this backend gives the trainer the sharded
model, a gradient-norm clip reduced across TP ranks, the weight export (gathered, under Hugging Face names) and
per-rank checkpoints. On CPU (no CUDA) `patches` makes megatron-core run with gloo; with a GPU the model and the
batch live on the local CUDA device and the default process group is NCCL.
"""

import dataclasses
import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asyncopd.config.schema import LearnerConfig
from asyncopd.core.errors import ConfigError
from asyncopd.core.types import LearnerBatch
from asyncopd.data.tokenizer import copy_tokenizer_files
from asyncopd.learner.megatron import patches
from asyncopd.learner.megatron.convert import (
    HF_WEIGHTS,
    DecoderLayout,
    gather_hf_weights,
    hf_tensor_loader,
    load_hf_into_megatron,
)
from asyncopd.learner.megatron.patches.fp8 import fp8_context, require_transformer_engine
from asyncopd.learner.trainer import Weights, student_vocab
from asyncopd.weights.process_group import find_free_port

STATE_FILE = "learner_state.rank{rank}.pt"


def init_parallel(tp: int, pp: int = 1, seed: int = 0) -> bool:
    """Bring up torch.distributed (a 1-rank group when nothing started it) and megatron's TP groups.

    Returns True when it started the default process group itself (tp=1, single process)."""
    from megatron.core import parallel_state, tensor_parallel

    patches.apply()
    if pp != 1:
        raise ConfigError(f"learner.pp={pp}: the megatron learner implements one pipeline stage only; set "
                          "learner.pp=1 (learner.tp shards the model across ranks)")
    created = not dist.is_initialized()
    if created:
        if tp != 1:
            raise RuntimeError(f"learner.tp={tp} needs {tp} processes in an initialised torch.distributed group "
                               "(one per TP rank); only tp=1 can start its own group")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=10))
    world = dist.get_world_size()
    if world != tp * pp:
        raise ValueError(f"torch.distributed world size {world} != learner.tp * learner.pp = {tp * pp}; "
                         "data parallelism is not supported by the megatron learner")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return created


def build_gpt_model(layout: DecoderLayout, tp: int, use_te: bool = False) -> torch.nn.Module:
    """A GPTModel matching the layout's family (RMSNorm, SwiGLU, RoPE; Qwen2's QKV bias, Qwen3's q/k norms, Llama
    3's RoPE scaling; no other bias), fp32, full-vocab output."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=layout.num_layers, hidden_size=layout.hidden, num_attention_heads=layout.heads,
        num_query_groups=layout.groups, kv_channels=layout.head_dim, ffn_hidden_size=layout.ffn,
        normalization="RMSNorm", layernorm_epsilon=layout.eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=layout.qkv_bias,
        qk_layernorm=layout.qk_norm, hidden_dropout=0.0, attention_dropout=layout.attention_dropout,
        init_method_std=layout.init_std,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True, params_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
        use_cpu_initialization=not on_gpu,
    )
    spec = (get_gpt_layer_with_transformer_engine_spec(qk_layernorm=layout.qk_norm) if use_te
            else get_gpt_layer_local_spec(qk_layernorm=layout.qk_norm, normalization="RMSNorm"))
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=layout.padded_vocab,
        max_sequence_length=layout.max_positions, pre_process=True, post_process=True,
        parallel_output=False,  # the output layer gathers the vocab shards: [b, s, padded_vocab] on every rank
        share_embeddings_and_output_weights=layout.tied, position_embedding_type="rope",
        rotary_percent=1.0, rotary_base=layout.rope_theta,
    )
    if layout.llama3_rope is not None:
        # GPTModel's rope_scaling passes only the factor (the rest fixed at Llama 3.1's 1, 4, 8192): apply
        # megatron's llama3 scaling with every parameter of the checkpoint instead
        r, rotary = layout.llama3_rope, model.rotary_pos_emb
        rotary.inv_freq = rotary._apply_scaling(rotary.inv_freq, factor=r.factor, low_freq_factor=r.low_freq_factor,
                                                high_freq_factor=r.high_freq_factor,
                                                original_max_position_embeddings=r.original_max_positions)
    model.hf_layout = layout
    return model.cuda() if on_gpu else model


def attention_mask_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 1/0 padding mask -> megatron's bool [B, 1, L, L] mask (True = masked): causal and key padding."""
    L = attention_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    return (~allowed).unsqueeze(1)


@torch.no_grad()
def sum_head_norm_grads(module: torch.nn.Module, tp_group) -> None:
    """Sum the q/k norm gradients over the TP ranks, as megatron's finalize_model_grads does.

    The norm is one replicated weight, but each rank applies it to its own heads only, so each rank's gradient
    holds its heads' share."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    for name, p in module.named_parameters():
        if p.grad is not None and ("q_layernorm" in name or "k_layernorm" in name):
            dist.all_reduce(p.grad, group=tp_group)


@torch.no_grad()
def clip_grad_norm_tp(params, max_norm: float, tp_group) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2) over the full model, when `params` are this rank's TP shards."""
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    grads = [p.grad for p in params if p.grad is not None]
    # a TP-sharded parameter's shards are disjoint (count every rank's); a replicated one is counted on rank 0 only
    counted = [p.grad for p in params
               if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or rank == 0)]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in counted:
        sq += g.detach().double().pow(2).sum()
    if tp > 1:
        dist.all_reduce(sq, group=tp_group)
    total = sq.sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


class MegatronBackend:
    """This TP rank's shard of a GPTModel converted from a Hugging Face Qwen2, Qwen3 or Llama checkpoint."""

    def __init__(self, cfg: LearnerConfig, model_path: str):
        import transformers
        from megatron.core import parallel_state

        require_transformer_engine(cfg)  # fail before any process group or model is built
        if not (Path(model_path) / "config.json").exists():
            raise FileNotFoundError(f"{model_path}: no config.json; not a Hugging Face checkpoint "
                                    "(run `asyncopd prepare` first)")
        self.cfg = cfg
        self._owns_process_group = init_parallel(cfg.tp, cfg.pp, cfg.seed)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.hf_config = transformers.AutoConfig.from_pretrained(model_path)
        self.layout = DecoderLayout.from_hf_config(self.hf_config, cfg.tp, cfg.vocab_divisible_by)
        self.model_path = model_path
        self.vocab_size = student_vocab(model_path, self.hf_config)  # <= layout.vocab <= layout.padded_vocab
        self.module = build_gpt_model(self.layout, cfg.tp, use_te=cfg.fp8)
        load_hf_into_megatron(self.module, hf_tensor_loader(model_path), self.layout, self.tp_rank, cfg.tp)
        self.module.train()

    def to_device(self, batch: LearnerBatch) -> LearnerBatch:
        """Every tensor of the batch on this rank's device (the local GPU; a no-op on CPU)."""
        if self.device.type == "cpu":
            return batch
        est = dataclasses.replace(batch.est, **{
            f.name: getattr(batch.est, f.name).to(self.device) for f in dataclasses.fields(batch.est)
            if isinstance(getattr(batch.est, f.name), torch.Tensor)})
        return dataclasses.replace(batch, input_ids=batch.input_ids.to(self.device),
                                   attention_mask=batch.attention_mask.to(self.device),
                                   response_index=batch.response_index.to(self.device), est=est)

    def forward_logits(self, batch: LearnerBatch) -> torch.Tensor:
        """[B, L, V] logits over the tokenizer's V ids, gathered across TP.

        One slice drops both paddings: megatron's (rows up to layout.padded_vocab, zero, for an even TP split) and
        the checkpoint's own (HF rows past the tokenizer's ids), so no padded id gets probability mass and their
        rows get no gradient from the loss. The output layer gathers its vocabulary shards (parallel_output=False)
        and the estimators run dense: their vocabulary-parallel path (EstimatorBatch.vocab_shard) is not wired
        here, and wiring it must mask the same ids on the shards that hold them."""
        input_ids = batch.input_ids
        # right padding: real tokens sit at 0..n-1, so plain positions match HF's
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        with fp8_context(self.cfg):
            logits = self.module(input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask_for(batch.attention_mask))
        return logits[..., : self.vocab_size].float()

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global norm over the full model (TP shards reduced across ranks), identical on every rank.

        Completes the q/k norms' partial gradients first: the trainer calls this after every backward."""
        sum_head_norm_grads(self.module, self.tp_group)
        return float(clip_grad_norm_tp(list(self.module.parameters()), max_norm, self.tp_group))

    def named_weights_for_rollout(self, bucket_bytes: int) -> Weights:
        """Full weights under HF names, gathered across TP. Collective: every TP rank must consume it."""
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in gather_hf_weights(self.module, self.tp_group, self.layout):
            if bucket and size + tensor.nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, tensor))
            size += tensor.nbytes
        if bucket:
            yield bucket

    def save(self, path: str, state: dict[str, Any]) -> None:
        """HF checkpoint (rank 0: config.json + model.safetensors) + this rank's optimizer state. Collective."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        weights = {name: t.detach().cpu().clone()
                   for name, t in gather_hf_weights(self.module, self.tp_group, self.layout)}
        if dist.get_rank() == 0:
            self.hf_config.save_pretrained(out)
            save_file(weights, str(out / HF_WEIGHTS), metadata={"format": "pt"})
            copy_tokenizer_files(self.model_path, out)
        torch.save({**state, "tp": self.cfg.tp}, out / STATE_FILE.format(rank=self.tp_rank))
        dist.barrier()

    def load(self, path: str) -> dict[str, Any]:
        """The weights from the HF checkpoint; the state from this rank's shard, saved at the same tp."""
        state_file = Path(path) / STATE_FILE.format(rank=self.tp_rank)
        if not state_file.exists():
            raise FileNotFoundError(f"{path} is not a megatron learner checkpoint: {state_file.name} is missing")
        state = torch.load(state_file, weights_only=False, map_location=self.device)
        if state.get("tp") != self.cfg.tp:
            raise ValueError(f"{path} was saved with learner.tp={state.get('tp')}, this learner has tp={self.cfg.tp}")
        load_hf_into_megatron(self.module, hf_tensor_loader(path), self.layout, self.tp_rank, self.cfg.tp)
        return state

    def close(self) -> None:
        """Tear down megatron's parallel state, and the process group if this backend started it."""
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False
