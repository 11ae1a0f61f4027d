"""Dispatch a batch of prompts over rollout servers as they free up, with a cap on requests in flight per server.

An even split per batch waits for the slowest engine (longer responses, a busier host, a restarted engine); here a
batch becomes requests of `samples_per_request` prompts, and each request goes to the server with the most free
slots the moment it has one, so a fast engine takes more of the batch. Results come back in prompt order.

Sample i of a batch seeded `seed` samples with `sample_seed(seed, i)`, sent per item (SGLang's per-item
`sampling_params`; the embedded engine draws each row from its own stream), so its tokens depend on its index
alone, not on which engine served it nor on what it was batched with. `samples_per_request` trades that freedom
against batching: SGLang batches across requests (continuous batching), so one sample per request costs it
nothing; the embedded engine runs one request's rows as one batch and its forwards one at a time, so it wants few,
large requests. Measured on the tiny student, 64 prompts x 48 tokens, two embedded engines on this 2-core machine:
1 in flight per engine, requests of 32: 0.27 s; 4 in flight, requests of 8: 1.40 s; one prompt per request, 4 in
flight: 7.0 s (5.6 s through sglang-router). Hence rollout.max_inflight_per_engine=1 and samples_per_request=0 by
default (the embedded engine), 64 and 1 in configs/rollout/sglang.yaml.

Partial rollouts. A weight update with weights.pause_mode=abort ends the requests in flight; SGLang (and our engine)
answer them with the tokens they have, their logprobs, top-k, MC draws and version spans, finish_reason "abort".
Such a sample is resumed on the same engine, in the same slot, under the new weights: prompt + its tokens so far as
the new input, the rest of its max_new_tokens as the budget, and the pieces are joined into one Rollout
(asyncopd.core.types.join_pieces) whose every token keeps the logprobs and version of the weights that produced it.
No response ending in "abort" leaves `Dispatcher.generate`. Seeds: a sample cut after k tokens continues with
`resume_seed(its seed, k)`, a fresh stream keyed by where it was cut (see there), so its tokens are still a
function of its seed, the weights and the cut, never of the engine or batch. A lost engine during a resume sends
the whole request elsewhere, from its prompt (SlotPool).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, Generic, TypeVar

import numpy as np

from asyncopd.core.types import Rollout, join_pieces
from asyncopd.net.client import ServerError, unanswered
from asyncopd.rollout.client import SGLangClient

T = TypeVar("T")
R = TypeVar("R")


def sample_seed(seed: int, index: int) -> int:
    """The sampling seed of sample `index` of a batch seeded `seed`: a hash of both (neighbouring batches' seeds
    never collide, as `seed + index` would), in [0, 2**63) because SGLang's sampling_seed is an i64."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def resume_seed(seed: int | None, offset: int) -> int | None:
    """The seed a sample continues with after `offset` tokens: its own seed at 0 (it drew nothing yet), else a hash
    of both. Not its own seed: the embedded engine draws a row's uniforms in order from the start of its request,
    so the same seed would replay the first piece's draws at the next positions (noise correlated across the cut);
    SGLang keys its noise by (seed, position) (sampler.py: multinomial_with_seed), where the same seed would carry on
    the uninterrupted stream. The hash is a fresh independent stream on both, and a function of the cut alone."""
    return seed if seed is None or offset == 0 else sample_seed(seed, offset)


def request_size(n: int, slots: int, samples_per_request: int, max_batch: int) -> int:
    """Prompts per request: `samples_per_request`, or (0) the batch spread over every slot; never more than a
    server takes in one request."""
    size = samples_per_request or math.ceil(n / max(1, slots))
    return max(1, min(size, max_batch))


class SlotPool(Generic[T]):
    """Runs calls on `targets`, at most `cap` at once on each, on whichever has the most free slots first.

    One pool serves every caller (the pipeline's rollouts and an evaluation may overlap): the caps hold across
    them. Its worker threads number the slots, so a call never waits for a slot long.

    A call that fails because its target was lost (`lost(error)`: no answer) is sent again, up to `max_redispatch`
    times. With a supervisor (`on_lost` set) the lost target takes no calls until `mark_up` (it restarted it), and
    `on_lost(i, error)` tells it, once per loss; with every target down, calls wait for one to come back, or for
    `fail(error)` (it will not)."""

    def __init__(self, targets: Sequence[T], cap: int, name: str = "rollout", max_redispatch: int = 0,
                 lost: Callable[[BaseException], bool] = unanswered):
        if not targets:
            raise ValueError("SlotPool needs at least one target")
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self.targets, self.cap = list(targets), cap
        self.inflight = [0] * len(self.targets)
        self.served = [0] * len(self.targets)  # calls each target has run: how the load spread
        self.max_redispatch, self.lost = max_redispatch, lost
        self.redispatched = 0  # calls sent again after their target was lost
        self.on_lost: Callable[[int, BaseException], None] | None = None
        self.up = [True] * len(self.targets)
        self._incarnation = [0] * len(self.targets)  # bumped by mark_up: a late error of a call to the old one is moot
        self._failed: BaseException | None = None
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=len(self.targets) * cap, thread_name_prefix=name)

    @property
    def slots(self) -> int:
        return len(self.targets) * self.cap

    def _acquire(self) -> tuple[int, int]:
        """(target, its incarnation) with a free slot, up."""
        with self._cond:
            while True:
                if self._failed is not None:
                    raise self._failed
                free = [i for i, n in enumerate(self.inflight) if n < self.cap and self.up[i]]
                if free:
                    i = min(free, key=self.inflight.__getitem__)  # the least busy; ties: the first
                    self.inflight[i] += 1
                    return i, self._incarnation[i]
                self._cond.wait()

    def mark_down(self, i: int, error: BaseException, incarnation: int | None = None) -> None:
        """Target i (as of `incarnation`, default the current one) was lost: no calls go to it; its supervisor hears
        of it once."""
        with self._cond:
            if not self.up[i] or incarnation not in (None, self._incarnation[i]):
                return
            self.up[i] = False
        if self.on_lost is not None:
            self.on_lost(i, error)

    def mark_up(self, i: int) -> None:
        """Target i serves again (restarted, caught up): it takes calls."""
        with self._cond:
            self._incarnation[i] += 1
            self.up[i] = True
            self._cond.notify_all()

    def wait_any_up(self) -> None:
        """Until some target is up; raises `fail`'s error if one comes instead."""
        with self._cond:
            while not any(self.up):
                if self._failed is not None:
                    raise self._failed
                self._cond.wait()

    def fail(self, error: BaseException) -> None:
        """A lost target will not come back: calls waiting for a slot raise `error`, and so do later ones."""
        with self._cond:
            self._failed = error
            self._cond.notify_all()

    def _release(self, i: int) -> None:
        with self._cond:
            self.inflight[i] -= 1
            self.served[i] += 1
            self._cond.notify()

    def map(self, fn: Callable[[T, Any], R], works: Sequence[Any]) -> list[R]:
        """`fn(target, work)` for every work, each on a target with a free slot; results in the works' order. The
        first error is raised as soon as it happens: calls not yet started are cancelled, running ones end
        in the background."""

        def one(work: Any) -> R:
            for attempt in range(self.max_redispatch + 1):
                i, incarnation = self._acquire()
                try:
                    return fn(self.targets[i], work)
                except Exception as e:
                    if not self.lost(e):
                        raise
                    if self.on_lost is not None:  # supervised: out of rotation until its supervisor brings it back
                        self.mark_down(i, e, incarnation)
                    if attempt == self.max_redispatch:
                        raise
                    with self._cond:
                        self.redispatched += 1
                finally:
                    self._release(i)
            raise AssertionError("unreachable")

        futures = [self._pool.submit(one, w) for w in works]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                failed.result()  # raises its error, not waiting on calls before it
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


MAX_IDLE_PIECES = 8  # resumes of one sample in a row that brought no token, before the request fails


class EngineRestarted(ServerError):
    """An engine answered with weights older than it was sent: it restarted (its server, under its actor's
    watchdog) and serves its checkpoint again. Treated as lost (status None): the request goes elsewhere."""

    def __init__(self, message: str):
        super().__init__(message, status=None)


class Dispatcher:
    """`generate` over SGLang-API servers: per-sample seeds, requests of `samples_per_request` prompts on a
    SlotPool. `one_seed_per_request` (sglang-router refuses per-item sampling_params: 422) sends one prompt per
    request when seeded, its seed as the request's. A request whose engine is lost (`lost(error)`) moves to another
    one (up to `max_redispatch` times; SlotPool); `min_version[i]` is the weight version engine i was last sent (the
    supervisor sets it), and an answer from an older one means the engine restarted: EngineRestarted.

    A server that fronts others (sglang-router) is never the one lost, and does not say which engine behind it was:
    it stays in rotation, its `min_version` is the floor of every engine behind it, and `on_fault(error)` is told of
    each lost request before it is sent again (the supervisor looks behind it)."""

    def __init__(self, servers: Sequence[SGLangClient], cap: int, samples_per_request: int = 0,
                 max_batch: int = 8192, one_seed_per_request: bool = False, max_redispatch: int = 0,
                 lost: Callable[[BaseException], bool] = unanswered):
        self.pool: SlotPool[SGLangClient] = SlotPool(servers, cap, max_redispatch=max_redispatch, lost=lost)
        self.samples_per_request, self.max_batch = samples_per_request, max_batch
        self.one_seed_per_request = one_seed_per_request
        self.min_version = [0] * len(self.pool.targets)
        self.on_fault: Callable[[BaseException], None] | None = None

    def generate(self, prompts: Sequence[Sequence[int]], *, seed: int | None = None, **kw: Any) -> list[Rollout]:
        """Rollouts in prompt order, none ending in "abort" (resumed: module docstring); `kw` as SGLangClient.generate
        takes them (max_new_tokens, temperature, ...)."""
        n = len(prompts)
        size = request_size(n, self.pool.slots, self.samples_per_request, self.max_batch)
        if self.one_seed_per_request and seed is not None:
            size = 1
        requests = [range(a, min(a + size, n)) for a in range(0, n, size)]

        def call(server: SGLangClient, idx: range) -> list[Rollout]:
            seeds = None if seed is None else [sample_seed(seed, i) for i in idx]
            try:
                return self._complete(server, [prompts[i] for i in idx], seeds, kw)
            except Exception as e:
                if self.on_fault is not None and self.pool.lost(e):
                    self.on_fault(e)
                raise

        return [r for out in self.pool.map(call, requests) for r in out]

    def _send(self, server: SGLangClient, prompts: Sequence[Sequence[int]], seeds: list[int] | None,
              kw: dict[str, Any]) -> list[Rollout]:
        """One /generate request; EngineRestarted when the engine answers with weights older than it was sent."""
        floor = self.min_version[self.pool.targets.index(server)]  # as of sending: a sync may raise it meanwhile
        out = server.generate(prompts, **kw, seed=seeds[0] if seeds is not None and len(seeds) == 1 else seeds)
        served = min((r.version_end for r in out), default=floor)  # the last token's: current on a live engine
        if served < floor:
            raise EngineRestarted(f"{server.base_url} answered with weight version {served}, older than the "
                                  f"{floor} it was sent: it restarted")
        return out

    def _complete(self, server: SGLangClient, prompts: Sequence[Sequence[int]], seeds: list[int] | None,
                  kw: dict[str, Any]) -> list[Rollout]:
        """One request's Rollouts, every sample a weight update aborted resumed from its partial output until it
        stops or spends its budget; samples cut at the same length share a resume request (one max_new_tokens)."""
        budget = int(kw["max_new_tokens"])
        pieces = [[r] for r in self._send(server, prompts, seeds, kw)]
        idle = [int(ps[0].finish_reason == "abort" and not ps[0].num_tokens) for ps in pieces]  # in a row, no token
        while True:
            cut: dict[int, list[int]] = {}  # tokens left -> samples
            for j, ps in enumerate(pieces):
                if ps[-1].finish_reason != "abort":
                    continue
                left = budget - sum(p.num_tokens for p in ps)
                if left > 0:
                    cut.setdefault(left, []).append(j)
                else:  # cut after its last allowed token: it ended by length
                    ps[-1] = replace(ps[-1], finish_reason="length")
            if not cut:
                return [join_pieces(ps) for ps in pieces]
            for left, rows in cut.items():
                inputs = [np.concatenate([pieces[j][0].prompt_ids, *(p.response_ids for p in pieces[j])]).tolist()
                          for j in rows]
                resumed = None if seeds is None else [resume_seed(seeds[j], budget - left) for j in rows]
                out = self._send(server, inputs, resumed, {**kw, "max_new_tokens": left})
                for j, r in zip(rows, out, strict=True):
                    idle[j] = idle[j] + 1 if r.num_tokens == 0 else 0
                    if idle[j] > MAX_IDLE_PIECES:
                        raise RuntimeError(f"{server.base_url} aborted a sample {idle[j]} times in a row before it "
                                           "generated a token: something aborts every request (weight updates "
                                           "faster than a prefill, or /abort_request)")
                    pieces[j].append(r)

    def shutdown(self) -> None:
        self.pool.shutdown()
