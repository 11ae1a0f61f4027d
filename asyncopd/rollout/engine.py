"""The embedded rollout engine: SGLang's native request/response shapes over our KV-cache sampler.

Concurrency model. Every forward of every request runs inside `step_guard`, which holds the engine's
weights lock (`_cond`) for exactly one forward and yields the weight version. So:
- a weight update receives its tensors with no lock held, then swaps them into the model under the
  lock, i.e. between two decode steps; requests in flight continue on the new weights and report
  `weight_version_start` != `weight_version`;
- `/pause_generation` makes the next step of every request wait (mode "in_place"/"retract"), or ends
  the requests in flight with finish_reason "abort" (mode "abort", SGLang's default);
  `/continue_generation` resumes them.
The engine raises ApiError (HTTP 400 with a message naming the field) for malformed requests.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any

import numpy as np
import torch

from asyncopd.config.schema import RolloutConfig
from asyncopd.model.sampler import GenerationOutput, KVCacheSampler
from asyncopd.model.scorer import score_sequences, token_vocab
from asyncopd.net.server import ApiError, model_card
from asyncopd.rollout.client import SGLANG_GROUP_NAME
from asyncopd.weights.broadcast import recv_bucket, str_to_dtype
from asyncopd.weights.process_group import check_group_args, destroy_weights_group, init_weights_group

# SGLang /generate fields this engine accepts but that change nothing when left at these values.
_IGNORED_TOP = {"text": None, "stream": False, "return_text_in_logprobs": None, "lora_path": None,
                "custom_logit_processor": None, "return_hidden_states": False, "input_embeds": None,
                "image_data": None, "audio_data": None, "video_data": None, "session_params": None,
                "log_metrics": None, "data_parallel_rank": None, "bootstrap_host": None,
                "bootstrap_port": None, "bootstrap_room": None, "modalities": None, "priority": None}
_IGNORED_SAMPLING = {"n": 1, "min_new_tokens": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                     "repetition_penalty": 1.0, "min_p": 0.0, "ignore_eos": False, "stop": None,
                     "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
                     "custom_params": None, "logit_bias": None}
_FREE_SAMPLING = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval"}
_SAMPLING = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "sampling_seed"}
_TOP = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
        "token_ids_logprob", "rid", "mc_samples"}
PAUSE_MODES = ("abort", "retract", "in_place")
MAX_MC_SAMPLES = 1024


class _Aborted(Exception):
    pass


def _is_int(x) -> bool:
    return type(x) is int


def _is_num(x) -> bool:
    return type(x) in (int, float)


def _lp_triples(lps, ids) -> list:
    return [[float(lp), int(i), None] for lp, i in zip(lps, ids, strict=True)]


def _empty_output(k: int, m: int, version: int) -> GenerationOutput:
    """What a prefill-only request (max_new_tokens = 0) returns: no tokens, at `version`."""
    return GenerationOutput(
        output_ids=[], logprobs=np.zeros(0, np.float32), finish_reason="length", version_start=version,
        version_end=version, top_ids=np.zeros((0, k), np.int32), top_logprobs=np.zeros((0, k), np.float32),
        mc_ids=np.zeros((0, m), np.int32) if m else None, mc_logprobs=np.zeros((0, m), np.float32) if m else None)


def _parse_version(v, field: str = "weight_version") -> int:
    """SGLang carries weight_version as a string; ours is an int (optimizer steps applied)."""
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ApiError(f"{field} must be an integer (the number of optimizer steps applied), "
                       f"got {v!r}") from None


class RolloutEngine:
    def __init__(self, model, model_path: str = "", *, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, initial_version: int = 0,
                 group_timeout_s: float = RolloutConfig.group_timeout_s):
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
        # name -> parameter (tied weights appear under every name, e.g. lm_head.weight and embed_tokens).
        self.params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters(remove_duplicate=False))
        self.device = next(self.model.parameters()).device  # where broadcasts land (CUDA for NCCL)

        self._cond = threading.Condition()  # the weights lock; held for one forward at a time
        self._paused = False
        self._epoch = 0  # bumped by pause(mode="abort"): requests of an older epoch end
        self._version = int(initial_version)
        self._update_lock = threading.Lock()  # one weight update (receive + swap) at a time
        self._group = None
        self._group_name = ""
        self._staged: dict[str, torch.Tensor] = {}
        self._stats_lock = threading.Lock()
        self.stats = {"forward_steps": 0, "requests": 0, "sequences": 0, "completion_tokens": 0, "generate_s": 0.0,
                      "weight_updates": 0, "weight_bytes": 0, "weight_recv_s": 0.0, "weight_swap_s": 0.0}

    # ---- state -------------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    def _guard(self, epoch: int):
        @contextlib.contextmanager
        def step_guard():
            with self._cond:
                while self._paused and self._epoch == epoch:
                    self._cond.wait()
                if self._epoch != epoch:
                    raise _Aborted()
                self.stats["forward_steps"] += 1
                yield self._version

        return step_guard

    # ---- /generate ---------------------------------------------------------------------------------
    def _parse_sampling(self, sp) -> dict[str, Any]:
        if sp is None:
            sp = {}
        if isinstance(sp, list):
            if not sp or any(s != sp[0] for s in sp):
                raise ApiError("sampling_params: a batch runs as one sampler call, so every item needs the same "
                               "sampling_params; send one request per setting")
            sp = sp[0]
        if not isinstance(sp, dict):
            raise ApiError("sampling_params must be a JSON object")
        for key, val in sp.items():
            if key in _SAMPLING or key in _FREE_SAMPLING:
                continue
            if key in _IGNORED_SAMPLING:
                if val not in (_IGNORED_SAMPLING[key], None, [], ""):
                    raise ApiError(f"sampling_params.{key}={val!r} is not supported by the embedded engine "
                                   f"(leave it at {_IGNORED_SAMPLING[key]!r})")
                continue
            raise ApiError(f"sampling_params.{key} is unknown; supported: {sorted(_SAMPLING)}")
        max_new = sp.get("max_new_tokens", 128)
        if not _is_int(max_new) or max_new < 0:
            raise ApiError(f"sampling_params.max_new_tokens must be an int >= 0, got {max_new!r}")
        temp = sp.get("temperature", 1.0)
        if not _is_num(temp) or temp < 0:
            raise ApiError(f"sampling_params.temperature must be a number >= 0 (0 = greedy), got {temp!r}")
        top_p = sp.get("top_p", 1.0)
        if not _is_num(top_p) or not 0 < top_p <= 1:
            raise ApiError(f"sampling_params.top_p must be in (0, 1], got {top_p!r}")
        top_k = sp.get("top_k", -1)
        if not _is_int(top_k) or not (top_k == -1 or top_k >= 1):
            raise ApiError(f"sampling_params.top_k must be -1 (off) or an int >= 1, got {top_k!r}")
        stop = sp.get("stop_token_ids") or []
        if not isinstance(stop, list) or not all(_is_int(t) for t in stop):
            raise ApiError(f"sampling_params.stop_token_ids must be a list of ints, got {stop!r}")
        seed = sp.get("sampling_seed")
        if seed is not None and not _is_int(seed):
            raise ApiError(f"sampling_params.sampling_seed must be an int, got {seed!r}")
        return {"max_new_tokens": max_new, "temperature": float(temp), "top_p": float(top_p), "top_k": top_k,
                "stop_token_ids": stop, "seed": seed}

    def parse_generate(self, req: dict) -> dict[str, Any]:
        for key, val in req.items():
            if key in _TOP:
                continue
            if key in _IGNORED_TOP:
                if key == "text" and val is not None:
                    raise ApiError("text: the embedded engine takes token ids only; tokenize on the client and "
                                   "send input_ids")
                if key == "stream" and val:
                    raise ApiError("stream=true is not supported by the embedded engine; send stream=false")
                continue
            raise ApiError(f"unknown field {key!r} in /generate; supported: {sorted(_TOP)}")
        ids = req.get("input_ids")
        if ids is None:
            raise ApiError("input_ids is missing: send a list of token ids, or a list of such lists for a batch")
        if not isinstance(ids, list) or not ids:
            raise ApiError("input_ids must be a non-empty list of ints (or of int lists for a batch)")
        batched = isinstance(ids[0], list)
        prompts = ids if batched else [ids]
        for i, p in enumerate(prompts):
            where = f"input_ids[{i}]" if batched else "input_ids"
            if not isinstance(p, list) or not p:
                raise ApiError(f"{where} must be a non-empty list of token ids")
            if not all(_is_int(t) for t in p):
                raise ApiError(f"{where} must contain ints only")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                raise ApiError(f"{where} has token id {lo if lo < 0 else hi} outside the vocabulary "
                               f"[0, {self.vocab_size}); tokenize with the model's tokenizer")
        n = len(prompts)
        sp = self._parse_sampling(req.get("sampling_params"))
        if self.max_len:
            longest = max(len(p) for p in prompts)
            if longest + sp["max_new_tokens"] > self.max_len:
                raise ApiError(f"prompt ({longest} tokens) + sampling_params.max_new_tokens "
                               f"({sp['max_new_tokens']}) exceeds the model's max_position_embeddings "
                               f"({self.max_len}); lower max_new_tokens or shorten the prompt")

        def per_item(name, default, check, what, nested=False):
            """A scalar applies to every input; a list (of lists, when `nested`) has one entry per input."""
            val = req.get(name, default)
            per = batched and isinstance(val, list) and (
                not nested or (bool(val) and all(v is None or isinstance(v, list) for v in val)))
            vals = val if per else [val] * n
            if len(vals) != n:
                raise ApiError(f"{name}: a list must have one entry per input ({n}), got {len(vals)}")
            for v in vals:
                if not check(v):
                    raise ApiError(f"{name} must be {what}, got {v!r}")
            return vals

        ret_lp = per_item("return_logprob", False, lambda v: isinstance(v, bool), "a bool")
        start = per_item("logprob_start_len", -1, lambda v: _is_int(v) and v >= -1, "an int >= -1")
        top_n = req.get("top_logprobs_num", 0)
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
        if any(t for t in tids) and (sp["top_p"] < 1 or sp["top_k"] != -1):
            raise ApiError("token_ids_logprob with top_p < 1 or top_k != -1 is not supported by the embedded "
                           "engine (it scores full-vocabulary logprobs); drop token_ids_logprob or the filters")
        mc = req.get("mc_samples", 0)
        if not _is_int(mc) or not 0 <= mc <= MAX_MC_SAMPLES:
            raise ApiError(f"mc_samples must be an int in [0, {MAX_MC_SAMPLES}], got {mc!r}")
        if mc and sp["temperature"] == 0:
            raise ApiError("mc_samples > 0 needs sampling_params.temperature > 0: greedy decoding has nothing "
                           "to sample; set temperature (e.g. 1.0) or mc_samples=0")
        rid = req.get("rid")
        rids = rid if isinstance(rid, list) else ([rid] if not batched else
                                                  ([f"{rid}-{i}" for i in range(n)] if rid else [None] * n))
        if len(rids) != n or not all(r is None or isinstance(r, str) for r in rids):
            raise ApiError(f"rid must be a string, or a list of {n} strings for a batch")
        rids = [r or uuid.uuid4().hex for r in rids]
        return {"prompts": prompts, "batched": batched, "sampling": sp, "return_logprob": ret_lp,
                "logprob_start_len": start, "top_logprobs_num": top_n, "token_ids_logprob": tids,
                "mc_samples": mc, "rids": rids}

    def _score(self, seqs, starts, top_k, queries, temperature, guard):
        """One scoring forward, between decode steps like any other forward (same weights lock)."""
        with guard():
            return score_sequences(self.model, seqs, starts, top_k, queries, temperature=temperature,
                                   vocab_size=self.vocab_size)

    def generate(self, req: dict) -> dict | list[dict]:
        t0 = time.perf_counter()
        r = self.parse_generate(req)
        prompts, sp, n = r["prompts"], r["sampling"], len(r["prompts"])
        guard = self._guard(self._epoch)
        aborted = False
        try:
            if sp["max_new_tokens"] > 0:
                outs = self.sampler.generate(
                    prompts, max_new_tokens=sp["max_new_tokens"], temperature=sp["temperature"],
                    top_p=sp["top_p"], top_k=sp["top_k"], stop_token_ids=sp["stop_token_ids"],
                    top_logprobs_num=r["top_logprobs_num"], mc_samples=r["mc_samples"], seed=sp["seed"],
                    step_guard=guard)
            else:
                with guard() as v:
                    pass
                outs = [_empty_output(r["top_logprobs_num"], r["mc_samples"], v) for _ in range(n)]
            input_lp = self._input_logprobs(r, guard)
            ids_lp = self._output_ids_logprobs(r, outs, guard)
        except _Aborted:
            aborted = True
        dt = time.perf_counter() - t0
        items = []
        for i in range(n):
            meta: dict[str, Any] = {"id": r["rids"][i], "prompt_tokens": len(prompts[i]), "cached_tokens": 0,
                                    "e2e_latency": dt}
            if aborted:
                meta.update(finish_reason={"type": "abort", "message": "aborted by /pause_generation"},
                            completion_tokens=0, weight_version=str(self._version),
                            weight_version_start=str(self._version))
                items.append({"text": "", "output_ids": [], "meta_info": meta})
                continue
            o = outs[i]
            if o.finish_reason == "stop":
                fr = {"type": "stop", "matched": int(o.output_ids[-1])}
            else:
                fr = {"type": "length", "length": sp["max_new_tokens"]}
            meta.update(finish_reason=fr, completion_tokens=len(o.output_ids),
                        weight_version=str(o.version_end), weight_version_start=str(o.version_start))
            if r["return_logprob"][i]:
                meta["output_token_logprobs"] = _lp_triples(o.logprobs, o.output_ids)
                meta["input_token_logprobs"] = input_lp[i][0]
                if r["top_logprobs_num"]:
                    meta["output_top_logprobs"] = [_lp_triples(lp, ix)
                                                   for lp, ix in zip(o.top_logprobs, o.top_ids, strict=True)]
                    meta["input_top_logprobs"] = input_lp[i][1]
                if ids_lp[i] is not None:
                    meta["output_token_ids_logprobs"] = ids_lp[i]
            if r["mc_samples"]:
                meta["output_mc_ids"] = o.mc_ids.tolist()
                meta["output_mc_logprobs"] = o.mc_logprobs.tolist()
            items.append({"text": "", "output_ids": list(map(int, o.output_ids)), "meta_info": meta})
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["sequences"] += n
            self.stats["completion_tokens"] += sum(it["meta_info"]["completion_tokens"] for it in items)
            self.stats["generate_s"] += dt
        return items if r["batched"] else items[0]

    def _input_logprobs(self, r, guard) -> list[tuple[list, list | None]]:
        """SGLang's input_token_logprobs / input_top_logprobs from `logprob_start_len` (-1 = none)."""
        k = r["top_logprobs_num"]
        out: list[tuple[list, list | None]] = [([], [] if k else None) for _ in r["prompts"]]
        want = [i for i, p in enumerate(r["prompts"])
                if r["return_logprob"][i] and 0 <= r["logprob_start_len"][i] < len(p)]
        if not want:
            return out
        seqs = [r["prompts"][i] for i in want]
        starts = [max(r["logprob_start_len"][i], 1) for i in want]
        res = self._score(seqs, starts, k, None, 1.0, guard)
        for j, i in enumerate(want):
            a, b = int(res.offsets[j]), int(res.offsets[j + 1])
            p = r["prompts"][i]
            toks = _lp_triples(res.token_logprob[a:b], p[starts[j]:])
            tops = [_lp_triples(lp, ix) for lp, ix in zip(res.topk_logprobs[a:b], res.topk_ids[a:b], strict=True)]
            if r["logprob_start_len"][i] == 0:  # the first token has no predecessor: SGLang reports None
                toks.insert(0, [None, int(p[0]), None])
                tops.insert(0, None)
            out[i] = (toks, tops if k else None)
        return out

    def _output_ids_logprobs(self, r, outs, guard) -> list[list | None]:
        """SGLang's output_token_ids_logprobs: logprobs of fixed ids at every output position, scored after
        generation in one forward (under the weights of `weight_version`, at the sampling temperature)."""
        res_out: list[list | None] = [None] * len(outs)
        want = [i for i, t in enumerate(r["token_ids_logprob"]) if t and r["return_logprob"][i]]
        want = [i for i in want if outs[i].output_ids]
        for i, t in enumerate(r["token_ids_logprob"]):
            if t and r["return_logprob"][i] and not outs[i].output_ids:
                res_out[i] = []
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
            res_out[i] = [_lp_triples(row[: len(ids)], ids) for row in res.query_logprobs[a:b]]
        return res_out

    # ---- pause / continue / flush ------------------------------------------------------------------
    def pause(self, req: dict) -> dict:
        mode = req.get("mode", "abort")
        if mode not in PAUSE_MODES:
            raise ApiError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._cond:
            self._paused = True
            if mode == "abort":
                self._epoch += 1
            self._cond.notify_all()
        return {"success": True, "message": f"paused (mode={mode})"}

    def resume(self) -> dict:
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        return {"success": True, "message": "continued"}

    @property
    def paused(self) -> bool:
        return self._paused

    def flush_cache(self) -> dict:
        # No prefix cache survives a request here, so there is nothing stale to drop.
        return {"success": True, "message": "no prefix cache to flush"}

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
            self._staged = {}
        return {"success": True, "message": f"joined {name!r} as rank {rank_offset} of {world} ({backend})"}

    def destroy_weights_update_group(self, req: dict) -> dict:
        name = req.get("group_name", self._group_name)
        with self._update_lock:
            if self._group is None or name != self._group_name:
                raise self._fail(f"no weight group named {name!r} (current: {self._group_name or 'none'})")
            destroy_weights_group(self._group)
            self._group, self._group_name, self._staged = None, "", {}
        return {"success": True, "message": f"destroyed {name!r}"}

    def update_weights_from_distributed(self, req: dict) -> dict:
        names, dtypes, shapes = req.get("names"), req.get("dtypes"), req.get("shapes")
        group_name = req.get("group_name", self._group_name)
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
        with self._update_lock:
            if self._group is None or group_name != self._group_name:
                raise self._fail(f"no weight group named {group_name!r}; call /init_weights_update_group first")
            # Semantic errors: still drain the broadcast so the group stays in step with rank 0,
            # but load nothing (the old weights stay intact).
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
            new_version = None
            if version is not None:
                try:
                    new_version = _parse_version(version)
                except ApiError as e:
                    errors.append(e.message)
            fmt = req.get("load_format")
            if fmt not in (None, "", "auto"):
                errors.append(f"load_format {fmt!r} is not supported (use null)")
            commit = req.get("commit", True)
            if not isinstance(commit, bool):
                errors.append(f"commit must be a bool, got {commit!r}")
            t0 = time.perf_counter()
            try:
                received = recv_bucket(self._group, [str(n) for n in names], parsed, shapes, device=self.device)
            except Exception as e:
                self._staged = {}
                raise self._fail(f"receiving the broadcast failed ({type(e).__name__}: {e}); the weight group "
                                 "may be out of step: destroy and re-create it") from None
            t_recv = time.perf_counter() - t0
            if errors:
                self._staged = {}
                shown = "; ".join(errors[:5]) + (f"; ... ({len(errors)} errors)" if len(errors) > 5 else "")
                raise self._fail(f"update rejected, old weights kept (version {self._version}): {shown}")
            self._staged.update(received)
            self.stats["weight_bytes"] += sum(t.numel() * t.element_size() for t in received.values())
            self.stats["weight_recv_s"] += t_recv
            if not commit:
                return {"success": True, "message": f"staged {len(received)} tensors (commit=false)"}
            t1 = time.perf_counter()
            staged, self._staged = self._staged, {}
            with self._cond, torch.no_grad():
                for name, t in staged.items():
                    self.params[name].copy_(t)
                if new_version is not None:
                    self._version = new_version
            self.stats["weight_swap_s"] += time.perf_counter() - t1
            self.stats["weight_updates"] += 1
        return {"success": True, "message": f"loaded {len(staged)} tensors; weight_version {self._version}"}

    def close(self) -> None:
        """Leave the weight group, if any (the server calls this on stop)."""
        with self._update_lock:
            destroy_weights_group(self._group)
            self._group, self._group_name, self._staged = None, "", {}

    # ---- info --------------------------------------------------------------------------------------
    def model_info(self) -> dict:
        return dict(self.card, tokenizer_path=self.model_path, is_generation=True,
                    weight_version=str(self._version), eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id)

    def server_info(self) -> dict:
        from asyncopd import __version__

        return {"engine": "asyncopd-embedded", "version": __version__, "supports_mc_samples": True,
                "max_mc_samples": MAX_MC_SAMPLES, "weight_version": str(self._version), "paused": self._paused,
                "weight_group": self._group_name or None, "torch_threads": torch.get_num_threads(),
                "stats": dict(self.stats)}
