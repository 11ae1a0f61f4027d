"""The teacher wire format: round trips of every dtype and shape, and clear errors for bad bodies."""

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asyncopd.teacher import wire

DTYPES = sorted(wire.WIRE_DTYPES)


def _roundtrip(arrays, meta=None):
    body = wire.encode(arrays, meta)
    out, got_meta = wire.decode(body)
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        b = out[name]
        assert b.dtype == np.asarray(a).dtype and b.shape == np.asarray(a).shape
        np.testing.assert_array_equal(b, a)
    assert got_meta == (meta or {})
    return body


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (0, 4), (4, 0), (2, 3, 4), (1, 1, 1, 65)])
def test_roundtrip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 100).astype(dtype)
    _roundtrip({"x": a, "y": np.arange(3, dtype=np.int32)}, {"top_k": 8, "note": "ok"})


def test_offsets_are_aligned_and_no_json_numbers():
    arrays = {"a": np.arange(5, dtype=np.float16), "b": np.ones((3, 3), np.float64), "c": np.zeros(0, np.int8)}
    body = wire.encode(arrays)
    (hlen,) = struct.unpack_from("<I", body, 4)
    header = json.loads(body[8:8 + hlen])
    assert all(e["offset"] % wire.ALIGN == 0 for e in header["arrays"].values())
    assert set(header) == {"arrays", "meta"}
    # 10 + 72 bytes of payload plus header and padding: no bloat
    assert len(body) <= 8 + hlen + 3 * wire.ALIGN + 10 + 72 + wire.ALIGN


def test_empty_dict_and_big_endian_and_noncontiguous():
    _roundtrip({})
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    out, _ = wire.decode(wire.encode({"a": a, "t": a.T}))
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["t"], a.T)
    assert out["a"].dtype == np.dtype("<i4")


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(
    st.text(min_size=1, max_size=8),
    hnp.arrays(dtype=st.sampled_from([np.dtype(d) for d in DTYPES]),
               shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
    max_size=4))
def test_roundtrip_fuzz(arrays):
    body = wire.encode(arrays)
    out, _ = wire.decode(body)
    assert set(out) == set(arrays)
    for k, a in arrays.items():
        np.testing.assert_array_equal(out[k], a)  # NaNs compare equal in assert_array_equal


def test_every_truncation_is_a_clear_value_error():
    arrays = {"ids": np.arange(10, dtype=np.int32), "lp": np.linspace(-3, 0, 7, dtype=np.float32)}
    body = wire.encode(arrays)
    out, _ = wire.decode(body)
    # the data ends with the last array's bytes; only trailing padding may be dropped safely
    (hlen,) = struct.unpack_from("<I", body, 4)
    header = json.loads(body[8:8 + hlen])
    data_start = 8 + hlen + (-(8 + hlen)) % wire.ALIGN
    end = data_start + max(e["offset"] + int(np.prod(e["shape"])) * 4 for e in header["arrays"].values())
    for cut in range(end):
        with pytest.raises(ValueError, match="wire"):
            wire.decode(body[:cut])


def _body_with_header(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    head = b"AOW1" + struct.pack("<I", len(h)) + h
    return head + b"\0" * ((-len(head)) % wire.ALIGN) + data


@pytest.mark.parametrize("body, match", [
    (b"XXXX" + b"\0" * 60, "bad magic"),
    (b"AOW1" + struct.pack("<I", 10**9), "header length"),
    (b"AOW1" + struct.pack("<I", 3) + b"{{{", "not valid JSON"),
    (_body_with_header([1, 2]), "JSON object"),
    (_body_with_header({"arrays": {"a": {"dtype": "object", "shape": [1], "offset": 0}}}), "unsupported dtype"),
    (_body_with_header({"arrays": {"a": {"dtype": "int32", "shape": [-1], "offset": 0}}}), "shape"),
    (_body_with_header({"arrays": {"a": {"dtype": "int32", "shape": [1], "offset": 3}}}, b"\0" * 64), "offset"),
    (_body_with_header({"arrays": {"a": {"dtype": "int32", "shape": [10**12, 10**12], "offset": 0}}}), "truncated"),
    (_body_with_header({"arrays": {}, "meta": [1]}), "meta"),
])
def test_corrupt_bodies(body, match):
    with pytest.raises(ValueError, match=match):
        wire.decode(body)


def test_random_byte_flips_never_escape_as_other_errors():
    rng = np.random.default_rng(1)
    body = bytearray(wire.encode({"a": np.arange(20, dtype=np.int64), "b": np.ones((4, 4), np.float32)},
                                 {"top_k": 4}))
    for _ in range(300):
        b = bytearray(body)
        for i in rng.integers(0, len(b), size=3):
            b[i] = int(rng.integers(0, 256))
        try:
            wire.decode(bytes(b))
        except ValueError:
            pass


def test_encode_rejects_unsupported_arrays():
    with pytest.raises(TypeError, match="dtype"):
        wire.encode({"c": np.ones(2, np.complex64)})
    with pytest.raises(TypeError, match="names"):
        wire.encode({1: np.ones(2)})
