"""WeightSync, the driver of an update: SGLang 0.5.23's call order, its failure handling, TP-aware ranks, the wire
dtype, and whole updates between real processes (rank 0 here, engines serving HTTP in their own processes)."""

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncopd.bench.weight_bench import EngineProcess, start_engine_process
from asyncopd.config.schema import WeightSyncConfig
from asyncopd.core.errors import ConfigError
from asyncopd.net.client import ServerError
from asyncopd.rollout.client import SGLangClient
from asyncopd.weights.broadcast import FLATTENED
from asyncopd.weights.source import ModuleWeightSource
from asyncopd.weights.sync import WeightSync, engine_dtype, rank_layout
from asyncopd.weights.versions import token_versions, version_spans
from tests._serving_fixtures import save_tiny, tiny_model

ROOT = Path(__file__).resolve().parents[1]


# ---- pieces ----------------------------------------------------------------------------------------------------

def test_rank_layout_is_slimes():
    assert rank_layout([1]) == ([1], 2)
    assert rank_layout([1, 1, 1]) == ([1, 2, 3], 4)
    assert rank_layout([2, 1, 4]) == ([1, 3, 4], 8)  # engine i starts at 1 + sum(tp_j, j < i)
    with pytest.raises(ValueError, match="tensor-parallel size >= 1"):
        rank_layout([2, 0])


def test_engine_dtype_as_sglang_resolves_it(tmp_path):
    assert engine_dtype({"dtype": "bfloat16"}, None) == "bfloat16"
    assert engine_dtype({"dtype": "half"}, None) == "float16"  # SGLang's --dtype spellings
    assert engine_dtype({"dtype": "float32"}, None) == "float32"  # the embedded engine's /server_info

    def model(**config) -> str:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        return str(d)

    # --dtype auto: the checkpoint's dtype; float32 (or none) is served as float16, Gemma's as bfloat16
    assert engine_dtype({"dtype": "auto"}, model(torch_dtype="bfloat16")) == "bfloat16"
    assert engine_dtype({}, model(dtype="float16")) == "float16"
    assert engine_dtype({"dtype": "auto"}, model(torch_dtype="float32", model_type="qwen2")) == "float16"
    assert engine_dtype({"dtype": "auto"}, model(model_type="gemma2")) == "bfloat16"
    with pytest.raises(ConfigError, match="not on this machine; set weights.dtype"):
        engine_dtype({"dtype": "auto"}, "Qwen/Qwen3-8B")
    with pytest.raises(ConfigError, match="dtype='int8'"):
        engine_dtype({"dtype": "int8"}, None)


def test_config_is_checked_before_anything_starts():
    for field, value in (("pause_mode", "freeze"), ("dtype", "fp8"), ("load_format", "bucket")):
        with pytest.raises(ConfigError, match=f"weights.{field}={value!r} is unknown"):
            WeightSync(replace(WeightSyncConfig(), **{field: value}), FakeLearner(), [FakeEngine()])
    with pytest.raises(ValueError, match="2 tensor-parallel sizes for 1 engines"):
        WeightSync(WeightSyncConfig(), FakeLearner(), [FakeEngine()], engine_tp=[1, 2])


def test_version_spans_round_trip_as_sglang_writes_them():
    # SGLang: contiguous [start, end) runs, an empty response gets one empty span at the version it finished under
    assert version_spans([3, 3, 4, 4, 4]) == [{"version": "3", "start": 0, "end": 2},
                                              {"version": "4", "start": 2, "end": 5}]
    assert version_spans([], finished_at=7) == [{"version": "7", "start": 0, "end": 0}]
    spans = version_spans([1, 2, 2, 5])
    assert token_versions(spans, 4, int).tolist() == [1, 2, 2, 5]
    assert token_versions([{"version": "7", "start": 0, "end": 0}], 0, int).tolist() == []
    for bad, n, why in ((spans, 3, "do not tile the 3"), ([{"version": "1", "start": 1, "end": 4}], 4, "do not tile"),
                        ([{"version": "1", "start": 0, "end": 3}], 4, "cover 3 of 4"), ([], 4, "non-empty list"),
                        ([{"v": "1"}], 4, "lacks version/start/end")):
        with pytest.raises(ValueError, match=why):
            token_versions(bad, n, int)


def test_client_reads_spans_into_token_versions():
    """A /generate answer with spans becomes per-token versions; spans that do not tile the tokens are the server's
    error, never a sample (an answer without spans: test_a_server_without_version_spans_is_refused_...)."""
    client = SGLangClient("http://127.0.0.1:1")
    item = {"output_ids": [5, 6, 7], "meta_info": {"output_token_logprobs": [[-1.0, 5, None]] * 3,
                                                   "finish_reason": {"type": "length"}, "weight_version": "4",
                                                   "weight_versions": version_spans([3, 4, 4])}}
    r = client._rollout([1, 2], item, 0, 0, None)
    assert r.token_versions.tolist() == [3, 4, 4] and (r.version_start, r.version_end, r.oldest_version) == (3, 4, 3)
    item["meta_info"]["weight_versions"] = version_spans([3, 4])
    with pytest.raises(ServerError, match="cover 2 of 3 output tokens"):
        client._rollout([1, 2], item, 0, 0, None)


# ---- the call order, against recording fakes --------------------------------------------------------------------

BUCKETS = [{"names": ["a"], "dtypes": ["float32"], "shapes": [[4]], "group_name": "g"},
           {"names": ["b", "c"], "dtypes": ["bfloat16", "float32"], "shapes": [[2, 3], []], "group_name": "g"}]


class FakeLearner:
    def __init__(self):
        self.calls: list[tuple] = []

    def init_weight_group(self, *args) -> None:
        self.calls.append(("init", args))

    def weight_buckets(self, bucket_bytes, group_name, dtype="", load_format="") -> list[dict]:
        self.calls.append(("buckets", dtype, load_format))
        return BUCKETS

    def broadcast_weights(self, bucket_bytes, dtype="", load_format="") -> float:
        self.calls.append(("broadcast", dtype, load_format))
        return 0.0


class FakeEngine:
    """Records every call; `fail` maps a method name to the exception it raises, `flushes` is the answers of
    successive /flush_cache calls (then True)."""

    def __init__(self, tp_size: int = 1, dtype: str = "float32", fail: dict | None = None, flushes=()):
        self.info = {"tp_size": tp_size, "dtype": dtype}
        self.fail = fail or {}
        self.flushes = list(flushes)
        self.calls: list = []

    def _call(self, name: str, detail=None):
        self.calls.append(name if detail is None else (name, detail))
        if name in self.fail:
            raise self.fail[name]
        return {"success": True}

    def server_info(self, refresh: bool = False) -> dict:
        return self.info

    def model_info(self) -> dict:
        return {}

    def init_weights_update_group(self, **kw):
        return self._call("init", (kw["rank_offset"], kw["world_size"]))

    def pause_generation(self, mode: str = "abort"):
        return self._call("pause", mode)

    def flush_cache(self, timeout_s: float = 0.0) -> bool:
        self._call("flush")
        return self.flushes.pop(0) if self.flushes else True

    def begin_weight_update(self):
        return self._call("begin")

    def update_weights_from_distributed(self, **kw):
        return self._call("update", (tuple(kw["names"]), kw["flush_cache"], kw["weight_version"]))

    def end_weight_update(self):
        return self._call("end")

    def continue_generation(self):
        return self._call("continue")


def _synced(mode: str, engines: list[FakeEngine], **cfg) -> tuple[WeightSync, FakeLearner]:
    learner = FakeLearner()
    sync = WeightSync(WeightSyncConfig(pause_mode=mode, master_port=29999, **cfg), learner, engines)
    sync.init_group()
    return sync, learner


UPDATES = [("update", (("a",), False, None)), ("update", (("b", "c"), False, "7"))]


@pytest.mark.parametrize("mode, before, after", [
    ("retract", [("pause", "retract"), "flush"], ["continue"]),
    ("abort", [("pause", "abort"), "flush"], ["continue"]),
    ("in_place", [("pause", "in_place")], ["continue"]),  # SGLang cannot flush while paused requests hold KV
    ("none", [], []),
])
def test_sglang_call_order(mode, before, after):
    engines = [FakeEngine(), FakeEngine()]
    sync, learner = _synced(mode, engines)
    stats = sync.sync(7)
    for i, e in enumerate(engines):
        # pause and flush BEFORE the session: begin on a running SGLang server waits for every request in flight
        assert e.calls == [("init", (i + 1, 3)), *before, "begin", *UPDATES, "end", *after], e.calls
    assert learner.calls[-1] == ("broadcast", "float32", "")
    assert stats.bytes == 4 * 4 + 6 * 2 + 4 and stats.buckets == 2 and stats.version == 7
    assert (stats.engine_stall_s > 0) == (mode != "none") and stats.engine_stall_s <= stats.seconds
    assert set(stats.metrics()) == {"weights/sync_s", "weights/bytes", "weights/gbps", "weights/transfer_s",
                                    "weights/engine_stall_s"}


def test_flush_is_retried_until_it_succeeds():
    engine = FakeEngine(flushes=[False, False, True])
    sync, _ = _synced("retract", [engine])
    sync.sync(1)
    assert engine.calls.count("flush") == 3 and engine.calls.index("begin") > 3


def test_an_engine_that_cannot_prepare_stops_the_update_before_a_byte_is_sent():
    good, bad = FakeEngine(), FakeEngine(fail={"begin": RuntimeError("session already open")})
    sync, learner = _synced("retract", [good, bad])
    with pytest.raises(RuntimeError, match="version 3 failed on rollout engine 1.*session already open"):
        sync.sync(3)
    assert not any(c[0] == "broadcast" for c in learner.calls)  # a missing receiver would hang the broadcast
    assert good.calls[-2:] == ["end", "continue"]  # the session it opened is closed, generation resumes
    assert bad.calls[-1] == "continue" and "end" not in bad.calls

    stuck = FakeEngine(flushes=[False] * 1000)
    sync, learner = _synced("retract", [stuck], timeout_s=0.3)
    with pytest.raises(RuntimeError, match="refused /flush_cache for 0.3 s after /pause_generation mode='retract'"):
        sync.sync(1)
    assert "begin" not in stuck.calls and stuck.calls[-1] == "continue"


def test_a_failed_bucket_still_drains_the_rest():
    engine = FakeEngine(fail={"update": RuntimeError("shape mismatch")})
    sync, learner = _synced("retract", [engine])
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sync.sync(2)
    assert [c for c in engine.calls if c[0] == "update"] == [
        ("update", (("a",), False, None)), ("update", (("b", "c"), False, "2"))]  # every bucket still received
    assert engine.calls[-2:] == ["end", "continue"]


def test_tp_and_dtype_come_from_config_and_engines():
    engines = [FakeEngine(tp_size=2), FakeEngine(tp_size=1), FakeEngine(tp_size=4)]
    learner = FakeLearner()
    WeightSync(WeightSyncConfig(master_port=29999), learner, engines, engine_tp=[2, 1, 4]).init_group()
    assert [e.calls[0] for e in engines] == [("init", (1, 8)), ("init", (3, 8)), ("init", (4, 8))]
    assert learner.calls[0][1][2] == 8  # the learner hosts a group of 1 + sum(tp)
    with pytest.raises(ConfigError, match="engine 0 runs tp_size=2 but rollout.tp=1"):
        WeightSync(WeightSyncConfig(), FakeLearner(), [FakeEngine(tp_size=2)], engine_tp=1).init_group()
    # weights.dtype=auto: the engines' dtype, which must be one
    sync, learner = _synced("retract", [FakeEngine(dtype="bfloat16")], load_format=FLATTENED)
    assert sync.wire_dtype == "bfloat16" and learner.calls[-1] == ("buckets", "bfloat16", FLATTENED)
    with pytest.raises(ConfigError, match=r"different dtypes \['bfloat16', 'float32'\]"):
        _synced("retract", [FakeEngine(dtype="bfloat16"), FakeEngine()])
    sync, _ = _synced("retract", [FakeEngine(dtype="bfloat16")], dtype="float16")
    assert sync.wire_dtype == "float16"  # an explicit weights.dtype wins


# ---- whole updates between real processes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("served") / "a", seed=0)


def perturbed(seed: int) -> torch.nn.Module:
    model = tiny_model(0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def digest(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """What the engine process reports for its weights: the float64 sum of every parameter (after the wire)."""
    return {n: float(p.detach().to(dtype).double().sum()) for n, p in model.named_parameters()}


def served_digest(engine: EngineProcess) -> dict[str, float]:
    return json.loads(engine.command({"cmd": "params"}))


@pytest.mark.e2e
def test_updates_reach_every_engine_process(served_dir):
    engines = [start_engine_process(served_dir, group_timeout_s=60) for _ in range(2)]
    clients = [SGLangClient(e.url, timeout_s=120) for e in engines]
    source = ModuleWeightSource(perturbed(1))
    cfg = WeightSyncConfig(bucket_mb=4096 / 2**20, timeout_s=60)  # several buckets for the tiny model
    sync = WeightSync(cfg, source, clients)
    try:
        sync.init_group()
        assert sync.world_size == 3 and sync.wire_dtype == "float32" and len(sync.buckets) > 2
        stats = sync.sync(1)
        for e, c in zip(engines, clients, strict=True):
            assert served_digest(e) == digest(source.module) and c.get_weight_version() == 1
        assert stats.bytes == sum(p.numel() * 4 for p in source.module.parameters())
        assert stats.gbps > 0 and 0 < stats.engine_stall_s <= stats.seconds and stats.transfer_s <= stats.seconds

        # an update lands while a request is generating: its tokens say which weights made them, and the client
        # hands the learner one version per token
        for version in range(2, 7):  # a request that finished before the pause landed is simply retried
            box: dict = {}
            steps0 = clients[0].server_info(refresh=True)["stats"]["forward_steps"]
            th = threading.Thread(target=lambda b=box: b.setdefault("out", clients[0].generate(
                [[3, 4, 5]] * 4, max_new_tokens=60, temperature=1.0)), daemon=True)
            th.start()
            while clients[0].server_info(refresh=True)["stats"]["forward_steps"] < steps0 + 3 and th.is_alive():
                time.sleep(0.002)
            source.module = perturbed(version)
            sync.sync(version)
            th.join(120)
            rollouts = box["out"]
            if any(r.version_start != r.version_end for r in rollouts):
                break
        else:
            pytest.fail("no request spanned an update in 5 tries")
        for e in engines:
            assert served_digest(e) == digest(source.module)
        for r in rollouts:  # the client's per-token versions: the old weights' tokens, then (unless it stopped) new
            v = r.token_versions
            assert r.num_tokens == len(v) and v[0] == version - 1 and set(v) <= {version - 1, version}
            assert np.all(np.diff(v) >= 0) and r.oldest_version == version - 1 == r.version_start
            assert r.version_end == v[-1]

        # the same group, flattened buckets and bfloat16 on the wire: half the bytes, bf16-rounded weights served
        flat = WeightSync(replace(cfg, load_format=FLATTENED, dtype="bfloat16"), source, clients)
        flat.check_engines()
        flat.plan()
        source.module = perturbed(10)
        stats = flat.sync(10)
        assert stats.bytes == sum(p.numel() * 2 for p in source.module.parameters())
        for e in engines:
            assert served_digest(e) == digest(source.module, torch.bfloat16) != digest(source.module)
        flat.close()
    finally:
        sync.close()
        for e in engines:
            e.stop()
        source.close()


RECEIVER = r"""
import json, os, sys
from asyncopd.weights.broadcast import recv_bucket
from asyncopd.weights.process_group import destroy_weights_group, init_weights_group
port, rank, world, group = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pg = init_weights_group("127.0.0.1", port, world, rank, group, "gloo", timeout_s=30)
print("joined", flush=True)
for line in sys.stdin:
    b = json.loads(line)
    if b.get("bye"):
        break
    got = recv_bucket(pg, b["names"], b["dtypes"], b["shapes"], flattened=b.get("load_format") == "flattened_bucket")
    print(json.dumps({n: float(t.double().sum()) for n, t in got.items()}), flush=True)
destroy_weights_group(pg)
sys.stdout.flush()
os._exit(0)
"""


class FakeTPEngine(FakeEngine):
    """An engine at TP=tp as SGLang runs one: a process per shard, shard r joined at rank_offset + r, each receiving
    every broadcast (real gloo ranks; the HTTP side is the recording fake)."""

    def __init__(self, tp: int):
        super().__init__(tp_size=tp)
        self.procs: list[subprocess.Popen] = []
        self.received: list[dict] = [{} for _ in range(tp)]

    def init_weights_update_group(self, **kw):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for r in range(self.info["tp_size"]):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", RECEIVER, str(kw["master_port"]), str(kw["rank_offset"] + r),
                 str(kw["world_size"]), kw["group_name"]],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in self.procs:
            assert p.stdout.readline().strip() == "joined"
        return super().init_weights_update_group(**kw)

    def update_weights_from_distributed(self, **kw):
        for p in self.procs:
            p.stdin.write(json.dumps(kw) + "\n")
            p.stdin.flush()
        for r, p in enumerate(self.procs):
            self.received[r].update(json.loads(p.stdout.readline()))
        return super().update_weights_from_distributed(**kw)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.communicate(json.dumps({"bye": True}) + "\n", timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()


@pytest.mark.e2e
def test_tp_engines_take_cumulative_ranks(served_dir):
    """A TP=2 engine (two shard processes) then a TP=1 engine: world 4, offsets 1 and 3. With one rank per
    engine (the old layout) the group could not form: ranks would collide and one shard would have none."""
    tp2 = FakeTPEngine(2)
    real = start_engine_process(served_dir, group_timeout_s=30)
    source = ModuleWeightSource(perturbed(4))
    sync = WeightSync(WeightSyncConfig(timeout_s=30), source, [tp2, SGLangClient(real.url, timeout_s=60)],
                      engine_tp=[2, 1])
    try:
        sync.init_group()
        assert tp2.calls[0] == ("init", (1, 4)) and sync.offsets == [1, 3]
        sync.sync(1)
        want = digest(source.module)
        assert tp2.received == [want, want]  # every shard received every tensor
        assert served_digest(real) == want
    finally:
        sync.close()
        real.stop()
        tp2.stop()
        source.close()



@pytest.mark.e2e
def test_bench_weights_writes_its_table(tmp_path, capsys):
    from asyncopd.cli.main import main

    assert main(["bench", "weights", "--engines", "1", "--repeats", "2", "--hidden", "64", "--layers", "1",
                 "--vocab", "512", "--out", str(tmp_path), "weights.pause_mode=in_place"]) == 0
    saved = json.loads((tmp_path / "weights.json").read_text())
    assert [m["mode"] for m in saved["modes"]] == ["raw per-tensor", "raw flattened", "sync per-tensor",
                                                   "sync flattened"]
    assert saved["pause_mode"] == "in_place" and saved["wire_dtype"] == "float32" and saved["engines"] == 1
    for m in saved["modes"]:
        assert m["n"] == 2 and m["min_s"] <= m["p50_s"] <= m["max_s"] and m["gbps"] > 0
        assert (m["stall_s"] > 0) == m["mode"].startswith("sync")
    assert saved["modes"][0]["vs_raw"] == 1.0 and (tmp_path / "weights.png").stat().st_size > 0
    assert "GB/s (p50)" in capsys.readouterr().out


def test_a_server_without_version_spans_is_refused_not_charged_its_newest_version():
    """SGLang before 0.5.23 reports one weight_version, the one it holds when the response ends: the newest a token
    can have. Charging it would hide staleness, so the client refuses such an answer."""
    client = SGLangClient("http://127.0.0.1:9")
    item = {"output_ids": [5, 6], "meta_info": {"output_token_logprobs": [[-0.1, 5, None], [-0.2, 6, None]],
                                                "weight_version": "3", "finish_reason": {"type": "length"}}}
    with pytest.raises(ServerError, match="no meta_info.weight_versions spans"):
        client._rollout([1, 2], item, 0, 0, None)
    item["meta_info"]["weight_versions"] = version_spans([2, 3], finished_at=3)
    r = client._rollout([1, 2], item, 0, 0, None)
    assert list(r.versions_per_token()) == [2, 3] and (r.version_start, r.version_end) == (2, 3)
