"""Partial rollouts: a weight update with weights.pause_mode=abort cuts the requests in flight, and the dispatcher
resumes each sample from its partial output under the new weights, joining the pieces into one Rollout; nothing
ending in finish_reason=abort reaches the teacher or the learner.

A scripted server checks the resume protocol exactly (inputs, budgets, seeds, joins); a real engine process under a
real gloo weight update checks it against the engine (its abort answers, the new weights' logprobs)."""

import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncopd.bench.weight_bench import start_engine_process
from asyncopd.config.load import compose_config
from asyncopd.config.schema import WeightSyncConfig
from asyncopd.core.errors import AbortedRollout
from asyncopd.core.types import Rollout, TeacherScores, join_pieces
from asyncopd.learner.collate import collate
from asyncopd.rollout.backends import weight_sync_config
from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.dispatch import MAX_IDLE_PIECES, Dispatcher, resume_seed, sample_seed
from asyncopd.teacher.router import TeacherRouter
from asyncopd.validation.rules import problems
from asyncopd.weights.source import ModuleWeightSource
from asyncopd.weights.sync import WeightSync
from tests._serving_fixtures import VOCAB, full_logprobs, save_tiny, tiny_model
from tests._tolerances import logprob_tol
from tests.conftest import TEST_THREADS

# ---- joining pieces ----------------------------------------------------------------------------------------------


def _piece(tokens: list[int], version: int, finish: str, prompt=(1, 2, 3), spans: bool = True) -> Rollout:
    """A piece with every per-position field, each a function of the token id (so a join can be checked)."""
    t = np.asarray(tokens, dtype=np.int32)
    n = len(t)
    return Rollout(prompt_ids=np.asarray(prompt, np.int32), response_ids=t, logprobs=-t.astype(np.float32) / 10,
                   version_start=version, version_end=version, finish_reason=finish,
                   mc_ids=np.stack([t, t + 1], 1), mc_logprobs=np.stack([-t, -t - 1], 1).astype(np.float32),
                   student_topk_ids=np.stack([t, t + 2], 1),
                   student_topk_logprobs=np.stack([-t, -t - 2], 1).astype(np.float32) / 3,
                   token_versions=np.full(n, version, np.int64) if spans else None, metadata={"answer": "7"},
                   ticket=5)


def test_every_per_position_field_is_joined():
    """Rollout.PER_POSITION lists every array indexed by response position: a field added without it would be
    dropped from a resumed sample (this fails then)."""
    r = _piece([4, 5, 6, 7], 0, "stop", prompt=(1, 2))
    per_position = {f.name for f in fields(r) if isinstance(getattr(r, f.name), np.ndarray)
                    and getattr(r, f.name).shape[:1] == (r.num_tokens,)}
    assert per_position - {"token_versions"} == set(Rollout.PER_POSITION)


def test_join_pieces_concatenates_tokens_fields_and_versions():
    a, b, c = _piece([4, 5], 3, "abort"), _piece([], 4, "abort", spans=False), _piece([6, 7, 8], 4, "stop",
                                                                                      spans=False)
    whole = _piece([4, 5, 6, 7, 8], 3, "stop")
    joined = join_pieces([a, b, c])
    for name in Rollout.PER_POSITION:
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name), err_msg=name)
    # a piece without spans charges its tokens to its own version_start, not the whole sample's
    assert joined.token_versions.tolist() == [3, 3, 4, 4, 4] and joined.oldest_version == 3
    assert (joined.version_start, joined.version_end, joined.finish_reason, joined.pieces) == (3, 4, "stop", 3)
    assert joined.prompt_ids.tolist() == [1, 2, 3] and joined.metadata == {"answer": "7"} and joined.ticket == 5
    assert join_pieces([a]) is a  # a sample no update cut is passed through as it came
    with pytest.raises(ValueError, match="mc_ids is missing"):
        join_pieces([a, replace(c, mc_ids=None)])


def test_nothing_aborted_reaches_the_teacher_or_the_learner():
    cut, done = _piece([4, 5], 0, "abort"), _piece([4, 5], 0, "length")
    scores = TeacherScores(np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float32), np.zeros(2, np.float32))
    assert collate([(done, scores)], pad_id=0).versions == [0]
    with pytest.raises(AbortedRollout, match=r"the learner got 1 response\(s\) that ended in finish_reason=abort"):
        collate([(done, scores), (cut, scores)], pad_id=0)
    with pytest.raises(AbortedRollout, match="the teacher got 1"):
        TeacherRouter({"t": object()}).score([cut], top_k=1)


# ---- the resume protocol, against a scripted server ---------------------------------------------------------------

class ScriptedServer:
    """Answers /generate as an engine would: sample s (prompt [s, s, s]) emits token 10 * s + t at response position
    t, with per-position fields as _piece has them, until its budget (finish "length") or the next position in
    `cuts[s]`, where a weight update aborts it; every answer after a cut comes from the next version. Records each
    call: (inputs, max_new_tokens, seed)."""

    base_url = "scripted"

    def __init__(self, cuts: dict[int, list[int]]):
        self.cuts = {s: list(c) for s, c in cuts.items()}
        self.calls: list[tuple[list[list[int]], int, object]] = []
        self.version = 0

    def generate(self, prompts, *, max_new_tokens: int, seed=None, **kw) -> list[Rollout]:
        self.calls.append(([list(p) for p in prompts], max_new_tokens, seed))
        out, cut_now = [], False
        for p in prompts:
            s, start = p[0], len(p) - 3
            end = start + max_new_tokens
            nxt = [c for c in self.cuts.get(s, []) if c >= start]
            if nxt and nxt[0] < end:
                self.cuts[s].remove(nxt[0])
                end, cut_now = nxt[0], True
            piece = _piece([10 * s + t for t in range(start, end)], self.version,
                           "abort" if end < start + max_new_tokens else "length", prompt=p)
            out.append(replace(piece, metadata={}, ticket=-1))
        self.version += cut_now
        return out


def test_aborted_samples_resume_from_their_partial_output():
    # sample 1 cut at 3 and 5 tokens, sample 2 before its first token, sample 3 never, sample 4 at 3 like sample 1
    server = ScriptedServer({1: [3, 5], 2: [0], 4: [3]})
    prompts = [[s] * 3 for s in (1, 2, 3, 4)]
    out = Dispatcher([server], cap=1).generate(prompts, seed=9, max_new_tokens=8, temperature=1.0)
    seeds = [sample_seed(9, i) for i in range(4)]
    # the first request, then one per budget left: samples cut at one length share a request
    assert server.calls[0] == (prompts, 8, seeds)
    assert sorted(server.calls[1:3], key=lambda c: c[1]) == [
        ([[1] * 3 + [10, 11, 12], [4] * 3 + [40, 41, 42]], 5, [resume_seed(seeds[0], 3), resume_seed(seeds[3], 3)]),
        ([[2] * 3], 8, seeds[1])]  # cut before its first token: its own prompt and seed again
    assert server.calls[3] == ([[1] * 3 + [10, 11, 12, 13, 14]], 3, resume_seed(seeds[0], 5))
    assert len(server.calls) == 4
    for s, r in zip((1, 2, 3, 4), out, strict=True):
        whole = _piece([10 * s + t for t in range(8)], 0, "length", prompt=[s] * 3)
        for name in Rollout.PER_POSITION:
            np.testing.assert_array_equal(getattr(r, name), getattr(whole, name), err_msg=f"sample {s}: {name}")
        assert r.finish_reason == "length" and r.prompt_ids.tolist() == [s] * 3
    assert [r.pieces for r in out] == [3, 2, 1, 2]
    assert out[0].token_versions.tolist() == [0] * 3 + [1] * 2 + [2] * 3
    assert out[1].token_versions.tolist() == [2] * 8 and out[1].oldest_version == 2  # its cut piece had no token
    assert resume_seed(seeds[0], 0) == seeds[0] != resume_seed(seeds[0], 3) != resume_seed(seeds[0], 5)
    assert resume_seed(None, 3) is None


def test_a_cut_after_the_last_allowed_token_ends_by_length_and_endless_aborts_fail():
    server = ScriptedServer({1: [4]})
    (r,) = Dispatcher([server], cap=1).generate([[1] * 3], max_new_tokens=4, temperature=1.0)
    assert (r.finish_reason, r.num_tokens, len(server.calls)) == ("length", 4, 1)  # the cut at 4 is no cut

    class Aborting(ScriptedServer):
        def generate(self, prompts, **kw):
            return [replace(r, finish_reason="abort", response_ids=r.response_ids[:0]) for r in
                    super().generate(prompts, **kw)]

    with pytest.raises(RuntimeError, match=f"aborted a sample {MAX_IDLE_PIECES + 1} times in a row"):
        Dispatcher([Aborting({})], cap=1).generate([[1] * 3], max_new_tokens=4, temperature=1.0)


def test_abort_is_a_sound_pause_mode_and_rollout_sglang_defaults_to_it():
    for overrides in (["weights.pause_mode=abort"], ["weights.pause_mode=abort", "estimator=mc_rkl"],
                      ["rollout=sglang", "estimator=forward_kl"]):
        assert problems(compose_config(overrides)) == [], overrides
    assert weight_sync_config(compose_config(["rollout=sglang"])).pause_mode == "abort"
    assert weight_sync_config(compose_config(["rollout=sglang", "weights.pause_mode=retract"])).pause_mode == "retract"


# ---- a real engine process, aborted by a real weight update -------------------------------------------------------

class Recording(SGLangClient):
    """An SGLangClient that keeps every request it sent (inputs, max_new_tokens, seed) and the Rollouts it got."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sent: list[tuple[list[list[int]], int, object, list[Rollout]]] = []

    def generate(self, prompts, *, max_new_tokens: int, seed=None, **kw) -> list[Rollout]:
        out = super().generate(prompts, max_new_tokens=max_new_tokens, seed=seed, **kw)
        self.sent.append(([list(map(int, p)) for p in prompts], max_new_tokens, seed, out))
        return out


def perturbed(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return base


N = 400  # tokens per sample: eos lies outside the vocabulary, so every sample runs to its budget
PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
CONFIG = dict(eos_token_id=VOCAB, max_position_embeddings=512)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("partial") / "a", seed=0, **CONFIG)


@pytest.mark.e2e
def test_an_abort_mode_update_mid_generation_is_resumed_under_the_new_weights(engine_dir):
    engine = start_engine_process(engine_dir, threads=TEST_THREADS, group_timeout_s=60)
    client = Recording(engine.url, timeout_s=120)
    source = ModuleWeightSource(tiny_model(0, **CONFIG))
    sync = WeightSync(WeightSyncConfig(pause_mode="abort", timeout_s=60), source, [client])
    dispatcher = Dispatcher([client], cap=1)
    kw = dict(max_new_tokens=N, temperature=1.0, top_p=1.0, mc_samples=2, student_top_k=3)
    try:
        sync.init_group()
        models = {0: tiny_model(0, **CONFIG)}
        for version in range(1, 6):  # a batch that finished before the pause landed is simply drawn again
            client.sent.clear()
            box: dict = {}
            th = threading.Thread(target=lambda b=box, v=version: b.setdefault(
                "out", dispatcher.generate(PROMPTS, seed=v, **kw)), daemon=True)
            steps0 = client.server_info(refresh=True)["stats"]["forward_steps"]
            th.start()
            while client.server_info(refresh=True)["stats"]["forward_steps"] < steps0 + 3 and th.is_alive():
                time.sleep(0.002)
            source.module = models[version] = perturbed(tiny_model(0, **CONFIG), version)
            sync.sync(version)
            th.join(120)
            out = box["out"]
            if any(r.pieces > 1 for r in out):
                break
        else:
            pytest.fail("no weight update landed mid-generation in 5 tries")
    finally:
        sync.close()
        engine.stop()
        source.close()

    # the cut request, then one resume request for all of it (one batch: every row was cut at the same step)
    (inputs, budget, seeds, cut), (resumed_inputs, left, resumed_seeds, tail) = client.sent
    assert inputs == PROMPTS and budget == N and seeds == [sample_seed(version, i) for i in range(4)]
    k = cut[0].num_tokens
    assert all(r.finish_reason == "abort" and r.num_tokens == k for r in cut) and 0 < k < N
    assert left == N - k and resumed_seeds == [resume_seed(s, k) for s in seeds]
    assert resumed_inputs == [p + r.response_ids.tolist() for p, r in zip(PROMPTS, cut, strict=True)]
    for p, r, a, b in zip(PROMPTS, out, cut, tail, strict=True):
        assert r.finish_reason == "length" and r.num_tokens == N and r.pieces == 2 and r.prompt_ids.tolist() == p
        for name in Rollout.PER_POSITION:  # every per-position field: the cut piece's, then the resumed one's
            np.testing.assert_array_equal(getattr(r, name), np.concatenate([getattr(a, name), getattr(b, name)]),
                                          err_msg=name)
        assert r.token_versions.tolist() == [version - 1] * k + [version] * (N - k)
        assert r.oldest_version == version - 1 and r.version_end == version
        # each token's behaviour logprob is that of the weights that produced it, on prompt + every token before:
        # the old weights up to the cut, the new ones after it, over the resumed prompt + partial output
        ids = p + r.response_ids.tolist()
        for model, span in ((models[version - 1], range(k)), (models[version], range(k, N))):
            ref = full_logprobs(model, ids)
            want = np.array([ref[len(p) - 1 + t, ids[len(p) + t]].item() for t in span])
            np.testing.assert_allclose(r.logprobs[span.start:span.stop], want, atol=logprob_tol(model, len(ids)))
    scores = [TeacherScores(np.zeros((N, 1), np.int32), np.zeros((N, 1), np.float32), np.zeros(N, np.float32))] * 4
    batch = collate(list(zip(out, scores, strict=True)), pad_id=0)  # nothing aborted reaches the learner
    assert batch.versions == [version - 1] * 4 and [v.tolist() for v in batch.token_versions] == [
        r.token_versions.tolist() for r in out]
    with pytest.raises(AbortedRollout):  # as the cut pieces would have, unresumed
        collate(list(zip(cut, scores, strict=True)), pad_id=0)
