"""Teacher scoring: the batched scorer against brute force, and the /score server + client over HTTP."""

import numpy as np
import pytest
import requests
import torch

from asyncopd.core.types import Rollout
from asyncopd.model.scorer import score_sequences
from asyncopd.net.client import ServerError
from asyncopd.teacher import wire
from asyncopd.teacher.client import TeacherClient, _split_balanced
from asyncopd.teacher.server import TeacherServer
from tests._serving_fixtures import VOCAB, full_logprobs, save_tiny, tiny_model
from tests._tolerances import EPS16, logprob_tol


def _brute(model, seq, start, k, queries=None):
    lp = full_logprobs(model, list(seq))
    rows = lp[start - 1:len(seq) - 1]  # logits predicting tokens start..L-1
    top_v, top_i = torch.topk(rows, k, dim=-1)
    tok = rows.gather(1, torch.as_tensor(seq[start:], dtype=torch.long).unsqueeze(1)).squeeze(1)
    q = rows.gather(1, torch.as_tensor(queries, dtype=torch.long)) if queries is not None else None
    return top_i.numpy(), top_v.numpy(), tok.numpy(), None if q is None else q.numpy()


def _random_rollouts(n, seed=0, m=0, max_prompt=6, max_resp=9):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(0, VOCAB, size=int(rng.integers(1, max_prompt + 1)), dtype=np.int32)
        t = int(rng.integers(0, max_resp + 1))
        r = rng.integers(0, VOCAB, size=t, dtype=np.int32)
        ro = Rollout(prompt_ids=p, response_ids=r, logprobs=np.zeros(t, np.float32), version_start=0,
                     version_end=0, finish_reason="length")
        if m:
            ro.mc_ids = np.concatenate([r[:, None], rng.integers(0, VOCAB, size=(t, m - 1), dtype=np.int32)], 1)
        out.append(ro)
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from asyncopd.data.tokenizer import save_tiny_tokenizer

    d = save_tiny(tmp_path_factory.mktemp("teacher"), seed=3)
    save_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def servers(model, ckpt):
    started = [TeacherServer(model, str(ckpt)).start() for _ in range(2)]
    yield started
    for s in started:
        s.stop()


@pytest.mark.parametrize("max_tokens, chunk", [(10**6, 4096), (12, 3)])
def test_scorer_matches_brute_force(model, max_tokens, chunk):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, VOCAB, size=L).tolist() for L in (5, 9, 1, 12, 4)]
    starts = [2, 4, 1, 1, 4]  # includes a sequence with nothing to score (start == length)
    total = sum(len(s) - st for s, st in zip(seqs, starts, strict=True))
    queries = rng.integers(0, VOCAB, size=(total, 3))
    res = score_sequences(model, seqs, starts, 5, queries, max_tokens_per_forward=max_tokens,
                          positions_per_chunk=chunk)
    assert res.offsets.tolist() == [0, 3, 8, 8, 19, 19]
    tol = logprob_tol(model, max(len(s) for s in seqs))  # float32: padded, chunked batch vs one forward per row
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        a, b = res.offsets[i], res.offsets[i + 1]
        ti, tv, tok, q = _brute(model, s, st, 5, queries[a:b])
        np.testing.assert_array_equal(res.topk_ids[a:b], ti)
        np.testing.assert_allclose(res.topk_logprobs[a:b], tv, atol=tol)
        np.testing.assert_allclose(res.token_logprob[a:b], tok, atol=tol)
        np.testing.assert_allclose(res.query_logprobs[a:b], q, atol=tol)
        assert np.all(np.diff(res.topk_logprobs[a:b], axis=1) <= 0)  # descending


def test_scorer_rejects_bad_starts(model):
    with pytest.raises(ValueError, match="score start"):
        score_sequences(model, [[1, 2]], [0], 2)


def test_split_balanced():
    assert _split_balanced([1] * 10, 2) == [(0, 5), (5, 10)]
    assert _split_balanced([5], 3) == [(0, 1)]
    ranges = _split_balanced([100, 1, 1, 1, 1, 100], 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 6 and all(b > a for a, b in ranges)
    assert len(ranges) == 3


def test_health_and_model_info(servers, ckpt):
    from asyncopd.data.tokenizer import tokenizer_fingerprint

    client = TeacherClient([s.url for s in servers])
    assert client.health() == [{"status": "ok"}] * 2
    infos = client.model_info()
    assert len(infos) == 2
    info = infos[0]
    assert info["vocab_size"] == VOCAB
    assert info["max_position_embeddings"] == 64
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(ckpt) != ""
    assert info["model_path"] == str(ckpt)


@pytest.mark.parametrize("with_queries", [False, True])
def test_score_round_trip_equals_brute_force(servers, model, with_queries):
    rollouts = _random_rollouts(9, seed=1, m=4 if with_queries else 0)
    client = TeacherClient([s.url for s in servers])
    scores = client.score(rollouts, top_k=6, with_queries=with_queries)
    assert len(scores) == len(rollouts)
    assert client.last_stats["replicas_used"] == 2
    for ro, sc in zip(rollouts, scores, strict=True):
        seq = np.concatenate([ro.prompt_ids, ro.response_ids])
        ti, tv, tok, q = _brute(model, seq, len(ro.prompt_ids), 6, ro.mc_ids if with_queries else None)
        tol = logprob_tol(model, len(seq))  # float32: the server's padded batch vs one forward of this row
        assert sc.topk_ids.dtype == np.int32 and sc.topk_logprobs.dtype == np.float32
        assert sc.topk_ids.shape == (ro.num_tokens, 6)
        np.testing.assert_array_equal(sc.topk_ids, ti)
        np.testing.assert_allclose(sc.topk_logprobs, tv, atol=tol)
        np.testing.assert_allclose(sc.token_logprob, tok, atol=tol)
        if with_queries:
            np.testing.assert_allclose(sc.query_logprobs, q, atol=tol)
            # mc_ids[:, 0] is the response token: one element of one log-softmax, exact
            np.testing.assert_array_equal(sc.query_logprobs[:, 0], sc.token_logprob)
        else:
            assert sc.query_logprobs is None


def test_student_topk_scores_split_from_mc_scores(servers, model):
    """Both query sets travel as one [T, M + K_S] matrix and come back split, each equal to brute force."""
    rollouts = _random_rollouts(5, seed=3, m=3)
    rng = np.random.default_rng(3)
    for r in rollouts:
        r.student_topk_ids = rng.integers(0, VOCAB, size=(r.num_tokens, 2)).astype(np.int32)
    client = TeacherClient([s.url for s in servers])
    scores = client.score(rollouts, top_k=2, with_queries=True, with_student_topk=True)
    for ro, sc in zip(rollouts, scores, strict=True):
        seq = np.concatenate([ro.prompt_ids, ro.response_ids])
        *_, q_mc = _brute(model, seq, len(ro.prompt_ids), 2, ro.mc_ids)
        *_, q_st = _brute(model, seq, len(ro.prompt_ids), 2, ro.student_topk_ids)
        tol = logprob_tol(model, len(seq))  # float32: the server's padded batch vs one forward of this row
        np.testing.assert_allclose(sc.query_logprobs, q_mc, atol=tol)
        np.testing.assert_allclose(sc.student_topk_logprobs, q_st, atol=tol)
    only = client.score(rollouts, top_k=2, with_student_topk=True)
    assert only[0].query_logprobs is None and only[0].student_topk_logprobs.shape == (rollouts[0].num_tokens, 2)
    rollouts[0].student_topk_ids = None
    with pytest.raises(ValueError, match="student_topk_ids needs rollouts generated with top_logprobs_num"):
        client.score(rollouts, top_k=2, with_student_topk=True)


def test_float16_wire_halves_logprob_bytes(servers):
    rollouts = _random_rollouts(16, seed=2, m=8, max_resp=20)
    c32 = TeacherClient([servers[0].url], wire_dtype="float32")
    c16 = TeacherClient([servers[0].url], wire_dtype="float16")
    s32 = c32.score(rollouts, top_k=8, with_queries=True)
    s16 = c16.score(rollouts, top_k=8, with_queries=True)
    # The same float32 scores (same request, same batches), the second rounded once to float16 (to nearest):
    # relative error <= EPS16 / 2, or half the subnormal spacing (2**-25) below float16's smallest normal.
    half_subnormal = torch.finfo(torch.float16).smallest_normal * EPS16 / 2
    for a, b in zip(s32, s16, strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, rtol=EPS16 / 2, atol=half_subnormal)
        np.testing.assert_allclose(b.query_logprobs, a.query_logprobs, rtol=EPS16 / 2, atol=half_subnormal)
    tokens = c32.last_stats["tokens"]
    # int32 ids stay, logprobs (8 top-k + 1 token + 8 queries per position) halve
    assert c32.last_stats["bytes_per_token"] > 8 * 4 + 17 * 4
    saved = c32.last_stats["response_bytes"] - c16.last_stats["response_bytes"]
    assert saved >= 17 * 2 * tokens - 3 * 64


def test_empty_and_zero_length_rollouts(servers):
    client = TeacherClient([s.url for s in servers])
    assert client.score([], top_k=3) == []
    ro = _random_rollouts(3, seed=4, m=2)
    for r in ro:
        r.response_ids = r.response_ids[:0]
        r.mc_ids = r.mc_ids[:0]
    out = client.score(ro, top_k=3, with_queries=True)
    assert [s.topk_ids.shape for s in out] == [(0, 3)] * 3


def test_client_errors(servers):
    client = TeacherClient([servers[0].url])
    with pytest.raises(ValueError, match="mc_ids"):
        client.score(_random_rollouts(2), top_k=2, with_queries=True)
    with pytest.raises(ValueError, match="wire_dtype"):
        TeacherClient([servers[0].url], wire_dtype="int8")
    with pytest.raises(ServerError, match="top_k"):
        client.score(_random_rollouts(2), top_k=VOCAB + 1)


def _post(url, body, **headers):
    return requests.post(url + "/score", data=body, headers={"Content-Type": wire.CONTENT_TYPE, **headers},
                         timeout=30)


def _req(ids, offsets, starts, **extra):
    arrays = {"input_ids": np.asarray(ids, np.int32), "offsets": np.asarray(offsets, np.int64),
              "score_start": np.asarray(starts, np.int64)}
    meta = {"top_k": extra.pop("top_k", 2)}
    meta.update(extra.pop("meta", {}))
    arrays.update(extra)
    return wire.encode(arrays, meta)


@pytest.mark.parametrize("body, match", [
    (b"not a body", "wire-format"),
    (_req([1, 2, 3], [0, 3], [1])[:-70], "truncated"),
    (wire.encode({"offsets": np.array([0, 1])}), "input_ids"),
    (_req([1, 2, 3], [0, 2], [1]), "offsets"),
    (_req([1, 2, 3], [0, 3], [0]), "score_start"),
    (_req([1, 2, 3], [0, 3], [4]), "score_start"),
    (_req([1, 2, 99], [0, 3], [1]), "vocabulary"),
    (_req([1, 2, 3], [0, 3], [1], top_k=-1), "top_k"),
    (_req([1, 2, 3], [0, 3], [1], meta={"wire_dtype": "int8"}), "wire_dtype"),
    (_req([1, 2, 3], [0, 3], [1], query_ids=np.zeros((5, 2), np.int32)), "query_ids"),
    (_req([1, 2, 3], [0, 3], [1], query_ids=np.full((2, 2), 50, np.int32)), "query_ids"),
    (wire.encode({"input_ids": np.array([1.0, 2.0], np.float32), "offsets": np.array([0, 2]),
                  "score_start": np.array([1])}), "integer"),
    (_req(list(range(3)) * 30, [0, 90], [1]), "max_position_embeddings"),
])
def test_malformed_score_requests_get_400(servers, body, match):
    r = _post(servers[0].url, body)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]


def test_json_body_is_refused_with_a_pointer(servers):
    r = requests.post(servers[0].url + "/score", json={"input_ids": [1, 2]}, timeout=30)
    assert r.status_code == 400 and "application/octet-stream" in r.json()["error"]


def test_api_key_and_bind_rules(model):
    with pytest.raises(ValueError, match="api_key"):
        TeacherServer(model, host="0.0.0.0")
    server = TeacherServer(model, api_key="s3cret").start()
    try:
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        assert requests.get(server.url + "/model_info", timeout=10).status_code == 401
        r = _post(server.url, _req([1, 2, 3], [0, 3], [1]))
        assert r.status_code == 401 and "Bearer" in r.json()["error"]
        r = _post(server.url, _req([1, 2, 3], [0, 3], [1]), Authorization="Bearer wrong")
        assert r.status_code == 401
        scores = TeacherClient([server.url], api_key="s3cret").score(_random_rollouts(2, seed=5), top_k=2)
        assert len(scores) == 2
    finally:
        server.stop()


def test_sglang_prefill_teacher_client_against_the_engine(model):
    """teacher.backend=sglang speaks stock SGLang's prefill /generate; our engine serves the same API."""
    from asyncopd.rollout.engine import RolloutEngine
    from asyncopd.rollout.http_server import RolloutServer
    from asyncopd.teacher.backends import TEACHER_BACKENDS
    from asyncopd.teacher.client import SGLangTeacherClient

    servers = [RolloutServer(RolloutEngine(model, "")).start() for _ in range(2)]
    try:
        client = TEACHER_BACKENDS["sglang"].client([s.url for s in servers])
        assert isinstance(client, SGLangTeacherClient)
        rollouts = _random_rollouts(7, seed=6)
        rollouts[2].response_ids = rollouts[2].response_ids[:0]
        scores = client.score(rollouts, top_k=4)
        assert client.last_stats["replicas_used"] == 2
        for ro, sc in zip(rollouts, scores, strict=True):
            assert sc.topk_ids.shape == (ro.num_tokens, 4) and sc.query_logprobs is None
            if not ro.num_tokens:
                continue
            seq = np.concatenate([ro.prompt_ids, ro.response_ids])
            ti, tv, tok, _ = _brute(model, seq, len(ro.prompt_ids), 4)
            tol = logprob_tol(model, len(seq))  # float32: the engine's batched prefill vs one forward of this row
            np.testing.assert_array_equal(sc.topk_ids, ti)
            np.testing.assert_allclose(sc.topk_logprobs, tv, atol=tol)
            np.testing.assert_allclose(sc.token_logprob, tok, atol=tol)
        with pytest.raises(ValueError, match="per-position query scores .* teacher=embedded"):
            client.score(_random_rollouts(2, m=2), top_k=2, with_queries=True)
    finally:
        for s in servers:
            s.stop()


def test_teacher_host_config_errors(tmp_path):
    from asyncopd.config.schema import TeacherConfig
    from asyncopd.teacher.actor import TeacherHost

    with pytest.raises(FileNotFoundError, match="model.teacher_path="):
        TeacherHost(str(tmp_path / "missing"), TeacherConfig()).start()
    with pytest.raises(RuntimeError, match="not started"):
        TeacherHost(str(tmp_path), TeacherConfig()).url()
