"""SGLang 0.5.23's /generate contract, held against the embedded engine: every request shape slime, AReaL,
sglang-router and our own clients send is a valid SGLang request AND is answered; every answer decodes with
SGLang's own response types (tests/_sglang_contract.py: the release's decoders, else its fixture). Then SGLang's
semantics: text, stop strings, abort with partial output, logprob conventions, control endpoints, limits, auth."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time

import numpy as np
import pytest
import requests
import torch

from asyncopd.data.tokenizer import build_tiny_tokenizer, save_tiny_tokenizer
from asyncopd.model.sampler import GenerationAborted, KVCacheSampler
from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.engine import SGLANG_API_VERSION, RolloutEngine
from asyncopd.rollout.http_server import RolloutServer
from tests._serving_fixtures import EOS, PAD, VOCAB, save_tiny, tiny_model
from tests._sglang_contract import VERSION, ContractError, contract, find_wheel
from tests._tolerances import logprob_tol

PROMPT = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint with its tokenizer files, as `asyncopd prepare` writes them."""
    path = save_tiny(tmp_path_factory.mktemp("ckpt"), seed=0)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.fixture(scope="module")
def server(model, ckpt):
    s = RolloutServer(RolloutEngine(model, str(ckpt), max_batch_size=16), max_request_bytes=64 * 1024).start()
    yield s
    s.stop()


def post(server, payload, path="/generate", method="POST"):
    r = requests.request(method, server.url + path, json=payload, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def decoded(body):
    """`body` decodes as SGLang's GenerateResponse (or a list of them): the contract check on every answer."""
    for item in body if isinstance(body, list) else [body]:
        contract().decode("GenerateResponse", item)
    return body


# ---- the contract itself ----------------------------------------------------------------------------------------

def test_contract_version_and_source():
    assert VERSION == SGLANG_API_VERSION  # the engine claims the version the tests hold it to
    c = contract()
    assert c.source.startswith(("wheel", "fixture"))
    with pytest.raises(ContractError, match="unknown field"):  # SGLang refuses unknown sampling keys ...
        c.decode("GenerateRequest", {"input_ids": [1], "sampling_params": {"max_tokens": 3}})
    c.decode("GenerateRequest", {"input_ids": [1], "model": None, "no_logs": True})  # ... and ignores top-level ones
    with pytest.raises(ContractError):
        c.decode("GenerateResponse", {"text": "", "meta_info": {"prompt_tokens": -1}})
    with pytest.raises(ContractError):
        c.decode("GenerateResponse", {"meta_info": {"output_token_logprobs": [[0.1, 2]]}})  # not a 3-tuple


def test_fixture_matches_the_release():
    """The committed fixture is what generate.py makes of the wheel (skipped offline: no wheel)."""
    wheel = find_wheel()
    if wheel is None or not wheel.is_file():
        pytest.skip("no sglang wheel here (`make test` fetches it); the fixture stands in")
    pytest.importorskip("msgspec")
    from tests.sglang_contract.generate import fixture, fixture_path

    assert fixture(wheel) == json.loads(fixture_path(VERSION).read_text())


def test_fixture_checker_agrees_with_the_real_decoders():
    """Where both exist, the fixture's checker accepts and refuses what SGLang's decoders do."""
    wheel = find_wheel()
    if wheel is None or not wheel.is_file():
        pytest.skip("no sglang wheel here")
    pytest.importorskip("msgspec")
    from tests._sglang_contract import FixtureChecker, _real
    from tests.sglang_contract.generate import fixture_path

    real, fake = _real(wheel), FixtureChecker(json.loads(fixture_path(VERSION).read_text()))
    cases = [("GenerateRequest", {"input_ids": [[1, 2], [3]], "sampling_params": {"stop": ["a"], "top_k": -1}}),
             ("GenerateRequest", {"input_ids": [1], "sampling_params": {"temperature": "hot"}}),
             ("GenerateRequest", {"text": 3}),
             ("GenerateResponse", {"text": "x", "output_ids": [1], "meta_info": {
                 "id": "a", "finish_reason": {"type": "abort", "message": "Aborted", "status_code": None},
                 "output_token_logprobs": [[-0.5, 1, None]], "weight_versions": [{"version": "0", "start": 0,
                                                                                   "end": 1}]}}),
             ("GenerateResponse", {"meta_info": {"completion_tokens": "3"}}),
             ("GenerateResponse", {"meta_info": {"finish_reason": {"type": "stop", "matched": "ab"}}}),
             ("GetServerInfoResponse", {"port": "x"})]
    for name, value in cases:
        outcomes = []
        for check in (real.decode, fake):
            try:
                check(name, value)
                outcomes.append(True)
            except ContractError:
                outcomes.append(False)
        assert outcomes[0] == outcomes[1], (name, value, outcomes)


# ---- what the ecosystem sends -----------------------------------------------------------------------------------

SLIME = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {
    "temperature": 1.0, "top_p": 0.9, "top_k": -1, "max_new_tokens": 6, "stop": None, "stop_token_ids": None,
    "skip_special_tokens": False, "no_stop_trim": True, "spaces_between_special_tokens": False,
    "custom_params": {"return_top_p_token_ids": True}, "sampling_seed": 11}}
SLIME_MOE = {**SLIME, "return_routed_experts": True}
AREAL = {"input_ids": PROMPT, "image_data": None, "return_logprob": True, "stream": False, "sampling_params": {
    "top_p": 1.0, "top_k": 100000000, "max_new_tokens": 6, "temperature": 0.0, "stop_token_ids": [],
    "ignore_eos": False, "skip_special_tokens": True, "frequency_penalty": 0.0, "stop": ["Q"]}}
ROUTER = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "model": None,
          "background": False, "no_logs": False, "return_bytes": False, "return_entropy": False, "stream": False}
TEACHER = {"input_ids": [PROMPT + [7, 8], [3, 9, 10]], "sampling_params": {"max_new_tokens": 0},
           "return_logprob": True, "logprob_start_len": [3, 2], "top_logprobs_num": 3}
OURS = {"input_ids": [PROMPT, [6, 7]], "sampling_params": {"max_new_tokens": 5, "temperature": 1.0, "top_p": 1.0,
                                                           "sampling_seed": 3},
        "return_logprob": True, "top_logprobs_num": 2, "mc_samples": 3}
TEXT = {"text": ["12+3=", "Q:7"], "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "return_logprob": True, "return_text_in_logprobs": True, "token_ids_logprob": [2, 3],
        "logprob_start_len": 1, "return_prompt_token_ids": True, "rid": "batch"}


@pytest.mark.parametrize("payload", [SLIME, SLIME_MOE, AREAL, ROUTER, TEACHER, OURS, TEXT],
                         ids=["slime", "slime-moe", "areal", "sglang-router", "teacher-prefill", "ours", "text"])
def test_client_shapes_are_sglang_requests_and_answered(server, payload):
    contract().decode("GenerateRequest", payload)  # a request SGLang itself accepts ...
    body = decoded(post(server, payload))  # ... we answer, in SGLang's response types
    for item in body if isinstance(body, list) else [body]:
        meta = item["meta_info"]
        assert isinstance(item["text"], str) and meta["completion_tokens"] == len(item["output_ids"])
        assert meta["weight_versions"][-1]["version"] == meta["weight_version"]
        assert meta["weight_versions"][-1]["end"] == len(item["output_ids"])
        if payload.get("return_logprob"):
            assert meta["output_token_logprobs_length"] == len(meta["output_token_logprobs"]) == len(item["output_ids"])
            assert [e[1] for e in meta["output_token_logprobs"]] == item["output_ids"]  # AReaL/slime index these


def test_put_generate(server):
    assert decoded(post(server, ROUTER, method="PUT"))["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_unknown_top_level_fields_ignored_and_logged_once(server, caplog):
    with caplog.at_level(logging.WARNING, logger="asyncopd.rollout.engine"):
        for _ in range(2):
            post(server, {**ROUTER, "some_new_field": {"x": 1}})
    assert sum("some_new_field" in r.getMessage() for r in caplog.records) == 1


# ---- SGLang's semantics -----------------------------------------------------------------------------------------

def test_text_in_and_out(server):
    tok = build_tiny_tokenizer()
    by_text = post(server, {"text": "12+3=", "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    by_ids = post(server, {"input_ids": tok("12+3=")["input_ids"],
                           "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert by_text["output_ids"] == by_ids["output_ids"] and by_text["text"] == by_ids["text"]
    ids = by_ids["output_ids"]
    stopped_on_eos = by_ids["meta_info"]["finish_reason"].get("matched") == EOS
    assert by_ids["text"] == tok.decode(ids[:-1] if stopped_on_eos else ids, skip_special_tokens=True)
    batch = post(server, TEXT)
    assert [b["meta_info"]["id"] for b in batch] == ["batch_0", "batch_1"]
    assert batch[1]["prompt_token_ids"] == tok("Q:7")["input_ids"]
    meta = batch[0]["meta_info"]
    assert all(e[2] == tok.decode([e[1]]) for e in meta["output_token_logprobs"] + meta["input_token_logprobs"])


def _greedy(server, prompt=PROMPT, **sp):
    return post(server, {"input_ids": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                                   "ignore_eos": True, **sp}})


def test_stop_strings_trim_and_no_stop_trim(server):
    full = _greedy(server)
    text = full["text"]
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = text.find(stop)
    trimmed = _greedy(server, stop=[stop, "never"])
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert trimmed["text"] == text[:cut]
    # the row ended at the first token whose text completes the stop string
    tok = build_tiny_tokenizer()
    n = len(trimmed["output_ids"])
    assert trimmed["output_ids"] == full["output_ids"][:n]
    assert stop in tok.decode(trimmed["output_ids"]) and stop not in tok.decode(trimmed["output_ids"][:-1])
    kept = _greedy(server, stop=stop, no_stop_trim=True)
    assert kept["text"] == text[:cut + len(stop)] and kept["output_ids"] == trimmed["output_ids"]


def test_stop_token_trimmed_from_text_not_ids(server):
    prompt = [8, 9, 10]  # its greedy answer starts with no eos
    full = _greedy(server, prompt)["output_ids"]  # ignore_eos: it also turns stop_token_ids off, as in SGLang
    k = next(k for k in range(1, len(full)) if full[k] not in full[:k] and EOS not in full[:k + 1])
    out = _greedy(server, prompt, stop_token_ids=[full[k]], ignore_eos=False)
    assert out["output_ids"] == full[:k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": full[k]}
    tok = build_tiny_tokenizer()
    assert out["text"] == tok.decode(full[:k], skip_special_tokens=True)
    kept = _greedy(server, prompt, stop_token_ids=[full[k]], ignore_eos=False, no_stop_trim=True)
    assert kept["text"] == tok.decode(full[:k + 1], skip_special_tokens=True)
    assert _greedy(server, prompt, stop_token_ids=[full[k]])["output_ids"] == full


def _full_vocab(model, prompt, output, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt) + list(output)])).logits[0].double()
    return torch.log_softmax(logits / temperature, -1)[len(prompt) - 1:-1]


def test_logprobs_are_full_vocabulary_at_top_p(server, model):
    """SGLang reports log_softmax(logits / T) over the vocabulary, not renormalised over the top-p support."""
    out = post(server, {"input_ids": PROMPT, "return_logprob": True, "top_logprobs_num": VOCAB,
                        "token_ids_logprob": [2, 3], "sampling_params": {
                            "max_new_tokens": 6, "temperature": 0.8, "top_p": 0.5, "sampling_seed": 1}})
    ids, meta = out["output_ids"], out["meta_info"]
    want = _full_vocab(model, PROMPT, ids, 0.8)
    tol = logprob_tol(model, len(PROMPT) + len(ids), 0.8)
    got = [e[0] for e in meta["output_token_logprobs"]]
    np.testing.assert_allclose(got, want.gather(1, torch.tensor(ids)[:, None]).squeeze(1).numpy(), atol=tol)
    # the whole top-VOCAB row is the full distribution: it sums to 1, where a renormalised one would have zeros
    np.testing.assert_allclose([sum(np.exp(e[0]) for e in row) for row in meta["output_top_logprobs"]], 1.0,
                               atol=1e-4)
    np.testing.assert_allclose([[e[0] for e in row] for row in meta["output_token_ids_logprobs"]],
                               want[:, [2, 3]].numpy(), atol=tol)


def test_input_logprobs_as_sglang_reports_them(server, model):
    prompt = [3, 9, 4, 12, 7]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "top_logprobs_num": 2, "token_ids_logprob": [5]}
    for start in (0, 2, 4, 5):
        meta = post(server, {**body, "logprob_start_len": start})["meta_info"]
        toks = meta["input_token_logprobs"]
        assert [e[1] for e in toks] == prompt[start:]
        if start < len(prompt):  # the first entry is None whatever the start (SGLang 0.5.23)
            assert toks[0][0] is None and meta["input_top_logprobs"][0] is None
            assert meta["input_token_ids_logprobs"][0] is None
        lp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].double(), -1)
        np.testing.assert_allclose([e[0] for e in toks[1:]], [lp[t - 1, prompt[t]].item()
                                                             for t in range(start + 1, len(prompt))], atol=1e-4)
        assert len(meta["input_token_ids_logprobs"]) == len(toks)
    assert post(server, {**body, "logprob_start_len": -1})["meta_info"]["input_token_logprobs"] == []


def test_health_generate_loads_and_info(server):
    assert requests.get(server.url + "/health_generate", timeout=30).status_code == 200
    client = SGLangClient(server.url)
    client.pause_generation("in_place")
    try:
        assert requests.get(server.url + "/health_generate", timeout=30).status_code == 200  # paused is healthy
    finally:
        client.continue_generation()
    loads = requests.get(server.url + "/v1/loads?include=core,disagg,queues", timeout=30).json()
    assert [ld["dp_rank"] for ld in loads["loads"]] == [0]
    assert loads["loads"][0]["num_running_reqs"] == loads["loads"][0]["num_waiting_reqs"] == 0
    r = requests.get(server.url + "/v1/loads?include=bogus", timeout=30)
    assert r.status_code == 400 and "bogus" in r.json()["error"]
    prom = requests.get(server.url + "/v1/loads?format=prometheus", timeout=30).text
    assert 'sglang_num_running_reqs{dp_rank="0"} 0' in prom
    assert requests.get(server.url + "/get_load", timeout=30).json()[0].keys() >= {"dp_rank", "num_reqs",
                                                                                   "num_tokens"}
    info = requests.get(server.url + "/server_info", timeout=30).json()
    contract().decode("GetServerInfoResponse", info)
    for key in ("tp_size", "dp_size", "pp_size", "ep_size", "nnodes", "node_rank", "base_gpu_id", "gpu_id_step"):
        assert info[key] == (0 if key in ("node_rank", "base_gpu_id") else 1), key  # what slime checks
    assert info["port"] == int(server.url.rsplit(":", 1)[1]) and info["disaggregation_mode"] == "null"
    model_info = requests.get(server.url + "/model_info", timeout=30).json()
    contract().decode("GetModelInfoResponse", model_info)
    assert model_info["weight_version"] == requests.get(server.url + "/get_weight_version",
                                                        timeout=30).json()["weight_version"]


# ---- abort: partial output with its logprobs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_server(ckpt):
    """A server whose every forward takes 40 ms, so an abort lands mid-generation."""
    model = tiny_model(0)
    model.register_forward_pre_hook(lambda *_: time.sleep(0.04))
    s = RolloutServer(RolloutEngine(model, str(ckpt))).start()
    yield s, model
    s.stop()


def _in_thread(fn):
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    th.start()
    return th, box


def _wait_running(url: str, rows: int) -> None:
    deadline = time.monotonic() + 30
    while requests.get(url + "/get_load", timeout=10).json()[0]["num_reqs"] < rows:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.25)  # a few steps in


def test_abort_request_keeps_partial_output_with_logprobs(slow_server):
    server, model = slow_server
    payload = {"input_ids": [PROMPT, [6, 7]], "rid": "job", "return_logprob": True,
               "sampling_params": {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}}
    th, box = _in_thread(lambda: post(server, payload))
    _wait_running(server.url, 2)
    contract().decode("AbortRequest", {"rid": "job_1"})
    assert requests.post(server.url + "/abort_request", json={"rid": "job_1"}, timeout=30).status_code == 200
    th.join(60)
    first, second = decoded(box["out"])
    assert first["meta_info"]["finish_reason"]["type"] == "length" and len(first["output_ids"]) == 40
    meta = second["meta_info"]
    assert meta["finish_reason"] == {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    ids = second["output_ids"]
    assert 0 < len(ids) < 40 and meta["completion_tokens"] == len(ids)
    assert [e[1] for e in meta["output_token_logprobs"]] == ids  # AReaL indexes these
    want = _full_vocab(model, [6, 7], ids, 1.0).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
    np.testing.assert_allclose([e[0] for e in meta["output_token_logprobs"]], want.numpy(),
                               atol=logprob_tol(model, 2 + len(ids)))


def test_abort_all_then_idle_as_slime_drains(slow_server):
    server, _ = slow_server
    th, box = _in_thread(lambda: post(server, {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {
        "max_new_tokens": 40, "temperature": 0, "ignore_eos": True}}))
    _wait_running(server.url, 1)
    assert requests.post(server.url + "/abort_request", json={"abort_all": True}, timeout=30).status_code == 200
    th.join(60)
    out = box["out"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and 0 < len(out["output_ids"]) < 40
    load = requests.get(server.url + "/v1/loads?include=core,disagg,queues", timeout=30).json()["loads"][0]
    assert load["num_running_reqs"] + load["num_waiting_reqs"] == 0
    # the engine takes new work at once (abort is not pause)
    assert post(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})["output_ids"]


# ---- the sampler under the engine ---------------------------------------------------------------------------------

def test_sampler_finish_check_and_abort_keep_tokens(model):
    s = KVCacheSampler(model, EOS, PAD, VOCAB)
    ref = s.generate([PROMPT, [6, 7]], max_new_tokens=8, temperature=0, ignore_eos=True)
    outs = s.generate([PROMPT, [6, 7]], max_new_tokens=8, temperature=0, ignore_eos=True,
                      finish_check=lambda running, rows: {1: ("stop", "x")} if len(rows[1]) == 3 else {})
    assert outs[0].output_ids == ref[0].output_ids and outs[0].finish_reason == "length"
    assert outs[1].output_ids == ref[1].output_ids[:3] and (outs[1].finish_reason, outs[1].matched) == ("stop", "x")
    forwards = {"left": 4, "ran": 0}  # the guard lets this many forwards run, then aborts

    @contextlib.contextmanager
    def guard():
        if forwards["ran"] == forwards["left"]:
            raise GenerationAborted()
        forwards["ran"] += 1
        yield forwards["ran"]

    cut = s.generate([PROMPT], max_new_tokens=8, temperature=0, ignore_eos=True, step_guard=guard)[0]
    assert cut.finish_reason == "abort" and cut.output_ids == ref[0].output_ids[:4]
    assert cut.versions == [1, 2, 3, 4] and cut.logprobs.shape == (4,)
    forwards.update(left=0, ran=0)  # now it refuses the prefill: nothing ran
    none = s.generate([PROMPT], max_new_tokens=8, temperature=0, step_guard=guard)[0]
    assert none.output_ids == [] and none.finish_reason == "abort" and none.version_start is None


def test_full_vocab_logprobs_flag(model):
    s = KVCacheSampler(model, EOS, PAD, VOCAB)
    kw = dict(max_new_tokens=5, temperature=0.9, top_k=3, seed=4)
    filtered = s.generate([PROMPT], **kw)[0]
    full = s.generate([PROMPT], full_vocab_logprobs=True, **kw)[0]
    assert full.output_ids == filtered.output_ids  # same draws, another report
    assert (full.logprobs < filtered.logprobs).all()  # renormalising over 3 ids raises every logprob


# ---- limits and auth --------------------------------------------------------------------------------------------

def test_request_limits_answer_413_naming_the_limit(server):
    big = {"input_ids": [3] * 40000}
    r = requests.post(server.url + "/generate", json=big, timeout=30)
    assert r.status_code == 413 and "rollout.max_request_bytes=65536" in r.json()["error"]

    def chunks():  # no Content-Length: the cap applies while reading
        yield b'{"input_ids": ['
        for _ in range(30000):  # 90 kB
            yield b"3, "
        yield b"3]}"

    r = requests.post(server.url + "/generate", data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 413 and "rollout.max_request_bytes" in r.json()["error"]
    r = requests.post(server.url + "/generate", json={"input_ids": [[3]] * 17}, timeout=30)
    assert r.status_code == 413 and "a batch of 17 inputs exceeds the limit rollout.max_batch_size=16" in r.text
    assert post(server, {"input_ids": [[3]] * 16, "sampling_params": {"max_new_tokens": 1}})  # still up, at the cap


ADMIN = [("POST", "/init_weights_update_group"), ("POST", "/update_weights_from_distributed"),
         ("POST", "/destroy_weights_update_group"), ("POST", "/begin_weight_update"), ("POST", "/end_weight_update"),
         ("POST", "/update_weight_version"), ("POST", "/pause_generation"), ("POST", "/continue_generation"),
         ("GET", "/flush_cache"), ("POST", "/abort_request"), ("POST", "/generate"), ("PUT", "/generate"),
         ("GET", "/v1/loads"), ("GET", "/get_load"), ("GET", "/server_info"), ("GET", "/model_info")]


def test_admin_and_weight_endpoints_need_the_key(model):
    engine = RolloutEngine(model, "")
    with pytest.raises(ValueError, match="api_key"):
        RolloutServer(engine, host="0.0.0.0")
    s = RolloutServer(engine, api_key="k3y").start()
    try:
        for method, path in ADMIN:
            r = requests.request(method, s.url + path, json={}, timeout=30)
            assert r.status_code == 401, (method, path, r.status_code)
        assert engine.paused is False
        for path in ("/health", "/health_generate"):  # probes, as SGLang exempts /health*
            assert requests.get(s.url + path, timeout=30).status_code == 200
        r = requests.get(s.url + "/v1/loads", headers={"Authorization": "Bearer k3y"}, timeout=30)
        assert r.status_code == 200
    finally:
        s.stop()
