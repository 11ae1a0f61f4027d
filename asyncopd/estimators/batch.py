"""What every estimator sees: rollout fields and teacher scores as padded tensors [B, T, ...]."""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EstimatorBatch:
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
