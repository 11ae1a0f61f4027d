"""The Rollout contract: one sampled response and everything the learner needs to know about it."""

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Rollout:
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
