"""KVCacheSampler against brute-force full (no-cache) forwards of the same model."""

import contextlib

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from asyncopd.model.sampler import KVCacheSampler, sampling_logprobs
from tests._tolerances import EPS32, logprob_tol, rounding_tol

VOCAB, PAD, EOS = 19, 0, 1
PROMPTS = [[5, 6, 7], [3, 4, 5, 6, 7, 8, 9, 10], [2], [11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                      max_position_embeddings=128)
    m = Qwen2ForCausalLM(cfg).eval()
    # sharpen the random model a little so greedy/argmax ties are impossible and distributions are uneven
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(8.0)
    return m


@torch.no_grad()
def full_logprobs(model, seq):
    return torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)


def brute_filtered(logits, temperature, top_p, top_k):
    """Reference top-k/top-p filter, one row at a time in plain Python."""
    z = (logits.double() / temperature).tolist()
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = order[:top_k] if top_k > 0 else order
    kz = np.array([z[i] for i in keep])
    p = np.exp(kz - kz.max())
    p /= p.sum()
    kept, mass = [], 0.0
    for i, pi in zip(keep, p, strict=True):
        if mass >= top_p:
            break
        kept.append(i)
        mass += pi
    out = np.full(len(z), -np.inf)
    kz = np.array([z[i] for i in kept])
    out[kept] = kz - kz.max() - np.log(np.exp(kz - kz.max()).sum())
    return out


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 1.0, -1), (1.3, 0.8, 6)])
def test_logprobs_match_full_forward_ragged(model, temperature, top_p, top_k):
    s = KVCacheSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    outs = s.generate(PROMPTS, max_new_tokens=15, temperature=temperature, top_p=top_p, top_k=top_k, seed=3,
                      top_logprobs_num=4, mc_samples=3)
    for p, o in zip(PROMPTS, outs, strict=True):
        assert len(o.output_ids) >= 1
        logits = model(torch.tensor([p + o.output_ids])).logits[0, len(p) - 1: -1].detach()
        ref = np.stack([brute_filtered(row, temperature, top_p, top_k) for row in logits])
        got = ref[np.arange(len(o.output_ids)), o.output_ids]
        tol = logprob_tol(model, len(p) + len(o.output_ids), temperature)  # KV-cache decode vs full forward
        np.testing.assert_allclose(o.logprobs, got, atol=tol)
        np.testing.assert_allclose(o.mc_logprobs, np.take_along_axis(ref, o.mc_ids, 1), atol=tol)
        assert np.isfinite(o.mc_logprobs).all()  # never draws a filtered-out token
        assert (o.mc_ids[:, 0] == np.array(o.output_ids)).all()
        ref_top = np.sort(ref, axis=1)[:, ::-1][:, :4]
        np.testing.assert_allclose(o.top_logprobs, ref_top, atol=tol)
        np.testing.assert_allclose(np.take_along_axis(ref, o.top_ids, 1), o.top_logprobs, atol=tol)
        assert o.logprobs.dtype == np.float32 and o.top_ids.dtype == np.int32 and o.mc_ids.dtype == np.int32


def test_greedy_deterministic_equals_argmax_and_batch_invariant(model):
    s = KVCacheSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    a = s.generate(PROMPTS, max_new_tokens=12, temperature=0.0, top_logprobs_num=2)
    b = s.generate(PROMPTS, max_new_tokens=12, temperature=0.0, top_logprobs_num=2)
    for p, oa, ob in zip(PROMPTS, a, b, strict=True):
        assert oa.output_ids == ob.output_ids
        seq = list(p)
        for _ in range(len(oa.output_ids)):  # no-cache argmax continuation
            nxt = int(full_logprobs(model, seq)[-1].argmax())
            seq.append(nxt)
            if nxt == EOS:
                break
        assert oa.output_ids == seq[len(p):]
        lp = full_logprobs(model, p + oa.output_ids)[len(p) - 1: -1]
        np.testing.assert_allclose(oa.logprobs, lp.gather(-1, torch.tensor(oa.output_ids)[:, None])[:, 0],
                                   atol=logprob_tol(model, len(p) + len(oa.output_ids)))  # KV cache vs full
        assert (oa.top_ids[:, 0] == np.array(oa.output_ids)).all()
        alone = s.generate([p], max_new_tokens=12, temperature=0.0)[0]  # padding does not change the result
        assert alone.output_ids == oa.output_ids


def test_seed_reproducible(model):
    s = KVCacheSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    a = s.generate(PROMPTS, max_new_tokens=10, seed=11, mc_samples=2)
    b = s.generate(PROMPTS, max_new_tokens=10, seed=11, mc_samples=2)
    for oa, ob in zip(a, b, strict=True):
        assert oa.output_ids == ob.output_ids and (oa.mc_ids == ob.mc_ids).all()


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.8, 0.9, 5)])
def test_mc_frequencies_match_distribution(model, temperature, top_p, top_k):
    prompt = [4, 9, 2]
    m = 40000
    s = KVCacheSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    o = s.generate([prompt], max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k,
                   mc_samples=m, seed=5)[0]
    logits = model(torch.tensor([prompt])).logits[0, -1].detach()
    ref = brute_filtered(logits, temperature, top_p, top_k)
    p = np.exp(ref)
    counts = np.bincount(o.mc_ids[0], minlength=VOCAB)
    assert counts[p == 0].sum() == 0
    support = p > 0
    expected = m * p[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    # 99.9% quantile of chi-square with df <= 18 is <= 42.3; the seed is fixed, so this is deterministic
    assert chi2 < 42.3, (chi2, counts, expected)
    # float32: the sampler's prefill and log-softmax vs one plain forward and a float64 one, at this temperature
    np.testing.assert_allclose(o.mc_logprobs[0], ref[o.mc_ids[0]], atol=logprob_tol(model, len(prompt), temperature))


def test_stop_ids_and_eos_end_rows(model):
    s = KVCacheSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    free = s.generate(PROMPTS, max_new_tokens=10, temperature=0.0)
    target = free[1].output_ids[2]  # a token row 1 emits at step 2 under greedy decoding
    stopped = s.generate(PROMPTS, max_new_tokens=10, temperature=0.0, stop_token_ids=[target])
    for f, o in zip(free, stopped, strict=True):
        if target in f.output_ids:
            cut = f.output_ids.index(target) + 1
            assert o.output_ids == f.output_ids[:cut] and o.finish_reason == "stop"
        else:
            assert o.output_ids == f.output_ids
    assert len(stopped[1].output_ids) <= 3
    # the eos id stops as well, without being listed
    s2 = KVCacheSampler(model, eos_token_id=target, pad_token_id=PAD)
    assert s2.generate([PROMPTS[1]], max_new_tokens=10, temperature=0.0)[0].finish_reason == "stop"
    # a row that never stops runs to the limit
    lim = s.generate([PROMPTS[0]], max_new_tokens=3, temperature=0.0)[0]
    assert len(lim.output_ids) == 3 or lim.finish_reason == "stop"


def test_step_guard_wraps_every_forward_and_reports_versions(model):
    calls = []

    @contextlib.contextmanager
    def guard():
        calls.append(len(calls))
        yield 10 + len(calls) - 1

    s = KVCacheSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    outs = s.generate(PROMPTS, max_new_tokens=6, temperature=1.0, seed=0, step_guard=guard)
    longest = max(len(o.output_ids) for o in outs)
    assert len(calls) == longest  # prefill + one forward per further token
    for o in outs:
        assert o.version_start == 10
        assert o.version_end == 10 + len(o.output_ids) - 1


def test_edge_cases_and_errors(model):
    s = KVCacheSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    assert s.generate([], max_new_tokens=4) == []
    o = s.generate([[3]], max_new_tokens=0, top_logprobs_num=2)[0]
    assert o.output_ids == [] and o.top_ids.shape == (0, 2) and o.finish_reason == "length"
    with pytest.raises(ValueError, match="empty"):
        s.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        s.generate([[VOCAB]], max_new_tokens=2)
    with pytest.raises(ValueError, match="mc_samples"):
        s.generate([[3]], max_new_tokens=2, temperature=0.0, mc_samples=2)
    with pytest.raises(ValueError, match="top_p"):
        s.generate([[3]], max_new_tokens=2, top_p=0.0)


def test_sampling_logprobs_normalised():
    logits = torch.randn(5, VOCAB)
    for args in [(1.0, 1.0, -1), (0.5, 0.3, -1), (2.0, 1.0, 1), (1.0, 0.95, 7)]:
        lp = sampling_logprobs(logits, *args)
        # float32 log-softmax (max, V exps, a V-term sum, a log) and the V-term sum of its exps, vs float64
        # rounded once to float32; terms up to |log p| <= 2 max|z| / T
        tol = rounding_tol(EPS32, 2 * VOCAB + 4, 2 * float(logits.abs().max()) / args[0])
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(5), rtol=0, atol=tol)
        ref = torch.tensor(np.stack([brute_filtered(r, *args) for r in logits]), dtype=torch.float32)
        torch.testing.assert_close(lp, ref, rtol=0, atol=tol)


def test_per_row_seeds_draw_each_row_as_it_is_drawn_alone(model):
    """A list of seeds gives each row its own stream (how the rollout dispatcher keeps a sample's tokens
    independent of the request it shares), and filtered tokens are still never drawn."""
    s = KVCacheSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.8, mc_samples=3)
    seeds = [101, 202, 303, 404]
    batch = s.generate(PROMPTS, seed=seeds, **kw)
    for p, seed, o in zip(PROMPTS, seeds, batch, strict=True):
        alone = s.generate([p], seed=seed, **kw)[0]  # an int seed on a batch of one: the same stream
        assert alone.output_ids == o.output_ids and (alone.mc_ids == o.mc_ids).all()
        assert np.isfinite(o.mc_logprobs).all()
    shuffled = s.generate(PROMPTS[::-1], seed=seeds[::-1], **kw)[::-1]
    assert [o.output_ids for o in shuffled] == [o.output_ids for o in batch]
    with pytest.raises(ValueError, match="one entry per prompt"):
        s.generate(PROMPTS, seed=seeds[:2], **kw)
