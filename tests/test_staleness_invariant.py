"""The staleness bound holds for every sample under randomised stage delays, and async really overlaps."""

import random
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncopd.core.errors import StalenessViolation
from asyncopd.learner.staleness import check_staleness
from asyncopd.pipeline.scheduler import run_stages


class DelayedStages:
    """Stage functions that sleep for random times; the 'fleet' version moves only at learn()."""

    def __init__(self, max_staleness: int, batch: int, seed: int, delays: tuple[float, float, float]):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.max_staleness = max_staleness
        self.batch = batch
        self.delays = delays
        self.fleet_version = 0
        self.observed: list[int] = []

    def _sleep(self, scale: float) -> None:
        with self.lock:
            d = self.rng.uniform(0, scale)
        time.sleep(d)

    def generate(self, s):
        # Each sample records the version it started under, then generation takes a while.
        versions = [self.fleet_version for _ in range(self.batch)]
        self._sleep(self.delays[0])
        return versions

    def score(self, s, versions):
        self._sleep(self.delays[1])
        return versions

    def learn(self, s, versions):
        lags = check_staleness(s, versions, self.max_staleness)
        self.observed.extend(lags.elements())
        self._sleep(self.delays[2])
        self.fleet_version = s + 1  # weight sync done


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(0, 4),
    seed=st.integers(0, 10_000),
    delays=st.tuples(*[st.floats(0.0, 0.004) for _ in range(3)]),
)
def test_no_sample_exceeds_bound(k, seed, delays):
    stages = DelayedStages(k, batch=3, seed=seed, delays=delays)
    times = run_stages(stages, steps=12, max_staleness=k)
    assert len(stages.observed) == 36
    assert max(stages.observed) <= k
    assert len(times.learner) == 12


def test_sync_mode_is_strictly_on_policy():
    stages = DelayedStages(0, batch=2, seed=0, delays=(0.002, 0.002, 0.002))
    run_stages(stages, steps=8, max_staleness=0)
    assert set(stages.observed) == {0}


def test_async_mode_runs_ahead_when_learning_is_slow():
    # Fast rollout, slow learner: with k = 3 rollout runs ahead and samples are consumed 3 versions old.
    stages = DelayedStages(3, batch=2, seed=0, delays=(0.0, 0.0, 0.02))
    run_stages(stages, steps=10, max_staleness=3)
    assert max(stages.observed) == 3


def test_violation_is_reported_not_swallowed():
    class Broken(DelayedStages):
        def generate(self, s):
            return [s - 5] * self.batch  # claims an ancient version

    stages = Broken(1, batch=2, seed=0, delays=(0, 0, 0))
    try:
        run_stages(stages, steps=3, max_staleness=1)
    except StalenessViolation as e:
        assert "pipeline.max_staleness=1" in str(e)
    else:
        raise AssertionError("a stale sample went through")


def test_stage_failure_propagates():
    class Failing(DelayedStages):
        def score(self, s, versions):
            raise ValueError("teacher down")

    try:
        run_stages(Failing(1, 2, 0, (0, 0, 0)), steps=3, max_staleness=1)
    except RuntimeError as e:
        assert isinstance(e.__cause__, ValueError)
    else:
        raise AssertionError("failure was swallowed")
