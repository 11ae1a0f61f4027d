"""The contracts every role speaks: what a rollout is, what the teacher returns, what the learner trains on.

They sit at the bottom of the package (numpy and torch only), so producers and consumers both import them
downward: rollout -> Rollout, teacher -> TeacherScores, learner <- LearnerBatch -> StepResult.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from asyncopd.core.errors import AbortedRollout


@dataclass
class Rollout:
    """One sampled response and everything the learner needs to know about it."""

    prompt_ids: np.ndarray  # int32 [P]
    response_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]: log pi_old(y_t) = log_softmax(logits / T) over the full vocabulary (SGLang's)
    version_start: int  # weight version of the first token (of the request, for an empty response)
    version_end: int  # weight version of the last token (differs if weights changed mid-response)
    finish_reason: str  # "stop" | "length" | "abort"
    mc_ids: np.ndarray | None = None  # int32 [T, M]: M i.i.d. draws from pi_old per position; col 0 = response
    mc_logprobs: np.ndarray | None = None  # float32 [T, M]: log pi_old of those draws (full vocabulary, as above)
    student_topk_ids: np.ndarray | None = None  # int32 [T, K]: student top-k support frozen at rollout time
    student_topk_logprobs: np.ndarray | None = None  # float32 [T, K]
    ticket: int = -1  # admission order; batch s of the learner is tickets [s*B, (s+1)*B)
    metadata: dict[str, Any] = field(default_factory=dict)  # task fields: answer, prompt text, ...
    # int64 [T]: the weight version that produced each token (SGLang's meta_info.weight_versions spans); None when
    # the server reported no spans, and then every token is charged version_start (the oldest it can be)
    token_versions: np.ndarray | None = None
    pieces: int = 1  # /generate answers it was joined from: > 1 when weight updates aborted it and it was resumed

    # every field indexed by response position [T, ...]: what joining the pieces of a resumed sample concatenates
    # (token_versions apart, which may be None per piece); a new per-position field belongs here
    PER_POSITION: ClassVar[tuple[str, ...]] = ("response_ids", "logprobs", "mc_ids", "mc_logprobs",
                                               "student_topk_ids", "student_topk_logprobs")

    @property
    def num_tokens(self) -> int:
        return int(self.response_ids.shape[0])

    def versions_per_token(self) -> np.ndarray:
        """int64 [T]: each token's weight version (version_start for all of them when no spans came)."""
        if self.token_versions is not None:
            return self.token_versions
        return np.full(self.num_tokens, self.version_start, dtype=np.int64)

    @property
    def oldest_version(self) -> int:
        """The version staleness is charged to: the oldest token's (version_start for a response with none)."""
        v = self.versions_per_token()
        return int(v.min()) if v.size else self.version_start


def join_pieces(pieces: Sequence[Rollout]) -> Rollout:
    """One Rollout from the pieces of a sample that weight updates aborted and the dispatcher resumed (piece k+1
    continued prompt + the tokens of pieces 0..k): every per-position field and the per-token versions
    concatenated, so each token keeps the logprobs and version of the weights that produced it; the prompt,
    metadata and ticket of the first piece, the finish reason and last version of the last one."""
    if len(pieces) == 1:
        return pieces[0]
    first, last = pieces[0], pieces[-1]
    joined: dict[str, Any] = {}
    for name in Rollout.PER_POSITION:
        parts = [getattr(p, name) for p in pieces]
        if any((x is None) != (parts[0] is None) for x in parts):
            raise ValueError(f"join_pieces: {name} is missing from some pieces of one sample")
        joined[name] = None if parts[0] is None else np.concatenate(parts)
    versions = np.concatenate([p.versions_per_token() for p in pieces]).astype(np.int64)
    return replace(first, **joined, token_versions=versions,
                   version_start=int(versions[0]) if versions.size else first.version_start,
                   version_end=last.version_end, finish_reason=last.finish_reason,
                   pieces=sum(p.pieces for p in pieces))


def require_finished(rollouts: Sequence[Rollout], consumer: str) -> None:
    """Refuse partial responses: one that ended in finish_reason=abort (a weight update cut it) must be resumed by
    the rollout dispatcher first, else the teacher scores and the learner trains on a truncated response."""
    aborted = [i for i, r in enumerate(rollouts) if r.finish_reason == "abort"]
    if aborted:
        raise AbortedRollout(f"{consumer} got {len(aborted)} response(s) that ended in finish_reason=abort (samples "
                             f"{aborted[:8]}): a weight update cut them and nothing resumed them (the rollout "
                             "dispatcher does: asyncopd.rollout.dispatch)")


@dataclass
class TeacherScores:
    """A finite teacher-score cache for every response position (compact arrays, never JSON tuples)."""

    topk_ids: np.ndarray  # int32 [T, K]: teacher's top-k token ids, descending logprob
    topk_logprobs: np.ndarray  # float32 [T, K]
    token_logprob: np.ndarray  # float32 [T]: teacher logprob of the sampled token
    query_logprobs: np.ndarray | None = None  # float32 [T, M]: teacher logprobs of the MC sample ids
    student_topk_logprobs: np.ndarray | None = None  # float32 [T, K_S]: teacher logprobs of the student's top-k

    @property
    def nbytes(self) -> int:
        arrays = (self.topk_ids, self.topk_logprobs, self.token_logprob, self.query_logprobs,
                  self.student_topk_logprobs)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class EstimatorBatch:
    """What every estimator sees: rollout fields and teacher scores as padded tensors [B, T, ...]."""

    mask: torch.Tensor  # bool [B, T]: real response positions
    response_ids: torch.Tensor  # long [B, T]: sampled tokens y_t
    old_logprobs: torch.Tensor  # float [B, T]: log pi_old(y_t) recorded at rollout time
    teacher_token_logprob: torch.Tensor  # float [B, T]: log p_T(y_t)
    teacher_topk_ids: torch.Tensor | None = None  # long [B, T, K]
    teacher_topk_logprobs: torch.Tensor | None = None  # float [B, T, K]
    mc_ids: torch.Tensor | None = None  # long [B, T, M]
    mc_old_logprobs: torch.Tensor | None = None  # float [B, T, M]: log pi_old of the MC draws
    teacher_mc_logprobs: torch.Tensor | None = None  # float [B, T, M]: log p_T of the MC draws
    student_topk_ids: torch.Tensor | None = None  # long [B, T, K]: student support frozen at rollout
    prox_logprobs: torch.Tensor | None = None  # float [B, T]: log pi_prox(y_t), decoupled PPO only
    # float [B, T, K_S]: log p_T of the student_topk_ids (the teacher scores them as query ids);
    # sparse_rkl with sparse_support=student only (Requirements.teacher_scores_student_topk).
    teacher_student_topk_logprobs: torch.Tensor | None = None
    # Tensor parallel: when set, the logits passed to the loss are this rank's vocabulary shard
    # (asyncopd.estimators.vocab_parallel.VocabShard); every id field stays global.
    vocab_shard: Any = None


@dataclass
class LearnerBatch:
    """A collated batch: the model inputs, the estimator fields, and each sample's policy version."""

    input_ids: torch.Tensor  # long [B, L]: prompt + response, right-padded
    attention_mask: torch.Tensor  # long [B, L]
    response_index: torch.Tensor  # long [B, T]: position whose logits predict response token t (P + t - 1)
    est: EstimatorBatch
    versions: list[int]  # every sample's oldest token version (Rollout.oldest_version): the staleness check
    token_versions: list[np.ndarray] = field(default_factory=list)  # every sample's per-token versions [T_i]


@dataclass
class StepResult:
    """What one optimizer step reports: scalar metrics and how stale its samples were (lag -> count)."""

    version: int  # the weight version this step produced
    metrics: dict[str, float]
    staleness: dict[int, int]  # by sample: lag of its oldest token -> samples
    token_staleness: dict[int, int] = field(default_factory=dict)  # by token: lag -> tokens
