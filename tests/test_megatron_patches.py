"""The megatron patches: the CPU ones (idempotent, conditional on CUDA, version-pinned) and the FP8 switch."""

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist

from asyncopd.config.schema import LearnerConfig
from asyncopd.learner.megatron import patches
from asyncopd.learner.megatron.patches import cpu_current_device, cpu_rng_tracker
from asyncopd.learner.megatron.patches.fp8 import TE_MISSING, fp8_context, fp8_recipe_kwargs, have_transformer_engine

pytest.importorskip("megatron.core")
from megatron.core.tensor_parallel import random as mrandom  # noqa: E402

CPU_ONLY = not torch.cuda.is_available()


def _state():
    return (torch.cuda.current_device, mrandom.CudaRNGStatesTracker)


@pytest.mark.skipif(not CPU_ONLY, reason="the patches apply only without CUDA")
def test_apply_twice_is_harmless():
    names = patches.apply()
    assert names == ["cpu_current_device", "cpu_rng_tracker", "adam_step_load", "reshardable_offsets"] \
        == patches.applied()
    before = _state()
    assert patches.apply() == names
    assert _state() == before  # not wrapped twice
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


@pytest.mark.parametrize("patch", [p for p in patches.PATCHES if p.NAME != "reshardable_offsets"],
                         ids=lambda p: p.NAME)
def test_each_cpu_patch_is_a_noop_with_cuda(patch):
    assert patch.should_apply(cuda_available=True) is False
    assert patch.should_apply(cuda_available=False) is True
    before = _state()
    assert patch.apply(cuda_available=True) is False
    assert _state() == before


def test_package_apply_with_cuda_applies_only_the_fix_and_checks_the_version(monkeypatch):
    import megatron.core

    before = _state()
    assert patches.apply(cuda_available=True) == ["reshardable_offsets"]  # a megatron bug on GPUs too
    assert _state() == before  # none of the CPU patches
    monkeypatch.setattr(megatron.core, "__version__", "0.0.1")
    with pytest.raises(patches.MegatronVersionError):
        patches.apply(cuda_available=True)


def test_other_megatron_version_is_refused_or_warned(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.15.0")
    with pytest.raises(patches.MegatronVersionError, match="0.16.1.*found 0.15.0"):
        patches.apply(cuda_available=False)
    with pytest.warns(UserWarning, match="megatron-core==0.16.1"):
        patches.check_megatron_version(strict=False)


@pytest.mark.skipif(not CPU_ONLY, reason="the patches apply only without CUDA")
def test_cpu_rng_tracker_forks_the_cpu_generator():
    patches.apply()
    assert cpu_rng_tracker.is_applied() and cpu_current_device.is_applied()
    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = mrandom.get_cuda_rng_tracker()
    assert isinstance(tracker, mrandom.CudaRNGStatesTracker)
    tracker.add("tp-stream", 1234)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("other", 1234)
    torch.manual_seed(7)
    expected_default = torch.rand(3)
    reference = torch.Generator().manual_seed(1234)
    expected_stream = torch.rand(4, generator=reference)

    torch.manual_seed(7)
    with tracker.fork("tp-stream"):
        first = torch.rand(2)
    default = torch.rand(3)  # the default stream is untouched by the fork
    with tracker.fork("tp-stream"):
        second = torch.rand(2)  # the named stream continues where it stopped
    assert torch.equal(default, expected_default)
    assert torch.equal(torch.cat([first, second]), expected_stream)
    mrandom.initialize_rng_tracker(force_reset=True)


# ---- FP8 switch ---------------------------------------------------------------------------------------------

def test_fp8_recipe_mapping():
    cfg = LearnerConfig(fp8=True, fp8_recipe="delayed", fp8_format="hybrid", fp8_margin=1,
                        fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent")
    assert fp8_recipe_kwargs(cfg) == ("DelayedScaling", {"fp8_format": "HYBRID", "margin": 1,
                                                          "amax_history_len": 16, "amax_compute_algo": "most_recent"})
    current = dataclasses.replace(cfg, fp8_recipe="current", fp8_format="e4m3")
    assert fp8_recipe_kwargs(current) == ("Float8CurrentScaling", {"fp8_format": "E4M3"})
    for bad, match in ((dict(fp8_recipe="mxfp4"), "fp8_recipe"), (dict(fp8_format="e5m2"), "fp8_format"),
                       (dict(fp8_margin=-1), "fp8_margin"), (dict(fp8_amax_history_len=0), "amax_history_len"),
                       (dict(fp8_amax_compute_algo="mean"), "amax_compute_algo")):
        with pytest.raises(ValueError, match=match):
            fp8_recipe_kwargs(dataclasses.replace(cfg, **bad))


def test_fp8_off_is_a_null_context():
    assert isinstance(fp8_context(LearnerConfig(fp8=False)), contextlib.nullcontext)


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine is installed")
def test_fp8_without_transformer_engine_fails_early_and_clearly(tmp_path):
    with pytest.raises(RuntimeError) as err:
        fp8_context(LearnerConfig(fp8=True))
    assert str(err.value) == TE_MISSING == "learner.fp8=true needs Transformer Engine: pip install .[gpu]"
    from asyncopd.config.schema import Config
    from asyncopd.learner.backends import build_trainer

    was_initialised = dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"needs Transformer Engine: pip install \.\[gpu\]"):
        build_trainer(Config(learner=LearnerConfig(backend="megatron", fp8=True)), str(tmp_path))
    assert dist.is_initialized() == was_initialised  # failed before any process group or model


@pytest.mark.skipif(not CPU_ONLY, reason="the CUDA-call redirection applies only without CUDA")
def test_cpu_cuda_calls_scope_redirects_inside_and_restores_outside():
    from asyncopd.learner.megatron.patches.cpu_cuda_calls import scope

    t = torch.ones(2)
    with scope():
        assert torch.zeros(1, device="cuda").device.type == "cpu"  # megatron's device="cuda" allocations
        assert torch.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"  # megatron's dtype checks by CUDA type name
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        torch.cuda.synchronize()
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
        assert torch.cuda.random.get_rng_state().numel() == 0  # activation recomputation saves it
    assert t.type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.synchronize()


def test_cpu_cuda_calls_scope_is_a_null_context_with_cuda():
    from asyncopd.learner.megatron.patches.cpu_cuda_calls import scope

    sync = torch.cuda.synchronize
    with scope(cuda_available=True):
        assert torch.cuda.synchronize is sync
        assert torch.ones(1).type() == "torch.FloatTensor"


def test_adam_step_load_only_for_the_torch_fallback_on_cpu():
    from megatron.core.optimizer import distrib_optimizer

    from asyncopd.learner.megatron.patches import adam_step_load

    assert adam_step_load.should_apply(cuda_available=True) is False
    assert adam_step_load.should_apply(cuda_available=False) is (not distrib_optimizer.HAVE_APEX_OR_TE)
