"""Bucketed weight broadcast from rank 0 in SGLang's protocol, per tensor or as one flattened bucket.

For every `/update_weights_from_distributed` call with names [n1, n2, ...], rank 0 broadcasts one
tensor per name, in that order, and every other rank receives each into a fresh buffer of the listed
dtype and shape. With `load_format="flattened_bucket"` (SGLang 0.5.23: receive_weights_from_distributed ->
_receive_bucketed_weights_from_distributed) rank 0 broadcasts the bucket's tensors as ONE uint8 buffer, their
bytes back to back in the listed order, and the receivers cut it into views (FlattenedTensorBucket.empty,
which refuses a tensor whose byte offset is not a multiple of its element size). One collective per bucket
instead of one per tensor: the per-call cost of many small tensors (norms, biases) is paid once.
`send_bucket` / `recv_bucket` are the two halves; `plan_buckets` cuts a model into buckets of about
`bucket_bytes`; `bucket_request` builds the HTTP payload for one bucket; `wire_bucket` casts a bucket to the
engine's dtype before it is announced and sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

# SGLang's dtype strings (the torch attribute name, no "torch." prefix).
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)

FLATTENED = "flattened_bucket"  # SGLang's load_format for one broadcast per bucket


def dtype_to_str(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the string SGLang's update request carries)."""
    return str(dtype).removeprefix("torch.")


def str_to_dtype(name: str) -> torch.dtype:
    """"bfloat16" or "torch.bfloat16" -> torch.bfloat16; ValueError for anything else."""
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes of a tensor of `dtype` and `shape` (what a bucket announces and moves)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_buckets(meta: Mapping[str, torch.Tensor | tuple[str | torch.dtype, Sequence[int]]]
                 | Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[str]]:
    """Split tensors (in their given order) into consecutive buckets of at most `bucket_bytes` each.

    `meta` maps name -> tensor, or name -> (dtype, shape), or is an iterable of (name, tensor)
    (e.g. `model.named_parameters()`). A tensor larger than the bucket gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    items = meta.items() if isinstance(meta, Mapping) else meta
    buckets: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, spec in items:
        if isinstance(spec, torch.Tensor):
            size = spec.numel() * spec.element_size()
        else:
            dtype, shape = spec
            size = nbytes(str_to_dtype(dtype) if isinstance(dtype, str) else dtype, shape)
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        buckets.append(current)
    return buckets


def wire_bucket(named: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> list[tuple[str, torch.Tensor]]:
    """`named` as it goes on the wire: floating tensors cast to the engine's `dtype` (None: as they are), so an
    engine serving bf16 receives bf16 (half the bytes of the learner's fp32) and nothing is cast twice."""
    if dtype is None:
        return list(named)
    return [(n, t.detach().to(dtype) if t.is_floating_point() and t.dtype != dtype else t) for n, t in named]


def flat_layout(dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each tensor in a flattened bucket; ValueError, as SGLang's
    FlattenedTensorBucket.empty raises, when a tensor would start at an offset its dtype cannot be viewed at."""
    spans, offset = [], 0
    for i, (dtype, shape) in enumerate(zip(dtypes, shapes, strict=True)):
        size = nbytes(dtype, shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset % itemsize:
            raise ValueError(f"flattened bucket: tensor {i} ({dtype}) would start at byte {offset}, not a multiple "
                             f"of {itemsize}; order the bucket by dtype or use load_format=''")
        spans.append((offset, offset + size))
        offset += size
    return spans


def bucket_request(named: Sequence[tuple[str, torch.Tensor]], *, group_name: str, load_format: str = "") -> dict:
    """The `/update_weights_from_distributed` payload announcing `named` tensors (SGLang's fields); the sync adds
    flush_cache and weight_version per call. A flattened bucket is checked for SGLang's alignment rule here,
    before anything is announced."""
    payload = {
        "names": [n for n, _ in named],
        "dtypes": [dtype_to_str(t.dtype) for _, t in named],
        "shapes": [list(t.shape) for _, t in named],
        "group_name": group_name,
    }
    if load_format:
        if load_format != FLATTENED:
            raise ValueError(f"load_format={load_format!r} is unknown: use '' or {FLATTENED!r}")
        flat_layout([t.dtype for _, t in named], payload["shapes"])
        payload["load_format"] = load_format
    return payload


def send_bucket(group: dist.ProcessGroup, tensors: Sequence[torch.Tensor], flattened: bool = False) -> None:
    """Rank 0: broadcast each tensor, in order, to every rank of `group` (or all of them as one flattened uint8
    buffer); returns when all are sent."""
    tensors = [t.detach().contiguous() for t in tensors]
    if flattened:
        tensors = [torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])] if tensors else []
    works = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
    for w in works:
        w.wait()


def recv_bucket(group: dist.ProcessGroup, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                shapes: Sequence[Sequence[int]], device: str | torch.device = "cpu",
                flattened: bool = False) -> dict[str, torch.Tensor]:
    """Other ranks: receive one broadcast per name (the order rank 0 sends them) into new buffers, or one
    flattened buffer cut into views of the listed dtypes and shapes."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
    dts = [str_to_dtype(d) if isinstance(d, str) else d for d in dtypes]
    dims = [tuple(int(d) for d in shape) for shape in shapes]
    if flattened:
        layout = flat_layout(dts, dims)
        if not layout:
            return {}
        flat = torch.empty(layout[-1][1], dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=group)
        return {name: flat[a:b].view(dt).reshape(shape)
                for name, dt, shape, (a, b) in zip(names, dts, dims, layout, strict=True)}
    out: dict[str, torch.Tensor] = {}
    works = []
    for name, dt, shape in zip(names, dts, dims, strict=True):
        buf = torch.empty(shape, dtype=dt, device=device)
        works.append(dist.broadcast(buf, src=0, group=group, async_op=True))
        out[name] = buf
    for w in works:
        w.wait()
    return out


def broadcast_buckets(group: dist.ProcessGroup | None, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]],
                      dtype: torch.dtype | None = None, load_format: str = "") -> int:
    """Rank 0 of a weight sync: cast each bucket to the wire dtype and send it (group None: a learner rank that
    only takes part in gathering the buckets). Returns the bytes sent, as the engines receive them."""
    sent = 0
    for bucket in buckets:
        wire = wire_bucket(bucket, dtype)
        if group is not None:
            send_bucket(group, [t for _, t in wire], flattened=load_format == FLATTENED)
            sent += sum(t.numel() * t.element_size() for _, t in wire)
    return sent


def bucket_requests(buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], group_name: str,
                    dtype: torch.dtype | None = None, load_format: str = "") -> list[dict]:
    """The payload of every bucket as `broadcast_buckets` will send it (same cast, same order; cast on "meta"
    tensors, so announcing a model allocates nothing)."""
    return [bucket_request(wire_bucket([(n, torch.empty(t.shape, dtype=t.dtype, device="meta")) for n, t in b], dtype),
                           group_name=group_name, load_format=load_format) for b in buckets]
