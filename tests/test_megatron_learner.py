"""The megatron Trainer on CPU (real megatron-core GPTModel chunks, real gloo, real pipeline schedules, megatron's DDP
and optimizers): the same logits, loss, gradients and optimizer step as the Hugging Face model / the hf Trainer at
every layout (TP, PP with micro-batches, interleaved PP, DP with and without the distributed optimizer, TP x PP),
bf16 with fp32 main weights, and checkpoints that resume under another layout and export to Hugging Face."""

import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from tests._families import FAMILIES, save_family_checkpoint  # noqa: E402
from tests._learner_fixtures import (  # noqa: E402
    EIGHT,
    ESTIMATOR,
    VOCAB,
    assert_same_step,
    learner_config,
    make_batch,
    make_trainer,
)
from tests._tolerances import EPS32, EPS_BF16, FP32_ESTIMATOR, logit_tol, rounding_tol  # noqa: E402
from tests.conftest import TEST_THREADS  # noqa: E402

# grad_clip far below the gradient norm (~1.2): the global-norm clip across ranks is exercised
LR, CLIP = 1e-2, 0.05
# vocab_divisible_by=1: the 19 ids pad to 20 at TP=2, so each rank's vocabulary shard holds real ids
MEGATRON = dict(backend="megatron", lr=LR, grad_clip=CLIP, vocab_divisible_by=1)


def _flat(buckets) -> dict[str, torch.Tensor]:
    return {name: t.clone() for bucket in buckets for name, t in bucket}


def _spawn(fn, world: int, tmp_path: Path, *args) -> None:
    torch.multiprocessing.spawn(_worker, args=(fn, world, tempfile.mktemp(dir=tmp_path), args), nprocs=world)


def _worker(rank: int, fn, world: int, init_file: str, args) -> None:
    torch.set_num_threads(TEST_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def _grads(learner) -> dict[str, torch.Tensor]:
    """Every parameter's gradient under HF names, gathered on rank 0 (megatron DDP's main_grad). Collective."""
    from asyncopd.learner.megatron.convert import export_hf_weights

    m = learner.model
    return dict(export_hf_weights(m.chunks, m.layout, m.where, grads=True))


def check_step(ckpt: str, knobs: dict, batch_shapes=EIGHT) -> None:
    """On every rank: logits equal HF's, the export round-trips, one train_step equals the hf Trainer's (loss, clipped
    grad norm, every gradient where the layout keeps whole gradients, the updated weights)."""
    from asyncopd.model.build import load_model

    learner = make_trainer(learner_config(**MEGATRON, **knobs), ESTIMATOR, ckpt, max_staleness=2)
    try:
        hf = load_model(ckpt)
        hf_params = dict(hf.named_parameters())
        rank0 = dist.get_rank() == 0
        batch = make_batch(shapes=batch_shapes)

        # 1. the logits (the last stage's vocabulary shards, gathered here) equal the HF model's on this replica's
        # rows of a right-padded batch, padding positions included
        parts = learner.model.forward_only(batch, lambda logits, mb, shard: (logits, mb.input_ids, mb.attention_mask))
        if parts:
            tp_group = learner.model.where.tp_group
            shards = [None] * dist.get_world_size(tp_group)
            dist.all_gather_object(shards, [p[0] for p in parts], group=tp_group)
            for i, (_, ids, mask) in enumerate(parts):
                logits = torch.cat([s[i] for s in shards], dim=-1)  # padded ids: -inf on the last shard
                assert torch.isneginf(logits[..., VOCAB:]).all()
                logits = logits[..., :VOCAB]
                with torch.no_grad():
                    ref = hf(input_ids=ids, attention_mask=mask).logits
                assert logits.shape == ref.shape == (*ids.shape, VOCAB)
                # float32: GPTModel (fused QKV, TP partial sums) vs the HF forward, reordered reductions
                torch.testing.assert_close(logits, ref, atol=logit_tol(hf, ids.shape[1]), rtol=0)

        # 2. the streamed export equals the checkpoint exactly, on rank 0 only; buckets respect their size
        buckets = list(learner.named_weights_for_rollout(bucket_bytes=8192))
        if rank0:
            assert len(buckets) > 1 and all(len(b) == 1 or sum(t.nbytes for _, t in b) <= 8192 for b in buckets)
            weights = _flat(buckets)
            assert set(weights) == set(hf_params)
            for name, p in hf_params.items():
                assert torch.equal(weights[name], p.detach()), name
        else:
            assert buckets == []

        # 3. one train_step: the hf Trainer's loss, clipped grad norm, gradients and updated weights
        metrics = learner.train_step(make_batch(shapes=batch_shapes)).metrics
        reported = {k: v for k, v in metrics.items() if k != "learner_time_s"}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, reported)
        assert all(m == reported for m in everyone)  # every rank reports the batch's metrics
        grads = _grads(learner)
        weights = _flat(learner.named_weights_for_rollout(bucket_bytes=1 << 20))
        if rank0:
            reference = make_trainer(learner_config(lr=LR, grad_clip=CLIP, weight_decay=knobs.get("weight_decay", 0.0)),
                                     ESTIMATOR, ckpt, max_staleness=2)
            expected = reference.train_step(make_batch(shapes=batch_shapes)).metrics
            assert metrics["grad_norm"] > 10 * CLIP  # clipping was active
            # the optimizers clip the DDP grad buffer in place (the fp32 main params' grads are views of it); with
            # the distributed optimizer over DP > 1 each replica holds only its shard of the reduced gradient
            whole = knobs.get("dp", 1) == 1 or not knobs.get("distributed_optimizer", True)
            assert_same_step(metrics, weights, reference, expected, make_batch(shapes=batch_shapes),
                             grads if whole else None)
            for name, p in hf_params.items():
                assert not torch.equal(weights[name], p.detach()), f"{name} was not updated"
    finally:
        learner.close()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> str:
    return str(save_family_checkpoint(tmp_path_factory.mktemp(f"{request.param}_tiny") / "student", request.param))


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> str:
    """Qwen3 (q/k norms, head_dim apart), 4 layers, tied embeddings: PP=2 and interleaving split it evenly, and the
    last stage holds a copy of the embedding as its output layer."""
    return str(save_family_checkpoint(tmp_path_factory.mktemp("deep") / "student", "qwen3", num_hidden_layers=4))


@pytest.fixture(scope="module")
def deep_untied(tmp_path_factory) -> str:
    """Llama 3, 4 layers, its own lm_head."""
    return str(save_family_checkpoint(tmp_path_factory.mktemp("deep_untied") / "student", "llama",
                                      num_hidden_layers=4, tie_word_embeddings=False))


def test_tp1_matches_hf(family):
    assert not dist.is_initialized()
    check_step(family, {})
    assert not dist.is_initialized()  # the learner started a 1-rank gloo group and closed it


def test_weight_decay_on_matrices_only_as_the_hf_learner(deep):
    """Biases and norms take no decay in either learner (megatron's wd_mult, applied by the backend itself)."""
    check_step(deep, {"weight_decay": 0.1})


def test_tp2_matches_hf(family, tmp_path):
    _spawn(check_step, 2, tmp_path, family, {"tp": 2})


def test_pp2_four_micro_batches_matches_hf(deep, tmp_path):
    _spawn(check_step, 2, tmp_path, deep, {"pp": 2, "micro_batch_size": 2})


def test_interleaved_pp2_matches_hf(deep, tmp_path):
    _spawn(check_step, 2, tmp_path, deep, {"pp": 2, "virtual_pp": 2, "micro_batch_size": 2, "recompute": "full"})


def _dp2_both(ckpt: str) -> None:
    check_step(ckpt, {"dp": 2, "micro_batch_size": 2, "distributed_optimizer": False})
    check_step(ckpt, {"dp": 2, "micro_batch_size": 2, "distributed_optimizer": True})


def test_dp2_matches_hf(deep, tmp_path):
    """All-reduced gradients (whole on every replica) and the distributed optimizer (each replica steps its half)."""
    _spawn(_dp2_both, 2, tmp_path, deep)


def test_tp2_pp2_matches_hf(deep_untied, tmp_path):
    _spawn(check_step, 4, tmp_path, deep_untied, {"tp": 2, "pp": 2, "micro_batch_size": 2,
                                                   "recompute": "selective"})


def _run_then_save(ckpt: str, knobs: dict, out: str, result: str) -> None:
    learner = make_trainer(learner_config(**MEGATRON, **knobs), ESTIMATOR, ckpt, max_staleness=4)
    try:
        learner.train_step(make_batch(1, EIGHT))
        learner.save(out)
        metrics = learner.train_step(make_batch(2, EIGHT)).metrics
        if dist.get_rank() == 0:
            torch.save(metrics, result)
    finally:
        learner.close()


def _resume(ckpt: str, knobs: dict, out: str, result: str) -> None:
    from asyncopd.learner.megatron.checkpoint import _optimizers

    learner = make_trainer(learner_config(**MEGATRON, **knobs), ESTIMATOR, ckpt, max_staleness=4)
    try:
        learner.load(out)
        assert learner.version == 1  # the staleness clock survives the change of layout
        steps = [s["step"] for opt in _optimizers(learner.model.optimizer) for s in opt.optimizer.state.values()]
        assert steps and all(float(s) == 1.0 for s in steps)  # Adam's count, one tensor per parameter
        assert len({id(s) for s in steps}) == len(steps)
        metrics = learner.train_step(make_batch(2, EIGHT)).metrics
        if dist.get_rank() == 0:
            torch.save(metrics, result)
    finally:
        learner.close()


def test_resume_under_another_layout(deep, tmp_path):
    """Saved at TP=2, resumed at PP=2 x DP=2 with the distributed optimizer: the next step is the uninterrupted one."""
    from asyncopd.model.build import load_model

    out = str(tmp_path / "ckpt")
    _spawn(_run_then_save, 2, tmp_path, deep, {"tp": 2}, out, str(tmp_path / "a.pt"))
    assert {p.name for p in Path(out).iterdir()} >= {"config.json", "learner_state.pt", "megatron"}
    _spawn(_resume, 4, tmp_path, deep, {"pp": 2, "dp": 2, "micro_batch_size": 2}, out, str(tmp_path / "b.pt"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    hf = load_model(deep)
    L = make_batch(2, EIGHT).input_ids.shape[1]
    # the same weights and batch through other reductions (TP partial sums vs pipeline stages): forward KL is
    # 2-Lipschitz in the logits, plus the estimator's own roundings; a lost or garbled shard moves it by >> 1e-3
    assert b["loss"] == pytest.approx(a["loss"], rel=0, abs=2 * logit_tol(hf, L) + FP32_ESTIMATOR)
    n = sum(p.numel() for p in hf.parameters())
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4 + rounding_tol(EPS32, n, 1.0))


def _bf16(ckpt: str) -> None:
    from asyncopd.model.build import load_model

    learner = make_trainer(learner_config(**MEGATRON, precision="bf16"), ESTIMATOR, ckpt, max_staleness=2)
    try:
        model = learner.model
        assert all(p.dtype == torch.bfloat16 for c in model.chunks for p in c.parameters())
        opt = model.optimizer.chained_optimizers[0] if hasattr(model.optimizer, "chained_optimizers") \
            else model.optimizer
        mains = [p for g in opt.optimizer.param_groups for p in g["params"]]
        assert mains and all(p.dtype == torch.float32 for p in mains)  # fp32 main weights
        metrics = learner.train_step(make_batch()).metrics
        assert all(p.main_grad.dtype == torch.float32 for c in model.chunks for p in c.parameters())
        reference = make_trainer(learner_config(lr=LR, grad_clip=CLIP), ESTIMATOR, ckpt, max_staleness=2)
        expected = reference.train_step(make_batch()).metrics
        hf = load_model(ckpt)
        L = make_batch().input_ids.shape[1]
        # bf16 weights and bf16 GEMMs against the fp32 reference: each logit's roundings at bf16's epsilon
        bf16_logits = rounding_tol(EPS_BF16, 1, 1.0) / rounding_tol(EPS32, 1, 1.0) * logit_tol(hf, L)
        assert metrics["loss"] == pytest.approx(expected["loss"], rel=0, abs=2 * bf16_logits + FP32_ESTIMATOR)
        assert metrics["grad_norm"] == pytest.approx(expected["grad_norm"], rel=math.sqrt(L) * EPS_BF16 * 8)
        weights = _flat(learner.named_weights_for_rollout(1 << 20))
        assert all(t.dtype == torch.bfloat16 for t in weights.values())
    finally:
        learner.close()


def test_bf16_parameters_with_fp32_main_weights(deep):
    _bf16(deep)


def test_export_hf_of_a_sharded_checkpoint(deep, tmp_path):
    """A checkpoint saved at TP=2 x PP=2 becomes a Hugging Face checkpoint equal to the learner's weights."""
    from asyncopd.learner.megatron.model import export_hf
    from asyncopd.model.build import load_model

    out = str(tmp_path / "ckpt")
    _spawn(_save_weights, 4, tmp_path, deep, {"tp": 2, "pp": 2, "micro_batch_size": 2}, out,
           str(tmp_path / "w.pt"))
    export_hf(out, str(tmp_path / "hf"), bucket_bytes=8192)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # several shards at this bucket size
    exported = dict(load_model(str(tmp_path / "hf")).named_parameters())
    saved = torch.load(tmp_path / "w.pt")
    assert set(exported) == set(saved)
    for name, t in saved.items():
        assert torch.equal(exported[name].detach(), t), name


def _save_weights(ckpt: str, knobs: dict, out: str, result: str) -> None:
    learner = make_trainer(learner_config(**MEGATRON, **knobs), ESTIMATOR, ckpt, max_staleness=4)
    try:
        learner.train_step(make_batch(1, EIGHT))
        learner.save(out)
        weights = _flat(learner.named_weights_for_rollout(1 << 20))
        if dist.get_rank() == 0:
            torch.save(weights, result)
    finally:
        learner.close()


def test_parallel_layout_errors():
    from asyncopd.config.schema import LearnerConfig
    from asyncopd.learner.megatron.parallel import init_parallel

    if dist.is_initialized():
        pytest.skip("needs a process without a default process group")
    with pytest.raises(RuntimeError, match=r"learner.tp \* learner.pp \* learner.dp = 4 needs 4 processes"):
        init_parallel(LearnerConfig(backend="megatron", tp=2, dp=2))
    assert not dist.is_initialized()


def _adam_round_trip(ckpt: str, knobs: dict, out: str) -> None:
    learner = make_trainer(learner_config(**MEGATRON, **knobs), ESTIMATOR, ckpt, max_staleness=4)
    try:
        learner.train_step(make_batch(1, EIGHT))
        learner.train_step(make_batch(2, EIGHT))
        from asyncopd.learner.megatron.checkpoint import _optimizers

        params = [p for c in learner.model.chunks for p in c.parameters()]

        def states():
            return {(j, i): {k: v.clone() for k, v in opt._get_main_param_and_optimizer_states(p).items()}
                    for j, opt in enumerate(_optimizers(learner.model.optimizer))
                    for i, p in enumerate(params) if p in opt.model_param_gbuf_map}

        before = states()
        learner.save(out)
        learner.load(out)
        after = states()
        assert before and before.keys() == after.keys()
        for i, want in before.items():
            for key, t in want.items():
                assert torch.equal(after[i][key], t), f"parameter {i}: {key} changed in a save / load round trip"
    finally:
        learner.close()


def test_checkpoint_round_trip_keeps_every_adam_state_exactly(deep, tmp_path):
    """Tied embeddings over PP=2 put the shared embedding in a bucket of its own; DP=2 shards the state: every
    parameter's fp32 main weight and Adam moments come back bit for bit (megatron-core 0.16.1 alone shifts the
    ones after the first bucket: patches.reshardable_offsets)."""
    _spawn(_adam_round_trip, 4, tmp_path, deep, {"pp": 2, "dp": 2, "micro_batch_size": 2}, str(tmp_path / "ckpt"))
