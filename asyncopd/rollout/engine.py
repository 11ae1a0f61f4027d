"""The embedded rollout engine: SGLang's native request/response shapes over our KV-cache sampler.

Concurrency model. Every forward of every request runs inside `step_guard`, which holds the engine's
weights lock (`_cond`) for exactly one forward and yields the weight version. So:
- a weight update follows SGLang 0.5.23's session: `/begin_weight_update`, one or more
  `/update_weights_from_distributed` buckets (refused outside a session, as SGLang refuses them), then
  `/end_weight_update`. Buckets are received with no lock held and STAGED; the end of the session swaps
  every staged tensor, and the version a bucket or `/update_weight_version` named, into the model under
  the lock, i.e. between two decode steps. SGLang loads each bucket at once, so a client must pause it; here
  no decode step ever sees half an update whether or not generation was paused, and the version a token
  reports is exactly that of the weights that produced it. Requests in flight continue on the new weights
  and report both versions in SGLang's `meta_info.weight_versions` spans;
- `/pause_generation` makes the next step of every request wait (mode "in_place"/"retract"), or ends
  the requests in flight with finish_reason "abort" and returns once they have ended (mode "abort",
  SGLang's default); `/continue_generation` resumes them. "retract" keeps each request's KV here (the
  engine has no shared prefix cache to free), so it behaves as "in_place" except for `/flush_cache`;
- `/flush_cache` succeeds, as SGLang's does, only when no request holds KV: none in flight, or all of them
  retracted, or aborted and drained; otherwise 400.

/generate speaks SGLang 0.5.23's contract (SGLANG_API_VERSION; tests/test_sglang_contract.py checks it against
that release's own definitions):
- Logprobs are SGLang's defaults, so a behaviour logprob means the same whichever backend produced it: an output
  token's (and its top-K's, and our MC draws') logprob is log_softmax(logits / T) over the whole vocabulary, NOT
  renormalised over the top-p/top-k support it was drawn from (sglang/srt/layers/sampler.py: log(probs) taken
  before the filters); greedy (T = 0) reports log_softmax(logits). Estimators that need the probability of the
  draw under the filtered distribution must renormalise themselves (identical when top_p = 1, top_k = -1).
  Prompt logprobs (logprob_start_len) are log_softmax(logits) without temperature, the first entry None.
- `text` is the output decoded by the checkpoint's tokenizer (less the matched stop token or string unless
  no_stop_trim); "" when the checkpoint has no tokenizer files. `text` is accepted as input (tokenized here).
  `stop` strings end a row once the text of its last tokens contains one.
- An aborted request (/abort_request, /pause_generation mode "abort") answers with the tokens it has and their
  logprobs, finish_reason {"type": "abort", ...}; no prompt or token-id logprobs are scored after an abort.
- Unknown top-level fields are ignored (logged once), as SGLang ignores them; unknown sampling_params are 400.
- A batch runs as one sampler call, so per-item `sampling_params` may differ in `sampling_seed` alone: each row
  then draws from its own seeded stream, the tokens it gets alone with that seed (asyncopd.rollout.dispatch).
The engine raises ApiError (HTTP 400 with a message naming the field) for malformed requests, 413 over a limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyncopd.config.schema import RolloutConfig
from asyncopd.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from asyncopd.model.sampler import FinishCheck, GenerationAborted, GenerationOutput, KVCacheSampler
from asyncopd.model.scorer import score_sequences, token_vocab
from asyncopd.net.server import ApiError, model_card, too_large
from asyncopd.rollout.client import SGLANG_GROUP_NAME
from asyncopd.weights.broadcast import FLATTENED, dtype_to_str, recv_bucket, str_to_dtype
from asyncopd.weights.process_group import check_group_args, destroy_weights_group, init_weights_group
from asyncopd.weights.versions import version_spans

SGLANG_API_VERSION = "0.5.23"  # the release whose /generate contract this engine speaks (tests/sglang_contract)
# SGLang's /generate fields (GenerateRequest in sglang/api/v1/api_types.py, GenerateReqInput in io_struct.py) by what
# this engine does with them. Honoured (mc_samples is ours):
_TOP = {"input_ids", "text", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
        "token_ids_logprob", "return_text_in_logprobs", "return_prompt_token_ids", "rid", "mc_samples"}
# Accepted at their no-op value only: an answer that silently ignored another value would be wrong, so it is a 400
# naming the field.
_TOP_AT_DEFAULT = {"stream": False, "return_hidden_states": False, "input_embeds": None, "image_data": None,
                   "audio_data": None, "video_data": None, "lora_path": None, "custom_logit_processor": None,
                   "session_params": None, "return_sampling_mask": False, "sampling_logprobs_mode": None,
                   "return_flat_raw_top_logprobs": False, "return_flat_raw_output_top_logprobs": False,
                   "return_flat_raw_top_logprobs_b64": False, "max_thinking_tokens": None, "require_reasoning": False,
                   "positional_embed_overrides": None, "return_indexer_topk": False, "mm_hashes": None,
                   "mm_content_hashes": None, "video_config": None, "watermark": None}
# Hints to SGLang's scheduler, router, caches, metrics or disaggregation: they change no answer here, so any value
# passes (a dense model has no routed experts to return).
_TOP_HINTS = {"log_metrics", "priority", "routing_key", "routed_dp_rank", "data_parallel_rank",
              "disagg_prefill_dp_rank", "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key",
              "decode_tp_size",
              "conversation_id", "session_id", "extra_key", "cache_salt", "custom_labels", "kv_hints",
              "images_config", "modalities", "background", "return_routed_experts", "routed_experts_start_len",
              "use_audio_in_video", "http_worker_ipc", "lora_id"}
# Any other top-level key is ignored and logged once, as SGLang ignores it (sglang-router adds model, no_logs, ...).
_SAMPLING = {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos",
             "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
_SAMPLING_AT_DEFAULT = {"n": 1, "min_new_tokens": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                        "repetition_penalty": 1.0, "min_p": 0.0, "json_schema": None, "regex": None, "ebnf": None,
                        "structural_tag": None, "stop_regex": None, "logit_bias": None, "beam_width": 1,
                        "watermark": None, "choice": None}
# custom_params feeds SGLang's custom logit processors, which this engine has none of (slime sends it at top_p < 1)
_SAMPLING_HINTS = {"custom_params", "stream_interval"}
MAX_STOP_STRINGS = 32  # SGLang's MAX_STOP_COUNT
PAUSE_MODES = ("abort", "retract", "in_place")
MAX_MC_SAMPLES = 1024
HEALTH_CHECK_TIMEOUT_S = 20.0  # SGLang's default SGLANG_HEALTH_CHECK_TIMEOUT
# SGLang's abort finish reasons: a request that ran at least one forward, and one still waiting for its first
ABORT_RUNNING = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
ABORT_WAITING = {"type": "abort", "message": "Abort in waiting queue"}
LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})  # /v1/loads ?include=

log = logging.getLogger(__name__)


class _Aborted(GenerationAborted):
    pass


def _is_int(x) -> bool:
    return type(x) is int


def _is_num(x) -> bool:
    return type(x) in (int, float)


def _lp_triples(lps, ids, text: Callable[[int], str | None] | None = None) -> list:
    """SGLang's [logprob, token_id, text] entries; text only under return_text_in_logprobs."""
    return [[float(lp), int(i), text(int(i)) if text else None] for lp, i in zip(lps, ids, strict=True)]


def _all_aborted(ticket: _Ticket | None) -> bool:
    """Every row of the request was ended by /abort_request: its step guard ends it, even while paused."""
    return ticket is not None and bool(ticket.rids) and len(ticket.aborted) == len(ticket.rids)


def _is_bool(x) -> bool:
    return type(x) is bool


def _empty_output(k: int, m: int, version: int) -> GenerationOutput:
    """What a prefill-only request (max_new_tokens = 0) returns: no tokens, at `version`."""
    return GenerationOutput(
        output_ids=[], logprobs=np.zeros(0, np.float32), finish_reason="length", version_start=version,
        version_end=version, top_ids=np.zeros((0, k), np.int32), top_logprobs=np.zeros((0, k), np.float32),
        mc_ids=np.zeros((0, m), np.int32) if m else None, mc_logprobs=np.zeros((0, m), np.float32) if m else None)


def _version_label(v, field: str = "weight_version") -> str:
    """SGLang's weight versions are free strings (ours count optimizer steps, "3"); an int is taken as its string."""
    if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
        raise ApiError(f"{field} must be a non-empty string (e.g. the number of optimizer steps applied), got {v!r}")
    return str(v)


# SGLang 0.5.23's own answers (sglang/srt/managers/scheduler_components/weight_updater.py), so a client written
# against this engine meets the same refusals there.
NO_SESSION = "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
SESSION_OPEN = "a weight-update session is already open; call end_weight_update() first"
NO_SESSION_TO_END = "no weight-update session is open; call begin_weight_update() first"
NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are still running or queued. "
               "Retract or finish them, then call /flush_cache.")
SELECTORS = ("target", "draft", "all")


@dataclass(eq=False)  # hashed by identity: one per call
class _Ticket:
    """One /generate call in flight: the abort epoch its step guard was made in, and whether a forward ran
    (then it holds KV the current weights produced, which a flush would have to drop)."""

    epoch: int | None = None
    started: bool = False
    rids: list[str] = field(default_factory=list)  # one per input row
    aborted: set[int] = field(default_factory=set)  # rows /abort_request ended
    tokens: int = 0  # prompt + generated tokens it holds (/v1/loads)


class RolloutEngine:
    def __init__(self, model, model_path: str = "", *, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, initial_version: int = 0,
                 group_timeout_s: float = RolloutConfig.group_timeout_s, tokenizer=None,
                 max_batch_size: int = RolloutConfig.max_batch_size):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None:
            raise ValueError(f"{model_path or 'model'}: config has no eos_token_id; pass eos_token_id=")
        pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
        self.eos_token_id, self.pad_token_id = int(eos), int(eos if pad is None else pad)
        self.model_path = model_path
        self.card = model_card(model_path, model)
        # ids the engine reads and emits: the tokenizer's; padded embedding rows are never sampled nor scored
        self.vocab_size = token_vocab(model, self.card["tokenizer_vocab_size"])
        self.sampler = KVCacheSampler(self.model, self.eos_token_id, self.pad_token_id, self.vocab_size)
        self.max_len = self.card["max_position_embeddings"]
        self.group_timeout_s = group_timeout_s
        self.max_batch_size = max_batch_size
        # the checkpoint's tokenizer: `text` in and out, stop strings; None without tokenizer files ("" text)
        if tokenizer is None and model_path and any((Path(model_path) / f).is_file()
                                                    for f in (TOKENIZER_FILE, "tokenizer_config.json")):
            tokenizer = load_tokenizer(model_path, field="model_path")
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}  # id -> its text alone (return_text_in_logprobs)
        self._unknown_logged: set[str] = set()
        # name -> parameter (tied weights appear under every name, e.g. lm_head.weight and embed_tokens).
        self.params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters(remove_duplicate=False))
        self.device = next(self.model.parameters()).device  # where broadcasts land (CUDA for NCCL)

        self._cond = threading.Condition()  # the weights lock; held for one forward at a time
        self._paused = False
        self._pause_mode = ""
        self._epoch = 0  # bumped by pause(mode="abort") and abort_all_requests: requests of an older epoch end
        self._version = str(initial_version)  # SGLang's label: a free string ("default" there before any update)
        self._tickets: set[_Ticket] = set()  # /generate calls in flight (guarded by _cond)
        self._local = threading.local()  # the ticket of the request this thread serves
        self._update_lock = threading.Lock()  # one weight-update call (receive, stage, swap) at a time
        self._group = None
        self._group_name = ""
        self._session = False  # a /begin_weight_update ... /end_weight_update session is open
        self._staged: dict[str, torch.Tensor] = {}  # received in this session, swapped in at its end
        self._staged_version: str | None = None  # the version the session's buckets named, set at its end
        self._session_error = ""  # why a bucket of this session was rejected: its end applies nothing
        self._stats_lock = threading.Lock()
        self.stats = {"forward_steps": 0, "requests": 0, "sequences": 0, "completion_tokens": 0, "generate_s": 0.0,
                      "weight_updates": 0, "weight_bytes": 0, "weight_recv_s": 0.0, "weight_swap_s": 0.0}

    # ---- state -------------------------------------------------------------------------------------
    @property
    def weight_version(self) -> str:
        return self._version

    @property
    def weight_group(self):
        """The torch.distributed group joined by /init_weights_update_group (None before): the weights bench
        receives raw broadcasts on it to time the collective alone."""
        return self._group

    def _guard(self, epoch: int):
        ticket = getattr(self._local, "ticket", None)  # bound here: the epoch the request really runs in
        if ticket is not None:
            ticket.epoch = epoch

        @contextlib.contextmanager
        def step_guard():
            with self._cond:
                while self._paused and self._epoch == epoch and not _all_aborted(ticket):
                    self._cond.wait()
                if self._epoch != epoch or _all_aborted(ticket):
                    raise _Aborted()
                if ticket is not None:
                    ticket.started = True
                self.stats["forward_steps"] += 1
                yield self._version

        return step_guard

    @contextlib.contextmanager
    def _tracked(self):
        """Count a /generate call as in flight (for abort's drain and flush's idleness) while it runs."""
        ticket = _Ticket()
        self._local.ticket = ticket
        with self._cond:
            self._tickets.add(ticket)
        try:
            yield
        finally:
            self._local.ticket = None
            with self._cond:
                self._tickets.discard(ticket)
                self._cond.notify_all()

    def _version_meta(self, versions, finished_at) -> dict[str, Any]:
        """SGLang's per-token version fields: `weight_versions` spans over the tokens and `weight_version` (the
        last span's), from the version each token's forward ran under."""
        spans = version_spans(list(versions), finished_at=finished_at)
        return {"weight_version": spans[-1]["version"], "weight_versions": spans}

    # ---- /generate ---------------------------------------------------------------------------------
    def _parse_sampling(self, sp) -> dict[str, Any]:
        if sp is None:
            sp = {}
        seeds = None
        if isinstance(sp, list):
            if not sp or not all(isinstance(s, dict) for s in sp):
                raise ApiError("sampling_params must be a JSON object, or a non-empty list of one per input")
            # items may differ in sampling_seed alone: the sampler draws each row from its own seeded stream
            rest = [{k: v for k, v in s.items() if k != "sampling_seed"} for s in sp]
            if any(r != rest[0] for r in rest):
                raise ApiError("sampling_params: a batch runs as one sampler call, so every item needs the same "
                               "sampling_params (sampling_seed may differ); send one request per setting")
            seeds = [s.get("sampling_seed") for s in sp]
            sp = sp[0]
        if not isinstance(sp, dict):
            raise ApiError("sampling_params must be a JSON object")
        for key, val in sp.items():
            if key in _SAMPLING or key in _SAMPLING_HINTS:
                continue
            if key in _SAMPLING_AT_DEFAULT:
                if val not in (_SAMPLING_AT_DEFAULT[key], None, [], {}, ""):
                    raise ApiError(f"sampling_params.{key}={val!r} is not supported by the embedded engine "
                                   f"(leave it at {_SAMPLING_AT_DEFAULT[key]!r})")
                continue
            # as SGLang's contract check: an unknown sampling key is an error, not a silent default
            raise ApiError(f"sampling_params.{key} is unknown; supported: {sorted(_SAMPLING)}")

        def get(name: str, default):
            val = sp.get(name)
            return default if val is None else val

        max_new = get("max_new_tokens", 128)
        if not _is_int(max_new) or max_new < 0:
            raise ApiError(f"sampling_params.max_new_tokens must be an int >= 0, got {max_new!r}")
        temp = get("temperature", 1.0)
        if not _is_num(temp) or temp < 0:
            raise ApiError(f"sampling_params.temperature must be a number >= 0 (0 = greedy), got {temp!r}")
        top_p = get("top_p", 1.0)
        if not _is_num(top_p) or not 0 < top_p <= 1:
            raise ApiError(f"sampling_params.top_p must be in (0, 1], got {top_p!r}")
        top_k = get("top_k", -1)
        if not _is_int(top_k) or not (top_k == -1 or top_k >= 1):
            raise ApiError(f"sampling_params.top_k must be -1 (off) or an int >= 1, got {top_k!r}")
        stop_ids = get("stop_token_ids", [])
        if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
            raise ApiError(f"sampling_params.stop_token_ids must be a list of ints, got {stop_ids!r}")
        stop = get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
            raise ApiError(f"sampling_params.stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, "
                           f"got {stop!r}")
        stop = [s for s in stop if s]
        if stop and self.tokenizer is None:
            raise ApiError("sampling_params.stop: stop strings need the checkpoint's tokenizer, and this engine has "
                           f"none (no tokenizer files in {self.model_path!r}); use stop_token_ids")
        seed = seeds if seeds is not None and any(x != seeds[0] for x in seeds) else sp.get("sampling_seed")
        for x in seed if isinstance(seed, list) else [seed]:
            if x is not None and not _is_int(x):
                raise ApiError(f"sampling_params.sampling_seed must be an int, got {x!r}")
        flags = {name: get(name, default) for name, default in (
            ("ignore_eos", False), ("skip_special_tokens", True), ("spaces_between_special_tokens", True),
            ("no_stop_trim", False))}
        for name, val in flags.items():
            if not _is_bool(val):
                raise ApiError(f"sampling_params.{name} must be a bool, got {val!r}")
        return {"max_new_tokens": max_new, "temperature": float(temp), "top_p": float(top_p), "top_k": top_k,
                "stop_token_ids": stop_ids, "stop": stop, "seed": seed, **flags}

    def _check_top_level(self, req: dict) -> None:
        """SGLang's treatment of top-level keys (see _TOP): refuse what would change the answer unseen, ignore the
        rest; an unknown key is logged the first time it is seen."""
        for key, val in req.items():
            if key in _TOP or key in _TOP_HINTS:
                continue
            if key in _TOP_AT_DEFAULT:
                if val not in (_TOP_AT_DEFAULT[key], None, [], {}, ""):
                    hint = "; send stream=false" if key == "stream" else ""
                    raise ApiError(f"{key}={val!r:.80} is not supported by the embedded engine "
                                   f"(leave it at {_TOP_AT_DEFAULT[key]!r}){hint}")
                continue
            if key not in self._unknown_logged:
                self._unknown_logged.add(key)
                log.warning("/generate: ignoring unknown field %r (as SGLang does); logged once", key)

    def _prompts(self, req: dict) -> tuple[list[list[int]], bool, str]:
        """(prompts as ids, batched, the field they came from): `input_ids`, or `text` through the tokenizer."""
        text, ids = req.get("text"), req.get("input_ids")
        if text is not None and ids is not None:
            raise ApiError("send either text or input_ids, not both")
        if text is not None:
            if self.tokenizer is None:
                raise ApiError(f"text: this engine has no tokenizer (no tokenizer files in {self.model_path!r}); "
                               "tokenize on the client and send input_ids")
            batched = isinstance(text, list)
            texts = text if batched else [text]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ApiError("text must be a string, or a non-empty list of strings for a batch")
            encoded = self.tokenizer(texts)["input_ids"]
            return [[int(t) for t in e] for e in encoded], batched, "text"
        if ids is None:
            raise ApiError("input_ids is missing: send a list of token ids, or a list of such lists for a batch "
                           "(or text)")
        if not isinstance(ids, list) or not ids:
            raise ApiError("input_ids must be a non-empty list of ints (or of int lists for a batch)")
        batched = isinstance(ids[0], list)
        return (ids if batched else [ids]), batched, "input_ids"

    def parse_generate(self, req: dict) -> dict[str, Any]:
        self._check_top_level(req)
        prompts, batched, field = self._prompts(req)
        n = len(prompts)
        if n > self.max_batch_size:
            raise too_large(f"a batch of {n} inputs", self.max_batch_size, "rollout.max_batch_size")
        for i, p in enumerate(prompts):
            where = f"{field}[{i}]" if batched else field
            if not isinstance(p, list) or not p:
                raise ApiError(f"{where} must be a non-empty list of token ids" if field == "input_ids"
                               else f"{where} tokenizes to no tokens")
            if not all(_is_int(t) for t in p):
                raise ApiError(f"{where} must contain ints only")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                raise ApiError(f"{where} has token id {lo if lo < 0 else hi} outside the vocabulary "
                               f"[0, {self.vocab_size}); tokenize with the model's tokenizer")
        sp = self._parse_sampling(req.get("sampling_params"))
        if isinstance(sp["seed"], list) and len(sp["seed"]) != n:
            raise ApiError(f"sampling_params: a list needs one entry per input ({n}), got {len(sp['seed'])}")
        if self.max_len:
            longest = max(len(p) for p in prompts)
            if longest + sp["max_new_tokens"] > self.max_len:
                raise ApiError(f"prompt ({longest} tokens) + sampling_params.max_new_tokens "
                               f"({sp['max_new_tokens']}) exceeds the model's max_position_embeddings "
                               f"({self.max_len}); lower max_new_tokens or shorten the prompt")

        def per_item(name, default, check, what, nested=False):
            """A scalar applies to every input; a list (of lists, when `nested`) has one entry per input; null is
            the default, as in SGLang."""
            val = req.get(name)
            val = default if val is None else val
            per = batched and isinstance(val, list) and (
                not nested or (bool(val) and all(v is None or isinstance(v, list) for v in val)))
            vals = val if per else [val] * n
            if len(vals) != n:
                raise ApiError(f"{name}: a list must have one entry per input ({n}), got {len(vals)}")
            for v in vals:
                if not check(v):
                    raise ApiError(f"{name} must be {what}, got {v!r}")
            return vals

        ret_lp = per_item("return_logprob", False, _is_bool, "a bool")
        start = per_item("logprob_start_len", -1, lambda v: _is_int(v) and v >= -1, "an int >= -1")
        for i, (p, s) in enumerate(zip(prompts, start, strict=True)):
            if ret_lp[i] and s > len(p):  # SGLang aborts such a request with this 400
                raise ApiError(f"logprob_start_len={s} is higher than the number of input tokens {len(p)}"
                               f"{f' (input {i})' if batched else ''}. Please use a smaller logprob_start_len.")
        top_n = req.get("top_logprobs_num")
        top_n = 0 if top_n is None else top_n
        if isinstance(top_n, list):
            if any(t != top_n[0] for t in top_n) or len(top_n) != n:
                raise ApiError("top_logprobs_num: per-item values must be equal (one batched sampler call)")
            top_n = top_n[0] if top_n else 0
        if not _is_int(top_n) or not 0 <= top_n <= self.vocab_size:
            raise ApiError(f"top_logprobs_num must be an int in [0, vocab_size={self.vocab_size}], got {top_n!r}")
        tids = per_item("token_ids_logprob", None,
                        lambda v: v is None or (isinstance(v, list) and all(
                            _is_int(t) and 0 <= t < self.vocab_size for t in v)),
                        f"null or a list of token ids in [0, {self.vocab_size})", nested=True)
        tids = [t or None for t in tids]  # SGLang: [] is no query
        flags = {name: req.get(name) for name in ("return_text_in_logprobs", "return_prompt_token_ids")}
        for name, val in flags.items():
            if val is not None and not _is_bool(val):
                raise ApiError(f"{name} must be a bool, got {val!r}")
            flags[name] = bool(val)
        mc = req.get("mc_samples", 0)
        if not _is_int(mc) or not 0 <= mc <= MAX_MC_SAMPLES:
            raise ApiError(f"mc_samples must be an int in [0, {MAX_MC_SAMPLES}], got {mc!r}")
        if mc and sp["temperature"] == 0:
            raise ApiError("mc_samples > 0 needs sampling_params.temperature > 0: greedy decoding has nothing "
                           "to sample; set temperature (e.g. 1.0) or mc_samples=0")
        rid = req.get("rid")
        rids = rid if isinstance(rid, list) else ([rid] if not batched else
                                                  ([f"{rid}_{i}" for i in range(n)] if rid else [None] * n))
        if len(rids) != n or not all(r is None or isinstance(r, str) for r in rids):
            raise ApiError(f"rid must be a string, or a list of {n} strings for a batch")
        rids = [r or uuid.uuid4().hex for r in rids]
        if len(set(rids)) != n:
            dup = sorted(x for x in set(rids) if rids.count(x) > 1)
            raise ApiError(f"rid: duplicate request IDs within the request: {dup}")
        return {"prompts": prompts, "batched": batched, "sampling": sp, "return_logprob": ret_lp,
                "logprob_start_len": start, "top_logprobs_num": top_n, "token_ids_logprob": tids,
                "mc_samples": mc, "rids": rids, **flags}

    def _score(self, seqs, starts, top_k, queries, temperature, guard):
        """One scoring forward, between decode steps like any other forward (same weights lock)."""
        with guard():
            return score_sequences(self.model, seqs, starts, top_k, queries, temperature=temperature,
                                   vocab_size=self.vocab_size)

    def generate(self, req: dict) -> dict | list[dict]:
        with self._tracked():
            return self._generate(req)

    def _finish_check(self, sp: dict, ticket: _Ticket | None) -> FinishCheck | None:
        """The sampler's per-step check: rows /abort_request ended, and stop strings. A stop string ends a row
        once the text of its last tokens contains it (SGLang decodes the same tail, with special tokens)."""
        stops = sp["stop"]
        if not stops and ticket is None:
            return None
        tail = max((len(s.encode()) for s in stops), default=0) + 1  # every token is at least one byte

        def check(running: list[int], outputs: list[list[int]]) -> dict[int, tuple[str, str | None]]:
            ended: dict[int, tuple[str, str | None]] = {}
            if ticket is not None:
                ticket.tokens += len(running)
            for i in running:
                if ticket is not None and i in ticket.aborted:
                    ended[i] = ("abort", None)
                elif stops:
                    text = self.tokenizer.decode(outputs[i][-tail:])
                    hit = next((s for s in stops if s in text), None)
                    if hit is not None:
                        ended[i] = ("stop", hit)
            return ended

        return check

    def _generate(self, req: dict) -> dict | list[dict]:
        t0 = time.perf_counter()
        r = self.parse_generate(req)
        prompts, sp, n = r["prompts"], r["sampling"], len(r["prompts"])
        k, m = r["top_logprobs_num"], r["mc_samples"]
        ticket = getattr(self._local, "ticket", None)
        if ticket is not None:
            ticket.rids, ticket.tokens = r["rids"], sum(map(len, prompts))
        guard = self._guard(self._epoch)
        try:
            if sp["max_new_tokens"] > 0:
                outs = self.sampler.generate(
                    prompts, max_new_tokens=sp["max_new_tokens"], temperature=sp["temperature"],
                    top_p=sp["top_p"], top_k=sp["top_k"], stop_token_ids=sp["stop_token_ids"],
                    top_logprobs_num=k, mc_samples=m, seed=sp["seed"], step_guard=guard, full_vocab_logprobs=True,
                    ignore_eos=sp["ignore_eos"], finish_check=self._finish_check(sp, ticket))
            else:
                with guard() as v:
                    pass
                outs = [_empty_output(k, m, v) for _ in range(n)]
        except _Aborted:  # the prefill-only request never ran: the sampler ends its own rows itself
            outs = [dataclasses.replace(_empty_output(k, m, None), finish_reason="abort") for _ in range(n)]
        try:
            input_lp = self._input_logprobs(r, outs, guard)
            ids_lp = self._output_ids_logprobs(r, outs, guard)
        except _Aborted:  # aborted while scoring: the tokens stand, the request did not finish
            outs = [dataclasses.replace(o, finish_reason="abort", matched=None) for o in outs]
            input_lp = self._input_logprobs(r, outs, guard)
            ids_lp = self._output_ids_logprobs(r, outs, guard)
        dt = time.perf_counter() - t0
        items = [self._item(r, i, o, input_lp[i], ids_lp[i], dt) for i, o in enumerate(outs)]
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["sequences"] += n
            self.stats["completion_tokens"] += sum(it["meta_info"]["completion_tokens"] for it in items)
            self.stats["generate_s"] += dt
        return items if r["batched"] else items[0]

    def _item(self, r: dict, i: int, o: GenerationOutput, input_lp: tuple, ids_lp: list | None, dt: float) -> dict:
        """One /generate answer as SGLang 0.5.23 builds it (tokenizer_manager: meta_info, logprob fields)."""
        sp = r["sampling"]
        text_of = self._token_text_of if r["return_text_in_logprobs"] and self.tokenizer is not None else None
        if o.finish_reason == "abort":
            fr = dict(ABORT_WAITING if o.version_start is None else ABORT_RUNNING)
        elif o.finish_reason == "stop":
            fr = {"type": "stop", "matched": o.matched if o.matched is not None else int(o.output_ids[-1])}
        else:
            fr = {"type": "length", "length": sp["max_new_tokens"]}
        finished_at = o.version_end if o.version_end is not None else self._version
        meta: dict[str, Any] = {
            "id": r["rids"][i], "finish_reason": fr, "prompt_tokens": len(r["prompts"][i]),
            "completion_tokens": len(o.output_ids), "cached_tokens": 0, "reasoning_tokens": 0, "num_retractions": 0,
            "e2e_latency": dt, **self._version_meta(o.versions, finished_at)}
        if r["return_logprob"][i]:
            meta["input_token_logprobs"] = input_lp[0]
            meta["output_token_logprobs"] = _lp_triples(o.logprobs, o.output_ids, text_of)
            meta["output_token_logprobs_length"] = len(o.output_ids)
            if r["top_logprobs_num"]:
                meta["input_top_logprobs"] = input_lp[1]
                meta["output_top_logprobs"] = [_lp_triples(lp, ix, text_of)
                                               for lp, ix in zip(o.top_logprobs, o.top_ids, strict=True)]
            if r["token_ids_logprob"][i] is not None:
                meta["input_token_ids_logprobs"] = input_lp[2]
                meta["output_token_ids_logprobs"] = ids_lp
        if r["mc_samples"]:
            meta["output_mc_ids"] = o.mc_ids.tolist()
            meta["output_mc_logprobs"] = o.mc_logprobs.tolist()
        item = {"text": self._detokenize(o, sp), "output_ids": [int(t) for t in o.output_ids], "meta_info": meta}
        if r["return_prompt_token_ids"]:
            item["prompt_token_ids"] = list(r["prompts"][i])
        return item

    def _detokenize(self, o: GenerationOutput, sp: dict) -> str:
        """SGLang's `text`: the output decoded by the checkpoint's tokenizer, less the matched stop token or stop
        string unless no_stop_trim (detokenizer_manager.trim_matched_stop); "" without a tokenizer."""
        if self.tokenizer is None:
            return ""
        ids = o.output_ids
        if o.finish_reason == "stop" and o.matched is None and not sp["no_stop_trim"]:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=sp["skip_special_tokens"],
                                     spaces_between_special_tokens=sp["spaces_between_special_tokens"])
        if o.finish_reason == "stop" and o.matched is not None and (pos := text.find(o.matched)) >= 0:
            text = text[:pos + len(o.matched)] if sp["no_stop_trim"] else text[:pos]
        return text

    def _token_text_of(self, token_id: int) -> str:
        """One id's text, decoded alone as SGLang's detokenize_logprob_tokens does (cached: ids repeat)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _input_logprobs(self, r, outs, guard) -> list[tuple[list, list | None, list | None]]:
        """SGLang's input_token_logprobs, input_top_logprobs, input_token_ids_logprobs: one entry per prompt token
        from logprob_start_len on (-1: none), the first always None as SGLang 0.5.23 reports it (its prefill keeps
        the logits from that position on, and those predict the next token). Plain log_softmax(logits), no
        temperature. Not scored for a request that was aborted."""
        k, prompts = r["top_logprobs_num"], r["prompts"]
        text_of = self._token_text_of if r["return_text_in_logprobs"] and self.tokenizer is not None else None
        out = [([], [] if k else None, [] if r["token_ids_logprob"][i] is not None else None)
               for i in range(len(prompts))]
        want = [i for i, p in enumerate(prompts) if r["return_logprob"][i] and 0 <= r["logprob_start_len"][i] < len(p)
                and outs[i].finish_reason != "abort"]
        for i in want:
            s, tids = r["logprob_start_len"][i], r["token_ids_logprob"][i]
            out[i] = ([[None, int(prompts[i][s]), text_of(int(prompts[i][s])) if text_of else None]],
                      [None] if k else None, [None] if tids is not None else None)
        scored = [i for i in want if r["logprob_start_len"][i] + 1 < len(prompts[i])]
        if not scored:
            return out
        starts = [r["logprob_start_len"][i] + 1 for i in scored]
        queries = None
        width = max(len(r["token_ids_logprob"][i] or ()) for i in scored)
        if width:
            queries = np.concatenate([
                np.tile(np.pad(np.asarray(r["token_ids_logprob"][i] or [], np.int64),
                               (0, width - len(r["token_ids_logprob"][i] or ()))), (len(prompts[i]) - s, 1))
                for i, s in zip(scored, starts, strict=True)])
        res = self._score([prompts[i] for i in scored], starts, k, queries, 1.0, guard)
        for j, (i, s) in enumerate(zip(scored, starts, strict=True)):
            a, b = int(res.offsets[j]), int(res.offsets[j + 1])
            toks, tops, ids_rows = out[i]
            toks += _lp_triples(res.token_logprob[a:b], prompts[i][s:], text_of)
            if k:
                tops += [_lp_triples(lp, ix, text_of)
                         for lp, ix in zip(res.topk_logprobs[a:b], res.topk_ids[a:b], strict=True)]
            if ids_rows is not None:
                tids = r["token_ids_logprob"][i]
                ids_rows += [_lp_triples(row[: len(tids)], tids, text_of) for row in res.query_logprobs[a:b]]
        return out

    def _output_ids_logprobs(self, r, outs, guard) -> list[list | None]:
        """SGLang's output_token_ids_logprobs: logprobs of fixed ids at every output position, scored after
        generation in one forward (under the weights of `weight_version`, at the sampling temperature)."""
        res_out: list[list | None] = [None] * len(outs)
        text_of = self._token_text_of if r["return_text_in_logprobs"] and self.tokenizer is not None else None
        want = [i for i, t in enumerate(r["token_ids_logprob"]) if t and r["return_logprob"][i]]
        want = [i for i in want if outs[i].output_ids and outs[i].finish_reason != "abort"]
        for i, t in enumerate(r["token_ids_logprob"]):
            if t and r["return_logprob"][i] and i not in want:
                res_out[i] = []  # no tokens, or aborted (no scoring forward after an abort)
        if not want:
            return res_out
        seqs = [list(r["prompts"][i]) + list(outs[i].output_ids) for i in want]
        starts = [len(r["prompts"][i]) for i in want]
        width = max(len(r["token_ids_logprob"][i]) for i in want)
        queries = np.concatenate([
            np.tile(np.pad(np.asarray(r["token_ids_logprob"][i], np.int64),
                           (0, width - len(r["token_ids_logprob"][i]))), (len(outs[i].output_ids), 1))
            for i in want])
        temp = r["sampling"]["temperature"] or 1.0
        res = self._score(seqs, starts, 0, queries, temp, guard)
        for j, i in enumerate(want):
            ids = r["token_ids_logprob"][i]
            a, b = int(res.offsets[j]), int(res.offsets[j + 1])
            res_out[i] = [_lp_triples(row[: len(ids)], ids, text_of) for row in res.query_logprobs[a:b]]
        return res_out

    # ---- abort / health / load (SGLang's /abort_request, /health_generate, /v1/loads) ----------------------
    def abort_request(self, req: dict) -> None:
        """SGLang's /abort_request: `abort_all` ends every request in flight or waiting; else every row whose rid
        starts with `rid` (SGLang matches by prefix, so a batch's "<rid>_<i>" rows go with "<rid>"); an empty rid
        aborts nothing. Aborted rows answer their /generate with the tokens they have, finish_reason abort."""
        rid, abort_all = req.get("rid", ""), req.get("abort_all", False)
        if not isinstance(rid, str) or not _is_bool(abort_all):
            raise ApiError(f"rid must be a string and abort_all a bool, got rid={rid!r}, abort_all={abort_all!r}")
        with self._cond:
            if abort_all:
                self._abort_in_flight()
            elif rid:
                for ticket in self._tickets:
                    ticket.aborted.update(i for i, x in enumerate(ticket.rids) if x.startswith(rid))
                self._cond.notify_all()

    def health_generate(self) -> None:
        """SGLang's /health_generate: one greedy token from input [0] through the same step guard as any request
        (so a wedged weights lock shows). A paused engine is healthy without it: its requests wait by design, and
        a supervisor must not restart an engine in the middle of a weight update."""
        if self._paused:
            return
        self.sampler.generate([[0]], max_new_tokens=1, temperature=0.0, step_guard=self._guard(self._epoch))

    def load(self) -> dict[str, Any]:
        """This engine's one LoadSnapshot (SGLang's load_snapshot.py core fields, dp_rank 0): rows in flight, the
        waiting ones those with no forward yet (all of them while paused), tokens they hold."""
        with self._cond:
            rows = sum(len(t.rids) for t in self._tickets)
            waiting = rows if self._paused else sum(len(t.rids) for t in self._tickets if not t.started)
            tokens = sum(t.tokens for t in self._tickets)
        with self._stats_lock:
            throughput = self.stats["completion_tokens"] / max(self.stats["generate_s"], 1e-9)
        return {"timestamp": time.time(), "dp_rank": 0, "num_running_reqs": rows - waiting,
                "num_waiting_reqs": waiting, "num_waiting_uncached_tokens": 0, "num_used_tokens": tokens,
                "num_total_tokens": tokens, "num_active_tokens": tokens, "num_prealloc_ready_tokens": 0,
                "max_total_num_tokens": 0, "max_running_requests": self.max_batch_size, "token_usage": 0.0,
                "gen_throughput": throughput, "cache_hit_rate": 0.0, "utilization": 0.0,
                "total_prefill_uncached_tokens": 0, "total_prefill_busy_us": 0, "decode_moments": None}

    # ---- pause / continue / flush ------------------------------------------------------------------
    def _abort_in_flight(self) -> None:
        """End every request in flight with finish_reason "abort" (caller holds _cond); new ones are unaffected."""
        self._epoch += 1
        self._cond.notify_all()

    def _drained(self) -> bool:
        """No request of an aborted epoch is still running (caller holds _cond)."""
        return all(t.epoch is None or t.epoch >= self._epoch for t in self._tickets)

    def pause(self, req: dict) -> dict:
        """SGLang's /pause_generation: "abort" returns once the aborted requests have ended (as SGLang's loop
        waits for its model_update_lock), "in_place"/"retract" once no further forward will start."""
        mode = req.get("mode", "abort")
        if mode not in PAUSE_MODES:
            raise ApiError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._cond:
            self._paused, self._pause_mode = True, mode
            if mode == "abort":
                self._abort_in_flight()
                self._cond.wait_for(self._drained)
            self._cond.notify_all()
        return {"message": "Generation paused successfully.", "status": "ok"}

    def resume(self, req: dict | None = None) -> dict:
        """SGLang's /continue_generation (its `torch_empty_cache` has nothing to free here)."""
        with self._cond:
            self._paused, self._pause_mode = False, ""
            self._cond.notify_all()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @property
    def paused(self) -> bool:
        return self._paused

    def _idle(self) -> bool:
        """SGLang's is_fully_idle(ignore_waiting=paused) (caller holds _cond): unpaused, nothing in flight; paused,
        no request holding KV (retracted requests hold none there; aborted ones have ended)."""
        if not self._paused:
            return not self._tickets
        if self._pause_mode == "retract":
            return True
        return not any(t.started and t.epoch == self._epoch for t in self._tickets) and self._drained()

    def flush_cache(self, timeout_s: float = 0.0) -> tuple[bool, str]:
        """SGLang's /flush_cache: succeeds only when idle, waiting up to `timeout_s` for that. There is no shared
        prefix cache here to drop, but a client must meet SGLang's refusals to be right against SGLang."""
        with self._cond:
            ok = self._cond.wait_for(self._idle, timeout=timeout_s) if timeout_s > 0 else self._idle()
        if ok:
            return True, "Cache flushed.\n"
        return False, ("Timed out waiting for idle state." if timeout_s > 0 else "Flush cache failed.\n")

    # ---- weight updates ----------------------------------------------------------------------------
    @staticmethod
    def _fail(message: str) -> ApiError:
        return ApiError(message, extra={"success": False, "message": message})

    def init_weights_update_group(self, req: dict) -> dict:
        try:
            addr, port = req.get("master_address"), req.get("master_port")
            rank_offset, world = req.get("rank_offset"), req.get("world_size")
            name, backend = req.get("group_name", SGLANG_GROUP_NAME), req.get("backend", "nccl")
            if not _is_int(rank_offset) or rank_offset < 1:
                raise ValueError(f"rank_offset must be an int >= 1 (rank 0 is the learner), got {rank_offset!r}")
            check_group_args(addr, port, world, rank_offset, name, backend)
        except ValueError as e:
            raise self._fail(f"/init_weights_update_group: {e}") from None
        with self._update_lock:
            if self._group is not None:
                raise self._fail(f"a weight group {self._group_name!r} already exists; call "
                                 "/destroy_weights_update_group first")
            try:
                self._group = init_weights_group(addr, port, world, rank_offset, name, backend,
                                                 timeout_s=self.group_timeout_s)
            except Exception as e:  # timeouts, refused connections: the caller needs to know, in words
                raise self._fail(f"/init_weights_update_group: could not form group {name!r} at "
                                 f"{addr}:{port} as rank {rank_offset}/{world}: {type(e).__name__}: {e}") from None
            self._group_name = name
        return {"success": True, "message": f"joined {name!r} as rank {rank_offset} of {world} ({backend})"}

    def destroy_weights_update_group(self, req: dict) -> dict:
        name = req.get("group_name", self._group_name)
        with self._update_lock:
            if self._group is None or name != self._group_name:
                raise self._fail(f"no weight group named {name!r} (current: {self._group_name or 'none'})")
            destroy_weights_group(self._group)
            self._group, self._group_name = None, ""
        return {"success": True, "message": f"destroyed {name!r}"}

    def begin_weight_update(self, req: dict) -> dict:
        """SGLang's /begin_weight_update: open the session the buckets must arrive in (nothing is unpacked here)."""
        selector = req.get("selector", "all")
        if selector not in SELECTORS:
            raise self._fail(f"selector must be one of {SELECTORS}, got {selector!r}")
        with self._update_lock:
            if self._session:
                raise self._fail(SESSION_OPEN)
            self._session, self._staged, self._staged_version, self._session_error = True, {}, None, ""
        return {"success": True, "message": "Success"}

    def end_weight_update(self, req: dict | None = None) -> dict:
        """SGLang's /end_weight_update: close the session, swapping everything it staged (and the version it named)
        in at once, between two decode steps. A session with a rejected bucket applies nothing (old weights kept)."""
        with self._update_lock:
            if not self._session:
                raise self._fail(NO_SESSION_TO_END)
            staged, version, error = self._staged, self._staged_version, self._session_error
            self._session, self._staged, self._staged_version, self._session_error = False, {}, None, ""
            if error:
                raise self._fail(f"nothing applied, old weights kept (version {self._version}): {error}")
            t0 = time.perf_counter()
            with self._cond, torch.no_grad():
                for name, t in staged.items():
                    self.params[name].copy_(t)
                if version is not None:
                    self._version = version
            self.stats["weight_swap_s"] += time.perf_counter() - t0
            self.stats["weight_updates"] += 1 if staged or version is not None else 0
        return {"success": True, "message": "Success"}

    def update_weight_version(self, req: dict) -> dict:
        """SGLang's /update_weight_version: a new label, after aborting the requests in flight unless
        abort_all_requests=false. Inside a session it is staged with the weights, so no token produced by the old
        weights is ever labelled with the new version."""
        version = _version_label(req.get("new_version"), "new_version")
        abort = req.get("abort_all_requests", True)
        if not isinstance(abort, bool):
            raise self._fail(f"abort_all_requests must be a bool, got {abort!r}")
        with self._update_lock:
            with self._cond:
                if abort:
                    self._abort_in_flight()
                if not self._session:
                    self._version = version
            if self._session:
                self._staged_version = version
        return {"success": True, "message": f"Weight version updated to {version}", "new_version": version}

    def update_weights_from_distributed(self, req: dict) -> dict:
        """SGLang's /update_weights_from_distributed: receive one bucket from rank 0 and stage it for the session's
        end. Refused outside a session before anything is received, as 0.5.23 refuses it."""
        names, dtypes, shapes = req.get("names"), req.get("dtypes"), req.get("shapes")
        group_name = req.get("group_name", SGLANG_GROUP_NAME)
        if not self._session:
            raise self._fail(NO_SESSION)
        # Structural errors: we cannot know what rank 0 sends, so nothing is received.
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            raise self._fail("names, dtypes and shapes must be lists (one entry per tensor, in send order)")
        if not len(names) == len(dtypes) == len(shapes):
            raise self._fail(f"names/dtypes/shapes must have equal lengths, got "
                             f"{len(names)}/{len(dtypes)}/{len(shapes)}")
        try:
            parsed = [str_to_dtype(d) for d in dtypes]
        except ValueError as e:
            raise self._fail(f"dtypes: {e}") from None
        if not all(isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s) for s in shapes):
            raise self._fail("shapes must be lists of non-negative ints")
        flattened = req.get("load_format") == FLATTENED  # any other load_format: one broadcast per tensor (SGLang)
        flush = req.get("flush_cache", True)
        if req.get("abort_all_requests", False) is True:
            with self._cond:
                self._abort_in_flight()
        with self._update_lock:
            if not self._session:
                raise self._fail(NO_SESSION)
            if self._group is None or group_name != self._group_name:
                raise self._fail(f"no weight group named {group_name!r}; call /init_weights_update_group first")
            # Semantic errors: still drain the broadcast so the group stays in step with rank 0,
            # but stage nothing (the old weights stay intact).
            errors = []
            if len(set(names)) != len(names):
                errors.append("names contain duplicates")
            for name, shape in zip(names, shapes, strict=True):
                if not isinstance(name, str) or name not in self.params:
                    errors.append(f"unknown weight name {name!r}")
                elif tuple(shape) != tuple(self.params[name].shape):
                    errors.append(f"{name}: shape {shape} does not match the model's "
                                  f"{list(self.params[name].shape)}")
            version = req.get("weight_version")
            if version is not None:
                try:
                    version = _version_label(version)
                except ApiError as e:
                    errors.append(e.message)
            if not isinstance(flush, bool):
                errors.append(f"flush_cache must be a bool, got {flush!r}")
            t0 = time.perf_counter()
            try:
                received = recv_bucket(self._group, [str(n) for n in names], parsed, shapes, device=self.device,
                                       flattened=flattened)
            except Exception as e:
                self._session_error = self._session_error or f"receiving a bucket failed ({type(e).__name__}: {e})"
                raise self._fail(f"receiving the broadcast failed ({type(e).__name__}: {e}); the weight group "
                                 "may be out of step: destroy and re-create it") from None
            self.stats["weight_recv_s"] += time.perf_counter() - t0
            if errors:
                shown = "; ".join(errors[:5]) + (f"; ... ({len(errors)} errors)" if len(errors) > 5 else "")
                self._session_error = self._session_error or f"a bucket was rejected: {shown}"
                raise self._fail(f"update rejected, old weights kept (version {self._version}): {shown}")
            self._staged.update(received)
            self.stats["weight_bytes"] += sum(t.numel() * t.element_size() for t in received.values())
            message = "Succeeded to update parameter online."
            if version is not None:
                self._staged_version = version
                message += f" Weight version updated to {version}."
        if flush:
            with self._cond:
                if not self._idle():
                    raise self._fail(NOT_FLUSHED)
        return {"success": True, "message": message}

    def close(self) -> None:
        """Leave the weight group, if any (the server calls this on stop)."""
        with self._update_lock:
            destroy_weights_group(self._group)
            self._group, self._group_name, self._staged, self._session = None, "", {}, False

    # ---- info --------------------------------------------------------------------------------------
    def model_info(self) -> dict:
        """SGLang's /model_info (GetModelInfoResponse) and our card: vocabulary, fingerprint, eos/pad."""
        return dict(self.card, tokenizer_path=self.model_path, served_model_name=self.model_path,
                    is_generation=True, preferred_sampling_params=None, weight_version=self._version,
                    load_format="auto", reasoning_parser=None, tool_call_parser=None,
                    model_type=getattr(self.model.config, "model_type", None), has_image_understanding=False,
                    has_audio_understanding=False, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)

    def server_info(self) -> dict:
        from asyncopd import __version__

        # SGLang 0.5.23's GetServerInfoResponse and the server args slime and sglang-router read: one engine is
        # tp/dp/pp/ep 1, node 0 of 1, no disaggregation. The HTTP layer adds host and port.
        deployment = {"nnodes": 1, "node_rank": 0, "dp_size": 1, "base_gpu_id": 0, "dcp_size": 1,
                      "max_running_requests": self.max_batch_size, "max_prefill_tokens": 0,
                      "enable_dp_attention": False, "enable_hierarchical_cache": False, "hicache_size": 0,
                      "kv_event_sources": []}
        sglang = {"model_path": self.model_path, "tokenizer_path": self.model_path,
                  "served_model_name": self.model_path, "max_context_length": self.max_len,
                  "context_length": self.max_len, "max_total_num_tokens": None,
                  "max_running_requests": self.max_batch_size, "internal_states": [],
                  "incremental_streaming_output": False, "disaggregation_mode": "null", "dp_size": 1, "pp_size": 1,
                  "ep_size": 1, "nnodes": 1, "node_rank": 0, "base_gpu_id": 0, "gpu_id_step": 1,
                  "skip_tokenizer_init": self.tokenizer is None, "enable_memory_saver": False,
                  "deployment_info": deployment, "sglang_api_version": SGLANG_API_VERSION}
        return {**sglang, "engine": "asyncopd-embedded", "version": __version__, "supports_mc_samples": True,
                "max_mc_samples": MAX_MC_SAMPLES, "weight_version": self._version, "paused": self._paused,
                "weight_group": self._group_name or None, "torch_threads": torch.get_num_threads(),
                # SGLang's server-args fields a weight sync reads: the dtype weights must arrive in, the TP ranks
                "dtype": dtype_to_str(next(self.model.parameters()).dtype), "tp_size": 1,
                "stats": dict(self.stats)}
