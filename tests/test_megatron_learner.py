"""The megatron Trainer on CPU (real megatron-core GPTModel, real gloo): the same logits, weights and optimizer step
as the Hugging Face model / the hf Trainer, at TP=1 (in this process) and TP=2 (two spawned ranks), for a tiny
checkpoint of each family (Qwen2, Qwen3, Llama 3)."""

import tempfile

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from tests._families import FAMILIES, save_family_checkpoint  # noqa: E402
from tests._learner_fixtures import (  # noqa: E402
    ESTIMATOR,
    VOCAB,
    assert_same_step,
    learner_config,
    make_batch,
    make_trainer,
)
from tests._tolerances import logit_tol  # noqa: E402
from tests.conftest import TEST_THREADS  # noqa: E402

# grad_clip far below the gradient norm (~1.2): the global-norm clip across TP ranks is exercised
LR, CLIP = 1e-2, 0.05


def _flat(buckets) -> dict[str, torch.Tensor]:
    return {name: t.clone() for bucket in buckets for name, t in bucket}


def check_learner(ckpt: str, tp: int, out_dir: str) -> None:
    """Every check, on this rank; collective calls in the same order on every rank."""
    from asyncopd.learner.megatron.convert import gather_hf_weights
    from asyncopd.model.build import load_model

    learner = make_trainer(learner_config(backend="megatron", lr=LR, grad_clip=CLIP, tp=tp), ESTIMATOR, ckpt,
                           max_staleness=2)
    try:
        hf = load_model(ckpt)
        hf_params = dict(hf.named_parameters())

        # 1. the rotary frequencies are HF's exactly (Llama 3's scaling included, which moves the logits of these
        # short sequences by about the tolerance only), and the full-vocabulary logits equal the HF model's on a
        # right-padded batch (padding positions included)
        assert torch.equal(learner.model.module.rotary_pos_emb.inv_freq, hf.model.rotary_emb.inv_freq)
        batch = make_batch()
        with torch.no_grad():
            logits = learner.model.forward_logits(learner.model.to_device(batch))
            ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert logits.shape == ref.shape == (*batch.input_ids.shape, VOCAB)
        # float32: GPTModel (fused QKV, TP partial sums) vs the HF forward, reordered reductions; decoder_roundings
        # counts Qwen3's q/k norms and its wider attention
        torch.testing.assert_close(logits, ref, atol=logit_tol(hf, batch.input_ids.shape[1]), rtol=0)

        # 2. gathered weights under HF names round-trip exactly (buckets respect the size)
        buckets = list(learner.named_weights_for_rollout(bucket_bytes=8192))
        assert len(buckets) > 1
        assert all(len(b) == 1 or sum(t.nbytes for _, t in b) <= 8192 for b in buckets)
        weights = _flat(buckets)
        assert set(weights) == set(hf_params)
        for name, p in hf_params.items():
            assert torch.equal(weights[name], p.detach()), name

        # 3. one train_step with forward_kl: same loss, clipped grad norm and (nearly) the same weights as hf;
        # the gradients compared include Qwen3's q/k norms, which each TP rank holds a share of before the step
        reference = make_trainer(learner_config(lr=LR, grad_clip=CLIP), ESTIMATOR, ckpt, max_staleness=2)
        expected = reference.train_step(make_batch()).metrics
        metrics = learner.train_step(make_batch()).metrics
        assert learner.version == reference.version == 1
        assert learner.cfg.grad_clip == CLIP  # the configured clip is kept (no workaround value)
        assert metrics["grad_norm"] > 10 * CLIP  # clipping was active
        grads = dict(gather_hf_weights(learner.model.module, learner.model.tp_group, grads=True))
        weights = _flat(learner.named_weights_for_rollout(bucket_bytes=1 << 20))
        assert_same_step(metrics, weights, reference, expected, make_batch(), grads)
        for name, p in hf_params.items():
            assert not torch.equal(weights[name], p.detach()), f"{name} was not updated"

        # 4. save / load: an HF checkpoint + per-rank optimizer state; the version survives
        learner.save(out_dir)
        saved = load_model(out_dir)
        for name, p in saved.named_parameters():
            assert torch.equal(p.detach(), weights[name]), name
        learner.train_step(make_batch(seed=2))
        assert learner.version == 2
        learner.load(out_dir)
        assert learner.version == 1
        reloaded = _flat(learner.named_weights_for_rollout(bucket_bytes=1 << 20))
        for name, t in weights.items():
            assert torch.equal(reloaded[name], t), name
        assert learner.optimizer.state_dict()["state"][0]["step"] == 1
    finally:
        learner.close()


def _tp2_worker(rank: int, init_file: str, ckpt: str, out_dir: str) -> None:
    torch.set_num_threads(TEST_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        check_learner(ckpt, tp=2, out_dir=out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory) -> str:
    return str(save_family_checkpoint(tmp_path_factory.mktemp(f"{request.param}_tiny") / "student", request.param))


def test_tp1_matches_hf_and_hf_trainer(checkpoint, tmp_path):
    assert not dist.is_initialized()
    check_learner(checkpoint, tp=1, out_dir=str(tmp_path / "ckpt"))
    assert not dist.is_initialized()  # the learner started a 1-rank gloo group and closed it


def test_tp2_matches_hf_and_hf_trainer(checkpoint, tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    torch.multiprocessing.spawn(_tp2_worker, args=(init_file, checkpoint, str(tmp_path / "ckpt")), nprocs=2)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {
        "config.json", "model.safetensors", "learner_state.rank0.pt", "learner_state.rank1.pt"}


def test_parallel_layout_errors():
    from asyncopd.core.errors import ConfigError
    from asyncopd.learner.megatron.model import init_parallel

    if dist.is_initialized():
        pytest.skip("needs a process without a default process group")
    with pytest.raises(RuntimeError, match="learner.tp=2 needs 2 processes"):
        init_parallel(tp=2)
    with pytest.raises(ConfigError, match="learner.pp=2.*set learner.pp=1"):
        init_parallel(tp=1, pp=2)
    assert not dist.is_initialized()
