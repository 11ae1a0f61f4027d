"""The hf trainer: the staleness check, the proximal logprobs, weight export, and resume keeping the version."""

import dataclasses

import pytest
import torch

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.errors import StalenessViolation
from asyncopd.learner.collate import response_logits
from tests._learner_fixtures import ESTIMATOR, VOCAB, learner_config, make_batch, make_checkpoint, make_trainer
from tests._tolerances import EPS32, EPS64, rounding_tol


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("ckpt")))


def test_train_step_checks_staleness_and_counts_versions(ckpt):
    learner = make_trainer(learner_config(lr=1e-2), ESTIMATOR, ckpt, max_staleness=1)
    result = learner.train_step(make_batch())  # samples of version 0 consumed at step 0
    assert learner.version == result.version == 1 and result.staleness == {0: 3}
    assert not any(k.startswith("staleness/") for k in result.metrics)
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert learner.train_step(make_batch()).staleness == {1: 3}  # consumed at step 1: one behind
    with pytest.raises(StalenessViolation, match="pipeline.max_staleness=1"):
        learner.train_step(make_batch())


def test_prox_logprobs_equal_full_log_softmax(ckpt):
    learner = make_trainer(learner_config(), EstimatorConfig(name="decoupled_ppo", chunk_tokens=2), ckpt, 0)
    batch = make_batch()
    prox = learner.prox_logprobs(batch)
    with torch.no_grad():
        logits = learner.model.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        full = torch.log_softmax(response_logits(logits, batch.response_index), -1)
    want = full.gather(-1, batch.est.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.est.mask
    # the same float32 logits; a chunked log-softmax (max, V exps, a V-term sum, a log) vs torch's
    tol = rounding_tol(EPS32, VOCAB + 4, float(full.abs().max()))
    torch.testing.assert_close(prox[mask], want[mask], atol=tol, rtol=0)
    assert (prox[~mask] == 0).all()


def test_weight_buckets_cover_every_parameter_once(ckpt):
    learner = make_trainer(learner_config(), ESTIMATOR, ckpt, 0)
    buckets = list(learner.named_weights_for_rollout(bucket_bytes=8192))
    names = [n for b in buckets for n, _ in b]
    assert len(buckets) > 1 and sorted(names) == sorted(n for n, _ in learner.model.module.named_parameters())
    assert all(sum(t.nbytes for _, t in b) <= 8192 or len(b) == 1 for b in buckets)


def test_save_load_resumes_weights_optimizer_and_version(ckpt, tmp_path):
    cfg = learner_config(lr=1e-2)
    a = make_trainer(cfg, ESTIMATOR, ckpt, max_staleness=4)
    a.train_step(make_batch())
    a.save(str(tmp_path / "ck"))
    b = make_trainer(cfg, ESTIMATOR, ckpt, max_staleness=4)
    b.load(str(tmp_path / "ck"))
    assert b.version == 1
    ma, mb = a.train_step(make_batch(2)).metrics, b.train_step(make_batch(2)).metrics  # identical state -> step
    assert ma["loss"] == mb["loss"]  # the same ops on the same values in the same order: exact
    for (na, pa), (_, pb) in zip(a.model.module.named_parameters(), b.model.module.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    with pytest.raises(FileNotFoundError, match="learner_state.pt"):
        b.load(ckpt)


def test_unknown_estimator_is_a_clear_error(ckpt):
    with pytest.raises(ValueError, match="estimator.name='nope'"):
        make_trainer(learner_config(), dataclasses.replace(ESTIMATOR, name="nope"), ckpt, 0)


def test_lr_warmup_is_applied_and_resumes_with_the_version(ckpt, tmp_path):
    cfg = learner_config(lr=1e-2, warmup_steps=4)
    a = make_trainer(cfg, ESTIMATOR, ckpt, max_staleness=8)
    before = [p.detach().clone() for p in a.model.module.parameters()]
    lrs = [a.train_step(make_batch(v)).metrics["lr"] for v in range(2)]
    assert lrs == pytest.approx([0.0025, 0.005], rel=2 * EPS64)  # float64 lr * (v + 1) / warmup: two roundings
    # Adam's first update moves each parameter by lr * g / (|g| + 1e-8): the warmed-up rate, not the peak one.
    # The largest |g| moves most; the move is read back as a difference of float32 weights (EPS32 |w|).
    a2 = make_trainer(cfg, ESTIMATOR, ckpt, max_staleness=8)
    a2.train_step(make_batch(0))
    params = list(a2.model.module.parameters())
    step = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before, strict=True))
    g_max = max(float(p.grad.abs().max()) for p in params)
    w_max = max(float(b.abs().max()) for b in before)
    assert step == pytest.approx(0.0025 * g_max / (g_max + 1e-8), rel=0, abs=EPS32 * w_max)
    a.save(str(tmp_path / "ck"))
    b = make_trainer(cfg, ESTIMATOR, ckpt, max_staleness=8)
    b.load(str(tmp_path / "ck"))
    assert [b.train_step(make_batch(v)).metrics["lr"] for v in range(2, 5)] == pytest.approx([0.0075, 0.01, 0.01],
                                                                                             rel=2 * EPS64)
