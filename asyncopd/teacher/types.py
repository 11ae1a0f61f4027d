"""The TeacherScores contract: a finite teacher-score cache for every response position."""

from dataclasses import dataclass

import numpy as np


@dataclass
class TeacherScores:
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
