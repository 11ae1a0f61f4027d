"""Turn (Rollout, TeacherScores) pairs into padded learner tensors, and pick logits at response positions."""

import dataclasses

import numpy as np
import torch

from asyncopd.core.types import EstimatorBatch, LearnerBatch, Rollout, TeacherScores, require_finished


def _pad(
    arrays: list[np.ndarray | None], length: int, fill: float, dtype: torch.dtype
) -> torch.Tensor | None:
    if arrays[0] is None:
        return None
    trailing = arrays[0].shape[1:]
    out = torch.full((len(arrays), length, *trailing), fill, dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    return out


def collate(pairs: list[tuple[Rollout, TeacherScores]], pad_id: int) -> LearnerBatch:
    rollouts = [r for r, _ in pairs]
    require_finished(rollouts, "the learner")  # a truncated response would teach the student to stop mid-answer
    scores = [s for _, s in pairs]
    T = max(max(r.num_tokens for r in rollouts), 1)
    L = max(len(r.prompt_ids) + r.num_tokens for r in rollouts)
    input_ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), L), dtype=torch.long)
    response_index = torch.zeros((len(pairs), T), dtype=torch.long)
    for i, r in enumerate(rollouts):
        seq = np.concatenate([r.prompt_ids, r.response_ids])
        input_ids[i, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        attention_mask[i, : len(seq)] = 1
        P = len(r.prompt_ids)
        response_index[i] = torch.clamp(torch.arange(T) + P - 1, max=L - 1)
    mask = _pad([np.ones(r.num_tokens, dtype=bool) for r in rollouts], T, False, torch.bool)
    est = EstimatorBatch(
        mask=mask,
        response_ids=_pad([r.response_ids for r in rollouts], T, pad_id, torch.long),
        old_logprobs=_pad([r.logprobs for r in rollouts], T, 0.0, torch.float32),
        teacher_token_logprob=_pad([s.token_logprob for s in scores], T, 0.0, torch.float32),
        teacher_topk_ids=_pad([s.topk_ids for s in scores], T, 0, torch.long),
        teacher_topk_logprobs=_pad([s.topk_logprobs for s in scores], T, 0.0, torch.float32),
        mc_ids=_pad([r.mc_ids for r in rollouts], T, 0, torch.long),
        mc_old_logprobs=_pad([r.mc_logprobs for r in rollouts], T, 0.0, torch.float32),
        teacher_mc_logprobs=_pad([s.query_logprobs for s in scores], T, 0.0, torch.float32),
        student_topk_ids=_pad([r.student_topk_ids for r in rollouts], T, 0, torch.long),
        teacher_student_topk_logprobs=_pad([s.student_topk_logprobs for s in scores], T, 0.0, torch.float32),
    )
    return LearnerBatch(input_ids, attention_mask, response_index, est, [r.oldest_version for r in rollouts],
                        [r.versions_per_token() for r in rollouts])


def response_logits(logits: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits over the whole sequence -> [B, T, V] logits that predict each response token."""
    index = response_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, index)


def micro_batches(batch: LearnerBatch, size: int, start: int = 0, stop: int | None = None,
                  trim: bool = True) -> list[LearnerBatch]:
    """Samples [start, stop) of `batch` in micro-batches of `size` samples (0: one), each trimmed to its own
    longest sequence and response (trim=False: all keep the batch's shape), so a micro-batch of short samples
    pays for no other's padding."""
    stop = batch.input_ids.shape[0] if stop is None else stop
    size = size if size > 0 else max(stop - start, 1)
    return [_rows(batch, a, min(a + size, stop), trim) for a in range(start, stop, size)]


def _rows(batch: LearnerBatch, a: int, b: int, trim: bool) -> LearnerBatch:
    L = max(int(batch.attention_mask[a:b].sum(dim=1).max()), 1) if trim else batch.input_ids.shape[1]
    T = max(int(batch.est.mask[a:b].sum(dim=1).max()), 1) if trim else batch.est.mask.shape[1]
    est = dataclasses.replace(batch.est, **{
        f.name: v[a:b, :T] for f in dataclasses.fields(batch.est)
        if isinstance(v := getattr(batch.est, f.name), torch.Tensor)})
    return LearnerBatch(batch.input_ids[a:b, :L], batch.attention_mask[a:b, :L],
                        batch.response_index[a:b, :T].clamp(max=L - 1), est, batch.versions[a:b],
                        batch.token_versions[a:b])


def merge_metrics(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Token-weighted mean of per-micro-batch metrics [(metrics, real tokens)]: the whole batch's token means."""
    total = sum(n for _, n in parts)
    if not parts:
        return {}
    return {k: sum(m[k] * n for m, n in parts) / total if total else parts[0][0][k] for k in parts[0][0]}
