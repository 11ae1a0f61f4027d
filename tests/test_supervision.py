"""Supervision without Ray: backoff, re-dispatch of a lost engine's requests, the stale-weights fence, teacher retry
on another replica, the actors' watchdog restarting a dead server (in-process and a real subprocess), and atomic
checkpoints. The end-to-end faults (SIGKILL of a Ray actor mid-run) are tests/test_e2e_faults.py."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from asyncopd.config.schema import RolloutConfig, SupervisionConfig
from asyncopd.core.types import Rollout
from asyncopd.learner.checkpoints import resolve_checkpoint, save_checkpoint, step_dirs
from asyncopd.net.client import Backoff, HttpClient, ServerError
from asyncopd.rollout.dispatch import Dispatcher, SlotPool
from asyncopd.teacher.client import TeacherClient
from asyncopd.teacher.server import TeacherServer
from tests._serving_fixtures import VOCAB, save_tiny, tiny_model
from tests.test_weight_sync import FakeEngine as FakeSink
from tests.test_weight_sync import FakeLearner as FakeSinkLearner

GONE = ServerError("POST http://x/generate: no answer (ConnectionRefusedError)")  # status None: the server is gone


def wait_for(cond, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


# ---- backoff --------------------------------------------------------------------------------------------------
def test_backoff_is_exponential_bounded_and_retries_only_transient_errors(monkeypatch):
    assert list(Backoff(attempts=6, base_s=0.1, max_s=0.3).delays()) == [0.1, 0.2, 0.3, 0.3, 0.3]
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    tries: list[int] = []

    def flaky(attempt: int) -> str:
        tries.append(attempt)
        if attempt < 2:
            raise ServerError("busy", status=503)
        return "ok"

    assert Backoff(attempts=4, base_s=0.1).call(flaky) == "ok" and tries == [0, 1, 2] and slept == [0.1, 0.2]
    for error, calls in ((ServerError("bad request", status=400), 1), (GONE, 3)):  # a 4xx never; no answer: all tries
        tries.clear()

        def failing(attempt: int, error=error) -> str:
            tries.append(attempt)
            raise error

        with pytest.raises(ServerError):
            Backoff(attempts=3, base_s=0.01).call(failing)
        assert len(tries) == calls
    tries.clear()  # no try starts past the deadline

    def gone(attempt: int) -> str:
        tries.append(attempt)
        raise GONE

    with pytest.raises(ServerError):
        Backoff(attempts=10, base_s=5.0, deadline_s=1.0).call(gone)
    assert tries == [0]


def test_http_client_retarget_moves_every_thread_to_the_new_address():
    from asyncopd.net.server import ServerThread, make_app

    apps = [make_app(f"s{i}") for i in range(2)]
    for i, app in enumerate(apps):
        app.get("/who")(lambda i=i: {"server": i})
    servers = [ServerThread(app).start() for app in apps]
    try:
        client = HttpClient(servers[0].url)
        assert client.get_json("/who") == {"server": 0}  # a kept-alive connection to the first
        client.retarget(servers[1].url)
        assert client.get_json("/who") == {"server": 1}
        seen = []
        t = threading.Thread(target=lambda: seen.append(client.get_json("/who")))
        t.start()
        t.join()
        assert seen == [{"server": 1}]
    finally:
        for s in servers:
            s.stop()


# ---- rollout: re-dispatch and the fence -------------------------------------------------------------------------
class FakeEngine:
    """generate() answers one Rollout per prompt labelled `version`, or raises `error`; counts its calls."""

    def __init__(self, name: str, version: int = 0, error: BaseException | None = None, delay_s: float = 0.0):
        self.base_url, self.version, self.error, self.delay_s = f"http://{name}:1", version, error, delay_s
        self.calls = 0

    def generate(self, prompts, **_kw) -> list[Rollout]:
        self.calls += 1
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return [Rollout(prompt_ids=np.asarray(p, np.int32), response_ids=np.asarray([7], np.int32),
                        logprobs=np.zeros(1, np.float32), version_start=self.version, version_end=self.version,
                        finish_reason="length", metadata={"engine": self.base_url}) for p in prompts]


def test_requests_of_a_lost_engine_move_to_the_live_one_each_prompt_once():
    dead, live = FakeEngine("dead", error=GONE), FakeEngine("live")
    d = Dispatcher([dead, live], cap=1, samples_per_request=2, max_redispatch=2)
    lost: list[int] = []
    d.pool.on_lost = lambda i, e: lost.append(i)
    prompts = [[i] for i in range(10)]
    out = d.generate(prompts, max_new_tokens=1)
    assert [r.prompt_ids.tolist() for r in out] == prompts  # every prompt once, in order
    assert {r.metadata["engine"] for r in out} == {live.base_url}
    assert lost == [0] and d.pool.up == [False, True] and dead.calls == 1  # no call after the loss
    d.pool.mark_up(0)  # its supervisor restarted it
    dead.error = None
    d.generate(prompts, max_new_tokens=1)
    assert dead.calls > 1
    d.shutdown()


def test_only_a_lost_engine_is_redispatched_and_waiting_calls_fail_when_it_cannot_return():
    bad = Dispatcher([FakeEngine("a", error=ServerError("HTTP 400: bad", status=400)), FakeEngine("b")], cap=1,
                     samples_per_request=1, max_redispatch=3)
    with pytest.raises(ServerError, match="400"):  # the request's own fault: another engine would refuse it too
        bad.generate([[1], [2]], max_new_tokens=1)
    alone = Dispatcher([FakeEngine("a", error=GONE)], cap=1, max_redispatch=1)
    alone.pool.on_lost = lambda i, e: None  # supervised: the lost engine leaves the rotation
    threading.Timer(0.3, lambda: alone.pool.fail(RuntimeError("engine 0 could not be restarted"))).start()
    with pytest.raises(RuntimeError, match="could not be restarted"):  # waits for an engine, then the verdict
        alone.generate([[1]], max_new_tokens=1)
    for d in (bad, alone):
        d.shutdown()


def test_an_engine_answering_with_older_weights_than_it_was_sent_is_fenced_off():
    restarted, current = FakeEngine("restarted", version=0), FakeEngine("current", version=3)
    d = Dispatcher([restarted, current], cap=1, samples_per_request=1, max_redispatch=2)
    d.min_version = [3, 3]  # both were sent version 3; the first has restarted from its checkpoint since
    d.pool.on_lost = lambda i, e: None
    out = d.generate([[1], [2], [3]], max_new_tokens=1)
    assert all(r.version_end == 3 for r in out) and d.pool.up == [False, True]
    d.shutdown()


def test_slot_pool_ignores_a_late_error_from_an_engine_that_was_restarted_meanwhile():
    pool = SlotPool(["a", "b"], cap=1, max_redispatch=1)
    pool.mark_down(0, GONE)
    pool.mark_up(0)  # incarnation 1
    pool.mark_down(0, GONE, incarnation=0)  # a request sent to incarnation 0 timed out only now
    assert pool.up == [True, True]
    pool.shutdown()


# ---- teacher: retry on another replica --------------------------------------------------------------------------
def _rollouts(n: int, seed: int = 0) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, r = rng.integers(0, VOCAB, 4, dtype=np.int32), rng.integers(0, VOCAB, 5, dtype=np.int32)
        out.append(Rollout(prompt_ids=p, response_ids=r, logprobs=np.zeros(5, np.float32), version_start=0,
                           version_end=0, finish_reason="length"))
    return out


def test_teacher_scores_on_the_other_replica_when_one_is_gone(tmp_path):
    model, path = tiny_model(3), str(save_tiny(tmp_path, seed=3))
    servers = [TeacherServer(model, path).start() for _ in range(2)]
    try:
        rollouts = _rollouts(6)
        reference = TeacherClient(servers[1].url).score(rollouts, top_k=3)
        client = TeacherClient([s.url for s in servers], retry_attempts=3)
        lost: list[int] = []
        client.on_lost = lambda k, e: lost.append(k)
        servers[0].stop()  # gone: connections refused
        scores = client.score(rollouts, top_k=3)
        assert lost == [0] and client.up == [False, True]
        for got, want in zip(scores, reference, strict=True):
            np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
            np.testing.assert_allclose(got.token_logprob, want.token_logprob, rtol=0, atol=1e-6)
        assert client.score(rollouts, top_k=3) and lost == [0]  # later calls split over the live one only
        with pytest.raises(ServerError, match="no answer"):  # with no replica left, the error after the tries
            TeacherClient(servers[0].url, retry_attempts=2).score(rollouts, top_k=3)
    finally:
        servers[1].stop()


# ---- the actors' watchdog -----------------------------------------------------------------------------------------
WATCH = SupervisionConfig(health_interval_s=0.1, health_failures=2, max_restarts=2)


def test_watchdog_restarts_a_dead_engine_server_on_its_port_and_a_wedged_one_after_failed_probes(tiny_artifacts):
    from asyncopd.rollout.actor import RolloutEngineHost

    host = RolloutEngineHost(str(tiny_artifacts / "student"), RolloutConfig(), WATCH)
    try:
        url = host.start()
        assert host.probe() and host._probe_path == "/health_generate"  # the engine has SGLang's probe
        host.server.stop()  # its HTTP server dies under the actor
        wait_for(lambda: host.restarts == 1 and host.server is not None and host.server.alive, what="a restart")
        assert host.url() == url and HttpClient(url).get_json("/health") == {"status": "ok"}  # same port
        host.probe = lambda: False  # answers nothing useful: restarted after health_failures probes
        wait_for(lambda: host.restarts == 2, what="a restart after failed probes")
        time.sleep(5 * WATCH.health_interval_s)  # out of restarts: left to the driver
        assert host.restarts == WATCH.max_restarts
        assert host.ensure_serving() == url
    finally:
        host.stop()


FAKE_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_watchdog_restarts_a_killed_server_process_on_its_port(tmp_path, monkeypatch):
    """backend=sglang's host, with a stand-in for `sglang.launch_server` (a real process answering /health only, as
    a server without /health_generate): SIGKILL of the process -> a new one on the same port."""
    from asyncopd.rollout import sglang_launcher

    script = tmp_path / "fake_sglang.py"
    script.write_text(FAKE_SERVER)
    monkeypatch.setattr(sglang_launcher, "require_sglang", lambda role: None)
    monkeypatch.setattr(sglang_launcher, "sglang_command", lambda path, cfg, port: [sys.executable, str(script),
                                                                                   str(port)])
    host = sglang_launcher.SGLangServerHost(str(tmp_path), RolloutConfig(backend="sglang"), WATCH, str(tmp_path))
    try:
        url, pid = host.start(), host.pid()
        assert host.probe() and host._probe_path == "/health"  # no /health_generate here: /health
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: host.restarts == 1 and host.server is not None and host.server.alive, what="a restart")
        assert host.url() == url and host.pid() != pid and HttpClient(url).request("GET", "/health").status_code == 200
        pid = host.pid()
    finally:
        host.stop()
    with pytest.raises(ProcessLookupError):  # stop() ends the server's whole process group
        os.killpg(pid, 0)


# ---- checkpoints --------------------------------------------------------------------------------------------------
def _writer(content: str):
    def write(path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "learner_state.pt").write_text(content)

    return write


def test_checkpoints_are_published_whole_linked_and_pruned(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, _writer(f"v{step}"), keep=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000004", "step-00000006"]
    assert (tmp_path / "checkpoint").is_symlink() and (tmp_path / "checkpoint" / "learner_state.pt").read_text() == "v6"

    def crash(path: str) -> None:
        _writer("half")(path)
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 8, crash, keep=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000004", "step-00000006"]  # no half-written step-8
    assert (tmp_path / "checkpoint" / "learner_state.pt").read_text() == "v6"
    save_checkpoint(tmp_path, 8, _writer("v8"), keep=2)  # the next save clears the leftover temp dir
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # run.resume_from: the link, the run dir, checkpoints/, one step dir, a checkpoint of the old layout
    newest = tmp_path / "checkpoints" / "step-00000008"
    for given, want in ((tmp_path / "checkpoint", tmp_path / "checkpoint"), (tmp_path, tmp_path / "checkpoint"),
                        (tmp_path / "checkpoints", newest), (newest, newest)):
        assert resolve_checkpoint(given) == want and (resolve_checkpoint(given) / "learner_state.pt").exists()
    old = tmp_path / "old"
    _writer("legacy")(str(old / "checkpoint"))
    assert resolve_checkpoint(old / "checkpoint") == old / "checkpoint" == resolve_checkpoint(old)
    save_checkpoint(old, 1, _writer("v1"), keep=1)  # a reused run dir of the old layout: its checkpoint moves aside
    assert (old / "checkpoint" / "learner_state.pt").read_text() == "v1"
    assert [p.read_text() for p in (old / "checkpoints").glob("legacy-*/learner_state.pt")] == ["legacy"]
    # resumed from step 4 in the same run dir (keep=1): the new step 6 replaces the abandoned 6 and 8, and is kept
    save_checkpoint(tmp_path, 6, _writer("v6-again"), keep=1)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000006"]
    assert (tmp_path / "checkpoint" / "learner_state.pt").read_text() == "v6-again"
    assert not list((tmp_path / "checkpoints").glob(".old-*"))


def test_supervision_and_checkpoint_settings_are_validated_before_anything_starts():
    from asyncopd.core.errors import ConfigError
    from asyncopd.validation import load_config

    with pytest.raises(ConfigError) as e:
        load_config(["supervision.retry_attempts=0", "supervision.health_failures=0", "run.keep_checkpoints=0"])
    for field in ("supervision.retry_attempts", "supervision.health_failures", "run.keep_checkpoints"):
        assert field in str(e.value)
    assert load_config([]).run.save_every > 0  # checkpoints by default


# ---- the driver's supervisor, against recording fakes -------------------------------------------------------------
class SinkEngine(FakeSink):
    """test_weight_sync's recording engine, plus what the supervisor and the dispatcher call; `version` is what it
    serves (its last update's label)."""

    def __init__(self, name: str):
        super().__init__()
        self.base_url, self.version = f"http://{name}:1", 0

    def destroy_weights_update_group(self, group_name: str = "") -> dict:
        return self._call("destroy")

    def update_weights_from_distributed(self, **kw):
        out = super().update_weights_from_distributed(**kw)
        self.version = int(kw["weight_version"]) if kw["weight_version"] is not None else self.version
        return out

    def get_json(self, path: str, **_kw) -> dict:
        self._call("probe")
        return {"weight_version": str(self.version)}

    def generate(self, prompts, **_kw) -> list[Rollout]:
        return FakeEngine(self.base_url, self.version).generate(prompts)


def test_supervisor_syncs_the_live_engines_and_admits_a_restarted_one_with_the_current_weights(monkeypatch):
    from types import SimpleNamespace

    from asyncopd.config.schema import Config
    from asyncopd.pipeline.supervisor import Supervisor

    engines = [SinkEngine("e0"), SinkEngine("e1")]
    fleet = SimpleNamespace(engines=engines, direct=Dispatcher(engines, cap=1, max_redispatch=1),
                            teacher=SimpleNamespace(clients={}), engine_actors=["actor0", "actor1"], teacher_actors={},
                            router=None, routed=None)
    back = threading.Event()

    def restart(self, actor, port: int) -> str:  # Ray restarting actor1, and its server back on its port
        assert (actor, port) == ("actor1", 1)
        back.wait(30)
        engines[1].fail, engines[1].version = {}, 0  # fresh from its checkpoint
        return engines[1].base_url

    monkeypatch.setattr(Supervisor, "_restart", restart)
    cfg = Config()
    cfg.weights.pause_mode = "retract"  # engine 1 dies at its pause (auto would not pause these embedded engines)
    sup = Supervisor(cfg, fleet, FakeSinkLearner())
    sup.init_group()
    assert sup.sync(1).version == 1 and fleet.direct.min_version == [1, 1]
    engines[1].fail = {"begin": GONE, "probe": GONE}  # dies before the next update
    engines[1].calls.clear()
    assert sup.sync(2).version == 2  # over engine 0 alone, re-formed
    assert fleet.direct.pool.up == [True, False] and fleet.direct.min_version == [2, 1]
    [fault] = sup.faults
    assert (fault.role, fault.index, fault.detected_at_step, fault.time_lost_s) == ("rollout", 1, 1, None)
    with sup.lock:  # the learner steps (the loop holds the lock over train_step + sync) ...
        back.set()  # ... while engine 1 comes back: it must wait for the step's weights
        time.sleep(0.2)
        assert not fleet.direct.pool.up[1]
        sup.sync(3)
    wait_for(lambda: fleet.direct.pool.up[1], 10, "engine 1 admitted")
    assert engines[1].version == 3 and fleet.direct.min_version == [3, 3] and fault.time_lost_s > 0
    assert engines[1].calls.index("destroy") < engines[1].calls.index(("init", (2, 3)))  # re-formed: ranks 1, 2
    sup.close()


class FakeRouter:
    """sglang-router to the supervisor and the routed dispatcher: a worker list (recording each change with the
    version the engine serves then), and /generate round-robin over it, not saying which engine answered."""

    base_url = "http://router:1"

    def __init__(self, engines: list[SinkEngine]):
        self.engines, self.urls, self.events, self.turn = engines, [e.base_url for e in engines], [], 0

    def remove_worker(self, url: str) -> None:
        self.events.append(("remove", url))
        self.urls = [u for u in self.urls if u != url]

    def add_worker(self, url: str) -> None:
        self.events.append(("add", url, next(e.version for e in self.engines if e.base_url == url)))
        self.urls.append(url)

    def generate(self, prompts, **kw) -> list[Rollout]:
        if not self.urls:
            raise ServerError("HTTP 503: no_available_workers", status=503)
        self.turn += 1
        url = self.urls[self.turn % len(self.urls)]
        return next(e for e in self.engines if e.base_url == url).generate(prompts, **kw)


def test_through_the_router_a_restarted_engine_is_fenced_taken_out_and_added_back_after_catch_up(monkeypatch):
    """Engine 1 restarts under its watchdog (checkpoint weights, version 0) while the router still routes to it: its
    answer through the router is refused (the floor is the version every engine was sent), the supervisor finds it
    behind the router and takes it out before it restarts it, and adds it back, at its new URL, only once it holds
    the current weights."""
    from types import SimpleNamespace

    from asyncopd.config.schema import Config
    from asyncopd.pipeline.supervisor import Supervisor
    from asyncopd.rollout.sglang_router import lost_behind

    engines = [SinkEngine("e0"), SinkEngine("e1")]
    router = FakeRouter(engines)
    routed = Dispatcher([router], cap=1, samples_per_request=1, max_redispatch=2, lost=lost_behind)
    fleet = SimpleNamespace(engines=engines, direct=Dispatcher(engines, cap=1, max_redispatch=1),
                            teacher=SimpleNamespace(clients={}), engine_actors=["actor0", "actor1"], teacher_actors={},
                            router=router, routed=routed)
    back = threading.Event()

    def restart(self, actor, port: int) -> str:
        router.events.append(("restart", actor))
        back.wait(30)
        return "http://e1b:1"  # its old port was taken: it serves on another

    monkeypatch.setattr(Supervisor, "_restart", restart)
    monkeypatch.setattr(SinkEngine, "retarget", lambda self, url: setattr(self, "base_url", url), raising=False)
    sup = Supervisor(Config(), fleet, FakeSinkLearner())
    sup.init_group()
    sup.sync(1)
    assert routed.min_version == [1]
    engines[1].version = 0  # its watchdog restarted its server: the checkpoint again, same URL, back in rotation
    out = routed.generate([[1], [2], [3], [4]], max_new_tokens=1)
    assert all(r.version_end == 1 for r in out) and routed.pool.redispatched >= 1  # refused, sent again
    [fault] = sup.faults
    assert fault.index == 1 and "older than 1" in fault.cause and "router" in fault.cause
    assert router.events == [("remove", "http://e1:1"), ("restart", "actor1")] and router.urls == ["http://e0:1"]
    assert all(r.version_end == 1 for r in routed.generate([[5], [6]], max_new_tokens=1))  # engine 0 alone
    back.set()
    wait_for(lambda: fleet.direct.pool.up[1], 10, "engine 1 admitted")
    assert router.events[-1] == ("add", "http://e1b:1", 1)  # its new URL, with the current weights
    sup.sync(2)
    assert routed.min_version == [2] and {e.version for e in engines} == {2}
    assert all(r.version_end == 2 for r in routed.generate([[7], [8]], max_new_tokens=1))
    sup.close()
    routed.shutdown()


def test_through_the_router_requests_wait_for_an_engine_when_none_is_left(monkeypatch):
    """One engine behind the router, lost: the router answers 503 until it is back, and a request waits for it
    (as it would for an engine directly) instead of spending its re-dispatches at once."""
    from types import SimpleNamespace

    from asyncopd.config.schema import Config
    from asyncopd.pipeline.supervisor import Supervisor
    from asyncopd.rollout.sglang_router import lost_behind

    engine = SinkEngine("e0")
    router = FakeRouter([engine])
    routed = Dispatcher([router], cap=1, max_redispatch=1, lost=lost_behind)
    fleet = SimpleNamespace(engines=[engine], direct=Dispatcher([engine], cap=1, max_redispatch=1),
                            teacher=SimpleNamespace(clients={}), engine_actors=["actor0"], teacher_actors={},
                            router=router, routed=routed)
    back = threading.Event()
    monkeypatch.setattr(Supervisor, "_restart", lambda self, actor, port: back.wait(30) and engine.base_url)
    sup = Supervisor(Config(), fleet, FakeSinkLearner())
    sup.init_group()
    sup.sync(1)
    engine.version = 0  # restarted under its watchdog
    threading.Timer(0.5, back.set).start()
    t0 = time.monotonic()
    [r] = routed.generate([[1]], max_new_tokens=1)
    assert r.version_end == 1 and time.monotonic() - t0 >= 0.5 and routed.pool.redispatched == 1
    assert router.events == [("remove", engine.base_url), ("add", engine.base_url, 1)]
    sup.close()
    routed.shutdown()
