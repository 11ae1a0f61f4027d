"""Teacher health from what it returns, not from `/health`: a server that lost its weights still answers 200.

miles issue 1958: an SGLang teacher without its weights scored 44 rollouts at logprob -log V for every token, and
the learner trained on that. `check_scores` looks at one replica's answer to one request (all its scored positions)
and raises TeacherDegenerate, naming the replica, when it is something no trained model returns:

- non-finite: a NaN or an inf anywhere. One is enough: every estimator sums exp() and differences of these over
  the batch, so one poisons the step's loss and gradient.
- uniform: at every position the best logprob (top-1; the sampled token's when no top-k was asked for) is
  -log V within UNIFORM_TOL, V the ids the teacher's distributions span.
- input-independent: the same top-k ids and logprobs (within UNIFORM_TOL) at every position of two or more
  rollouts: the teacher does not see its input (an embedding loaded as zeros gives every position one hidden
  state; it also catches a uniform answer over more ids than V, e.g. padded embedding rows).

Thresholds (why a healthy teacher, even a randomly initialised test model, never trips them):

- UNIFORM_TOL = 0.01 nats. The top-1 logprob is >= -log V (the largest of V probabilities is >= 1/V) and its
  gap top1 + log V = log(V p_max) >= KL(p || uniform) = log V - H(p). A trained LM has a few nats of entropy per
  position against log V ~ 10.4-11.9 (32k-150k vocabularies), so its gap is several nats. A randomly initialised
  model (Hugging Face init, std 0.02) has logits spread ~0.02 sqrt(hidden) around their mean, so its best logit
  stands ~0.1 nats or more above a uniform share: the 32- and 48-wide random models of the tests (V = 19)
  measured a gap >= 0.11 at every one of 1,200 positions (3 seeds each). An exactly uniform answer misses -log V
  by rounding only: ~1e-7 in float32, at most half a float16 step (2**-8 for |log V| < 16) over a float16 wire.
  0.01 sits above the second and ~10x below the first.
- MIN_POSITIONS = 8: the uniform and input-independent tests judge "every position" only with this much evidence.
  Without top-k the uniform test reads the sampled tokens' logprobs, which a healthy teacher puts within 0.01 of
  -log V by chance (a few percent of positions for the random test models); eight in a row is below 1e-9.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from asyncopd.core.errors import TeacherDegenerate
from asyncopd.core.types import TeacherScores

UNIFORM_TOL = 0.01
MIN_POSITIONS = 8
_LOGPROBS = ("topk_logprobs", "token_logprob", "query_logprobs", "student_topk_logprobs")


def degenerate(scores: Sequence[TeacherScores], vocab_size: int | None) -> str | None:
    """What makes these scores (one answer of one replica) no trained teacher's, or None if nothing does.

    `vocab_size`: the ids the teacher's distributions span (None: the uniform test is skipped; the
    input-independent test still sees a uniform answer)."""
    scored = [s for s in scores if s.token_logprob.shape[0]]
    if not scored:
        return None
    bad = sum(int(np.size(a) - np.isfinite(a).sum()) for s in scored for name in _LOGPROBS
              if (a := getattr(s, name)) is not None)
    positions = sum(s.token_logprob.shape[0] for s in scored)
    if bad:
        return f"{bad} NaN/inf logprobs over {positions} scored positions"
    if positions < MIN_POSITIONS:
        return None
    top = np.concatenate([s.topk_logprobs for s in scored])
    k = top.shape[1]
    best = top[:, 0] if k else np.concatenate([s.token_logprob for s in scored])
    if vocab_size and np.all(np.abs(best + math.log(vocab_size)) <= UNIFORM_TOL):
        which = "top-1" if k else "sampled-token"
        return (f"uniform: the {which} logprob is -log V = {-math.log(vocab_size):.4f} (V = {vocab_size} ids) within "
                f"{UNIFORM_TOL} at all {positions} scored positions, as from a model without its weights")
    if k and len(scored) > 1:
        ids = np.concatenate([s.topk_ids for s in scored])
        if np.all(ids == ids[0]) and np.all(np.ptp(top, axis=0) <= UNIFORM_TOL):
            return (f"input-independent: the same top-{k} (ids {ids[0].tolist()}, logprobs within {UNIFORM_TOL}) at "
                    f"all {positions} scored positions of {len(scored)} rollouts, as from a model that does not see "
                    "its input")
    return None


def check_scores(scores: Sequence[TeacherScores], vocab_size: int | None, source: str) -> None:
    """Raise TeacherDegenerate naming `source` (the replica) when `degenerate` finds something."""
    why = degenerate(scores, vocab_size)
    if why:
        raise TeacherDegenerate(
            f"{source} returned degenerate scores ({why}); the run stopped before training on them. Check that "
            "teacher's checkpoint and server (weights lost or never loaded?); if this teacher really answers so, "
            "set check_scores=false on it (teacher.check_scores or teachers.<name>.check_scores)")
