"""Teacher health from content: real /score servers whose weights are zeroed (uniform), NaN, or blind to their
input are refused, naming the replica; healthy teachers, random-init ones included, never are."""

import math

import numpy as np
import pytest
import torch

from asyncopd.config.schema import ModelSpec
from asyncopd.core.errors import TeacherDegenerate
from asyncopd.core.types import TeacherScores
from asyncopd.model.build import build_model
from asyncopd.model.scorer import score_sequences
from asyncopd.teacher.client import TeacherClient
from asyncopd.teacher.health import MIN_POSITIONS, UNIFORM_TOL, degenerate
from asyncopd.teacher.server import TeacherServer
from tests._serving_fixtures import VOCAB, tiny_model
from tests.conftest import TINY_STUDENT, TINY_TEACHER
from tests.test_teacher_http import _random_rollouts


def _served(model):
    return TeacherServer(model).start()


def _zeroed(model):
    """A teacher whose weights never arrived: every parameter 0, so every logit is 0 (miles issue 1958)."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _blind():
    """An embedding lost (zeros) while the rest loaded: every position sees the same hidden state, a constant
    distribution that is not uniform (the value bias carries it to the logits, an untied output head maps it)."""
    model = tiny_model(5, tie_word_embeddings=False)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.layers[0].self_attn.v_proj.bias.normal_(0.0, 1.0)
    return model


def _nan():
    model = tiny_model(6)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    return model


@pytest.mark.parametrize("broken, wire_dtype, vocab_size, match", [
    (lambda: _zeroed(tiny_model(3)), "float32", VOCAB, "uniform: the top-1 logprob is -log V"),
    (lambda: _zeroed(tiny_model(3)), "float16", VOCAB, "uniform"),  # fp16 rounding of -log V stays inside the tol
    (lambda: _zeroed(tiny_model(3)), "float32", None, "input-independent"),  # no V: still caught as constant
    (_blind, "float32", VOCAB, "input-independent: the same top-4"),
    (_nan, "float32", VOCAB, "NaN/inf logprobs"),
])
def test_a_broken_teacher_server_is_refused_naming_the_replica(broken, wire_dtype, vocab_size, match):
    healthy, bad = _served(tiny_model(3)), _served(broken())
    try:
        client = TeacherClient([healthy.url, bad.url], wire_dtype=wire_dtype, vocab_size=vocab_size)
        with pytest.raises(TeacherDegenerate, match=match) as e:
            client.score(_random_rollouts(12, seed=7, max_resp=9), top_k=4)
        assert bad.url in str(e.value) and healthy.url not in str(e.value)  # the broken replica of the two
        assert "check_scores=false" in str(e.value)
        # the healthy replica alone passes; the check is what stops the broken one
        assert len(TeacherClient([healthy.url], vocab_size=vocab_size).score(_random_rollouts(12, seed=7), 4)) == 12
        unchecked = TeacherClient([bad.url], wire_dtype=wire_dtype, vocab_size=vocab_size, check_scores=False)
        assert len(unchecked.score(_random_rollouts(12, seed=7), top_k=4)) == 12
    finally:
        healthy.stop()
        bad.stop()


def test_a_uniform_teacher_is_caught_from_the_sampled_tokens_alone():
    """Sampled-token estimators ask no top-k: the sampled tokens' logprobs, all -log V, give it away."""
    server = _served(_zeroed(tiny_model(3)))
    try:
        with pytest.raises(TeacherDegenerate, match="uniform: the sampled-token logprob"):
            TeacherClient([server.url], vocab_size=VOCAB).score(_random_rollouts(6, seed=8), top_k=0)
    finally:
        server.stop()


@pytest.mark.parametrize("spec", [TINY_TEACHER, TINY_STUDENT, ModelSpec()])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_init_teachers_are_healthy(spec, seed):
    """Hugging Face's init (std 0.02) on the tests' tiny shapes is the most uniform a served model gets: each
    best logprob stands >= 0.1 nats above -log V (tests/conftest's teachers and students, the default spec)."""
    model = build_model(spec, VOCAB, seed).eval()
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, VOCAB, size=int(rng.integers(6, 40))).tolist() for _ in range(16)]
    res = score_sequences(model, seqs, [3] * len(seqs), 8)
    off = res.offsets
    for k in (8, 1, 0):
        scores = [TeacherScores(res.topk_ids[a:b, :k], res.topk_logprobs[a:b, :k], res.token_logprob[a:b])
                  for a, b in zip(off[:-1], off[1:], strict=True)]
        assert degenerate(scores, VOCAB) is None, k
    gap = res.topk_logprobs[:, 0] + math.log(VOCAB)
    assert gap.min() > 5 * UNIFORM_TOL  # the margin the threshold leaves: measured, not assumed


def _scores(top: np.ndarray, ids: np.ndarray | None = None, tok: np.ndarray | None = None) -> TeacherScores:
    ids = np.tile(np.arange(top.shape[1], dtype=np.int32), (top.shape[0], 1)) if ids is None else ids
    return TeacherScores(ids, top.astype(np.float32), (top[:, 0] if tok is None else tok).astype(np.float32))


def test_thresholds_at_their_edges():
    v = 1000
    flat = np.full((MIN_POSITIONS, 4), -math.log(v))
    two = [_scores(flat[: MIN_POSITIONS // 2]), _scores(flat[MIN_POSITIONS // 2:])]
    assert "uniform" in degenerate(two, v)
    # float16's rounding of -log V (to the nearest step of 2**-8 between 4 and 8) is inside the tolerance
    assert "uniform" in degenerate([_scores(flat.astype(np.float16).astype(np.float32))], v)
    # one position 2 x UNIFORM_TOL above a uniform share is a distribution with a preference: not uniform
    peaked = flat.copy()
    peaked[3, 0] += 2 * UNIFORM_TOL
    assert degenerate([_scores(peaked)], v) is None
    # too little evidence for "every position"
    assert degenerate([_scores(flat[: MIN_POSITIONS - 1])], v) is None
    # one NaN or inf anywhere, even in few positions or in the query scores, is enough
    bad = _scores(np.full((1, 4), -1.0))
    bad.query_logprobs = np.array([[0.0, np.inf]], np.float32)
    assert "1 NaN/inf" in degenerate([bad], v)
    # a constant answer at one rollout's positions may be a repeated token; two rollouts' make it input-independent
    const = np.tile([-0.1, -3.0, -4.0], (MIN_POSITIONS, 1))
    assert degenerate([_scores(const)], v) is None
    assert "input-independent" in degenerate([_scores(const[:4]), _scores(const[4:])], v)
    varied = const.copy()
    varied[-1, 2] -= 2 * UNIFORM_TOL
    assert degenerate([_scores(varied[:4]), _scores(varied[4:])], v) is None
