"""Weight sync: bucket planning, real gloo broadcasts between processes, and engine updates over HTTP.

The sender is a plain Python subprocess (rank 0, like the learner) that loads a perturbed copy of the
model, joins the group and broadcasts buckets (per tensor, or flattened); the engine (rank 1) receives them
through SGLang 0.5.23's /init_weights_update_group, /begin_weight_update, /update_weights_from_distributed
and /end_weight_update endpoints, and must refuse what 0.5.23 refuses.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from asyncopd.net.client import ServerError
from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.engine import NO_SESSION, NO_SESSION_TO_END, NOT_FLUSHED, SESSION_OPEN, RolloutEngine
from asyncopd.rollout.http_server import RolloutServer
from asyncopd.weights.broadcast import (
    FLATTENED,
    bucket_request,
    dtype_to_str,
    plan_buckets,
    recv_bucket,
    str_to_dtype,
)
from asyncopd.weights.process_group import destroy_weights_group, find_free_port, init_weights_group
from tests._serving_fixtures import VOCAB, full_logprobs, tiny_model
from tests._tolerances import logprob_tol

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
GROUP = "test_weights"

SENDER = r"""
import json, os, sys, torch
from asyncopd.weights.broadcast import send_bucket
from asyncopd.weights.process_group import destroy_weights_group, init_weights_group

spec = json.loads(sys.argv[1])
params = {}
if spec.get("model"):  # the checkpoint's tensors under their Hugging Face names (no transformers import)
    from safetensors.torch import load_file
    params = load_file(spec["model"] + "/model.safetensors")
pg = init_weights_group("127.0.0.1", spec["port"], 2, 0, spec["group"], "gloo", timeout_s=60)
print("joined", flush=True)
for bucket in spec["buckets"]:
    flattened = isinstance(bucket, dict)  # {"flattened": [items]}: one broadcast of the items' bytes
    tensors = []
    for item in (bucket["flattened"] if flattened else bucket):
        if "param" in item:
            tensors.append(params[item["param"]].detach())
        else:
            dt = getattr(torch, item["dtype"])
            tensors.append(torch.full(item["shape"], item.get("fill", 0), dtype=dt))
    send_bucket(pg, tensors, flattened=flattened)
    print("sent", len(tensors), flush=True)
sys.stdin.readline()  # the engine leaves the group first: rank 0 hosts the store it talks to
destroy_weights_group(pg)
# Leave without interpreter teardown: destroying gloo's and the TCPStore's C++ objects during finalization
# aborts about 1 run in 10 under load ("terminate called without an active exception", no Python frame on any
# thread; measured with PYTHONFAULTHANDLER), after the group was already torn down above, which is what the
# tests check. Learners (rank 0 in a run) end by ray.kill and never reach that teardown.
sys.stdout.flush()
os._exit(0)
"""


_SENDERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap_senders():
    """A test that fails half-way must not leave its sender waiting for a peer."""
    yield
    while _SENDERS:
        proc = _SENDERS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_sender(spec: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SENDER, json.dumps(spec)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _SENDERS.append(proc)
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Let the sender leave the group (call after this side has left it) and check it exited cleanly."""
    out, _ = proc.communicate("bye\n", timeout=120)
    assert proc.returncode == 0, out
    return out


# ---- primitives --------------------------------------------------------------------------------------

def test_dtype_strings():
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
        assert str_to_dtype(dtype_to_str(dt)) is dt
    assert dtype_to_str(torch.bfloat16) == "bfloat16"
    assert str_to_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        str_to_dtype("float99")


def test_plan_buckets():
    named = [("a", torch.zeros(10)), ("b", torch.zeros(20)), ("c", torch.zeros(100)), ("d", torch.zeros(5)),
             ("e", torch.zeros(5, dtype=torch.float16))]
    assert plan_buckets(named, 30 * 4) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_buckets(dict(named), 10**9) == [["a", "b", "c", "d", "e"]]
    assert plan_buckets({"x": ("bfloat16", [4, 4]), "y": ("float32", [4])}, 32) == [["x"], ["y"]]
    assert plan_buckets([], 10) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(named, 0)
    model = tiny_model(0)
    buckets = plan_buckets(model.named_parameters(), 4096)
    flat = [n for b in buckets for n in b]
    assert flat == [n for n, _ in model.named_parameters()]  # order kept, nothing dropped
    req = bucket_request([("a", torch.zeros(2, 3, dtype=torch.bfloat16))], group_name="g")
    assert req == {"names": ["a"], "dtypes": ["bfloat16"], "shapes": [[2, 3]], "group_name": "g"}
    req = bucket_request([("a", torch.zeros(3, dtype=torch.float32)), ("b", torch.zeros(2, dtype=torch.bfloat16))],
                         group_name="g", load_format=FLATTENED)
    assert req["load_format"] == FLATTENED
    # SGLang's FlattenedTensorBucket refuses a tensor at a byte offset its dtype cannot be viewed at: so do we,
    # before anything is announced
    with pytest.raises(ValueError, match=r"tensor 1 \(torch.float32\) would start at byte 6"):
        bucket_request([("a", torch.zeros(3, dtype=torch.bfloat16)), ("b", torch.zeros(2))], group_name="g",
                       load_format=FLATTENED)
    with pytest.raises(ValueError, match="load_format='tensor_bucket' is unknown"):
        bucket_request([("a", torch.zeros(1))], group_name="g", load_format="tensor_bucket")


def test_send_recv_between_processes():
    port = find_free_port()
    items = [{"shape": [3, 4], "dtype": "float32", "fill": 1.5}, {"shape": [5], "dtype": "bfloat16", "fill": 2},
             {"shape": [], "dtype": "int64", "fill": 7}, {"shape": [0, 3], "dtype": "float32"}]
    mixed = [{"shape": [3], "dtype": "int64", "fill": -4}, {"shape": [2, 2], "dtype": "float32", "fill": 0.25},
             {"shape": [3], "dtype": "bfloat16", "fill": 3}, {"shape": [], "dtype": "bool", "fill": 1}]
    proc = start_sender({"port": port, "group": GROUP, "buckets": [items, items[:1], {"flattened": mixed}]})
    pg = init_weights_group("127.0.0.1", port, 2, 1, GROUP, "gloo", timeout_s=60)
    try:
        got = recv_bucket(pg, ["a", "b", "c", "d"], [i["dtype"] for i in items], [i["shape"] for i in items])
        assert got["a"].dtype == torch.float32 and torch.equal(got["a"], torch.full((3, 4), 1.5))
        assert got["b"].dtype == torch.bfloat16 and torch.equal(got["b"], torch.full((5,), 2, dtype=torch.bfloat16))
        assert got["c"].shape == () and got["c"].item() == 7
        assert got["d"].shape == (0, 3)
        again = recv_bucket(pg, ["a"], [torch.float32], [[3, 4]])
        assert torch.equal(again["a"], got["a"])
        # one broadcast of 24 + 16 + 6 + 1 bytes, cut back into four tensors of four dtypes
        flat = recv_bucket(pg, ["i", "f", "h", "b"], [m["dtype"] for m in mixed], [m["shape"] for m in mixed],
                           flattened=True)
        for name, m in zip(["i", "f", "h", "b"], mixed, strict=True):
            want = torch.full(m["shape"], m["fill"], dtype=str_to_dtype(m["dtype"]))
            assert flat[name].dtype == want.dtype and torch.equal(flat[name], want), name
        with pytest.raises(ValueError, match="lengths differ"):
            recv_bucket(pg, ["a", "b"], ["float32"], [[1]])
    finally:
        destroy_weights_group(pg)
    finish(proc)


# ---- engine updates over HTTP ------------------------------------------------------------------------

PROMPT = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A (served) and B = A perturbed (the learner's new weights), as HF checkpoints."""
    root = tmp_path_factory.mktemp("weights")
    a = tiny_model(0)
    a.save_pretrained(root / "a")
    torch.manual_seed(123)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))
    a.save_pretrained(root / "b")
    from transformers import AutoModelForCausalLM

    b = AutoModelForCausalLM.from_pretrained(root / "b", dtype=torch.float32).eval()
    return root / "a", root / "b", b


@pytest.fixture
def served(tmp_path):
    engine = RolloutEngine(tiny_model(0), "")
    server = RolloutServer(engine).start()
    yield engine, SGLangClient(server.url, timeout_s=120)
    server.stop()


def greedy(client: SGLangClient) -> dict:
    return client.generate_raw({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0},
                                "return_logprob": True})


def logprobs_of(out: dict) -> np.ndarray:
    return np.array([e[0] for e in out["meta_info"]["output_token_logprobs"]])


def reference(model, out: dict) -> np.ndarray:
    ids = PROMPT + out["output_ids"]
    lp = full_logprobs(model, ids)
    return np.array([lp[len(PROMPT) - 1 + t, ids[len(PROMPT) + t]].item() for t in range(len(out["output_ids"]))])


def assert_served(out: dict, model) -> None:
    """The engine's greedy logprobs are `model`'s: float32 KV-cache decode vs one full forward."""
    tol = logprob_tol(model, len(PROMPT) + len(out["output_ids"]))
    np.testing.assert_allclose(logprobs_of(out), reference(model, out), atol=tol)


def join_group(client: SGLangClient, spec: dict) -> subprocess.Popen:
    port = find_free_port()
    proc = start_sender(dict(spec, port=port, group=GROUP))
    client.init_weights_update_group(master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2,
                                     group_name=GROUP, backend="gloo")
    return proc


def test_update_from_a_sender_process(served, checkpoints):
    engine, client = served
    _, b_dir, b_model = checkpoints
    before = greedy(client)
    assert before["meta_info"]["weight_version"] == "0"
    assert_served(before, tiny_model(0))

    names = [n for n, _ in b_model.named_parameters()]
    bad_shape = {"shape": [7], "dtype": "float32", "fill": 5.0}
    proc = join_group(client, {"model": str(b_dir), "buckets": [
        [{"param": n} for n in names],
        [{"shape": [VOCAB, 32], "dtype": "float32", "fill": 9.0}],  # unknown name
        [bad_shape],  # shape mismatch
        [{"param": names[0]}],  # a good bucket after the bad ones: the group is still in step
    ]})
    assert client.server_info(refresh=True)["weight_group"] == GROUP
    req = bucket_request(list(b_model.named_parameters()), group_name=GROUP)
    # SGLang 0.5.23 refuses a bucket outside a session, before receiving anything (the sender has not sent yet)
    r = requests.post(client.base_url + "/update_weights_from_distributed", json=req, timeout=30)
    assert r.status_code == 400 and r.json()["success"] is False and r.json()["message"] == NO_SESSION
    with pytest.raises(ServerError, match=re.escape(NO_SESSION_TO_END)):
        client.end_weight_update()
    assert client.begin_weight_update() == {"success": True, "message": "Success"}
    with pytest.raises(ServerError, match=re.escape(SESSION_OPEN)):
        client.begin_weight_update()
    out = client.update_weights_from_distributed(**req, weight_version=1, flush_cache=False)
    assert out["success"] and out["message"].endswith("Weight version updated to 1.")
    staged = greedy(client)  # the bucket is staged: nothing served changes before the session ends
    assert staged["meta_info"]["weight_version"] == "0" and staged["output_ids"] == before["output_ids"]
    np.testing.assert_array_equal(logprobs_of(staged), logprobs_of(before))
    client.end_weight_update()

    after = greedy(client)
    assert after["meta_info"]["weight_version"] == "1" and client.get_weight_version() == 1
    assert_served(after, b_model)
    # the weights changed: the first logprob moved by more than rounding can explain
    assert np.abs(logprobs_of(after)[:1] - logprobs_of(before)[:1]).max() > logprob_tol(b_model, len(PROMPT))

    client.begin_weight_update()
    rejected = r"400: update rejected, old weights kept \(version 1\): unknown weight name 'bogus.weight'"
    with pytest.raises(ServerError, match=rejected):
        client.update_weights_from_distributed(names=["bogus.weight"], dtypes=["float32"], shapes=[[VOCAB, 32]],
                                               group_name=GROUP, weight_version="2")
    with pytest.raises(ServerError, match=r"model.norm.weight: shape \[7\] does not match"):
        client.update_weights_from_distributed(names=["model.norm.weight"], dtypes=["float32"], shapes=[[7]],
                                               group_name=GROUP, weight_version="2")
    with pytest.raises(ServerError, match=r"nothing applied, old weights kept \(version 1\): a bucket was rejected"):
        client.end_weight_update()  # a session with a rejected bucket swaps nothing in
    intact = greedy(client)
    assert intact["meta_info"]["weight_version"] == "1"
    assert intact["output_ids"] == after["output_ids"]
    np.testing.assert_array_equal(logprobs_of(intact), logprobs_of(after))

    # The group is still in step: the next (good) bucket lands, without a version bump.
    client.begin_weight_update()
    client.update_weights_from_distributed(names=[names[0]], dtypes=["float32"],
                                           shapes=[list(b_model.get_parameter(names[0]).shape)], group_name=GROUP)
    client.end_weight_update()
    assert client.get_weight_version() == 1
    assert client.destroy_weights_update_group(GROUP)["success"]
    finish(proc)
    assert engine.stats["weight_updates"] == 2


@pytest.mark.parametrize("load_format", ["", FLATTENED])
def test_session_swaps_its_buckets_in_at_its_end(served, checkpoints, load_format):
    engine, client = served
    _, b_dir, b_model = checkpoints
    before = greedy(client)
    named = list(b_model.named_parameters())
    buckets = plan_buckets(named, 8 * 1024)
    assert len(buckets) >= 2
    items = [[{"param": n} for n in b] for b in buckets]
    proc = join_group(client, {"model": str(b_dir),
                               "buckets": [{"flattened": b} for b in items] if load_format else items})
    by_name = dict(named)
    client.begin_weight_update()
    for i, b in enumerate(buckets):
        last = i == len(buckets) - 1
        req = bucket_request([(n, by_name[n]) for n in b], group_name=GROUP, load_format=load_format)
        client.update_weights_from_distributed(**req, flush_cache=False, weight_version=5 if last else None)
        mid = greedy(client)  # staged only, even the last: the served weights and version are untouched
        assert mid["meta_info"]["weight_version"] == "0"
        np.testing.assert_array_equal(logprobs_of(mid), logprobs_of(before))
    client.end_weight_update()
    after = greedy(client)
    assert after["meta_info"]["weight_version"] == "5"
    assert_served(after, b_model)
    assert engine.stats["weight_bytes"] == sum(p.numel() * 4 for _, p in named)
    client.destroy_weights_update_group(GROUP)
    finish(proc)


def test_update_weight_version_labels(served):
    """/update_weight_version: any string (SGLang's versions are free labels); inside a session it waits for
    the weights, so no token of the old weights carries the new label."""
    engine, client = served
    assert client.update_weight_version("v1.2", abort_all_requests=False)["new_version"] == "v1.2"
    assert greedy(client)["meta_info"]["weight_versions"][0]["version"] == "v1.2"
    with pytest.raises(ServerError, match="'v1.2' is not an integer"):
        client.get_weight_version()  # our pipeline's versions count optimizer steps
    client.begin_weight_update()
    client.update_weight_version(7, abort_all_requests=False)
    assert greedy(client)["meta_info"]["weight_version"] == "v1.2"
    client.end_weight_update()
    assert greedy(client)["meta_info"]["weight_version"] == "7" and client.get_weight_version() == 7
    r = requests.post(client.base_url + "/update_weight_version", json={"new_version": ["x"]}, timeout=30)
    assert r.status_code == 400 and "new_version must be a non-empty string" in r.json()["error"]


def _long_request(client: SGLangClient, n: int = 8, tokens: int = 60) -> tuple[threading.Thread, dict]:
    """A batch that cannot stop early (eos outside the vocabulary), in a thread: (thread, box with "out")."""
    box: dict = {}
    request = {"input_ids": [PROMPT] * n, "sampling_params": {"max_new_tokens": tokens, "temperature": 1.0},
               "return_logprob": True}
    th = threading.Thread(target=lambda: box.setdefault("out", client.generate_raw(request)), daemon=True)
    th.start()
    return th, box


def _mid_flight(engine: RolloutEngine, th: threading.Thread, steps: int = 3) -> None:
    steps0 = engine.stats["forward_steps"]
    while engine.stats["forward_steps"] < steps0 + steps and th.is_alive():
        time.sleep(0.001)


def test_flush_and_pause_follow_sglang():
    """SGLang's /flush_cache succeeds only when no request holds KV; pause "abort" returns after they end."""
    engine = RolloutEngine(tiny_model(0), "", eos_token_id=VOCAB)
    server = RolloutServer(engine).start()
    client = SGLangClient(server.url, timeout_s=120)
    try:
        assert client.flush_cache() is True  # idle
        th, box = _long_request(client)
        _mid_flight(engine, th)
        assert th.is_alive()
        r = requests.post(client.base_url + "/flush_cache", timeout=30)
        assert r.status_code == 400 and r.text == "Flush cache failed.\n"  # running: SGLang's text and status
        client.pause_generation("in_place")
        assert client.flush_cache() is False  # paused in place: the requests keep their KV
        client.pause_generation("retract")
        assert client.flush_cache() is True  # retracted: SGLang frees their KV (and recomputes it later)
        client.continue_generation()
        assert client.flush_cache(timeout_s=60) is True  # waits for the request to finish, as ?timeout= does
        th.join(60)
        assert [len(o["output_ids"]) for o in box["out"]] == [60] * 8

        th, box = _long_request(client)
        _mid_flight(engine, th)
        served = engine.stats["requests"]
        client.pause_generation("abort")
        assert engine.stats["requests"] == served + 1  # "abort" returns once the aborted requests have ended
        th.join(60)
        assert {o["meta_info"]["finish_reason"]["type"] for o in box["out"]} == {"abort"}
        assert client.flush_cache() is True
        th2, box2 = _long_request(client, n=1, tokens=4)  # new requests wait for /continue_generation
        time.sleep(0.3)
        assert th2.is_alive() and client.flush_cache() is True  # waiting, holding no KV
        client.continue_generation()
        th2.join(60)
        assert len(box2["out"][0]["output_ids"]) == 4
    finally:
        client.continue_generation()
        server.stop()


def test_generation_in_flight_continues_on_new_weights(checkpoints):
    """Pause in place between decode steps, update, continue: every response reports which tokens came from
    which weights, as SGLang's weight_versions spans."""
    _, b_dir, b_model = checkpoints
    # eos outside the vocabulary: no row stops early, so the request surely spans the update
    engine = RolloutEngine(tiny_model(0), "", eos_token_id=VOCAB)
    server = RolloutServer(engine).start()
    client = SGLangClient(server.url, timeout_s=120)
    try:
        proc = join_group(client, {"model": str(b_dir), "buckets": [[{"param": n}
                                                                    for n, _ in b_model.named_parameters()]]})
        for _attempt in range(5):  # a request that finished before the pause landed is simply retried
            th, box = _long_request(client, n=64)
            steps0 = engine.stats["forward_steps"]
            _mid_flight(engine, th)
            client.pause_generation("in_place")
            if th.is_alive() and engine.stats["forward_steps"] - steps0 < 60:
                break  # paused between two decode steps of this request
            client.continue_generation()
            th.join(60)
        else:
            pytest.fail("could not pause a 60-step request mid-generation in 5 tries")
        client.begin_weight_update()
        req = bucket_request(list(b_model.named_parameters()), group_name=GROUP)
        # SGLang's default flush_cache=true fails the call while paused requests hold KV (0.5.23: the weights
        # are loaded anyway); ours are staged and swap in at the session's end just the same
        with pytest.raises(ServerError, match=re.escape(NOT_FLUSHED)):
            client.update_weights_from_distributed(**req, weight_version=1)
        client.end_weight_update()
        client.continue_generation()
        th.join(60)
        client.destroy_weights_update_group(GROUP)
        finish(proc)
        out = box["out"]
        assert all(len(o["output_ids"]) == 60 for o in out)
        spans = {json.dumps(o["meta_info"]["weight_versions"]) for o in out}
        assert len(spans) == 1  # one batch: every row crossed the update at the same step
        (old, new), = [json.loads(x) for x in spans]
        assert old["version"] == "0" and new["version"] == "1" and old["start"] == 0 and new["end"] == 60
        assert 0 < old["end"] == new["start"] < 60
        assert all(o["meta_info"]["weight_version"] == "1" for o in out)
    finally:
        server.stop()
