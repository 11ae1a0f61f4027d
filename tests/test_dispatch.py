"""The rollout dispatcher: requests go to free slots within per-engine caps, results keep prompt order, and each
sample's seed follows its index, so its tokens do not depend on the engine or the request that carried it."""

import threading
import time

import numpy as np
import pytest

from asyncopd.config.load import compose_config
from asyncopd.model.build import load_model
from asyncopd.net.client import HttpClient, ServerError
from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.dispatch import Dispatcher, SlotPool, request_size, sample_seed
from asyncopd.rollout.engine import RolloutEngine
from asyncopd.rollout.http_server import RolloutServer
from asyncopd.validation.rules import problems


def test_sample_seed_is_a_fixed_i64_per_batch_seed_and_index():
    seeds = {sample_seed(s, i) for s in (0, 64, 2**40) for i in range(200)}
    assert len(seeds) == 600  # `seed + index` would collide across batches seeded 64 apart
    assert all(0 <= x < 2**63 for x in seeds)  # SGLang's sampling_seed is an i64
    assert sample_seed(7, 3) == sample_seed(7, 3) != sample_seed(7, 4)


@pytest.mark.parametrize("n,slots,per_request,max_batch,want", [
    (64, 4, 0, 8192, 16),  # 0: the batch spread over every slot
    (65, 4, 0, 8192, 17),
    (3, 8, 0, 8192, 1),
    (64, 4, 1, 8192, 1),  # one sample per request
    (64, 1, 0, 10, 10),  # never more than a server takes
])
def test_request_size(n, slots, per_request, max_batch, want):
    assert request_size(n, slots, per_request, max_batch) == want


@pytest.mark.parametrize("override,message", [
    ("rollout.max_inflight_per_engine=0", "rollout.max_inflight_per_engine must be >= 1 (got 0)"),
    ("rollout.samples_per_request=-1", "rollout.samples_per_request must be >= 0 (got -1)"),
    ("rollout.router=sglang-router", "rollout.router='sglang-router' is unknown: use one of ['none', 'sglang_router']"),
])
def test_dispatch_settings_are_validated(override, message):
    assert message in {p.field: p.message for p in problems(compose_config([override]))}[override.split("=")[0]]


class _Target:
    """Counts its calls in flight (the most at once) and takes `delay_s` per call."""

    def __init__(self, delay_s: float):
        self.delay_s, self.now, self.most = delay_s, 0, 0
        self.lock = threading.Lock()

    def __call__(self, work: int) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.delay_s)
        with self.lock:
            self.now -= 1
        return work * 10


def test_slot_pool_keeps_caps_and_order_and_feeds_the_engine_that_frees_up():
    slow, fast = _Target(0.05), _Target(0.005)
    pool = SlotPool([slow, fast], cap=2)
    try:
        assert pool.map(lambda target, work: target(work), list(range(60))) == [w * 10 for w in range(60)]
    finally:
        pool.shutdown()
    assert slow.most <= 2 and fast.most <= 2 and fast.most == 2  # the cap holds per target, and is used
    assert pool.inflight == [0, 0] and sum(pool.served) == 60
    assert pool.served[1] >= 3 * pool.served[0], pool.served  # an even split would be [30, 30]


def test_slot_pool_raises_the_first_error_without_waiting_for_the_rest():
    def call(target: _Target, work: int) -> int:
        if work == 1:
            raise ValueError("engine said no")
        return target(work)

    pool = SlotPool([_Target(0.5)], cap=2)
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="engine said no"):
            pool.map(call, list(range(20)))
    finally:
        pool.shutdown()
    assert time.perf_counter() - t0 < 2.0  # 19 calls x 0.5 s on 2 slots would be ~5 s


@pytest.fixture(scope="module")
def engines(tiny_artifacts):
    """Two embedded engines over HTTP serving the same student (separate model copies)."""
    path = str(tiny_artifacts / "student")
    servers = [RolloutServer(RolloutEngine(load_model(path), path)).start() for _ in range(2)]
    yield [SGLangClient(s.url) for s in servers]
    for s in servers:
        s.stop()


PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11], [4, 4], [5, 6, 7, 8, 9], [6], [8, 9, 10], [11, 3]]
KW = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, mc_samples=2, student_top_k=2)


def test_a_samples_tokens_depend_on_its_index_not_on_its_engine_or_request(engines):
    one_batch = Dispatcher(engines[:1], cap=1).generate(PROMPTS, seed=5, **KW)  # one request of 8
    spread = Dispatcher(engines, cap=2, samples_per_request=1)
    per_sample = spread.generate(PROMPTS, seed=5, **KW)
    threes = Dispatcher(engines[::-1], cap=1, samples_per_request=3).generate(PROMPTS, seed=5, **KW)
    assert all(spread.pool.served), spread.pool.served  # both engines drew samples
    for a, b, c in zip(one_batch, per_sample, threes, strict=True):
        assert a.response_ids.tolist() == b.response_ids.tolist() == c.response_ids.tolist()
        assert (a.mc_ids == b.mc_ids).all() and (a.mc_ids == c.mc_ids).all()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)  # a batch pads; the draw is the same
    other = Dispatcher(engines, cap=1).generate(PROMPTS, seed=6, **KW)
    assert any(a.response_ids.tolist() != b.response_ids.tolist() for a, b in zip(one_batch, other, strict=True))


def test_engine_takes_per_item_seeds_only(engines):
    client = HttpClient(engines[0].base_url)
    base = {"max_new_tokens": 2, "temperature": 1.0}
    with pytest.raises(ServerError, match="sampling_seed may differ"):
        client.post_json("/generate", {"input_ids": [[3, 4], [5, 6]], "sampling_params": [
            {**base, "sampling_seed": 1}, {**base, "sampling_seed": 2, "top_p": 0.5}]})
    with pytest.raises(ServerError, match=r"one entry per input \(2\), got 3"):
        client.post_json("/generate", {"input_ids": [[3, 4], [5, 6]], "sampling_params": [
            {**base, "sampling_seed": s} for s in (1, 2, 3)]})
