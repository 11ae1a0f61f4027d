"""The staleness bound holds for every sample (its oldest token) under randomised stage delays, and async really
overlaps."""

import random
import threading
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncopd.core.errors import StalenessViolation
from asyncopd.core.types import Rollout, TeacherScores
from asyncopd.learner.collate import collate
from asyncopd.learner.staleness import check_staleness, token_staleness
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


# ---- staleness per token: a response generated across updates is as old as its oldest token ---------------------

class TokenStages(DelayedStages):
    """Generation that takes several steps per sample, each token stamped with the fleet version at that step (as
    SGLang's weight_versions spans report it): updates land mid-response. learn() checks oldest tokens, as the
    learner does through collate."""

    def __init__(self, *args, tokens: int = 4, **kw):
        super().__init__(*args, **kw)
        self.tokens = tokens
        self.token_lags: Counter = Counter()

    def generate(self, s):
        rows = [[] for _ in range(self.batch)]
        for _ in range(self.tokens):
            for row in rows:
                row.append(self.fleet_version)
            self._sleep(self.delays[0] / self.tokens)
        return [_rollout(row) for row in rows]

    def learn(self, s, rollouts):
        batch = collate([(r, _scores(r.num_tokens)) for r in rollouts], pad_id=0)
        lags = check_staleness(s, batch.versions, self.max_staleness)
        self.token_lags.update(token_staleness(s, batch.token_versions))
        self.observed.extend(lags.elements())
        self._sleep(self.delays[2])
        self.fleet_version = s + 1


def _rollout(token_versions: list[int]) -> Rollout:
    v = np.asarray(token_versions, dtype=np.int64)
    n = len(v)
    return Rollout(prompt_ids=np.array([1, 2], np.int32), response_ids=np.full(n, 3, np.int32),
                   logprobs=np.zeros(n, np.float32), version_start=int(v[0]) if n else 0,
                   version_end=int(v[-1]) if n else 0, finish_reason="length", token_versions=v)


def _scores(n: int) -> TeacherScores:
    return TeacherScores(topk_ids=np.zeros((n, 1), np.int32), topk_logprobs=np.zeros((n, 1), np.float32),
                         token_logprob=np.zeros(n, np.float32))


@settings(max_examples=15, deadline=None)
@given(k=st.integers(0, 3), seed=st.integers(0, 10_000),
       delays=st.tuples(*[st.floats(0.0, 0.004) for _ in range(3)]))
def test_oldest_token_within_bound_when_updates_land_mid_response(k, seed, delays):
    stages = TokenStages(k, batch=3, seed=seed, delays=delays, tokens=4)
    run_stages(stages, steps=10, max_staleness=k)
    assert len(stages.observed) == 30 and max(stages.observed) <= k
    assert sum(stages.token_lags.values()) == 30 * 4  # every token counted once
    assert max(stages.token_lags) <= max(stages.observed)  # no token is older than its sample's oldest


def test_updates_do_land_mid_response():
    """With generation slower than learning, responses really do span versions (so the test above tests them)."""
    stages = TokenStages(2, batch=2, seed=0, delays=(0.03, 0.0, 0.0), tokens=6)
    run_stages(stages, steps=8, max_staleness=2)
    assert len(stages.token_lags) > 1 and max(stages.observed) <= 2


def test_a_response_is_charged_to_its_oldest_token():
    """Started 3 versions back, finished current: within a bound of 1 by its last token, not by its first. The
    check used to read a version SGLang never sends, so it saw every sample as current."""
    spanning = _rollout([0, 0, 2, 3])
    batch = collate([(spanning, _scores(4))], pad_id=0)
    assert batch.versions == [0] and batch.token_versions[0].tolist() == [0, 0, 2, 3]
    with pytest.raises(StalenessViolation, match=r"staleness \[3\] \(pipeline.max_staleness=1\)"):
        check_staleness(3, batch.versions, max_staleness=1)
    assert token_staleness(3, batch.token_versions) == Counter({3: 2, 1: 1, 0: 1})
    # a server without spans (one weight_version per response): every token charged the version it started at
    plain = Rollout(prompt_ids=np.array([1], np.int32), response_ids=np.array([5, 6], np.int32),
                    logprobs=np.zeros(2, np.float32), version_start=1, version_end=2, finish_reason="stop")
    assert plain.oldest_version == 1 and plain.versions_per_token().tolist() == [1, 1]
    assert _rollout([]).oldest_version == 0  # an empty response: the version it ran under
    with pytest.raises(StalenessViolation, match="tokens of version 4, which it has not produced"):
        token_staleness(3, [np.array([3, 4])])
