"""Hugging Face Qwen2 / Qwen3 / Llama (3) <-> megatron-core GPTModel weights, with tensor-parallel sharding.

Megatron layout (per decoder layer i, prefix `decoder.layers.{i}.`), TP size t, rank r:
- `self_attention.linear_qkv.weight|bias` column-parallel, rows grouped per KV group g:
  [q heads of g (np/ng * hn rows) | k_g (hn) | v_g (hn)], g = 0..ng-1; rank r holds groups
  [r*ng/t, (r+1)*ng/t) - a contiguous dim-0 slice of the interleaved tensor (needs ng % t == 0). Only Qwen2
  has the bias.
- `self_attention.q_layernorm.weight`, `k_layernorm.weight` (Qwen3's q_norm / k_norm: one RMSNorm over head_dim
  shared by the heads) replicated; each rank applies them to its own heads only, so under TP their gradients
  are per-rank partial sums (model.sum_head_norm_grads completes them).
- `self_attention.linear_proj.weight` (o_proj) row-parallel: dim-1 slice.
- `mlp.linear_fc1.weight` column-parallel SwiGLU: rank r holds [gate_r ; up_r] (its slice of gate_proj, then
  its slice of up_proj: megatron's glu splits each rank's output in two halves, silu on the first).
- `mlp.linear_fc2.weight` (down_proj) row-parallel: dim-1 slice.
- `input_layernorm.weight`, `pre_mlp_layernorm.weight` (post_attention_layernorm), `decoder.final_layernorm.weight`
  replicated (Transformer Engine spec: fused into linear_qkv/linear_fc1 as `layer_norm_weight`).
- `embedding.word_embeddings.weight` (and `output_layer.weight` when untied) vocab-parallel: dim-0 slice of the
  vocabulary padded to `DecoderLayout.padded_vocab`; the padding rows are zero and are dropped on export.
Llama 3's RoPE scaling has no weights: model.build_gpt_model scales the rotary frequencies.

Why this module and not mbridge (compared on the tiny checkpoints of tests/_families.py, tied and untied, at
TP=1 and TP=2 over gloo; mbridge 0.15.1, megatron-core 0.16.1, transformers 5.24, torch 2.13 CPU): where mbridge
runs, its megatron state equals this module's parameter for parameter (torch.equal) and its HF export is exact,
but only after five workarounds: its undeclared `einops` import; `config.rope_theta`, which transformers 5 moved
into `rope_parameters`; a Transformer Engine-only layer spec (replaced by the local spec, plus name-map entries
for `input_layernorm` / `pre_mlp_layernorm`); sequence parallelism forced on at TP>1 (the local norm refuses it);
and a class-level name map that a tied checkpoint rewrites (lm_head -> embed_tokens), breaking the next untied one
of that family in the process. Llama 3 stays wrong after them: under transformers 5 mbridge drops llama3 RoPE
scaling (logits 6.8e-5 off HF, 9x the float32 tolerance), and where it reads the scaling (transformers 4's
`"rope_scaling" in config`, simulated) it applies the factor as linear position interpolation (1.3e-3 off). This
module (~330 lines with the config checks; mbridge's core and these three bridges: ~2000) is exact on all three
families at TP=1 and TP=2 and needs nothing beyond megatron-core, so it stays, and mbridge is no dependency.
"""

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Family:
    """What a Hugging Face model_type adds to the shared decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention)."""

    qkv_bias: bool  # q/k/v projections carry a bias (o_proj and the MLP never do here)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE


FAMILIES: dict[str, Family] = {
    "qwen2": Family(qkv_bias=True, qk_norm=False),
    "qwen3": Family(qkv_bias=False, qk_norm=True),
    "llama": Family(qkv_bias=False, qk_norm=False),
}


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1's RoPE frequency scaling (rope_type "llama3"), with the checkpoint's own parameters."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclass(frozen=True)
class DecoderLayout:
    """The shapes and features the conversion and the GPTModel need, read from a Hugging Face config."""

    family: str  # the model_type, a key of FAMILIES
    num_layers: int
    hidden: int
    heads: int
    groups: int  # key/value heads
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int
    tied: bool
    eps: float
    rope_theta: float
    max_positions: int
    qkv_bias: bool
    qk_norm: bool
    llama3_rope: Llama3Rope | None = None
    init_std: float = 0.02
    attention_dropout: float = 0.0

    @classmethod
    def from_hf_config(cls, hf_config, tp: int = 1, vocab_divisible_by: int = 128) -> "DecoderLayout":
        """The layout of `hf_config`; a feature this conversion cannot express raises, naming the config field."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(f"model_type={model_type!r}: the megatron learner converts the dense families "
                             f"{sorted(FAMILIES)}")
        family = FAMILIES[model_type]
        if getattr(hf_config, "use_sliding_window", False):
            raise NotImplementedError("use_sliding_window=True: sliding-window attention is not supported by the "
                                      "megatron learner")
        windowed = sorted({t for t in getattr(hf_config, "layer_types", None) or () if t != "full_attention"})
        if windowed:
            raise NotImplementedError(f"layer_types has {windowed}: only full attention is supported")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={hf_config.hidden_act!r}: only silu (SwiGLU) is supported")
        for field in ("attention_bias", "mlp_bias"):  # Llama / Qwen3: also a bias on o_proj / the MLP
            if getattr(hf_config, field, False):
                raise NotImplementedError(f"{field}=True: only Qwen2's q/k/v bias is supported")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise NotImplementedError(f"rope_parameters['rope_type']={rope_type!r}: only 'default' and 'llama3' "
                                      "rotary embeddings are supported")
        partial = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise NotImplementedError(f"partial_rotary_factor={partial}: only full rotary embeddings are supported")
        llama3 = None if rope_type == "default" else Llama3Rope(
            float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]))
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        heads = hf_config.num_attention_heads
        groups = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        if heads % groups:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
        if groups % tp:
            raise ValueError(f"learner.tp={tp} must divide num_key_value_heads={groups} "
                             "(megatron's split of a KV group across ranks is not supported here)")
        if hf_config.intermediate_size % tp:
            raise ValueError(f"learner.tp={tp} must divide intermediate_size={hf_config.intermediate_size}")
        multiple = max(1, vocab_divisible_by) * tp
        padded = -(-hf_config.vocab_size // multiple) * multiple
        return cls(family=model_type, num_layers=hf_config.num_hidden_layers, hidden=hf_config.hidden_size,
                   heads=heads, groups=groups, head_dim=head_dim, ffn=hf_config.intermediate_size,
                   vocab=hf_config.vocab_size, padded_vocab=padded,
                   tied=bool(getattr(hf_config, "tie_word_embeddings", False)), eps=hf_config.rms_norm_eps,
                   rope_theta=float(theta), max_positions=hf_config.max_position_embeddings,
                   qkv_bias=family.qkv_bias, qk_norm=family.qk_norm, llama3_rope=llama3,
                   init_std=getattr(hf_config, "initializer_range", 0.02),
                   attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)))


# ---- QKV interleaving -------------------------------------------------------------------------------------

def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DecoderLayout) -> torch.Tensor:
    """HF q/k/v (weights [rows, h] or biases [rows]) -> megatron's per-group [q.., k, v] rows."""
    ng, hn, per = layout.groups, layout.head_dim, layout.heads // layout.groups
    rest = q.shape[1:]
    parts = [q.reshape(ng, per * hn, *rest), k.reshape(ng, hn, *rest), v.reshape(ng, hn, *rest)]
    return torch.cat(parts, dim=1).reshape(ng * (per + 2) * hn, *rest)


def split_qkv(qkv: torch.Tensor, layout: DecoderLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of interleave_qkv (on the full, unsharded tensor)."""
    ng, hn, per = layout.groups, layout.head_dim, layout.heads // layout.groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, (per + 2) * hn, *rest)
    q, k, v = torch.split(grouped, [per * hn, hn, hn], dim=1)
    return (q.reshape(ng * per * hn, *rest), k.reshape(ng * hn, *rest), v.reshape(ng * hn, *rest))


# ---- per-parameter rules ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: str  # replicated | vocab | qkv | fc1 | row
    exported: bool = True  # False: a copy of another rule's weights (the tied output layer of the last stage)


@dataclass(frozen=True)
class ChunkSpan:
    """The part of the decoder one megatron model chunk holds: global layers [first, last), plus the embedding
    (pre_process: the first pipeline stage's first chunk) and the final norm and output layer (post_process)."""

    first: int
    last: int
    pre_process: bool = True
    post_process: bool = True

    @classmethod
    def whole(cls, layout: "DecoderLayout") -> "ChunkSpan":
        return cls(0, layout.num_layers)


def pipeline_spans(num_layers: int, pp: int, vpp: int = 1) -> list[list[ChunkSpan]]:
    """spans[stage][chunk]: megatron's even split of the layers over pp * vpp chunks, chunk c of stage s holding
    the (c * pp + s)-th slice (the interleaved order; vpp=1 is the plain one)."""
    if num_layers % (pp * vpp):
        raise ValueError(f"num_hidden_layers={num_layers} must be divisible by learner.pp * learner.virtual_pp = "
                         f"{pp * vpp}")
    per = num_layers // (pp * vpp)
    return [[ChunkSpan((c * pp + s) * per, (c * pp + s + 1) * per, pre_process=(s == 0 and c == 0),
                       post_process=(s == pp - 1 and c == vpp - 1)) for c in range(vpp)] for s in range(pp)]


def _rules(layout: DecoderLayout, norms_fused: bool, span: ChunkSpan | None = None) -> list[_Rule]:
    """Every parameter of the chunk `span` (None: the whole model), under the chunk's own (local) layer numbers."""
    span = span or ChunkSpan.whole(layout)
    rules = [_Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")] \
        if span.pre_process else []
    for i in range(span.first, span.last):
        m, h = f"decoder.layers.{i - span.first}.", f"model.layers.{i}."
        attn_norm = "self_attention.linear_qkv.layer_norm_weight" if norms_fused else "input_layernorm.weight"
        mlp_norm = "mlp.linear_fc1.layer_norm_weight" if norms_fused else "pre_mlp_layernorm.weight"
        rules += [
            _Rule(m + attn_norm, (h + "input_layernorm.weight",), "replicated"),
            _Rule(m + "self_attention.linear_qkv.weight",
                  tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
        ]
        if layout.qkv_bias:
            rules.append(_Rule(m + "self_attention.linear_qkv.bias",
                               tuple(h + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"))
        if layout.qk_norm:
            rules += [_Rule(m + f"self_attention.{p}_layernorm.weight", (h + f"self_attn.{p}_norm.weight",),
                            "replicated") for p in "qk"]
        rules += [
            _Rule(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "row"),
            _Rule(m + mlp_norm, (h + "post_attention_layernorm.weight",), "replicated"),
            _Rule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "fc1"),
            _Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "row"),
        ]
    if span.post_process:
        rules.append(_Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
        if not layout.tied:
            rules.append(_Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
        elif not span.pre_process:  # tied, split over stages: the last stage keeps a copy of the embedding
            rules.append(_Rule("output_layer.weight", ("model.embed_tokens.weight",), "vocab", exported=False))
    return rules


def name_map(layout: DecoderLayout, norms_fused: bool = False) -> dict[str, tuple[str, ...]]:
    """megatron parameter name -> the HF names it holds (local spec; norms_fused=True: Transformer Engine spec)."""
    return {r.megatron: r.hf for r in _rules(layout, norms_fused)}


def _shard(rule: _Rule, hf: list[torch.Tensor], layout: DecoderLayout, rank: int, tp: int) -> torch.Tensor:
    if rule.kind == "replicated":
        return hf[0]
    if rule.kind == "vocab":
        full = hf[0]
        if full.shape[0] != layout.vocab:
            raise ValueError(f"{rule.hf[0]}: {full.shape[0]} rows, expected vocab_size={layout.vocab}")
        padded = full.new_zeros(layout.padded_vocab, *full.shape[1:])
        padded[: layout.vocab] = full
        return padded.chunk(tp, dim=0)[rank]
    if rule.kind == "qkv":
        return interleave_qkv(*hf, layout).chunk(tp, dim=0)[rank]
    if rule.kind == "fc1":
        gate, up = hf
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    if rule.kind == "row":
        return hf[0].chunk(tp, dim=1)[rank]
    raise AssertionError(rule.kind)


def _unshard(rule: _Rule, shards: list[torch.Tensor], layout: DecoderLayout) -> list[torch.Tensor]:
    if rule.kind == "replicated":
        return [shards[0]]
    if rule.kind == "vocab":
        return [torch.cat(shards, dim=0)[: layout.vocab]]
    if rule.kind == "qkv":
        return list(split_qkv(torch.cat(shards, dim=0), layout))
    if rule.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves], dim=0), torch.cat([u for _, u in halves], dim=0)]
    if rule.kind == "row":
        return [torch.cat(shards, dim=1)]
    raise AssertionError(rule.kind)


def _norms_fused(param_names) -> bool:
    return any(n.endswith("layer_norm_weight") for n in param_names)


# ---- HF -> megatron -----------------------------------------------------------------------------------------

def hf_to_megatron(hf_state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor], layout: DecoderLayout,
                   tp_rank: int = 0, tp_size: int = 1, norms_fused: bool = False,
                   span: ChunkSpan | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, this rank's shard) for every parameter of the chunk `span` (None: the whole model);
    `hf_state` is a dict or a name -> tensor loader."""
    get = hf_state.__getitem__ if isinstance(hf_state, Mapping) else hf_state
    for rule in _rules(layout, norms_fused, span):
        yield rule.megatron, _shard(rule, [get(n) for n in rule.hf], layout, tp_rank, tp_size)


@torch.no_grad()
def load_hf_into_megatron(model: torch.nn.Module, hf_state, layout: DecoderLayout, tp_rank: int = 0,
                          tp_size: int = 1, span: ChunkSpan | None = None) -> None:
    """Copy an HF state (dict or loader) into the GPTModel chunk's local shards; every parameter must be covered."""
    params = dict(model.named_parameters())
    seen = set()
    for name, shard in hf_to_megatron(hf_state, layout, tp_rank, tp_size, _norms_fused(params), span):
        if name not in params:
            raise KeyError(f"GPTModel has no parameter {name!r} (has {sorted(params)[:6]}...)")
        if params[name].shape != shard.shape:
            raise ValueError(f"{name}: shard {tuple(shard.shape)} does not fit parameter {tuple(params[name].shape)}")
        params[name].copy_(shard.to(params[name].dtype))
        seen.add(name)
    missing = set(params) - seen
    if missing:
        raise KeyError(f"no HF weights for GPTModel parameters {sorted(missing)}")


def hf_tensor_loader(model_path: str | Path) -> Callable[[str], torch.Tensor]:
    """name -> tensor from a HF checkpoint dir (model.safetensors or a sharded index), read lazily per tensor."""
    from safetensors import safe_open

    path = Path(model_path)
    if (path / HF_INDEX).exists():
        weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
        files = {name: path / f for name, f in weight_map.items()}
    elif (path / HF_WEIGHTS).exists():
        files = None
    else:
        raise FileNotFoundError(f"{path}: no {HF_WEIGHTS} or {HF_INDEX}; not a Hugging Face checkpoint")

    def load(name: str) -> torch.Tensor:
        file = path / HF_WEIGHTS if files is None else files.get(name)
        if file is None:
            raise KeyError(f"{path}: checkpoint has no tensor {name!r}")
        with safe_open(str(file), framework="pt") as f:
            if name not in f.keys():
                raise KeyError(f"{path}: checkpoint has no tensor {name!r}")
            return f.get_tensor(name).float()

    return load


# ---- megatron -> HF -----------------------------------------------------------------------------------------

def merge_megatron_shards(shards: list[Mapping[str, torch.Tensor]], layout: DecoderLayout) -> dict[str, torch.Tensor]:
    """Per-rank megatron state dicts (index = TP rank) -> the full HF state dict (offline, no communication)."""
    fused = _norms_fused(shards[0])
    out = {}
    for rule in _rules(layout, fused):
        for hf_name, tensor in zip(rule.hf, _unshard(rule, [s[rule.megatron] for s in shards], layout), strict=True):
            out[hf_name] = tensor.contiguous()
    return out


def _local_tensor(param: torch.nn.Parameter, grads: bool) -> torch.Tensor:
    if not grads:
        return param.detach()
    grad = getattr(param, "main_grad", None)  # megatron's DDP accumulates into a flat fp32 buffer
    grad = grad if grad is not None else param.grad
    return grad if grad is not None else torch.zeros_like(param)


def _gather_rule(rule: _Rule, params: dict, layout: DecoderLayout, tp_group, tp: int,
                 grads: bool) -> list[torch.Tensor]:
    local = _local_tensor(params[rule.megatron], grads)
    if tp == 1 or rule.kind == "replicated":
        shards = [local]
    else:
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local, group=tp_group)
    return [t.contiguous() for t in _unshard(rule, shards, layout)]


@dataclass(frozen=True)
class Placement:
    """Where this rank sits: its TP group and rank, its pipeline stage and the global rank of every stage's
    first TP rank in this DP replica (`stage_ranks[s]`), its DP rank, and its model chunks' spans."""

    tp_group: object
    tp: int
    tp_rank: int
    stage: int
    stage_ranks: tuple[int, ...]
    dp_rank: int
    spans: tuple[ChunkSpan, ...]  # one per model chunk on this stage
    all_spans: tuple[tuple[ChunkSpan, ...], ...]  # [stage][chunk]


_HEADER = 8  # int64 slots: ndim, then the shape


@torch.no_grad()
def export_hf_weights(chunks: list[torch.nn.Module], layout: DecoderLayout, where: Placement,
                      grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of the whole model, in HF order, on the first rank of DP replica 0 (the one that
    sends to the rollout fleet); every other rank yields nothing but must run the iterator to its end (collective).

    Tensor by tensor: the owning stage's TP ranks all-gather it, its first TP rank sends it to stage 0's (a
    shape header, then the data), so no rank ever holds more than the tensor in flight: no whole-model copy."""
    if where.dp_rank != 0:
        return
    fused = _norms_fused(dict(chunks[0].named_parameters()))
    sender = where.stage_ranks[0]  # stage 0's rank of this rank's pipeline group
    i_send = where.stage == 0 and where.tp_rank == 0  # global rank 0: the only one that yields
    first = next(chunks[0].parameters())
    dtype = torch.float32 if grads else first.dtype  # main_grad is fp32
    device = first.device  # NCCL sends only device tensors: headers and buffers live where the model does
    for stage, spans in enumerate(where.all_spans):
        for c, span in enumerate(spans):
            mine = stage == where.stage
            params = dict(chunks[c].named_parameters()) if mine else {}
            for rule in _rules(layout, fused, span):
                if not rule.exported:
                    continue
                if mine:
                    tensors = _gather_rule(rule, params, layout, where.tp_group, where.tp, grads)
                    if stage != 0 and where.tp_rank == 0:
                        for t in tensors:
                            header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
                            header[0], header[1: 1 + t.dim()] = t.dim(), torch.tensor(t.shape)
                            dist.send(header, dst=sender)
                            dist.send(t.to(dtype).contiguous(), dst=sender)
                    if i_send:
                        yield from zip(rule.hf, tensors, strict=True)
                elif i_send:
                    for name in rule.hf:
                        header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
                        dist.recv(header, src=where.stage_ranks[stage])
                        shape = header[1: 1 + int(header[0])].tolist()
                        t = torch.empty(shape, dtype=dtype, device=device)
                        dist.recv(t, src=where.stage_ranks[stage])
                        yield name, t
