"""The megatron learner backend: the student as megatron-core GPTModel chunks, tensor x pipeline x data parallel.

    every rank: the same LearnerBatch
      -> its DP replica's rows -> micro-batches (learner.micro_batch_size)
      -> get_forward_backward_func(): 1F1B over the pipeline stages (interleaved with learner.virtual_pp > 1)
           last stage: logits stay vocabulary-sharded over TP (parallel_output=True); the trainer's LossFn runs
           the estimator on the shard (estimators.vocab_parallel): no rank holds full-vocabulary logits
      -> megatron DDP: gradients summed over micro-batches and replicas, scaled by 1 / (real tokens in the batch)
      -> megatron optimizer (the distributed optimizer shards Adam and the fp32 main weights over DP; bf16
         parameters keep fp32 main weights and fp32 gradients), global-norm clipping
    weight export: tensor by tensor, TP-gathered, sent from its stage to global rank 0 (convert.export_hf_weights)
    checkpoints: megatron's dist_checkpointing, resharded on load to any TP / PP / DP layout (checkpoint.py)

On CPU (no CUDA) `patches` makes megatron-core run with gloo, and every megatron call runs inside
`patches.cpu_cuda_calls.scope()`; with a GPU the model lives on the local device and the process group is NCCL.
"""

import dataclasses
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asyncopd.config.schema import LearnerConfig
from asyncopd.core.types import LearnerBatch
from asyncopd.data.tokenizer import copy_tokenizer_files
from asyncopd.estimators.vocab_parallel import VocabShard
from asyncopd.learner.collate import merge_metrics, micro_batches
from asyncopd.learner.megatron.checkpoint import load_checkpoint, read_state, save_checkpoint
from asyncopd.learner.megatron.convert import (
    HF_INDEX,
    HF_WEIGHTS,
    ChunkSpan,
    DecoderLayout,
    export_hf_weights,
    hf_tensor_loader,
    load_hf_into_megatron,
)
from asyncopd.learner.megatron.parallel import init_parallel, placement
from asyncopd.learner.megatron.patches.cpu_cuda_calls import scope
from asyncopd.learner.megatron.patches.fp8 import fp8_context, require_transformer_engine
from asyncopd.learner.trainer import LossFn, Weights, student_vocab

RECOMPUTE = {"none": {}, "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                                  "recompute_num_layers": 1},
             "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def variable_shapes(cfg: LearnerConfig) -> bool:
    """Whether micro-batches may differ in shape. Not with the interleaved schedule at pp=2 over gloo: there a
    stage's previous and next stage are one rank, and megatron's shape exchange (always batched, whatever
    batch_p2p_comm says) pairs gloo's same-tag messages the wrong way round and hangs. Those micro-batches are
    then all the batch's length and learner.micro_batch_size samples."""
    return not (cfg.virtual_pp > 1 and cfg.pp == 2 and not torch.cuda.is_available())


def transformer_config(layout: DecoderLayout, cfg: LearnerConfig):
    """The TransformerConfig of the student's family at the configured layout, precision and recomputation."""
    from megatron.core.transformer import TransformerConfig

    if cfg.precision not in PRECISIONS:
        raise ValueError(f"learner.precision={cfg.precision!r} is unknown: choose one of {sorted(PRECISIONS)}")
    if cfg.recompute not in RECOMPUTE:
        raise ValueError(f"learner.recompute={cfg.recompute!r} is unknown: choose one of {sorted(RECOMPUTE)}")
    dtype, on_gpu = PRECISIONS[cfg.precision], torch.cuda.is_available()
    return TransformerConfig(
        num_layers=layout.num_layers, hidden_size=layout.hidden, num_attention_heads=layout.heads,
        num_query_groups=layout.groups, kv_channels=layout.head_dim, ffn_hidden_size=layout.ffn,
        normalization="RMSNorm", layernorm_epsilon=layout.eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=layout.qkv_bias,
        qk_layernorm=layout.qk_norm, hidden_dropout=0.0, attention_dropout=layout.attention_dropout,
        init_method_std=layout.init_std,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True, params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp, sequence_parallel=False,
        virtual_pipeline_model_parallel_size=cfg.virtual_pp if cfg.virtual_pp > 1 else None,
        use_cpu_initialization=not on_gpu,
        # every micro-batch is trimmed to its own longest sample: the stages exchange shapes first
        variable_seq_lengths=variable_shapes(cfg), moe_token_dispatcher_type="alltoall",  # 0.16.1: not allgather
        # batched p2p gives silently wrong activations on gloo with the interleaved schedule at pp=2
        batch_p2p_comm=on_gpu,
        calculate_per_token_loss=True,  # the loss is a token mean over the whole batch (Trainer.loss)
        **RECOMPUTE[cfg.recompute],
    )


def build_chunk(layout: DecoderLayout, config, span: ChunkSpan, vp_stage: int | None, use_te: bool = False):
    """One model chunk: a GPTModel holding the span's layers (and the embedding / head where the span has them),
    its output layer vocabulary-sharded over TP."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = (get_gpt_layer_with_transformer_engine_spec(qk_layernorm=layout.qk_norm) if use_te
            else get_gpt_layer_local_spec(qk_layernorm=layout.qk_norm, normalization="RMSNorm"))
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=layout.padded_vocab,
        max_sequence_length=layout.max_positions, pre_process=span.pre_process, post_process=span.post_process,
        parallel_output=True, share_embeddings_and_output_weights=layout.tied, position_embedding_type="rope",
        rotary_percent=1.0, rotary_base=layout.rope_theta, vp_stage=vp_stage,
    )
    first = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else span.first
    if first != span.first or len(model.decoder.layers) != span.last - span.first:
        raise AssertionError(f"megatron built layers from {first} ({len(model.decoder.layers)}), the conversion "
                             f"expects [{span.first}, {span.last})")
    if layout.llama3_rope is not None:
        # GPTModel's rope_scaling passes only the factor (the rest fixed at Llama 3.1's 1, 4, 8192): apply
        # megatron's llama3 scaling with every parameter of the checkpoint instead
        r, rotary = layout.llama3_rope, model.rotary_pos_emb
        rotary.inv_freq = rotary._apply_scaling(rotary.inv_freq, factor=r.factor, low_freq_factor=r.low_freq_factor,
                                                high_freq_factor=r.high_freq_factor,
                                                original_max_position_embeddings=r.original_max_positions)
    return model.cuda() if torch.cuda.is_available() else model


def attention_mask_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 1/0 padding mask -> megatron's bool [B, 1, L, L] mask (True = masked): causal and key padding."""
    L = attention_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    return (~allowed).unsqueeze(1)


class MegatronBackend:
    """This rank's chunks of a GPTModel converted from a Hugging Face Qwen2, Qwen3 or Llama checkpoint, under
    megatron's DDP and optimizer."""

    def __init__(self, cfg: LearnerConfig, model_path: str, init_weights: bool = True):
        import transformers
        from megatron.core import parallel_state as ps

        require_transformer_engine(cfg)  # fail before any process group or model is built
        if importlib.util.find_spec("psutil") is None:  # dist_checkpointing's writer: without it every rank hangs
            raise RuntimeError("the megatron learner needs psutil for its checkpoints: pip install psutil")
        if not (Path(model_path) / "config.json").exists():
            raise FileNotFoundError(f"{model_path}: no config.json; not a Hugging Face checkpoint "
                                    "(run `asyncopd prepare` first)")
        self.cfg = cfg
        self.model_path = model_path
        self.hf_config = transformers.AutoConfig.from_pretrained(model_path)
        self._owns_process_group = init_parallel(cfg)
        self.layout = DecoderLayout.from_hf_config(self.hf_config, cfg.tp, cfg.vocab_divisible_by)
        self.where = placement(self.layout.num_layers, cfg)
        self.vocab_size = student_vocab(model_path, self.hf_config)  # <= layout.vocab <= layout.padded_vocab
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.shard = VocabShard.partition(self.layout.padded_vocab // cfg.tp, self.where.tp_group) \
            if cfg.tp > 1 else None
        with scope():
            self.config = transformer_config(self.layout, cfg)
            vp = cfg.virtual_pp > 1
            self.chunks = [build_chunk(self.layout, self.config, span, c if vp else None, use_te=cfg.fp8)
                           for c, span in enumerate(self.where.spans)]
            if not init_weights:  # an export: the weights come from a megatron checkpoint next, and neither a
                self.model, self.optimizer = self.chunks, None  # grad buffer nor an optimizer is built
                return
            loader = hf_tensor_loader(model_path)
            for chunk, span in zip(self.chunks, self.where.spans, strict=True):
                load_hf_into_megatron(chunk, loader, self.layout, self.where.tp_rank, cfg.tp, span)
            self.model = [self._wrap(chunk) for chunk in self.chunks]
            self.optimizer = self._optimizer()
        for m in self.model:
            m.train()

    def _wrap(self, chunk: torch.nn.Module) -> torch.nn.Module:
        """Float16Module (bf16) inside megatron's DDP, whose grad buffer accumulates in fp32."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        if self.config.bf16:
            chunk = Float16Module(self.config, chunk)
        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=self.cfg.distributed_optimizer)
        return DistributedDataParallel(self.config, ddp, chunk)

    def _optimizer(self):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        c = self.cfg
        opt = OptimizerConfig(optimizer="adam", lr=c.lr, weight_decay=c.weight_decay, adam_beta1=c.adam_beta1,
                              adam_beta2=c.adam_beta2, adam_eps=1e-8, clip_grad=c.grad_clip, bf16=self.config.bf16,
                              params_dtype=self.config.params_dtype,
                              use_distributed_optimizer=c.distributed_optimizer)
        self.config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        return get_megatron_optimizer(opt, self.model)

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

    def _my_micro_batches(self, batch: LearnerBatch) -> list[LearnerBatch]:
        """This DP replica's contiguous share of the batch, in micro-batches."""
        B, dp, r = batch.input_ids.shape[0], self.cfg.dp, self.where.dp_rank
        if B < dp:
            raise ValueError(f"a batch of {B} samples cannot feed learner.dp={dp} replicas: raise pipeline.batch_size")
        start, stop = r * B // dp, (r + 1) * B // dp
        uniform = not variable_shapes(self.cfg)
        if uniform and (self.cfg.micro_batch_size < 1 or (stop - start) % self.cfg.micro_batch_size):
            raise ValueError(f"the interleaved schedule at learner.pp=2 on CPU needs micro-batches of equal size: "
                             f"set learner.micro_batch_size to a divisor of the {stop - start} samples per replica")
        mbs = micro_batches(batch, self.cfg.micro_batch_size, start, stop, trim=not uniform)
        if self.cfg.virtual_pp > 1 and len(mbs) % self.cfg.pp:
            raise ValueError(f"the interleaved schedule needs a multiple of learner.pp={self.cfg.pp} micro-batches per "
                             f"replica, got {len(mbs)} ({stop - start} samples, learner.micro_batch_size="
                             f"{self.cfg.micro_batch_size})")
        return mbs

    def _forward_step(self, on_output: Callable[[torch.Tensor, LearnerBatch], Any]):
        """megatron's forward_step_func: a chunk's forward on the next micro-batch; `on_output(logits, mb)` is the
        loss function the schedule calls on the last stage."""
        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            ids = mb.input_ids
            # right padding: real tokens sit at 0..n-1, so plain positions match HF's
            position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            with fp8_context(self.cfg):
                out = model(input_ids=ids, position_ids=position_ids,
                            attention_mask=attention_mask_for(mb.attention_mask))
            return out, lambda output: on_output(output, mb)
        return forward_step

    def _logits(self, output: torch.Tensor) -> torch.Tensor:
        """The last stage's [b, s, padded_vocab / tp] output as float32 logits of this rank's vocabulary shard.
        Padded ids (megatron's, up to layout.padded_vocab, and the checkpoint's own rows past the tokenizer's ids)
        get no probability mass nor gradient: sliced off without TP, -inf on a shard (which may hold only them)."""
        if self.shard is None:
            return output[..., : self.vocab_size].float()
        real = self.vocab_size - self.shard.start
        logits = output.float()
        if real < self.shard.size:
            padded = torch.arange(self.shard.size, device=logits.device) >= real
            logits = logits.masked_fill(padded, float("-inf"))
        return logits

    def _schedule(self, mbs: list[LearnerBatch], on_output, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        iters = [iter(mbs) for _ in self.model] if len(self.model) > 1 else iter(mbs)
        with scope():
            return get_forward_backward_func()(
                forward_step_func=self._forward_step(on_output), data_iterator=iters,
                model=self.model if len(self.model) > 1 else self.model[0], num_microbatches=len(mbs),
                seq_length=max(mb.input_ids.shape[1] for mb in mbs), micro_batch_size=max(
                    mb.input_ids.shape[0] for mb in mbs), forward_only=forward_only)

    def train_step(self, batch: LearnerBatch, loss_fn: LossFn, lr: float) -> dict[str, float]:
        """zero the grad buffers, the pipeline schedule over this replica's micro-batches, one optimizer step.

        Each micro-batch's loss is its token-mean times its real tokens (a sum); megatron sums the gradients over
        micro-batches and replicas and scales them by one over the batch's real tokens (calculate_per_token_loss):
        the gradient of the token mean over the whole batch, as the hf learner's."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

        def on_output(output, mb):
            loss, metrics = loss_fn(self._logits(output), mb, self.shard)
            n = mb.est.mask.sum().to(torch.int)
            return loss * n, n, {"metrics": metrics, "n": int(n)}

        parts = self._schedule(self._my_micro_batches(batch), on_output, forward_only=False)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            # megatron marks biases and norms wd_mult=0 but only its own lr scheduler applies it: apply it here, so
            # the decay is the hf learner's (matrices only)
            group["weight_decay"] = self.cfg.weight_decay * group.get("wd_mult", 1.0)
        with scope():
            _, grad_norm, _ = self.optimizer.step()
        metrics = self._batch_metrics([(p["metrics"], p["n"]) for p in parts])
        return {**metrics, "grad_norm": float(grad_norm)}

    def _batch_metrics(self, parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
        """The batch's token-weighted metrics on every rank: merged over the last stage's micro-batches, summed
        over the DP replicas, sent from the last stage to the others of its pipeline."""
        from megatron.core import parallel_state as ps

        merged = [merge_metrics(parts), sum(n for _, n in parts)] if self.last_stage else [None, 0]
        if self.cfg.pp > 1:
            dist.broadcast_object_list(merged, src=self.where.stage_ranks[-1],
                                       group=ps.get_pipeline_model_parallel_group())
        metrics, n = merged
        if self.cfg.dp > 1:
            keys = sorted(metrics)
            sums = torch.tensor([metrics[k] * n for k in keys] + [n], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums, group=ps.get_data_parallel_group())  # NCCL on GPUs: a device tensor
            total = max(float(sums[-1]), 1.0)
            metrics = {k: float(v) / total for k, v in zip(keys, sums[:-1], strict=True)}
        return metrics

    @torch.no_grad()
    def forward_only(self, batch: LearnerBatch, fn) -> list:
        results = []

        def on_output(output, mb):
            results.append(fn(self._logits(output), mb, self.shard))
            return output.sum() * 0, {}

        for m in self.model:
            m.eval()
        try:
            self._schedule(self._my_micro_batches(batch), on_output, forward_only=True)
        finally:
            for m in self.model:
                m.train()
        return results

    def named_weights_for_rollout(self, bucket_bytes: int) -> Weights:
        """Full weights under HF names on global rank 0, streamed from every stage and gathered across TP, in
        buckets. Collective: every rank must consume it."""
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in export_hf_weights(self.chunks, self.layout, self.where):
            if bucket and size + tensor.nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, tensor))
            size += tensor.nbytes
        if bucket:
            yield bucket

    def save(self, path: str, state: dict[str, Any]) -> None:
        with scope():
            save_checkpoint(self, path, state)

    def load(self, path: str) -> dict[str, Any]:
        with scope():
            return load_checkpoint(self, path)

    def load_weights_only(self, path: str) -> None:
        with scope():
            load_checkpoint(self, path, optimizer=False)

    def close(self) -> None:
        """Tear down megatron's parallel state, and the process group if this backend started it."""
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False


def export_hf(checkpoint: str, out_dir: str, bucket_bytes: int = 2 << 30) -> Path:
    """Write the checkpoint's weights as a Hugging Face checkpoint (config, tokenizer, safetensors shards with an
    index when there is more than one), in one process at TP = PP = DP = 1, streamed shard by shard."""
    from safetensors.torch import save_file

    state = read_state(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = MegatronBackend(LearnerConfig(backend="megatron", precision=state.get("precision", "fp32"),
                                            distributed_optimizer=False), checkpoint, init_weights=False)
    try:
        backend.load_weights_only(checkpoint)
        files, weight_map = [], {}
        for i, bucket in enumerate(backend.named_weights_for_rollout(bucket_bytes)):
            name = f"model-{i + 1:05d}.safetensors"
            save_file({n: t.contiguous() for n, t in bucket}, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({n: name for n, _ in bucket})
    finally:
        backend.close()
    if len(files) == 1:
        (out / files[0]).rename(out / HF_WEIGHTS)
    else:
        total = sum((out / f).stat().st_size for f in files)
        (out / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2))
    backend.hf_config.save_pretrained(out)
    copy_tokenizer_files(checkpoint, out)
    return out
