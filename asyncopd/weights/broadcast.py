"""Bucketed weight broadcast from rank 0 in SGLang's per-tensor protocol.

For every `/update_weights_from_distributed` call with names [n1, n2, ...], rank 0 broadcasts one
tensor per name, in that order, and every other rank receives each into a fresh buffer of the listed
dtype and shape. `send_bucket` / `recv_bucket` are the two halves; `plan_buckets` cuts a model into
buckets of about `bucket_bytes`; `bucket_request` builds the HTTP payload for one bucket.
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


def dtype_to_str(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the string SGLang's update request carries)."""
    return str(dtype).removeprefix("torch.")


def str_to_dtype(name: str) -> torch.dtype:
    """"bfloat16" or "torch.bfloat16" -> torch.bfloat16; ValueError for anything else."""
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
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
            size = _nbytes(str_to_dtype(dtype) if isinstance(dtype, str) else dtype, shape)
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        buckets.append(current)
    return buckets


def bucket_request(named: Sequence[tuple[str, torch.Tensor]], *, group_name: str, weight_version=None,
                   flush_cache: bool = True) -> dict:
    """The `/update_weights_from_distributed` payload announcing `named` tensors (SGLang's fields)."""
    payload = {
        "names": [n for n, _ in named],
        "dtypes": [dtype_to_str(t.dtype) for _, t in named],
        "shapes": [list(t.shape) for _, t in named],
        "group_name": group_name,
        "flush_cache": flush_cache,
    }
    if weight_version is not None:
        payload["weight_version"] = str(weight_version)
    return payload


def send_bucket(group: dist.ProcessGroup, tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0: broadcast each tensor, in order, to every rank of `group`; returns when all are sent."""
    works = []
    for t in tensors:
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        works.append(dist.broadcast(t, src=0, group=group, async_op=True))
    for w in works:
        w.wait()


def recv_bucket(group: dist.ProcessGroup, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                shapes: Sequence[Sequence[int]], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Other ranks: receive one broadcast per name (the order rank 0 sends them) into new buffers."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
    out: dict[str, torch.Tensor] = {}
    works = []
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        dt = str_to_dtype(dtype) if isinstance(dtype, str) else dtype
        buf = torch.empty(tuple(int(d) for d in shape), dtype=dt, device=device)
        works.append(dist.broadcast(buf, src=0, group=group, async_op=True))
        out[name] = buf
    for w in works:
        w.wait()
    return out
