"""Chunking bounds the memory: no estimator holds more than a few chunks of full-vocabulary floats.

Measured with the allocator's own record (the PyTorch profiler on CPU) by the same code as
`asyncopd bench memory`; the naive full log-softmax is measured too, so the meter is seen to work.
"""

import argparse
import json

import pytest
import torch

from asyncopd.bench import estimator_memory
from asyncopd.bench.estimator_memory import CASES, NAIVE, measure

SHAPE = dict(batch=2, seq=256, vocab=2048, chunk_tokens=32)  # a chunk is 1/16 of the tokens


@pytest.mark.parametrize("label, knobs", CASES, ids=[c[0] for c in CASES])
def test_peak_extra_memory_is_the_gradient_plus_a_few_chunks(label, knobs):
    row = measure(label, knobs, **SHAPE)
    frac = row["chunk_fraction"]
    assert frac == 1 / 16
    # the logits gradient (1x) and two float32 chunks of [chunk_tokens, V] (the chunk's logits and
    # its softmax) alive at once; the rest is per-token vectors (0.03 x logits: ~60 floats per token, V = 2048)
    assert 1.0 <= row["peak_extra_x_logits"] <= 1.0 + 2 * frac + 0.03, row


def test_bfloat16_logits_gradient_stays_bfloat16():
    row = measure("forward_kl", dict(name="forward_kl", top_k=8), dtype=torch.bfloat16, **SHAPE)
    # float32 chunks are twice the bytes of bfloat16 logits per element (plus the bf16 chunk gathered)
    assert row["peak_extra_x_logits"] <= 1.0 + 5 * row["chunk_fraction"] + 0.03, row


def test_naive_full_log_softmax_needs_several_logits_tensors():
    row = measure(NAIVE, dict(name="forward_kl", top_k=8), **SHAPE)
    assert row["peak_extra_x_logits"] >= 2.5, row


def test_bench_memory_cli_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    estimator_memory.add_arguments(parser)
    args = parser.parse_args(["--batch", "1", "--seq", "64", "--vocab", "512", "--chunk-tokens", "16",
                              "--estimators", "mc_rkl M=16,naive_full_log_softmax", "--out", str(tmp_path)])
    rows = estimator_memory.run(args)
    saved = json.loads((tmp_path / "estimator_memory.json").read_text())
    assert [r["estimator"] for r in saved] == ["mc_rkl M=16", NAIVE] == [r["estimator"] for r in rows]
    assert "x logits" in capsys.readouterr().out
