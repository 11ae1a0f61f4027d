"""One client for the embedded engine and for real SGLang servers: SGLang's native HTTP API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncopd.core.types import Rollout
from asyncopd.net.client import HttpClient, ServerError
from asyncopd.weights.versions import token_versions

FINISH_REASONS = ("stop", "length", "abort")


SGLANG_GROUP_NAME = "weight_update_group"  # SGLang's default group_name in its weight-update requests

def parse_version(v: Any) -> int:
    """SGLang reports weight_version as a string; "default" (a server never updated) is version 0."""
    if v is None or v == "default":
        return 0
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ServerError(f"weight_version {v!r} is not an integer: updates must send "
                          "weight_version=str(optimizer steps applied)") from None


def _finish_reason(fr: Any) -> str:
    kind = fr.get("type") if isinstance(fr, dict) else fr
    return kind if kind in FINISH_REASONS else "abort"


class SGLangClient(HttpClient):
    """Typed wrappers for /generate and the weight-sync endpoints; `generate` returns Rollouts."""

    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 300.0):
        super().__init__(base_url, api_key, timeout_s)
        self._server_info: dict | None = None

    # ---- info --------------------------------------------------------------------------------------
    def health(self, timeout_s: float | None = None) -> bool:
        self.request("GET", "/health", timeout_s=timeout_s)
        return True

    def model_info(self) -> dict:
        return self.get_json("/model_info")

    def server_info(self, refresh: bool = False) -> dict:
        if self._server_info is None or refresh:
            self._server_info = self.get_json("/server_info")
        return self._server_info

    def get_weight_version(self) -> int:
        """The served version, from /model_info (SGLang 0.5.23 has no /get_weight_version)."""
        return parse_version(self.model_info().get("weight_version"))

    # ---- generation --------------------------------------------------------------------------------
    def generate_raw(self, payload: dict) -> dict | list[dict]:
        return self.post_json("/generate", payload)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop_token_ids: Sequence[int] = (), mc_samples: int = 0,
                 student_top_k: int = 0, metadata: Sequence[dict] | None = None,
                 seed: int | Sequence[int] | None = None) -> list[Rollout]:
        """Sample one response per prompt, as one batched request; returns Rollouts in prompt order. `seed`: one
        for the request, or one per prompt (sent as per-item sampling_params: each row its own stream)."""
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(f"metadata has {len(metadata)} entries for {len(prompts)} prompts")
        if mc_samples > 0 and not self.server_info().get("supports_mc_samples"):
            raise ValueError(
                f"mc_samples={mc_samples}: the rollout server at {self.base_url} does not advertise "
                "per-position multi-sample capture (stock SGLang has none); use rollout.backend=embedded "
                "or a patched SGLang, or set mc_samples=0")
        if not prompts:
            return []
        sampling: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                                    "top_p": float(top_p)}
        if stop_token_ids:
            sampling["stop_token_ids"] = [int(t) for t in stop_token_ids]
        per_item = seed is not None and not isinstance(seed, (int, np.integer))
        if per_item and len(seed) != len(prompts):
            raise ValueError(f"seed has {len(seed)} entries for {len(prompts)} prompts")
        if seed is not None and not per_item:
            sampling["sampling_seed"] = int(seed)
        payload: dict[str, Any] = {"input_ids": [[int(t) for t in p] for p in prompts],
                                   "sampling_params": [{**sampling, "sampling_seed": int(x)} for x in seed]
                                   if per_item else sampling, "return_logprob": True}
        if student_top_k:
            payload["top_logprobs_num"] = int(student_top_k)
        if mc_samples:
            payload["mc_samples"] = int(mc_samples)
        items = self.generate_raw(payload)
        if not isinstance(items, list) or len(items) != len(prompts):
            raise ServerError(f"{self.base_url}/generate: expected a list of {len(prompts)} results")
        return [self._rollout(p, it, mc_samples, student_top_k, metadata[i] if metadata else None)
                for i, (p, it) in enumerate(zip(prompts, items, strict=True))]

    def _rollout(self, prompt, item: dict, mc: int, top_k: int, metadata: dict | None) -> Rollout:
        meta = item.get("meta_info", {})
        out = np.asarray(item.get("output_ids", []), dtype=np.int32)
        lps = meta.get("output_token_logprobs") or []
        if len(lps) != len(out):
            raise ServerError(f"{self.base_url}/generate: {len(lps)} output_token_logprobs for "
                              f"{len(out)} output_ids")
        logprobs = np.asarray([e[0] for e in lps], dtype=np.float32).reshape(len(out))
        versions, version_start, version_end = self._versions(meta, len(out))
        r = Rollout(prompt_ids=np.asarray(prompt, dtype=np.int32), response_ids=out, logprobs=logprobs,
                    version_start=version_start, version_end=version_end,
                    finish_reason=_finish_reason(meta.get("finish_reason")),
                    metadata=dict(metadata) if metadata else {}, token_versions=versions)
        if mc:
            r.mc_ids = np.asarray(meta["output_mc_ids"], dtype=np.int32).reshape(len(out), mc)
            r.mc_logprobs = np.asarray(meta["output_mc_logprobs"], dtype=np.float32).reshape(len(out), mc)
        if top_k:
            tops = meta.get("output_top_logprobs") or []
            if len(tops) != len(out):
                raise ServerError(f"{self.base_url}/generate: {len(tops)} output_top_logprobs rows for "
                                  f"{len(out)} tokens")
            r.student_topk_ids = np.asarray([[e[1] for e in row] for row in tops],
                                            dtype=np.int32).reshape(len(out), top_k)
            r.student_topk_logprobs = np.asarray([[e[0] for e in row] for row in tops],
                                                 dtype=np.float32).reshape(len(out), top_k)
        return r

    def _versions(self, meta: dict, n: int) -> tuple[np.ndarray | None, int, int]:
        """(per-token versions, first, last) from SGLang's `weight_versions` spans. A server without them (SGLang
        before 0.5.23) reports only the version it holds when the response ends, the newest a token can have:
        charging that would hide staleness, so such a server is refused."""
        spans = meta.get("weight_versions")
        if spans is None:
            raise ServerError(f"{self.base_url}/generate: no meta_info.weight_versions spans, so the weight version of "
                              "each token is unknown and staleness cannot be bounded; use SGLang 0.5.23 or later "
                              "(the version the gpu extra pins)")
        try:
            per_token = token_versions(spans, n, parse_version)
        except ValueError as e:
            raise ServerError(f"{self.base_url}/generate: {e}") from None
        return per_token, parse_version(spans[0]["version"]), parse_version(spans[-1]["version"])

    # ---- control and weight sync -------------------------------------------------------------------
    def _control(self, path: str, payload: dict | None = None, timeout_s: float | None = None) -> dict:
        out = self.post_json(path, payload, timeout_s=timeout_s)
        if isinstance(out, dict) and out.get("success") is False:
            raise ServerError(f"POST {self.base_url}{path}: {out.get('message')}")
        return out

    def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = SGLANG_GROUP_NAME,
                                  backend: str = "gloo") -> dict:
        return self._control("/init_weights_update_group", {
            "master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend})

    def update_weights_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str = SGLANG_GROUP_NAME,
                                        flush_cache: bool = True, weight_version: str | int | None = None,
                                        load_format: str | None = None) -> dict:
        """Receive one bucket broadcast by rank 0 (call concurrently with the sender), inside a
        begin_weight_update ... end_weight_update session (SGLang 0.5.23 refuses it outside one). flush_cache
        defaults to SGLang's True; a sync that flushed before the buckets sends False."""
        payload: dict[str, Any] = {"names": list(names), "dtypes": list(dtypes),
                                   "shapes": [list(map(int, s)) for s in shapes], "group_name": group_name,
                                   "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        if load_format:
            payload["load_format"] = load_format
        return self._control("/update_weights_from_distributed", payload)

    def destroy_weights_update_group(self, group_name: str = SGLANG_GROUP_NAME) -> dict:
        return self._control("/destroy_weights_update_group", {"group_name": group_name})

    def begin_weight_update(self) -> dict:
        """Open SGLang's weight-update session (selector "all": the target model and any draft model)."""
        return self._control("/begin_weight_update", {})

    def end_weight_update(self) -> dict:
        return self._control("/end_weight_update", {})

    def update_weight_version(self, version: str | int, abort_all_requests: bool = True) -> dict:
        """Relabel the served weights; SGLang aborts the requests in flight unless abort_all_requests=False."""
        return self._control("/update_weight_version", {"new_version": str(version),
                                                        "abort_all_requests": abort_all_requests})

    def flush_cache(self, timeout_s: float = 0.0) -> bool:
        """Whether the engine flushed (SGLang answers 400 while requests hold KV; `timeout_s` > 0 lets it wait
        that long for them)."""
        try:
            self.request("POST", f"/flush_cache?timeout={float(timeout_s)}" if timeout_s > 0 else "/flush_cache",
                         timeout_s=max(self.timeout_s, timeout_s + 30.0))
        except ServerError as e:
            if e.status == 400:
                return False
            raise
        return True

    def pause_generation(self, mode: str = "abort") -> dict:
        """mode "abort" (SGLang's default: requests in flight end), "retract" (they wait, their KV recomputed
        after), or "in_place" (they wait with their KV)."""
        return self._control("/pause_generation", {"mode": mode})

    def continue_generation(self) -> dict:
        return self._control("/continue_generation", {})
