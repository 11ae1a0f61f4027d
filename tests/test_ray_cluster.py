"""A local Ray cluster keeps its session files in the run directory, however deep that directory is."""

import ray

from asyncopd.config.ray_cluster import _SESSION_SUFFIX, _SOCKET_PATH_MAX, ray_temp_dir, start_ray
from asyncopd.config.schema import ClusterConfig


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
