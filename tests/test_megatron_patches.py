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
    assert names == ["cpu_current_device", "cpu_rng_tracker"] == patches.applied()
    before = _state()
    assert patches.apply() == names
    assert _state() == before  # not wrapped twice
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.NAME)
def test_each_patch_is_a_noop_with_cuda(patch):
    assert patch.should_apply(cuda_available=True) is False
    assert patch.should_apply(cuda_available=False) is True
    before = _state()
    assert patch.apply(cuda_available=True) is False
    assert _state() == before


def test_package_apply_with_cuda_does_nothing_even_on_another_version(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.0.1")
    before = _state()
    assert patches.apply(cuda_available=True) == []
    assert _state() == before


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
