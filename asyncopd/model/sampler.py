"""Batched KV-cache sampler for Hugging Face causal LMs (the embedded rollout engine's decode loop).

One prefill over the left-padded batch, then one forward per decode step for the whole batch, reusing a
``transformers.DynamicCache``. Finished rows keep riding along (feeding the pad id) until every row is done
or ``max_new_tokens`` is reached, but they contribute no more output. At this model size Python and
framework overhead per call dominates, so the loop does as little per step as possible: every per-token
record stays a tensor until the end and is converted to numpy once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import DynamicCache

from asyncopd.model.scorer import token_vocab

if TYPE_CHECKING:  # pragma: no cover
    import transformers


@dataclass
class GenerationOutput:
    output_ids: list[int]
    logprobs: np.ndarray  # float32 [T]: log prob of each output token under the reported distribution
    # "stop" (a stop/eos id, which IS included in output_ids, or a `finish_check` stop) | "length" | "abort"
    finish_reason: str
    version_start: Any  # value yielded by step_guard at the first step (0 if no guard; None if no step ran)
    version_end: Any  # value yielded by step_guard at the step that produced the last token
    top_ids: np.ndarray | None = None  # int32 [T, K] top-k ids of the reported distribution, descending
    top_logprobs: np.ndarray | None = None  # float32 [T, K]
    mc_ids: np.ndarray | None = None  # int32 [T, M]: M i.i.d. draws per position; column 0 == output token
    mc_logprobs: np.ndarray | None = None  # float32 [T, M]
    matched: str | None = None  # what `finish_check` matched (a stop string), when it ended the row
    versions: list = field(default_factory=list)  # [T]: step_guard's value at the forward behind each token


class GenerationAborted(Exception):
    """Raised by a step_guard to end a generation: the rows still running return what they have, "abort"."""


# finish_check(rows still running, every row's output ids so far) -> {row: (finish_reason, matched)}
FinishCheck = Callable[[list[int], list[list[int]]], dict[int, tuple[str, str | None]]]


@contextlib.contextmanager
def _no_guard():
    yield 0


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                      top_k: int = -1) -> torch.Tensor:
    """Log-probabilities of the sampling distribution for ``logits`` [..., V] (float32 out).

    temperature == 0 means greedy: the returned distribution is softmax(logits) (unfiltered), whose argmax
    is the greedy token. Otherwise softmax(logits / temperature) restricted to the top_k largest (top_k <= 0:
    all) and then to the smallest prefix whose probability reaches top_p (always at least one token),
    renormalised. Filtered-out tokens get -inf.
    """
    z = logits.float()
    if temperature <= 0:
        return torch.log_softmax(z, dim=-1)
    if temperature != 1.0:
        z = z / temperature
    vocab = z.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_z, dim=-1)
        # mass strictly before each token; drop a token once the mass before it already reaches top_p
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def _generators(seed: int | Sequence[int | None] | None, n: int, device: torch.device
                ) -> torch.Generator | list[torch.Generator | None] | None:
    """One stream for the batch (an int seed), one per row (a list), or torch's global one (None)."""
    if seed is None or isinstance(seed, (int, np.integer)):
        return None if seed is None else _generator(seed, device)
    if len(seed) != n:
        raise ValueError(f"seed: a list needs one entry per prompt ({n}), got {len(seed)}")
    return [None if s is None else _generator(s, device) for s in seed]


def _draw(probs: torch.Tensor, draws: int, gen: torch.Generator | list | None) -> torch.Tensor:
    """`draws` i.i.d. tokens per row of `probs` [n, V]. Unseeded: torch.multinomial. Seeded: by inverse CDF from
    uniforms of the batch's stream (an int seed) or of each row's own (a list), so a row drawn with seed s gets
    the tokens it gets alone with s; a zero-probability (filtered) token is never drawn. One uniform per draw and
    row: ~0.4 ms a step for 64 rows, where 64 per-row multinomials take ~2 ms."""
    if gen is None:
        return torch.multinomial(probs, draws, replacement=True)
    if isinstance(gen, list):
        u = torch.stack([torch.rand(draws, generator=g, device=probs.device) for g in gen])
    else:
        u = torch.rand(probs.shape[0], draws, generator=gen, device=probs.device)
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)


class KVCacheSampler:
    """Batched sampling with a KV cache; see the module docstring and ``generate``."""

    def __init__(self, model: transformers.PreTrainedModel, eos_token_id: int, pad_token_id: int,
                 vocab_size: int | None = None):
        """`vocab_size`: the tokenizer's id count; embedding rows past it (padding) are sliced off the logits, so
        they are never sampled and every reported distribution is over real tokens. None = every row."""
        self.model = model
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = token_vocab(model, vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop_token_ids: Sequence[int] = (),
        top_logprobs_num: int = 0,
        mc_samples: int = 0,
        seed: int | Sequence[int | None] | None = None,
        step_guard: Callable[[], ContextManager[Any]] | None = None,
        full_vocab_logprobs: bool = False,
        ignore_eos: bool = False,
        finish_check: FinishCheck | None = None,
    ) -> list[GenerationOutput]:
        """Continue every prompt; returns one GenerationOutput per prompt, in order.

        Stops a row at the first token in ``{eos_token_id} | stop_token_ids`` (included in the output, with
        finish_reason "stop"; ``ignore_eos`` turns both off) or after ``max_new_tokens`` tokens ("length").
        ``finish_check``, when given, is called after every step with the rows still running and every row's
        output ids so far; a row it returns ends there with its (finish_reason, matched), and wins over a stop id
        sampled in the same step (SGLang checks stop strings first). A step_guard raising GenerationAborted ends
        every running row with "abort", keeping its tokens so far.

        Tokens are drawn from the sampling distribution (temperature, then top-k, then top-p). The reported
        logprobs (the token's, top-K, MC draws') are that distribution's, renormalised over the kept support, or
        with ``full_vocab_logprobs`` log_softmax(logits / T) over the whole vocabulary (SGLang's default: not
        renormalised; the same thing when top_p = 1 and top-k is off). Greedy (T = 0) reports log_softmax(logits).
        ``mc_samples`` = M > 0 draws M i.i.d. tokens per position; column 0 is the continued token.
        ``seed``: one int seeds one stream for the whole batch; a list (one entry per prompt, None = unseeded)
        draws each row from its own stream, so a row's tokens are those it gets alone with its seed, whatever
        batch it shares (how a rollout dispatcher keeps samples deterministic across engines and request sizes).
        Every forward runs inside ``with step_guard() as version`` when a guard is given.
        """
        self._validate(prompts, max_new_tokens, temperature, top_p, top_logprobs_num, mc_samples)
        n = len(prompts)
        if n == 0:
            return []
        if max_new_tokens == 0:
            return [self._empty(top_logprobs_num, mc_samples) for _ in range(n)]

        device = self.device
        guard = step_guard or _no_guard
        gen = _generators(seed, n, device)
        greedy = temperature <= 0
        draws = max(1, mc_samples)
        vocab = self.vocab_size
        k_top = min(int(top_logprobs_num), vocab)
        # the sampling distribution differs from the full one only when a filter is on
        report_full = full_vocab_logprobs and not greedy and (top_p < 1.0 or 0 < top_k < vocab)

        # ---- left-padded prompt batch; attention mask for prompt + all new tokens, built once ----
        lens = [len(p) for p in prompts]
        plen = max(lens)
        total = plen + max_new_tokens
        ids = torch.full((n, plen), self.pad_token_id, dtype=torch.long)
        mask = torch.ones((n, total), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, plen - lens[i]:] = torch.as_tensor(p, dtype=torch.long)
            mask[i, : plen - lens[i]] = 0
        ids = ids.to(device)
        mask = mask.to(device)
        prompt_pos = (mask[:, :plen].cumsum(-1) - 1).clamp_(min=0)
        next_pos = torch.as_tensor(lens, dtype=torch.long, device=device).unsqueeze(1)  # position of token 0

        stop_set = set() if ignore_eos else {self.eos_token_id, *map(int, stop_token_ids)}
        stop_ids = torch.as_tensor(sorted(stop_set), dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        out_len = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
        reasons: list[str | None] = [None] * n  # set when a row finishes before max_new_tokens
        matched: list[str | None] = [None] * n
        rows_out: list[list[int]] = [[] for _ in range(n)]  # python copies, kept only for finish_check

        tok_hist: list[torch.Tensor] = []
        lp_hist: list[torch.Tensor] = []
        top_id_hist: list[torch.Tensor] = []
        top_lp_hist: list[torch.Tensor] = []
        mc_id_hist: list[torch.Tensor] = []
        mc_lp_hist: list[torch.Tensor] = []
        versions: list[Any] = []

        cache = DynamicCache(config=self.model.config)
        model = self.model
        steps = 0
        try:
            with guard() as version:
                logits = model(input_ids=ids, attention_mask=mask[:, :plen], position_ids=prompt_pos, cache=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1, :]
            versions.append(version)
            for t in range(max_new_tokens):
                z = logits[:, :vocab]
                logp = sampling_logprobs(z, temperature, top_p, top_k)
                if greedy:
                    tok = logp.argmax(dim=-1, keepdim=True)
                else:
                    tok = _draw(logp.exp(), draws, gen)
                if report_full:
                    logp = torch.log_softmax(z.float() / temperature, dim=-1)
                tok_lp = logp.gather(-1, tok)
                nxt = tok[:, 0]
                nxt = nxt.masked_fill(done, self.pad_token_id)
                tok_hist.append(nxt)
                lp_hist.append(tok_lp[:, 0])
                if mc_samples:
                    mc_id_hist.append(tok)
                    mc_lp_hist.append(tok_lp)
                if k_top:
                    tv, ti = torch.topk(logp, k_top, dim=-1)
                    top_id_hist.append(ti)
                    top_lp_hist.append(tv)
                steps = t + 1
                hit = (torch.isin(nxt, stop_ids) if stop_set else torch.zeros_like(done)) & ~done
                if finish_check is not None:
                    running = (~done).nonzero().flatten().tolist()
                    new = nxt.tolist()
                    for i in running:
                        rows_out[i].append(new[i])
                    ended = finish_check(running, rows_out)
                    for i in set(ended).intersection(running):  # a row that already ended stays as it ended
                        reasons[i], matched[i] = ended[i]
                        hit[i] = True
                if bool(hit.any()):
                    out_len.masked_fill_(hit, t + 1)
                    done |= hit
                    if bool(done.all()):
                        break
                if t + 1 == max_new_tokens:
                    break
                with guard() as version:
                    logits = model(input_ids=nxt.unsqueeze(1), attention_mask=mask[:, : plen + t + 1],
                                   position_ids=next_pos + t, cache=cache, use_cache=True).logits[:, -1, :]
                versions.append(version)
        except GenerationAborted:
            for i in (~done).nonzero().flatten().tolist():
                reasons[i] = "abort"
            out_len.masked_fill_(~done, steps)

        # ---- one conversion to numpy, then per-row slicing ----
        def stacked(hist: list[torch.Tensor], width: int | None, dtype) -> np.ndarray:
            if not hist:
                return np.zeros((n, 0) if width is None else (n, 0, width), dtype)
            return torch.stack(hist, 1).cpu().numpy().astype(dtype)

        toks = stacked(tok_hist, None, np.int32)
        lps = stacked(lp_hist, None, np.float32)
        lengths = out_len.clamp(max=steps).cpu().tolist()
        stopped = done.cpu().tolist()  # a row done without a reason hit a stop id
        reasons = [r or ("stop" if stopped[i] else "length") for i, r in enumerate(reasons)]
        top_ids = top_lps = mc_ids = mc_lps = None
        if k_top:
            top_ids, top_lps = stacked(top_id_hist, k_top, np.int32), stacked(top_lp_hist, k_top, np.float32)
        if mc_samples:
            mc_ids, mc_lps = stacked(mc_id_hist, mc_samples, np.int32), stacked(mc_lp_hist, mc_samples, np.float32)

        outs = []
        for i in range(n):
            m = lengths[i]
            outs.append(GenerationOutput(
                output_ids=toks[i, :m].tolist(),
                logprobs=lps[i, :m].copy(),
                finish_reason=reasons[i],
                version_start=versions[0] if versions else None,
                version_end=versions[m - 1] if m else (versions[0] if versions else None),
                top_ids=None if top_ids is None else top_ids[i, :m].copy(),
                top_logprobs=None if top_lps is None else top_lps[i, :m].copy(),
                mc_ids=None if mc_ids is None else mc_ids[i, :m].copy(),
                mc_logprobs=None if mc_lps is None else mc_lps[i, :m].copy(),
                matched=matched[i],
                versions=versions[:m],
            ))
        return outs

    def _validate(self, prompts, max_new_tokens, temperature, top_p, top_logprobs_num, mc_samples) -> None:
        if not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts must be a list of token-id lists")
        vocab = self.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token id")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"prompts[{i}] has token id {lo if lo < 0 else hi} outside the vocabulary "
                                 f"[0, {vocab})")
        if int(max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {top_logprobs_num}")
        if mc_samples < 0:
            raise ValueError(f"mc_samples must be >= 0, got {mc_samples}")
        if mc_samples > 0 and temperature <= 0:
            raise ValueError("mc_samples > 0 needs temperature > 0 (greedy decoding has nothing to sample)")

    @staticmethod
    def _empty(k: int, m: int) -> GenerationOutput:
        return GenerationOutput(
            output_ids=[], logprobs=np.zeros(0, np.float32), finish_reason="length", version_start=0,
            version_end=0,
            top_ids=np.zeros((0, k), np.int32) if k else None,
            top_logprobs=np.zeros((0, k), np.float32) if k else None,
            mc_ids=np.zeros((0, m), np.int32) if m else None,
            mc_logprobs=np.zeros((0, m), np.float32) if m else None,
        )
