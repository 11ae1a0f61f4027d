"""A local Ray cluster keeps its session files in the run directory, however deep that directory is; a role's
placement group keeps a learner TP group in one bundle and, when it cannot be placed, says what to change."""

import pytest
import ray
from ray.util import placement_group_table

from asyncopd.config.ray_cluster import _SESSION_SUFFIX, _SOCKET_PATH_MAX, placement, ray_temp_dir, start_ray
from asyncopd.config.schema import ClusterConfig, Config, LearnerConfig
from asyncopd.core.errors import ConfigError
from asyncopd.learner.group import learner_placement


def test_temp_dir_is_the_run_dirs_and_short_enough(tmp_path):
    for run_dir in (tmp_path / "r", tmp_path / ("d" * 60) / ("e" * 60)):
        got = ray_temp_dir(run_dir)
        assert got.resolve() == (run_dir / "ray").resolve()
        assert len(str(got)) + _SESSION_SUFFIX <= _SOCKET_PATH_MAX
        if len(str((run_dir / "ray").resolve())) + _SESSION_SUFFIX <= _SOCKET_PATH_MAX:
            assert got == (run_dir / "ray").resolve()  # no link when the real path fits


def test_deep_run_dir_starts_ray_through_a_short_link(tmp_path):
    run_dir = tmp_path / ("d" * 60) / ("e" * 60)  # Ray's plasma socket path would exceed 107 bytes here
    try:
        assert start_ray(ClusterConfig(num_cpus=1), run_dir) is True
        assert ray.get(ray.put(41)) + 1 == 42
        sessions = list((run_dir / "ray").glob("session_*"))
        assert sessions, "Ray's session files must live in the run directory"
        assert list(sessions[0].glob("sockets/*"))
    finally:
        ray.shutdown()


@pytest.fixture
def four_gpus(tmp_path):
    """A local Ray node declaring 4 GPUs (Ray schedules what it is told; the actors here use none)."""
    ray.init(num_cpus=1, num_gpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=str(ray_temp_dir(tmp_path)), log_to_driver=False)
    yield
    ray.shutdown()


def _bundles(options: list[dict]) -> tuple[list[dict], list[int]]:
    """(the placement group's bundles, each actor's bundle index)."""
    strategies = [o["scheduling_strategy"] for o in options]
    assert len({s.placement_group.id for s in strategies}) == 1  # one group per role
    return strategies[0].placement_group.bundle_specs, [s.placement_group_bundle_index for s in strategies]


def test_a_learner_tp_group_is_one_bundle(four_gpus):
    """PACK is best effort: only a bundle of its own keeps a TP group on one node. Megatron's TP groups (its
    default rank order) are exactly the ranks that share a bundle."""
    cfg = Config(learner=LearnerConfig(backend="megatron", tp=2, dp=2, gpus_per_rank=1.0),
                 cluster=ClusterConfig(placement_groups=True))
    bundles, index = _bundles(learner_placement(cfg))
    assert bundles == [{"GPU": 2.0}, {"GPU": 2.0}] and index == [0, 0, 1, 1]
    cfg.learner.gpus_per_rank = 0.0  # CPU ranks: a sliver of CPU per rank, a TP group's together
    assert _bundles(learner_placement(cfg)) == ([{"CPU": 0.02}, {"CPU": 0.02}], [0, 0, 1, 1])
    cfg.cluster.placement_groups = False  # Ray's default: no group
    assert learner_placement(cfg) == [{}, {}, {}, {}] and len(placement_group_table()) == 2
    megatron = pytest.importorskip("megatron.core.parallel_state")
    tp_groups = megatron.RankGenerator(tp=2, ep=1, dp=2, pp=1, cp=1, order="tp-cp-ep-dp-pp").get_ranks("tp")
    assert tp_groups == [[r for r in range(4) if index[r] == b] for b in range(2)]


def test_a_group_that_cannot_be_placed_says_what_to_change(four_gpus):
    cluster = ClusterConfig(placement_groups=True, rollout_placement="STRICT_SPREAD")
    with pytest.raises(ConfigError) as e:
        placement(cluster, "rollout", 2, 1.0, sized_by="rollout.num_engines, rollout.gpus_per_engine", timeout_s=2)
    message = str(e.value)
    for part in ("the rollout placement group (2 x {'GPU': 1.0}, cluster.rollout_placement=STRICT_SPREAD)",
                 "'GPU': 4.0", "(rollout.num_engines, rollout.gpus_per_engine)", "cluster.rollout_placement=SPREAD",
                 "cluster.placement_groups=false"):
        assert part in message, message
    assert [g["state"] for g in placement_group_table().values()] == ["REMOVED"]  # it holds nothing while pending
