"""Greedy test accuracy: generate with temperature 0 in batches, then decode + verify.

``score_responses`` is the scoring half on its own, so the pipeline can score outputs that came back from
the HTTP rollout engine (or SGLang) the same way. ``greedy_eval`` adds, for a local model, the decision
margins that bound how far the accuracy can move on a machine that rounds floats differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from asyncopd.config.schema import PrepareConfig, RolloutConfig
from asyncopd.data.task import Problem, verify

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GenerateFn = Callable[[list[list[int]]], list[list[int]]]  # prompt ids -> output ids (greedy)

# A greedy decode can come out differently on another CPU only where the top two logits are closer than that
# CPU's float32 rounding can move them. For these models (hidden <= 448, <= 4 layers) a logit is built from
# sums of a few hundred products of magnitude < 10; reordering a float32 sum of K terms moves it by at most
# ~K * 6e-8 * sum|terms|, ~1e-3 over the whole forward in the worst case. A gap under TIE_DELTA (10x that)
# counts as a near tie.
TIE_DELTA = 1e-2


def score_responses(problems: Sequence[Problem], output_ids_list: Sequence[Sequence[int]],
                    tokenizer: PreTrainedTokenizerBase) -> float:
    """Fraction of problems whose decoded output passes the exact-match verifier (special tokens dropped)."""
    if len(problems) != len(output_ids_list):
        raise ValueError(f"score_responses: {len(problems)} problems but {len(output_ids_list)} outputs")
    if not problems:
        return 0.0
    texts = tokenizer.batch_decode([list(ids) for ids in output_ids_list], skip_special_tokens=True)
    ok = sum(verify(p, text) for p, text in zip(problems, texts, strict=True))
    return ok / len(problems)


@dataclass
class GreedyEval:
    """Greedy accuracy plus, per problem, the smallest top-1 minus top-2 logit gap along its greedy path."""

    accuracy: float
    min_margin: np.ndarray  # float64 [N]

    def near_ties(self, delta: float = TIE_DELTA) -> int:
        """Problems whose greedy output another machine's rounding could change. Each moves the accuracy
        by at most 1/N, so |accuracy elsewhere - accuracy here| <= near_ties / N."""
        return int((self.min_margin < delta).sum())


def greedy_eval(model: torch.nn.Module, problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase, *,
                batch_size: int = PrepareConfig.eval_batch_size,
                max_new_tokens: int = RolloutConfig.max_new_tokens) -> GreedyEval:
    """Greedy accuracy of a Hugging Face causal LM (KV-cache sampler, temperature 0) with its margins."""
    from asyncopd.model.sampler import KVCacheSampler

    sampler = KVCacheSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             vocab_size=len(tokenizer))  # padded embedding rows are never tokens
    outputs: list[list[int]] = []
    margins: list[float] = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = tokenizer([p.prompt for p in chunk], add_special_tokens=False)["input_ids"]
        for o in sampler.generate(prompts, max_new_tokens=max_new_tokens,
                                  temperature=0.0, top_logprobs_num=2):
            outputs.append(o.output_ids)
            # log-softmax keeps logit differences: the top-2 logprob gap is the logit gap
            gap = o.top_logprobs[:, 0].astype(np.float64) - o.top_logprobs[:, 1]
            margins.append(float(gap.min()) if len(gap) else float("inf"))
    return GreedyEval(score_responses(problems, outputs, tokenizer), np.asarray(margins, dtype=np.float64))


def greedy_accuracy(model_or_fn: torch.nn.Module | GenerateFn, problems: Sequence[Problem],
                    tokenizer: PreTrainedTokenizerBase, *, batch_size: int = PrepareConfig.eval_batch_size,
                    max_new_tokens: int = RolloutConfig.max_new_tokens) -> float:
    """Greedy exact-match accuracy over ``problems``.

    ``model_or_fn`` is a Hugging Face causal LM (see ``greedy_eval``) or a function mapping a batch of prompt
    ids to greedy output ids (e.g. the HTTP engine client).
    """
    if isinstance(model_or_fn, torch.nn.Module):
        return greedy_eval(model_or_fn, problems, tokenizer, batch_size=batch_size,
                           max_new_tokens=max_new_tokens).accuracy
    outputs: list[list[int]] = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        outputs.extend(model_or_fn(tokenizer([p.prompt for p in chunk], add_special_tokens=False)["input_ids"]))
    return score_responses(problems, outputs, tokenizer)
