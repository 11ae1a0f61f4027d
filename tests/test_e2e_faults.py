"""Faults with real processes: SIGKILL of a rollout engine (of 2) and of a teacher replica (of 2) in the middle of a
run. The run completes, every prompt is trained exactly once, and summary.json lists the fault."""

import json
import os
import signal
import threading
import time

import pytest
import ray

from asyncopd.config.ray_cluster import start_ray
from asyncopd.config.schema import ClusterConfig
from asyncopd.net.client import ServerError
from asyncopd.pipeline.loop import OPDLoop
from asyncopd.pipeline.run import run_training
from tests.test_e2e_pipeline import small_run
from tests.test_supervision import wait_for

pytestmark = pytest.mark.e2e
STEPS, BATCH, KILL_AT = 6, 8, 1
# k=1: a restarted engine serving its checkpoint (version 0) from step 3 on would break the staleness bound
RUN = (f"pipeline.steps={STEPS}", f"pipeline.batch_size={BATCH}", "pipeline.max_staleness=1", "pipeline.eval_every=0",
       "rollout.max_new_tokens=40")
RESTART_S = 180.0  # a Ray actor restarted on this 2-core machine: a new process imports torch and loads the model


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(tmp_path_factory):
    start_ray(ClusterConfig(), tmp_path_factory.mktemp("ray"))
    yield
    ray.shutdown()


def _kill_engine_0_mid_run(monkeypatch, seen: dict, at_kill=None, at_return=None) -> None:
    """OPDLoop.generate patched: engine 0's process is SIGKILLed while it generates batch KILL_AT, once it holds a
    request (samples in flight die with it); batch KILL_AT + 2 waits for it to serve again (the rest of the run uses
    the restarted engine). `at_kill(loop)` runs before the kill, `at_return(loop)` once it is back."""
    generate = OPDLoop.generate

    def kill_then_generate(self: OPDLoop, s: int):
        pool, engine, actor = self.fleet.direct.pool, self.fleet.engines[0], self.fleet.engine_actors[0]
        if s == KILL_AT:
            seen["pid"], seen["pool"] = ray.get(actor.pid.remote()), pool
            if at_kill is not None:
                at_kill(self)

            def kill() -> None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and "in_flight" not in seen:
                    load = engine.get_json("/v1/loads")["loads"][0]
                    if load["num_running_reqs"] + load["num_waiting_reqs"]:
                        seen["in_flight"] = load
                    else:
                        time.sleep(0.005)  # a busy poll would starve the engines of this 2-core machine
                os.kill(seen["pid"], signal.SIGKILL)

            killer = threading.Thread(target=kill)
            killer.start()
            try:
                return generate(self, s)
            finally:
                killer.join()
        if s == KILL_AT + 2:
            wait_for(lambda: pool.up[0], RESTART_S, "engine 0 to serve again")
            seen["new_pid"], seen["version_at_return"] = ray.get(actor.pid.remote()), engine.get_weight_version()
            if at_return is not None:
                at_return(self)
        return generate(self, s)

    monkeypatch.setattr(OPDLoop, "generate", kill_then_generate)


def _check_engine_fault(summary: dict, seen: dict) -> None:
    """Every prompt trained once, one fault on engine 0, which came back as a new process with the current weights."""
    assert seen["in_flight"]
    assert summary["prompts_trained"] == summary["prompts_unique"] == STEPS * BATCH
    [fault] = summary["faults"]
    assert (fault["role"], fault["index"]) == ("rollout", 0) and fault["detected_at_step"] in (KILL_AT - 1, KILL_AT)
    assert fault["time_lost_s"] > 0 and fault["url"]
    assert seen["new_pid"] != seen["pid"]  # a new process: Ray restarted the actor
    assert seen["version_at_return"] >= KILL_AT  # the current weights, not its checkpoint's (0)
    assert summary["max_observed_staleness"] <= 1


def test_train_survives_a_sigkilled_rollout_engine(tiny_artifacts, tmp_path, monkeypatch):
    """`asyncopd train rollout.num_engines=2`: engine 0's process is SIGKILLed while it generates batch 1. Its
    requests move to engine 1, Ray restarts its actor, and it takes traffic again once it holds the current weights."""
    from asyncopd.cli.main import main

    seen: dict = {}
    _kill_engine_0_mid_run(monkeypatch, seen,
                           at_return=lambda loop: seen.update(served=loop.fleet.direct.pool.served[0]))
    t0 = time.monotonic()
    code = main(["train", "rollout.num_engines=2", f"model.artifacts_dir={tiny_artifacts}", f"run.dir={tmp_path}",
                 "run.progress=false", "pipeline.eval_prompts=16", *RUN])
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(f"run with an engine fault: {time.monotonic() - t0:.1f} s, faults {summary['faults']}")
    assert code == 0
    _check_engine_fault(summary, seen)
    assert summary["redispatched_requests"] >= 1  # the dead engine's request was served by the other
    assert seen["pool"].served[0] > seen["served"]  # and it took traffic again


def test_through_the_router_a_sigkilled_engine_leaves_its_rotation_and_rejoins_after_catch_up(tiny_artifacts, tmp_path,
                                                                                             monkeypatch):
    """rollout.router=sglang_router, the same fault: the router's worker list loses engine 0 when it is noticed and
    lists it again (at its URL now) only once it holds the current weights; answers through the router are fenced
    at the version every engine in it was sent."""
    seen: dict = {"lists": []}
    stop = threading.Event()

    def watch(loop: OPDLoop) -> None:  # the router's worker list, each change with the version engine 0 serves
        router, engine = loop.fleet.router, loop.fleet.engines[0]
        seen["url"] = engine.base_url

        def poll() -> None:
            while not stop.is_set():
                listed = set(router.workers())
                try:
                    version = engine.get_weight_version() if engine.base_url in listed else None
                except ServerError:
                    version = None
                if not seen["lists"] or seen["lists"][-1][0] != listed:
                    seen["lists"].append((listed, version))
                time.sleep(0.05)

        threading.Thread(target=poll, daemon=True).start()

    def at_return(loop: OPDLoop) -> None:
        stop.set()
        with loop.sync.lock:  # no sync between the two reads
            seen["version"], seen["floor"] = loop.sync.version, loop.fleet.routed.min_version[0]
        seen["back_url"] = loop.fleet.engines[0].base_url

    _kill_engine_0_mid_run(monkeypatch, seen, at_kill=watch, at_return=at_return)
    summary = run_training(small_run(tiny_artifacts, tmp_path, "rollout.num_engines=2",
                                     "rollout.router=sglang_router", *RUN))
    print(f"router worker lists: {seen['lists']}, faults {summary['faults']}")
    _check_engine_fault(summary, seen)
    urls = [listed for listed, _ in seen["lists"]]
    assert seen["url"] in urls[0] and len(urls[0]) == 2
    out = next((k for k, listed in enumerate(urls) if seen["url"] not in listed), None)
    assert out is not None and len(urls[out]) == 1, "engine 0 was never taken out of the router"
    back = next((k for k in range(out, len(urls)) if seen["back_url"] in urls[k]), None)
    assert back is not None and len(urls[back]) == 2, "engine 0 was not added back"
    assert seen["lists"][back][1] >= KILL_AT  # it rejoined with the current weights, not its checkpoint's (0)
    assert seen["floor"] == seen["version"] >= KILL_AT
    assert summary["rollout_requests"]["via_router"] > 0


def test_a_sigkilled_teacher_replica_is_retried_on_the_other(tiny_artifacts, tmp_path, monkeypatch):
    seen: dict = {}
    score = OPDLoop.score

    def kill_then_score(self: OPDLoop, s: int, rollouts):
        name = next(iter(self.fleet.teacher.clients))
        client, actor = self.fleet.teacher.clients[name], self.fleet.teacher_actors[name][0]
        if s == KILL_AT:
            seen["pid"] = ray.get(actor.pid.remote())
            os.kill(seen["pid"], signal.SIGKILL)
        if s == KILL_AT + 2:
            wait_for(lambda: client.up[0], RESTART_S, "teacher replica 0 to serve again")
            seen["new_pid"] = ray.get(actor.pid.remote())
        return score(self, s, rollouts)

    monkeypatch.setattr(OPDLoop, "score", kill_then_score)
    summary = run_training(small_run(tiny_artifacts, tmp_path, "teacher.replicas=2", *RUN))
    assert summary["prompts_trained"] == summary["prompts_unique"] == STEPS * BATCH
    [fault] = summary["faults"]
    assert (fault["role"], fault["index"], fault["teacher"]) == ("teacher", 0, "default") and fault["time_lost_s"] > 0
    assert seen["new_pid"] != seen["pid"]
