"""rollout.router=sglang_router against the installed router and two `asyncopd serve rollout` processes: what the
router forwards and refuses (asyncopd/rollout/sglang_router.py records it), how we configure it, and the fleet's
/generate through it: per-sample seeds give the tokens a direct batched request gives, and requests carrying our
mc_samples extension (which the router drops) go to the engines directly."""

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from asyncopd.bench import router_bench
from asyncopd.config.load import compose_config
from asyncopd.net.client import HttpClient, ServerError
from asyncopd.pipeline.fleet import Fleet
from asyncopd.pipeline.run import run_training
from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.dispatch import Dispatcher
from asyncopd.rollout.sglang_router import SGLangRouter
from asyncopd.validation import load_config
from tests._serve_processes import serving

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    importlib.util.find_spec("sglang_router") is None,
    reason="sglang-router is not installed (`pip install .[dev]` installs sglang-router==0.3.2)")]
KEY = "router-test-key"
PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11], [4, 4], [5, 6, 7, 8, 9], [6]]
BODY = {"input_ids": [3, 4, 5, 6], "sampling_params": {"max_new_tokens": 3, "temperature": 1.0, "ignore_eos": True},
        "return_logprob": True}


@pytest.fixture(scope="module")
def served(tiny_artifacts, tmp_path_factory):
    """Two standalone engines that require an API key (the router needs it for its own calls, and forwards ours);
    the last test kills one."""
    with serving("rollout", tiny_artifacts / "student", tmp_path_factory.mktemp("serve"), "--api-key", KEY,
                 count=2) as servers:
        yield servers


@pytest.fixture(scope="module")
def engines(served):
    return [SGLangClient(s.url, api_key=KEY) for s in served]


@pytest.fixture(scope="module")
def router(engines, tmp_path_factory):
    r = SGLangRouter([e.base_url for e in engines], api_key=KEY, log_dir=str(tmp_path_factory.mktemp("router")))
    r.start()
    yield r
    r.stop()


def test_router_binds_loopback_and_drops_our_extension_but_forwards_standard_fields(engines, router):
    assert router.url.startswith("http://127.0.0.1:")
    assert "--prometheus-host" in router.command(1, 2) and "0.0.0.0" not in router.command(1, 2)
    body = {**BODY, "mc_samples": 2, "top_logprobs_num": 3,
            "sampling_params": {**BODY["sampling_params"], "custom_params": {"mc_samples": 2}}}
    direct = engines[0].post_json("/generate", body)["meta_info"]
    routed = HttpClient(router.url, api_key=KEY).post_json("/generate", body)["meta_info"]
    assert "output_mc_ids" in direct
    # if a router release starts forwarding it, mc_samples may travel through the router: revisit Fleet.generate
    assert "output_mc_ids" not in routed
    assert len(routed["output_top_logprobs"]) == 3  # the student's top-k (top_logprobs_num) does pass


def test_router_refuses_per_item_sampling_params(router):
    with pytest.raises(ServerError) as refused:
        HttpClient(router.url, api_key=KEY).post_json("/generate", {
            **BODY, "input_ids": [[3, 4], [5, 6]],
            "sampling_params": [{"max_new_tokens": 2, "sampling_seed": s} for s in (1, 2)]})
    assert refused.value.status == 422


def test_bad_requests_do_not_open_the_circuit_for_everyone(router):
    client = HttpClient(router.url, api_key=KEY)
    for _ in range(25):  # sglang-router's default breaker opens after 10 failures, 4xx included
        with pytest.raises(ServerError) as bad:
            client.post_json("/generate", {**BODY, "sampling_params": {"temperature": -1}})
        assert bad.value.status == 400
    assert client.post_json("/generate", BODY)["meta_info"]["completion_tokens"] == 3


def test_fleet_generates_through_the_router_as_directly_and_sends_mc_samples_to_the_engines(engines):
    cfg = compose_config(["rollout.router=sglang_router", f"rollout.api_key={KEY}", "rollout.max_new_tokens=6",
                          "rollout.max_inflight_per_engine=2"])
    fleet = Fleet(cfg, [], engines, teacher=None, teacher_accuracy=None)
    try:
        fleet.start_router()
        routed = fleet.generate(PROMPTS, seed=9, student_top_k=2)
        assert fleet.routed.pool.served == [len(PROMPTS)] and fleet.direct.pool.served == [0, 0]
        direct = Dispatcher(engines[1:], cap=1).generate(PROMPTS, seed=9, max_new_tokens=6, temperature=1.0,
                                                         student_top_k=2)  # one batched request, one engine
        for a, b in zip(routed, direct, strict=True):
            assert a.response_ids.tolist() == b.response_ids.tolist()
            assert (a.student_topk_ids == b.student_topk_ids).all()
        with_mc = fleet.generate(PROMPTS, seed=9, mc_samples=2)
        assert all(r.mc_ids.shape == (len(r.response_ids), 2) for r in with_mc)
        assert sum(fleet.direct.pool.served) > 0 and fleet.routed.pool.served == [len(PROMPTS)]
        proc = fleet.router.proc
    finally:
        fleet.shutdown()
    assert proc.poll() is not None and fleet.router.proc is None  # torn down with the fleet


def test_engines_leave_and_rejoin_the_rotation_through_the_worker_api(engines, router):
    """0.3.2's worker API is REST (/workers), not /add_worker, /remove_worker, /list_workers. A removed engine stays
    out while it answers /health (the router's own health checks, every 2 s, would re-admit an unhealthy one), and
    gets no request until it is added back. Engine 0 is told apart by its weight version label."""
    client, gone = HttpClient(router.url, api_key=KEY), engines[0].base_url
    for path in ("/add_worker?url=" + gone, "/remove_worker?url=" + gone, "/list_workers"):
        with pytest.raises(ServerError) as absent:
            client.post_json(path)
        assert absent.value.status == 404, path

    def versions(n: int) -> set[str]:
        return {client.post_json("/generate", BODY)["meta_info"]["weight_version"] for _ in range(n)}

    engines[0].post_json("/update_weight_version", {"new_version": "7"})
    try:
        assert versions(20) == {"0", "7"}  # both in rotation
        router.remove_worker(gone)
        router.remove_worker(gone)  # not listed: nothing to do
        time.sleep(5)  # two health-check rounds
        assert list(router.workers()) == [engines[1].base_url]
        assert versions(20) == {"0"}
        router.add_worker(gone)
        assert {u: w["is_healthy"] for u, w in router.workers().items()} == {e.base_url: True for e in engines}
        assert versions(20) == {"0", "7"}
    finally:
        engines[0].post_json("/update_weight_version", {"new_version": "0"})


def test_router_bench_reports_both_paths(tmp_path):
    rows = router_bench.run(argparse.Namespace(requests=5, out=str(tmp_path)))
    assert [r["call"] for r in rows] == ["direct", "router"] and all(r["n"] == 5 for r in rows)
    saved = json.loads((tmp_path / "router.json").read_text())
    assert saved["router_version"] == "0.3.2" and saved["calls"][1]["p50_ms"] > 0


def _router_children() -> list[int]:
    """Processes this test process started that run sglang-router (its process title is sglang::router)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:  # gone meanwhile
            continue
        comm, fields = rest.rsplit(") ", 1)
        if comm.startswith("sglang::router") and int(fields.split()[1]) == me:
            found.append(int(pid))
    return found


def test_a_run_with_the_router_trains_and_tears_it_down(tiny_artifacts, tmp_path):
    """Rollouts of mc_rkl carry mc_samples (to the engines directly), evaluation's do not (through the router)."""
    before = _router_children()  # this module's own router fixture may be running
    summary = run_training(load_config([
        f"model.artifacts_dir={tiny_artifacts}", f"run.dir={tmp_path}", "run.progress=false", "pipeline.steps=2",
        "pipeline.batch_size=8", "pipeline.eval_prompts=8", "pipeline.eval_every=0", "rollout.max_new_tokens=8",
        "rollout.num_engines=2", "rollout.router=sglang_router", "estimator=mc_rkl", "estimator.mc_samples=2"]))
    assert summary["steps"] == 2 and sum(summary["staleness_histogram"].values()) == 2 * 8
    requests = summary["rollout_requests"]
    assert requests["via_router"] > 0 and all(requests["per_engine"]), requests  # evaluations; mc_rkl rollouts
    assert _router_children() == before


def test_a_killed_engine_leaves_the_rotation_within_seconds(served, router):
    """Runs last: it SIGKILLs engine 1. The router's health checks (every 2 s, 2 failures) take it out, after which
    every request lands on the live engine; with the router's defaults (60 s, 3 failures) it would stay in for
    minutes, a third of requests failing (asyncopd/rollout/sglang_router.py)."""
    client = HttpClient(router.url, api_key=KEY, timeout_s=30)
    served[1].proc.kill()
    served[1].proc.wait()
    deadline = time.monotonic() + 20
    while any(w["is_healthy"] for w in client.get_json("/workers")["workers"] if w["url"] == served[1].url):
        assert time.monotonic() < deadline, "the dead engine is still in rotation after 20 s"
        time.sleep(0.5)
    assert all(client.post_json("/generate", BODY)["meta_info"]["completion_tokens"] == 3 for _ in range(30))
