"""The contracts every role speaks: what a rollout is, what the teacher returns, what the learner trains on.

They sit at the bottom of the package (numpy and torch only), so producers and consumers both import them
downward: rollout -> Rollout, teacher -> TeacherScores, learner <- LearnerBatch -> StepResult.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Rollout:
    """One sampled response and everything the learner needs to know about it."""

    prompt_ids: np.ndarray  # int32 [P]
    response_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]: log pi_old(y_t) under the sampling distribution
    version_start: int  # weight version of the first decode step (the one staleness is charged to)
    version_end: int  # weight version of the last decode step (differs if weights changed mid-response)
    finish_reason: str  # "stop" | "length" | "abort"
    mc_ids: np.ndarray | None = None  # int32 [T, M]: M i.i.d. draws from pi_old per position; col 0 = response
    mc_logprobs: np.ndarray | None = None  # float32 [T, M]: log pi_old of those draws
    student_topk_ids: np.ndarray | None = None  # int32 [T, K]: student top-k support frozen at rollout time
    student_topk_logprobs: np.ndarray | None = None  # float32 [T, K]
    ticket: int = -1  # admission order; batch s of the learner is tickets [s*B, (s+1)*B)
    metadata: dict[str, Any] = field(default_factory=dict)  # task fields: answer, prompt text, ...

    @property
    def num_tokens(self) -> int:
        return int(self.response_ids.shape[0])


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
    versions: list[int]  # version_start of every sample, for the staleness check


@dataclass
class StepResult:
    """What one optimizer step reports: scalar metrics and how stale its samples were (lag -> count)."""

    version: int  # the weight version this step produced
    metrics: dict[str, float]
    staleness: dict[int, int]
