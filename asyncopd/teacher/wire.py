"""Compact binary wire format: a dict of numpy arrays plus a small JSON header in one bytes body.

Layout (all integers little-endian):

    magic   4 bytes  b"AOW1"
    hlen    4 bytes  uint32, length of the JSON header in bytes
    header  hlen     UTF-8 JSON: {"arrays": {name: {"dtype", "shape", "offset"}}, "meta": {...}}
    pad     to a multiple of ALIGN bytes from the start of the body
    data    each array's raw little-endian C-order bytes at its `offset` (relative to the data section,
            itself a multiple of ALIGN)

No numbers travel as JSON lists: arrays are raw buffers, and `meta` is for a few scalars only.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

CONTENT_TYPE = "application/octet-stream"
MAGIC = b"AOW1"
ALIGN = 64
_PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 1 << 20

# dtype name on the wire -> numpy little-endian dtype
WIRE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                 "float16", "float32", "float64")
}


def _pad(n: int) -> int:
    return (-n) % ALIGN


def encode(arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    """Pack `arrays` (numeric numpy arrays, any shape including empty) and a JSON-able `meta` dict."""
    entries: dict[str, dict[str, Any]] = {}
    buffers: list[bytes] = []
    offset = 0
    for name, arr in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"wire.encode: array names must be str, got {name!r}")
        a = np.asarray(arr)
        dname = a.dtype.name
        if dname not in WIRE_DTYPES:
            raise TypeError(f"wire.encode: array {name!r} has dtype {a.dtype}; supported: {sorted(WIRE_DTYPES)}")
        raw = np.ascontiguousarray(a, dtype=WIRE_DTYPES[dname]).tobytes()
        entries[name] = {"dtype": dname, "shape": list(a.shape), "offset": offset}
        buffers.append(raw)
        pad = _pad(len(raw))
        if pad:
            buffers.append(b"\0" * pad)
        offset += len(raw) + pad
    header = json.dumps({"arrays": entries, "meta": meta or {}}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"wire.encode: header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    head = _PREFIX.pack(MAGIC, len(header)) + header
    head += b"\0" * _pad(len(head))
    return b"".join([head, *buffers])


def decode(body: bytes | bytearray | memoryview) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Unpack a body made by `encode`. Arrays are zero-copy, read-only views of `body` (writable if
    `body` is a bytearray). Any truncated or corrupt body raises ValueError naming what is wrong."""
    view = memoryview(body).cast("B")
    n = len(view)
    if n < _PREFIX.size:
        raise ValueError(f"wire body truncated: {n} bytes, a body starts with a {_PREFIX.size}-byte prefix")
    magic, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(f"wire body has bad magic {bytes(magic)!r} (expected {MAGIC!r}): not an asyncopd body")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > n:
        raise ValueError(f"wire body truncated or corrupt: header length {hlen}, body {n} bytes")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"wire header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), dict):
        raise ValueError("wire header must be a JSON object with an 'arrays' object")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("wire header 'meta' must be a JSON object")
    data_start = _PREFIX.size + hlen + _pad(_PREFIX.size + hlen)
    data_len = n - data_start
    if data_len < 0:
        raise ValueError(f"wire body truncated: data section starts at {data_start}, body is {n} bytes")
    out: dict[str, np.ndarray] = {}
    for name, ent in header["arrays"].items():
        if not isinstance(ent, dict):
            raise ValueError(f"wire header entry {name!r} is not an object")
        dname, shape, off = ent.get("dtype"), ent.get("shape"), ent.get("offset")
        if dname not in WIRE_DTYPES:
            raise ValueError(f"wire array {name!r}: unsupported dtype {dname!r}")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"wire array {name!r}: shape must be a list of non-negative ints, got {shape!r}")
        if type(off) is not int or off < 0 or off % ALIGN:
            raise ValueError(f"wire array {name!r}: offset must be a non-negative multiple of {ALIGN}, got {off!r}")
        dt = WIRE_DTYPES[dname]
        count = math.prod(shape)
        nbytes = count * dt.itemsize
        if off + nbytes > data_len:
            raise ValueError(
                f"wire body truncated: array {name!r} needs bytes [{off}, {off + nbytes}) of a "
                f"{data_len}-byte data section")
        arr = np.frombuffer(view, dtype=dt, count=count, offset=data_start + off).reshape(shape)
        out[name] = arr
    return out, meta
