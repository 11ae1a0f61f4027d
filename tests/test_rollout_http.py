"""The embedded rollout engine over SGLang's HTTP API: every endpoint, 400s, auth, Ray actors, launcher."""

import re
import threading
import time

import numpy as np
import pytest
import requests
import torch

from asyncopd.config.schema import RolloutConfig
from asyncopd.net.client import ServerError
from asyncopd.net.server import ServerThread, make_app
from asyncopd.rollout.client import SGLangClient, parse_version
from asyncopd.rollout.engine import RolloutEngine
from asyncopd.rollout.http_server import RolloutServer
from tests._serving_fixtures import EOS, VOCAB, full_logprobs, save_tiny, tiny_model
from tests._tolerances import logprob_tol
from tests.conftest import TEST_THREADS

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.fixture(scope="module")
def server(model):
    s = RolloutServer(RolloutEngine(model, "")).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    c = SGLangClient(server.url, timeout_s=60)
    yield c
    c.continue_generation()  # leave the shared engine unpaused whatever a test did


def _tempered(model, prompt, output, temperature):
    """Brute-force log-probs of each output token under softmax(logits / T) (T = 0: plain softmax)."""
    ids = list(prompt) + list(output)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    if temperature > 0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, -1)
    return lp[len(prompt) - 1:len(ids) - 1]


def test_info_endpoints(client, server):
    assert client.health()
    info = client.model_info()
    assert info["vocab_size"] == VOCAB and info["max_position_embeddings"] == 64
    assert "tokenizer_fingerprint" in info and info["is_generation"] is True
    assert info["weight_version"] == "0"
    si = client.server_info(refresh=True)
    assert si["supports_mc_samples"] is True and si["engine"] == "asyncopd-embedded"
    assert client.get_weight_version() == 0
    assert requests.get(server.url + "/get_model_info", timeout=10).json()["vocab_size"] == VOCAB
    assert si["dtype"] == "float32" and si["tp_size"] == 1  # what a weight sync reads (SGLang's server args)
    assert client.flush_cache() is True  # idle: SGLang's 200 with a text body
    r = requests.get(server.url + "/flush_cache", timeout=10)
    assert r.status_code == 200 and r.text.startswith("Cache flushed")


def test_greedy_generate_shape_and_logprobs(client, model):
    out = client.generate_raw({"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 8, "temperature": 0},
                               "return_logprob": True, "top_logprobs_num": 3, "rid": "req-1"})
    assert set(out) == {"text", "output_ids", "meta_info"} and out["text"] == ""
    meta = out["meta_info"]
    ids = out["output_ids"]
    assert meta["id"] == "req-1" and meta["prompt_tokens"] == 3 and meta["completion_tokens"] == len(ids)
    # SGLang 0.5.23's per-token versions: one span over every token, and weight_version its version
    assert meta["weight_version"] == "0" and meta["weight_versions"] == [{"version": "0", "start": 0, "end": len(ids)}]
    assert "weight_version_start" not in meta  # SGLang never sends it
    fr = meta["finish_reason"]
    assert fr == ({"type": "stop", "matched": EOS} if ids[-1] == EOS else {"type": "length", "length": 8})
    lp = _tempered(model, PROMPTS[0], ids, 0)
    tol = logprob_tol(model, len(PROMPTS[0]) + len(ids))  # float32 KV-cache decode vs one full forward
    assert [e[1] for e in meta["output_token_logprobs"]] == ids
    assert all(e[2] is None for e in meta["output_token_logprobs"])
    np.testing.assert_allclose([e[0] for e in meta["output_token_logprobs"]],
                               lp.gather(1, torch.tensor(ids)[:, None]).squeeze(1).numpy(), atol=tol)
    assert ids == lp.argmax(-1).tolist()  # greedy
    top_v, top_i = torch.topk(lp, 3, dim=-1)
    assert [[e[1] for e in row] for row in meta["output_top_logprobs"]] == top_i.tolist()
    np.testing.assert_allclose([[e[0] for e in row] for row in meta["output_top_logprobs"]], top_v.numpy(),
                               atol=tol)


def test_batch_rollouts_sampled_logprobs(client, model):
    rollouts = client.generate(PROMPTS, max_new_tokens=10, temperature=0.7, seed=3,
                               metadata=[{"i": i} for i in range(3)])
    assert len(rollouts) == 3
    for i, (p, r) in enumerate(zip(PROMPTS, rollouts, strict=True)):
        assert r.metadata == {"i": i} and r.prompt_ids.tolist() == p
        assert r.response_ids.dtype == np.int32 and r.logprobs.dtype == np.float32
        assert r.finish_reason in ("stop", "length") and r.version_start == r.version_end == 0
        assert (r.finish_reason == "stop") == (r.response_ids[-1] == EOS)
        lp = _tempered(model, p, r.response_ids.tolist(), 0.7)
        want = lp.gather(1, torch.as_tensor(r.response_ids, dtype=torch.long)[:, None]).squeeze(1).numpy()
        # float32 KV-cache decode vs one full forward, at T = 0.7
        np.testing.assert_allclose(r.logprobs, want, atol=logprob_tol(model, len(p) + r.num_tokens, 0.7))


def test_seed_reproducible_and_rids(client):
    req = {"input_ids": PROMPTS, "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 7},
           "rid": ["a", "b", "c"]}
    a, b = client.generate_raw(req), client.generate_raw(req)
    assert [x["output_ids"] for x in a] == [x["output_ids"] for x in b]
    assert [x["meta_info"]["id"] for x in a] == ["a", "b", "c"]
    assert "output_token_logprobs" not in a[0]["meta_info"]  # return_logprob defaults to false


def test_mc_samples_and_student_top_k(client, model):
    rollouts = client.generate(PROMPTS, max_new_tokens=7, temperature=1.0, mc_samples=5, student_top_k=4, seed=1)
    for p, r in zip(PROMPTS, rollouts, strict=True):
        t = r.num_tokens
        assert r.mc_ids.shape == (t, 5) and r.mc_logprobs.shape == (t, 5)
        assert r.student_topk_ids.shape == (t, 4) and r.student_topk_logprobs.shape == (t, 4)
        np.testing.assert_array_equal(r.mc_ids[:, 0], r.response_ids)
        lp = _tempered(model, p, r.response_ids.tolist(), 1.0)
        np.testing.assert_allclose(r.mc_logprobs, lp.gather(1, torch.as_tensor(r.mc_ids).long()).numpy(),
                                   atol=logprob_tol(model, len(p) + t))  # KV-cache decode vs full forward
        np.testing.assert_array_equal(r.mc_logprobs[:, 0], r.logprobs)  # one element of one tensor: exact


def test_stop_token_ids(client, model):
    first = client.generate([PROMPTS[1]], max_new_tokens=5, temperature=0)[0].response_ids[0]
    out = client.generate_raw({"input_ids": PROMPTS[1], "sampling_params": {
        "max_new_tokens": 5, "temperature": 0, "stop_token_ids": [int(first)]}})
    assert out["output_ids"] == [first]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": int(first)}


def test_prefill_only_input_logprobs(client, model):
    prompt = [3, 9, 4, 12, 7]
    out = client.generate_raw({"input_ids": prompt, "sampling_params": {"max_new_tokens": 0},
                               "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2})
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["completion_tokens"] == 0
    assert meta["finish_reason"]["type"] == "length"
    inp = meta["input_token_logprobs"]
    assert inp[0] == [None, 3, None] and [e[1] for e in inp] == prompt
    lp = full_logprobs(model, prompt)
    # float32: the engine's prefill and log-softmax vs one plain forward and a float64 log-softmax
    np.testing.assert_allclose([e[0] for e in inp[1:]], [lp[t - 1, prompt[t]].item() for t in range(1, 5)],
                               atol=logprob_tol(model, len(prompt)))
    assert meta["input_top_logprobs"][0] is None
    assert [e[1] for e in meta["input_top_logprobs"][1]] == torch.topk(lp[0], 2).indices.tolist()
    out = client.generate_raw({"input_ids": prompt, "sampling_params": {"max_new_tokens": 0},
                               "return_logprob": True, "logprob_start_len": 3})
    assert [e[1] for e in out["meta_info"]["input_token_logprobs"]] == prompt[3:]


def test_token_ids_logprob(client, model):
    out = client.generate_raw({"input_ids": PROMPTS[2], "sampling_params": {"max_new_tokens": 4, "temperature": 0.5},
                               "return_logprob": True, "token_ids_logprob": [1, 5, 7]})
    rows = out["meta_info"]["output_token_ids_logprobs"]
    lp = _tempered(model, PROMPTS[2], out["output_ids"], 0.5)
    assert len(rows) == len(out["output_ids"])
    assert all([e[1] for e in row] == [1, 5, 7] for row in rows)
    np.testing.assert_allclose([[e[0] for e in row] for row in rows], lp[:, [1, 5, 7]].numpy(),
                               atol=logprob_tol(model, len(PROMPTS[2]) + len(rows), 0.5))  # KV cache vs full


@pytest.mark.parametrize("payload, match", [
    ({}, "input_ids is missing"),
    ({"input_ids": []}, "non-empty"),
    ({"input_ids": "1 2 3"}, "non-empty list"),
    ({"input_ids": [1, "2"]}, "ints only"),
    ({"input_ids": [[1, 2], []]}, r"input_ids\[1\]"),
    ({"input_ids": [1, VOCAB]}, "outside the vocabulary"),
    ({"input_ids": [-1]}, "outside the vocabulary"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1.5}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 100}}, "max_position_embeddings"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "temperature": -1}}, "temperature"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "top_p": 0}}, "top_p"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "top_k": 0}}, "top_k"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "stop_token_ids": "1"}}, "stop_token_ids"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "bogus": 1}}, "sampling_params.bogus"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "n": 2}}, "sampling_params.n"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "mc_samples": 4},
     "mc_samples > 0 needs"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4}, "mc_samples": -2}, "mc_samples"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4}, "top_logprobs_num": -1}, "top_logprobs_num"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4}, "logprob_start_len": -5}, "logprob_start_len"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4}, "return_logprob": "yes"}, "return_logprob"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4}, "token_ids_logprob": [99]}, "token_ids_logprob"),
    ({"input_ids": [[1], [2]], "sampling_params": [{"max_new_tokens": 4}, {"max_new_tokens": 5}]},
     "same sampling_params"),
    ({"input_ids": [[1], [2]], "sampling_params": {"max_new_tokens": 4}, "rid": ["x"]}, "rid"),
    ({"input_ids": [1], "text": "hello"}, "either text or input_ids"),
    ({"text": "hello"}, "no tokenizer"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "stop": "x"}}, "stop strings need"),
    ({"input_ids": [1], "stream": True}, "stream"),
    ({"input_ids": [1], "return_hidden_states": True}, "return_hidden_states"),
    ({"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
      "logprob_start_len": 3}, "logprob_start_len=3 is higher than the number of input tokens 2"),
    ({"input_ids": [[1], [2]], "sampling_params": {"max_new_tokens": 1}, "rid": ["a", "a"]}, "duplicate request IDs"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 4, "ignore_eos": "no"}}, "ignore_eos"),
])
def test_malformed_generate_gets_400(server, payload, match):
    r = requests.post(server.url + "/generate", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert re.search(match, r.json()["error"]), r.json()["error"]


def test_non_json_bodies_get_400(server):
    r = requests.post(server.url + "/generate", data=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = requests.post(server.url + "/generate", json=[1, 2], timeout=30)
    assert r.status_code == 400 and "object" in r.json()["error"]
    r = requests.post(server.url + "/pause_generation", json={"mode": "later"}, timeout=30)
    assert r.status_code == 400 and "mode" in r.json()["error"]


def _in_thread(fn, *args, **kw):
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("out", fn(*args, **kw)), daemon=True)
    th.start()
    return th, box


def test_pause_in_place_then_continue(client):
    assert client.pause_generation("in_place") == {"message": "Generation paused successfully.", "status": "ok"}
    assert client.server_info(refresh=True)["paused"] is True
    th, box = _in_thread(client.generate, [PROMPTS[0]], max_new_tokens=5, temperature=0)
    time.sleep(0.5)
    assert th.is_alive()  # waits while paused (new requests queue, as in SGLang)
    assert client.get_weight_version() == 0  # control endpoints still answer
    assert client.continue_generation()["status"] == "ok"
    th.join(30)
    assert not th.is_alive() and box["out"][0].finish_reason in ("stop", "length")
    assert client.server_info(refresh=True)["paused"] is False


def test_pause_abort_ends_requests_in_flight(client):
    client.pause_generation("in_place")
    th, box = _in_thread(client.generate_raw, {"input_ids": [PROMPTS[0], PROMPTS[1]],
                                               "sampling_params": {"max_new_tokens": 5}, "return_logprob": True})
    time.sleep(0.3)
    assert th.is_alive()
    client.pause_generation("abort")
    th.join(30)
    out = box["out"]
    assert [o["meta_info"]["finish_reason"]["type"] for o in out] == ["abort", "abort"]
    assert all(o["output_ids"] == [] for o in out)
    client.continue_generation()
    assert client.generate([PROMPTS[0]], max_new_tokens=3, temperature=0)[0].finish_reason != "abort"


def test_weight_endpoints_without_group(client):
    with pytest.raises(ServerError, match="must run between begin_weight_update"):
        client.update_weights_from_distributed(names=["model.norm.weight"], dtypes=["float32"], shapes=[[32]],
                                               group_name="g")
    client.begin_weight_update()
    try:
        with pytest.raises(ServerError, match="no weight group"):
            client.update_weights_from_distributed(names=["model.norm.weight"], dtypes=["float32"], shapes=[[32]],
                                                   group_name="g")
    finally:
        client.end_weight_update()
    with pytest.raises(ServerError, match="no weight group"):
        client.destroy_weights_update_group("g")
    with pytest.raises(ServerError, match="rank_offset"):
        client.init_weights_update_group(master_address="127.0.0.1", master_port=1234, rank_offset=0,
                                         world_size=2, group_name="g")
    with pytest.raises(ServerError, match="backend"):
        client.init_weights_update_group(master_address="127.0.0.1", master_port=1234, rank_offset=1,
                                         world_size=2, group_name="g", backend="mpi")
    client.begin_weight_update()
    try:
        r = requests.post(client.base_url + "/update_weights_from_distributed",
                          json={"names": ["a"], "dtypes": ["float99"], "shapes": [[1]]}, timeout=30)
    finally:
        client.end_weight_update()
    assert r.status_code == 400 and r.json()["success"] is False and "float99" in r.json()["message"]


def test_api_key_and_bind_rules(model):
    engine = RolloutEngine(model, "")
    with pytest.raises(ValueError, match="api_key"):
        RolloutServer(engine, host="0.0.0.0")
    s = RolloutServer(engine, api_key="k3y").start()
    try:
        assert requests.get(s.url + "/health", timeout=10).status_code == 200
        for path in ("/model_info", "/server_info"):
            assert requests.get(s.url + path, timeout=10).status_code == 401
        r = requests.post(s.url + "/generate", json={"input_ids": [1]}, timeout=10)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
        r = requests.post(s.url + "/pause_generation", json={}, headers={"Authorization": "Bearer nope"},
                          timeout=10)
        assert r.status_code == 401 and engine.paused is False
        good = SGLangClient(s.url, api_key="k3y")
        assert good.generate([[1, 2]], max_new_tokens=2, temperature=0)[0].num_tokens >= 1
        with pytest.raises(ServerError, match="401"):
            SGLangClient(s.url).model_info()
    finally:
        s.stop()


def test_client_refuses_mc_samples_without_server_support():
    """A server that, like stock SGLang, does not advertise per-position multi-sample capture."""
    app = make_app("stock-like")

    @app.get("/server_info")
    async def server_info():
        return {"version": "0.0-stock"}

    srv = ServerThread(app).start()
    try:
        client = SGLangClient(srv.url)
        with pytest.raises(ValueError, match="mc_samples=4.*does not advertise"):
            client.generate([[1]], max_new_tokens=2, mc_samples=4)
    finally:
        srv.stop()


def test_parse_version():
    assert parse_version("default") == 0 and parse_version("12") == 12 and parse_version(None) == 0
    with pytest.raises(ServerError, match="weight_version"):
        parse_version("v1.2")


# ---- Ray actors -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    from asyncopd.config.ray_cluster import start_ray
    from asyncopd.config.schema import ClusterConfig

    started = start_ray(ClusterConfig(num_cpus=2), tmp_path_factory.mktemp("ray"))
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.e2e
def test_engine_and_teacher_as_ray_actors(ray_cluster, tmp_path):
    from asyncopd.config.schema import TeacherConfig
    from asyncopd.data.tokenizer import save_tiny_tokenizer, tokenizer_fingerprint
    from asyncopd.rollout.actor import RolloutEngineActor
    from asyncopd.teacher.actor import TeacherActor
    from asyncopd.teacher.client import TeacherClient

    ray = ray_cluster
    ckpt = save_tiny(tmp_path / "student", seed=0)
    save_tiny_tokenizer(ckpt)
    engine = RolloutEngineActor.options(num_cpus=0).remote(str(ckpt), RolloutConfig(threads_per_engine=TEST_THREADS))
    teacher = TeacherActor.options(num_cpus=0).remote(str(ckpt), TeacherConfig(threads=TEST_THREADS))
    try:
        url, turl = ray.get([engine.start.remote(), teacher.start.remote()], timeout=120)
        assert url.startswith("http://127.0.0.1:") and turl.startswith("http://127.0.0.1:")
        client = SGLangClient(url)
        assert client.server_info(refresh=True)["torch_threads"] == TEST_THREADS
        info = client.model_info()
        assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(ckpt)
        assert TeacherClient([turl]).model_info()[0]["tokenizer_fingerprint"] == info["tokenizer_fingerprint"]
        rollouts = client.generate(PROMPTS, max_new_tokens=6, temperature=0, mc_samples=0)
        local = tiny_model(0)
        for p, r in zip(PROMPTS, rollouts, strict=True):
            lp = _tempered(local, p, r.response_ids.tolist(), 0)
            assert r.response_ids.tolist() == lp.argmax(-1).tolist()
        scores = TeacherClient([turl]).score(rollouts, top_k=3)
        for r, s in zip(rollouts, scores, strict=True):
            # same model, two float32 computations: the teacher's padded full forward vs the KV-cache decode
            np.testing.assert_allclose(s.token_logprob, r.logprobs, atol=logprob_tol(local, len(p) + r.num_tokens))
    finally:
        ray.get([engine.stop.remote(), teacher.stop.remote()])
        ray.kill(engine)
        ray.kill(teacher)


def test_actor_reports_missing_checkpoint_clearly(tmp_path):
    from asyncopd.rollout.actor import RolloutEngineHost

    with pytest.raises(FileNotFoundError, match="model.student_path=.*asyncopd prepare"):
        RolloutEngineHost(str(tmp_path / "nowhere"), RolloutConfig()).start()


def test_sglang_launcher_fails_early_without_sglang(tmp_path):
    import importlib.util

    from asyncopd.config.schema import TeacherConfig
    from asyncopd.core.errors import ConfigError
    from asyncopd.rollout.sglang_launcher import MISSING, SGLangServerHost, sglang_command

    cfg = RolloutConfig(backend="sglang", api_key="k", tp=2, sglang_args="--mem-fraction-static 0.8")
    cmd = sglang_command("/models/x", cfg, 30000)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--api-key") + 1] == "k" and cmd[-4:] == ["--tp-size", "2", "--mem-fraction-static", "0.8"]
    tcmd = sglang_command("/models/t", TeacherConfig(tp=8, sglang_args="--dtype bfloat16"), 30001)
    assert tcmd[-4:] == ["--tp-size", "8", "--dtype", "bfloat16"]
    # the TP size decides the weight group's ranks: only rollout.tp may set it
    for hidden in ("--tp 2", "--tp-size=2", "--tensor-parallel-size 4"):
        with pytest.raises(ConfigError, match=r"rollout.sglang_args sets the tensor-parallel size .*set rollout.tp"):
            sglang_command("/models/x", RolloutConfig(backend="sglang", sglang_args=hidden), 30000)
    cfg = RolloutConfig(backend="sglang", api_key="k")
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here: the missing-install path cannot be exercised")
    with pytest.raises(RuntimeError) as e:
        SGLangServerHost(str(tmp_path), cfg).start()
    assert str(e.value) == MISSING
    assert "pip install .[gpu]" in MISSING
    with pytest.raises(RuntimeError, match=r"^teacher.backend=sglang needs `pip install .\[gpu\]`"):
        SGLangServerHost(str(tmp_path), TeacherConfig(backend="sglang")).start()
