"""Greedy test accuracy: generate with temperature 0 in batches, then decode + verify.

``score_responses`` is the scoring half on its own, so the pipeline can score outputs that came back from
the HTTP rollout engine (or SGLang) the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from asyncopd.data.task import Problem, verify
from asyncopd.data.tokenizer import CharTokenizer

GenerateFn = Callable[[list[list[int]]], list[list[int]]]  # prompt ids -> output ids (greedy)


def score_responses(problems: Sequence[Problem], output_ids_list: Sequence[Sequence[int]],
                    tokenizer: CharTokenizer) -> float:
    """Fraction of problems whose decoded output passes the exact-match verifier (special tokens dropped)."""
    if len(problems) != len(output_ids_list):
        raise ValueError(f"score_responses: {len(problems)} problems but {len(output_ids_list)} outputs")
    if not problems:
        return 0.0
    ok = sum(verify(p, tokenizer.decode(ids)) for p, ids in zip(problems, output_ids_list, strict=True))
    return ok / len(problems)


def greedy_generate_fn(model: torch.nn.Module, tokenizer: CharTokenizer, max_new_tokens: int) -> GenerateFn:
    from asyncopd.model.sampler import KVCacheSampler

    sampler = KVCacheSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def fn(prompts: list[list[int]]) -> list[list[int]]:
        outs = sampler.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        return [o.output_ids for o in outs]

    return fn


def greedy_accuracy(model_or_fn: torch.nn.Module | GenerateFn, problems: Sequence[Problem],
                    tokenizer: CharTokenizer, *, batch_size: int = 250, max_new_tokens: int = 48) -> float:
    """Greedy exact-match accuracy over ``problems``.

    ``model_or_fn`` is a Hugging Face causal LM (decoded with the KV-cache sampler at temperature 0) or a
    function mapping a batch of prompt ids to greedy output ids (e.g. the HTTP engine client).
    """
    if isinstance(model_or_fn, torch.nn.Module):
        fn = greedy_generate_fn(model_or_fn, tokenizer, max_new_tokens)
    else:
        fn = model_or_fn
    outputs: list[list[int]] = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        outputs.extend(fn([tokenizer.encode(p.prompt) for p in chunk]))
    return score_responses(problems, outputs, tokenizer)
