"""Supervised fine-tuning on prompt + chain-of-thought response (loss on the response and its eos only)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from asyncopd.data.task import Problem, TrainStream

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode_sequences(problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase
                     ) -> list[tuple[list[int], int]]:
    """(prompt + response + eos ids, prompt length) per problem (one batched tokenizer call per side)."""
    if not problems:
        return []
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    responses = tokenizer([p.response for p in problems], add_special_tokens=False)["input_ids"]
    return [(q + r + [tokenizer.eos_token_id], len(q)) for q, r in zip(prompts, responses, strict=True)]


def pad_batch(seqs: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` [B, L] (L = longest sequence given) and ``labels`` [B, L].

    labels[b, t] is the token the model must predict at position t (i.e. input t+1), or -100 where no loss
    applies (prompt positions, the last prompt position excepted, and padding).
    """
    length = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for b, (s, st) in enumerate(seqs):
        t = torch.as_tensor(s, dtype=torch.long)
        ids[b, : len(s)] = t
        labels[b, st - 1: len(s) - 1] = t[st:]
    return ids, labels


def encode_batch(problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """One right-padded batch (see ``pad_batch``)."""
    return pad_batch(encode_sequences(problems, tokenizer), tokenizer.pad_token_id)


def length_buckets(lengths: Sequence[int], max_buckets: int) -> list[list[int]]:
    """Split indices into <= ``max_buckets`` groups of similar length, minimising padded tokens.

    Sorts by length and picks the split points (exhaustively, for up to 3 groups) that minimise
    sum(group size * group max length): the batch's padded compute.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ls = [lengths[i] for i in order]
    n = len(ls)
    if max_buckets <= 1 or n < 4:
        return [order]
    best = (n * ls[-1], [n])
    for i in range(1, n):
        if ls[i] == ls[i - 1]:
            continue  # splitting between equal lengths never helps
        c2 = i * ls[i - 1] + (n - i) * ls[-1]
        if c2 < best[0]:
            best = (c2, [i, n])
        if max_buckets >= 3:
            for j in range(i + 1, n):
                if ls[j] == ls[j - 1]:
                    continue
                c3 = i * ls[i - 1] + (j - i) * ls[j - 1] + (n - j) * ls[-1]
                if c3 < best[0]:
                    best = (c3, [i, j, n])
    groups, start = [], 0
    for end in best[1]:
        groups.append(order[start:end])
        start = end
    return groups


def encode_bucketed(problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase, max_buckets: int = 3
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch as up to ``max_buckets`` right-padded micro-batches of similar length."""
    seqs = encode_sequences(problems, tokenizer)
    groups = length_buckets([len(s) for s, _ in seqs], max_buckets)
    return [pad_batch([seqs[i] for i in g], tokenizer.pad_token_id) for g in groups]


def sft_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
             ) -> torch.Tensor:
    # right padding + causal attention: pads sit after every real token, so no attention mask is needed
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                             reduction=reduction)


def cosine_lr(step: int, total: int, warmup: int, peak: float, final_frac: float = 0.0) -> float:
    """Linear warmup to ``peak`` then cosine decay to ``final_frac * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


@dataclass
class SFTResult:
    steps: int
    wall_s: float
    final_loss: float
    stream_position: int


def train_sft(model: torch.nn.Module, stream: TrainStream, tokenizer: PreTrainedTokenizerBase, *, steps: int,
              batch_size: int, lr: float, warmup_steps: int, weight_decay: float = 0.0,
              final_lr_frac: float = 0.0, grad_clip: float = 1.0, desc: str = "sft",
              progress: bool = True, max_buckets: int = 3,
              callback: Callable[[int, float], bool | None] | None = None) -> SFTResult:
    """AdamW + warmup/cosine for ``steps`` steps on fresh problems from ``stream``.

    ``callback(step, loss)`` runs after every step; returning True stops training there (early stopping).
    """
    from tqdm.auto import tqdm

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-8)
    t0 = time.perf_counter()
    ema = float("nan")
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0, dynamic_ncols=True)
    done = 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, warmup_steps, lr, final_lr_frac)
        micro = encode_bucketed(stream.take(batch_size), tokenizer, max_buckets)
        n_tok = sum(int((lab != -100).sum()) for _, lab in micro)
        opt.zero_grad(set_to_none=True)
        val = 0.0
        for ids, labels in micro:  # mean over every response token of the batch, one backward per bucket
            loss = sft_loss(model, ids, labels, reduction="sum") / n_tok
            loss.backward()
            val += float(loss.detach())
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        done = step + 1
        ema = val if math.isnan(ema) else 0.95 * ema + 0.05 * val
        if step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
        if callback is not None and callback(done, val):
            break
    bar.close()
    model.eval()
    return SFTResult(steps=done, wall_s=time.perf_counter() - t0, final_loss=ema,
                     stream_position=stream.position)
