"""Config composition, overrides, and clear errors for bad values."""

import pytest

from asyncopd.cli.main import main
from asyncopd.config.load import compose_config
from asyncopd.core.errors import ConfigError
from asyncopd.validation import load_config
from asyncopd.validation.rules import validate


def test_defaults_compose_to_the_embedded_demo():
    cfg = load_config()
    assert cfg.run.experiment == "tiny_cpu"
    assert cfg.rollout.backend == "embedded" and cfg.learner.backend == "hf"
    assert cfg.pipeline.max_staleness == 2


def test_overrides_and_groups():
    cfg = load_config(["pipeline=sync", "learner.lr=0.01", "rollout.num_engines=2"])
    assert cfg.pipeline.max_staleness == 0
    assert cfg.learner.lr == 0.01 and cfg.rollout.num_engines == 2


@pytest.mark.parametrize(
    "override, field",
    [
        ("pipeline.max_staleness=-1", "pipeline.max_staleness"),
        ("pipeline.max_staleness=abc", "pipeline.max_staleness"),
        ("pipeline.no_such_key=1", "no_such_key"),
        ("rollout.backend=vllm", "rollout.backend"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("estimator.name=nope", "estimator.name"),
        ("weights.backend=mpi", "weights.backend"),
        ("learner.precision=fp16", "learner.precision"),
        ("learner.recompute=all", "learner.recompute"),
        ("learner.virtual_pp=0", "learner.virtual_pp"),
        ("learner.micro_batch_size=-1", "learner.micro_batch_size"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert field in str(e.value)


def test_gpu_only_configs_fail_early_on_cpu():
    for overrides, needle in (("rollout=sglang", "pip install .[gpu]"),
                              ("learner=megatron learner.fp8=true", "Transformer Engine"),
                              ("weights.backend=nccl", "weights.backend=gloo")):
        with pytest.raises(ConfigError) as e:
            validate(load_config(overrides.split()), host=True)
        assert needle in str(e.value)


def test_production_experiments_compose():
    for name in ("qwen3_1p7b_from_30b", "llama_70b"):
        cfg = compose_config([f"experiment={name}"])
        assert cfg.learner.backend == "megatron" and cfg.rollout.backend == "sglang"


def test_cli_reports_config_errors(capsys):
    assert main(["train", "pipeline.max_staleness=-3"]) == 2
    assert "pipeline.max_staleness" in capsys.readouterr().err
    assert main(["config", "pipeline.nope=1"]) == 2  # what does not compose is refused everywhere
