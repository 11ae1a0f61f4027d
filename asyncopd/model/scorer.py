"""Prefill-only teacher scoring: one batched forward over prompt + response, per-position scores.

For sequence i with ids x[0..L) and score start s (the prompt length), response position t covers
token x[s + t] and is predicted by the logits at index s + t - 1. For every such position we return
the teacher's top-k (ids, logprobs; descending), the logprob of the actual token, and optionally
the logprobs of M query ids per position (the student's Monte Carlo samples).

Every distribution is over the first `vocab_size` ids only (the tokenizer's): rows a checkpoint pads its
embedding with are sliced off the logits before the log-softmax. Slicing, not masking to -inf, because it is
exact (a -inf row adds an exact 0 to the softmax sum, so both give the same distribution) and cheaper: the
log-softmax and top-k run over fewer columns and nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from asyncopd.config.schema import TeacherConfig


@dataclass
class ScoreResult:
    """Flat over all scored positions of all sequences; `offsets[i]:offsets[i+1]` is sequence i."""

    topk_ids: np.ndarray  # int32 [sumT, K]
    topk_logprobs: np.ndarray  # float32 [sumT, K]
    token_logprob: np.ndarray  # float32 [sumT]
    query_logprobs: np.ndarray | None  # float32 [sumT, M]
    offsets: np.ndarray  # int64 [N + 1]


def token_vocab(model, vocab_size: int | None) -> int:
    """Ids to score, sample or train on: the tokenizer's `vocab_size` (None: every embedding row), at most the rows.

    `model`: a Hugging Face model or its config (the megatron learner holds only the config)."""
    rows = int(getattr(model, "config", model).vocab_size)
    return rows if vocab_size is None else min(int(vocab_size), rows)


def _split_model(model):
    """(decoder returning hidden states, output head) of a Hugging Face causal LM."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings()
    if base is None or head is None:
        raise TypeError(f"{type(model).__name__}: need a causal LM with a base model and an output head")
    return base, head


@torch.no_grad()
def score_sequences(model, sequences: Sequence[Sequence[int] | np.ndarray], score_starts: Sequence[int],
                    top_k: int, query_ids: np.ndarray | None = None, *, temperature: float = 1.0,
                    vocab_size: int | None = None, max_tokens_per_forward: int = TeacherConfig.max_tokens_per_forward,
                    positions_per_chunk: int = 4096) -> ScoreResult:
    """Score `sequences` (ids) from `score_starts[i]` on. `query_ids` is int [sumT, M] or None.

    `vocab_size`: the tokenizer's id count (padded embedding rows past it are never scored); None = every row.
    Scored tokens and query ids must be below it.

    Sequences are right-padded into micro-batches of at most `max_tokens_per_forward` padded tokens;
    the output head and log-softmax run on the scored positions only, `positions_per_chunk` at a time.
    """
    n = len(sequences)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    starts = np.asarray(score_starts, dtype=np.int64).reshape(-1)
    if starts.shape[0] != n:
        raise ValueError(f"score_starts has {starts.shape[0]} entries for {n} sequences")
    if n and (np.any(starts < 1) or np.any(starts > lengths)):
        raise ValueError("every score start must be in [1, len(sequence)] (at least one prompt token)")
    counts = lengths - starts
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    m = 0 if query_ids is None else int(query_ids.shape[1])
    if query_ids is not None and query_ids.shape[0] != total:
        raise ValueError(f"query_ids has {query_ids.shape[0]} rows for {total} scored positions")

    base, head = _split_model(model)
    param = next(model.parameters())
    device = param.device
    vocab = token_vocab(model, vocab_size)
    k = min(int(top_k), vocab)
    topk_ids = np.zeros((total, k), dtype=np.int32)
    topk_lp = np.zeros((total, k), dtype=np.float32)
    tok_lp = np.zeros(total, dtype=np.float32)
    q_lp = np.zeros((total, m), dtype=np.float32) if query_ids is not None else None
    q_all = torch.as_tensor(np.asarray(query_ids), dtype=torch.long) if query_ids is not None else None

    # Micro-batches of consecutive sequences (the output stays in input order).
    i = 0
    while i < n:
        j, width = i, 0
        while j < n and (j == i or max(width, lengths[j]) * (j - i + 1) <= max_tokens_per_forward):
            width = max(width, int(lengths[j]))
            j += 1
        rows = range(i, j)
        if int(offsets[j] - offsets[i]) > 0:
            ids = torch.zeros((j - i, width), dtype=torch.long)
            mask = torch.zeros((j - i, width), dtype=torch.long)
            for r, q in enumerate(rows):
                ids[r, : lengths[q]] = torch.as_tensor(np.asarray(sequences[q], dtype=np.int64))
                mask[r, : lengths[q]] = 1
            hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
            # (row, position of the predicting logits, target token) for each scored position, in order.
            b_idx = torch.cat([torch.full((int(counts[q]),), r, dtype=torch.long) for r, q in enumerate(rows)])
            p_idx = torch.cat([torch.arange(starts[q] - 1, lengths[q] - 1, dtype=torch.long) for q in rows])
            targets = ids[b_idx, p_idx + 1]
            base_off = int(offsets[i])
            for c0 in range(0, b_idx.shape[0], positions_per_chunk):
                c1 = min(c0 + positions_per_chunk, b_idx.shape[0])
                h = hidden[b_idx[c0:c1].to(device), p_idx[c0:c1].to(device)]
                logits = head(h)[:, :vocab].float()
                if temperature != 1.0:
                    logits = logits / temperature
                lp = torch.log_softmax(logits, dim=-1)
                sl = slice(base_off + c0, base_off + c1)
                if k > 0:
                    v, ix = torch.topk(lp, k, dim=-1, sorted=True)
                    topk_lp[sl] = v.cpu().numpy()
                    topk_ids[sl] = ix.to(torch.int32).cpu().numpy()
                tok_lp[sl] = lp.gather(1, targets[c0:c1].to(device).unsqueeze(1)).squeeze(1).cpu().numpy()
                if q_all is not None and m > 0:
                    q_lp[sl] = lp.gather(1, q_all[sl].to(device)).cpu().numpy()
        i = j
    return ScoreResult(topk_ids, topk_lp, tok_lp, q_lp, offsets)
