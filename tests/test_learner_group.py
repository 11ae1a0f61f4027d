"""LearnerGroup: the learner as Ray actor ranks (real Ray, real gloo, real megatron-core at TP=2), trained and
broadcasting its gathered weights to a real rollout engine over SGLang's weight-update API."""

import pytest
import ray
import torch

pytest.importorskip("megatron.core")

from asyncopd.cli.main import main  # noqa: E402
from asyncopd.config.ray_cluster import start_ray  # noqa: E402
from asyncopd.config.schema import (  # noqa: E402
    ClusterConfig,
    Config,
    LearnerConfig,
    WeightSyncConfig,
)
from asyncopd.core.errors import ConfigError
from asyncopd.learner.backends import LEARNER_BACKENDS  # noqa: E402
from asyncopd.learner.group import LearnerGroup, learner_ranks  # noqa: E402
from asyncopd.model.build import load_model  # noqa: E402
from asyncopd.rollout.client import SGLangClient  # noqa: E402
from asyncopd.rollout.engine import RolloutEngine  # noqa: E402
from asyncopd.rollout.http_server import RolloutServer  # noqa: E402
from asyncopd.weights.sync import WeightSync  # noqa: E402
from tests._learner_fixtures import (  # noqa: E402
    ESTIMATOR,
    assert_same_step,
    learner_config,
    make_batch,
    make_trainer,
)
from tests.conftest import make_artifacts  # noqa: E402

GROUP = "test_learner_group"
BUCKET_BYTES = 4096  # several buckets for the tiny student


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return str(make_artifacts(tmp_path_factory.mktemp("artifacts")) / "student")


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(tmp_path_factory):
    owns = start_ray(ClusterConfig(), tmp_path_factory.mktemp("ray"))
    yield
    if owns:
        ray.shutdown()


def _cfg(**learner) -> Config:
    # grad_clip far below the gradient norm: the global clip across the TP ranks is exercised
    return Config(learner=learner_config(lr=1e-2, grad_clip=0.05, **learner), estimator=ESTIMATOR)


def _sync(group: LearnerGroup, client: SGLangClient, version: int) -> None:
    """The run's weight sync (SGLang 0.5.23's session, as asyncopd.weights.sync drives it) from the learner ranks."""
    sync = WeightSync(WeightSyncConfig(bucket_mb=BUCKET_BYTES / 2**20, group_name=GROUP, timeout_s=60), group,
                      [client])
    try:
        sync.init_group()
        assert len(sync.buckets) > 1
        sync.sync(version)
    finally:
        sync.close()


def test_megatron_tp2_group_trains_and_broadcasts(student, tmp_path):
    reference = make_trainer(_cfg().learner, ESTIMATOR, student, max_staleness=2)
    expected = reference.train_step(make_batch()).metrics

    engine = RolloutEngine(load_model(student), student)
    server = RolloutServer(engine).start()
    client = SGLangClient(server.url, timeout_s=120)
    group = LearnerGroup.launch(_cfg(backend="megatron", tp=2), student)
    try:
        assert group.world_size == 2 and group.version() == 0
        with pytest.raises(RuntimeError, match="before init_weight_group"):
            group.broadcast_weights(BUCKET_BYTES)

        result = group.train_step(make_batch())
        metrics = result.metrics
        assert group.version() == result.version == 1 and result.staleness == {0: 3}
        assert metrics["grad_norm"] > 10 * 0.05  # the clip was active

        _sync(group, client, version=1)
        assert client.get_weight_version() == 1

        # the engine now holds the hf Trainer's step, gathered from the TP ranks; the checkpoint is megatron's
        # sharded one, and exported it is exactly what the engine serves
        served = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
        initial = dict(load_model(student).named_parameters())
        assert set(served) == set(initial)
        for name, p in served.items():
            assert not torch.equal(p, initial[name]), f"{name} was not updated"
        assert_same_step(metrics, served, reference, expected, make_batch())
        group.save(str(tmp_path / "ckpt"))
        assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"config.json", "learner_state.pt", "megatron"}
        assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
        for name, p in load_model(tmp_path / "hf").named_parameters():
            assert torch.equal(p.detach(), served[name]), name

        assert group.load(str(tmp_path / "ckpt")) == 1
    finally:
        group.shutdown()
        server.stop()


def test_hf_group_is_one_rank(student):
    group = LearnerGroup.launch(_cfg(), student)
    try:
        assert group.world_size == 1
        reference = make_trainer(_cfg().learner, ESTIMATOR, student, max_staleness=2)
        # one hf Trainer in an actor, one here, at the same thread count: the same ops in the same order
        assert group.train_step(make_batch()).metrics["loss"] == reference.train_step(make_batch()).metrics["loss"]
        assert group.version() == 1
    finally:
        group.shutdown()


def test_rank_count_errors():
    assert learner_ranks(LearnerConfig(backend="megatron", tp=2, pp=1)) == 2
    assert learner_ranks(LearnerConfig()) == 1
    with pytest.raises(ConfigError, match="learner.backend=megatron, or learner.tp=1"):
        learner_ranks(LearnerConfig(tp=2))
    with pytest.raises(ConfigError, match="must all be >= 1"):
        learner_ranks(LearnerConfig(backend="megatron", tp=0))
    assert learner_ranks(LearnerConfig(backend="megatron", tp=2, pp=2, dp=2)) == 8
    with pytest.raises(ConfigError, match="learner.pp=2 .*learner.backend=megatron, or learner.pp=1"):
        learner_ranks(LearnerConfig(pp=2))
    with pytest.raises(ConfigError, match="learner.dp=2 .*learner.backend=megatron, or learner.dp=1"):
        learner_ranks(LearnerConfig(dp=2))
    with pytest.raises(ConfigError, match="learner.backend='torch' is unknown"):
        learner_ranks(LearnerConfig(backend="torch"))


def test_hf_refuses_tensor_parallel():
    with pytest.raises(ConfigError, match=r"learner\.tp=2 with learner\.backend=hf.*learner\.tp=1"):
        learner_ranks(LearnerConfig(backend="hf", tp=2))


def test_backend_table_names():
    assert set(LEARNER_BACKENDS) == {"hf", "megatron"}
    assert all(name == backend.name for name, backend in LEARNER_BACKENDS.items())
