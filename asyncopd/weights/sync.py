"""Driver side of the weight sync: the learner broadcasts while every engine receives over HTTP.

One update, as SGLang 0.5.23 defines the calls (sglang/srt/entrypoints/http_server.py, tokenizer_control_mixin.py,
scheduler_components/weight_updater.py), every engine in parallel:

1. `/pause_generation {mode}` (weights.pause_mode; skipped for "none"). SGLang's default "abort" returns once the
   aborted requests have drained (they answer with their partial output, which the rollout dispatcher resumes
   under the new weights); "retract" moves running requests back to the queue and frees their KV.
2. `/flush_cache` until it answers 200 (SGLang's scheduler refuses while a request holds KV; slime retries the
   same way). Skipped for "in_place", which SGLang documents as unable to flush (its paused requests keep their
   KV), and for "none".
3. `/begin_weight_update`: 0.5.23 refuses `/update_weights_from_distributed` outside a session
   (weight_updater.py: "must run between begin_weight_update() and end_weight_update()"). It is opened AFTER the
   pause: opened on a running server it takes the model-update writer lock (tokenizer_control_mixin.py:
   _weight_update_session_call), which waits for every request in flight to finish, so an abort or in-place
   pause after it would pause nothing; and it restores in-place-packed (quantized) weights for loading, which
   generation must not run on.
4. Every bucket's `/update_weights_from_distributed` with flush_cache=false (the cache was flushed once in 2;
   SGLang's default true would try again per bucket and fail the call while a request holds KV), concurrently
   with the learner's broadcast of that bucket; the last bucket carries `weight_version`, which 0.5.23 records
   with the weights (record_weight_version_after_update), so no separate `/update_weight_version` (whose
   default aborts every request) is needed.
5. `/end_weight_update` (finalizes quantized weights into kernel layout), then 6. `/continue_generation`: the
   session closes before generation resumes, so no request runs on unfinalized weights.

The pause and flush come before anything is broadcast: an engine that cannot pause, flush or open its session
fails the update before the learner sends a byte (a broadcast with a missing receiver blocks until the group
times out). Whatever happens, every session opened is closed and every engine paused is continued.

Ranks (slime's scheme): the learner is rank 0; engine i with tensor-parallel size tp_i takes ranks
rank_offset_i .. rank_offset_i + tp_i - 1, rank_offset_i = 1 + sum(tp_j, j < i), in a group of 1 + sum(tp_i)
ranks (SGLang's TP shard r joins at rank_offset + r).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from asyncopd.config.schema import WeightSyncConfig
from asyncopd.core.errors import ConfigError
from asyncopd.core.protocols import WeightSink, WeightSource
from asyncopd.weights.broadcast import FLATTENED, dtype_to_str, nbytes, str_to_dtype
from asyncopd.weights.process_group import find_free_port

PAUSE_MODES = ("abort", "retract", "in_place", "none")
WIRE_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("", FLATTENED)
NO_FLUSH = ("in_place", "none")  # pause modes after which SGLang cannot (in_place) or need not be flushed
FLUSH_WAIT_S = 1.0  # how long one /flush_cache?timeout= call lets the server wait for idleness
# SGLang's --dtype spellings (server_args) -> the torch names the update requests carry
_SGLANG_DTYPES = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
                  "float32": "float32"}


def config_rules(w: WeightSyncConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, message) for the weights.* values a sync reads: `asyncopd validate` lists the failures, and
    WeightSync raises the first."""
    return [
        (w.pause_mode in (*PAUSE_MODES, "auto"), "weights.pause_mode",
         f"weights.pause_mode={w.pause_mode!r} is unknown: use one of {[*PAUSE_MODES, 'auto']}"),
        (w.dtype in WIRE_DTYPES, "weights.dtype",
         f"weights.dtype={w.dtype!r} is unknown: use one of {list(WIRE_DTYPES)}"),
        (w.load_format in LOAD_FORMATS, "weights.load_format",
         f"weights.load_format={w.load_format!r} is unknown: use '' (one broadcast per tensor) or {FLATTENED!r}"),
    ]


def rank_layout(tps: Sequence[int]) -> tuple[list[int], int]:
    """(rank_offset of every engine, world size) for engines of tensor-parallel sizes `tps` (slime's scheme)."""
    if not tps or any(type(t) is not int or t < 1 for t in tps):
        raise ValueError(f"every engine needs a tensor-parallel size >= 1, got {list(tps)}")
    offsets, rank = [], 1
    for tp in tps:
        offsets.append(rank)
        rank += tp
    return offsets, rank


def engine_dtype(server_info: dict, model_path: str | None) -> str:
    """The dtype an engine serves, as SGLang resolves `--dtype` (model_config.py: _get_and_verify_dtype): the
    server's `dtype` unless "auto"; for "auto", the checkpoint's config.json dtype, with float32 (or none)
    served as float16 (bfloat16 for Gemma). ConfigError when it cannot be known here."""
    given = str(server_info.get("dtype") or "auto").removeprefix("torch.")
    if given != "auto":
        if given not in _SGLANG_DTYPES:
            raise ConfigError(f"the engine reports dtype={given!r}, which weights.dtype cannot send; set weights.dtype")
        return _SGLANG_DTYPES[given]
    config = Path(model_path or "") / "config.json"
    if not model_path or not config.is_file():
        raise ConfigError(f"weights.dtype=auto: the engine serves --dtype auto from {model_path!r}, whose "
                          "config.json is not on this machine; set weights.dtype=bfloat16 (or the dtype it serves)")
    hf = json.loads(config.read_text())
    declared = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
    if declared in ("float32", "float"):
        return "bfloat16" if str(hf.get("model_type", "")).startswith("gemma") else "float16"
    return dtype_to_str(str_to_dtype(declared))


@dataclass
class SyncStats:
    """One update: what moved, how long it took, and how long generation stood still for it."""

    version: int
    bytes: int  # bytes on the wire (the model in the wire dtype; each engine receives all of them)
    seconds: float  # from the first pause to the last continue: what a learner step pays
    transfer_s: float  # the learner's gather, cast and broadcast of every bucket
    engine_stall_s: float  # the longest time one engine had generation paused (0 for pause_mode=none)
    buckets: int

    @property
    def gbps(self) -> float:
        """Effective bandwidth of the whole update, GB/s (10^9 bytes)."""
        return self.bytes / max(self.seconds, 1e-12) / 1e9

    def metrics(self) -> dict[str, float]:
        return {"weights/sync_s": self.seconds, "weights/bytes": float(self.bytes), "weights/gbps": self.gbps,
                "weights/transfer_s": self.transfer_s, "weights/engine_stall_s": self.engine_stall_s}


class WeightSync:
    """Learner rank 0, engines at TP-aware rank offsets: one group, bucketed broadcasts in SGLang 0.5.23's protocol."""

    def __init__(self, cfg: WeightSyncConfig, learner: WeightSource, engines: list[WeightSink],
                 engine_tp: int | Sequence[int] = 1):
        for ok, _field, message in config_rules(cfg):
            if not ok:
                raise ConfigError(message)
        self.cfg = cfg
        self.learner = learner
        self.engines = engines
        self.tps = [engine_tp] * len(engines) if isinstance(engine_tp, int) else list(engine_tp)
        if len(self.tps) != len(engines):
            raise ValueError(f"{len(self.tps)} tensor-parallel sizes for {len(engines)} engines")
        self.offsets, self.world_size = rank_layout(self.tps)
        self.bucket_bytes = int(cfg.bucket_mb * 2**20)
        # pause_mode=auto is resolved per rollout backend by the pipeline (rollout.backends.weight_sync_config); a
        # sync built without one (a bench, a test) has no backend to ask: retract is right for any SGLang-API engine
        self.pause_mode = "retract" if cfg.pause_mode == "auto" else cfg.pause_mode
        # two workers per engine: after a failed broadcast its receive may still hang until the group times out, and
        # ending its session and continuing its generation must not queue behind it
        self.pool = ThreadPoolExecutor(max_workers=max(2 * len(engines), 1), thread_name_prefix="weight-sync")
        self.buckets: list[dict] = []
        self.wire_dtype = ""  # what the learner casts to (init_group resolves weights.dtype=auto)
        self.bytes = 0

    def _each(self, fn: Callable[[int, WeightSink], object]) -> list[BaseException | None]:
        """fn(i, engine) on every engine at once; waits for all, returns each one's exception (None: it worked)."""
        futures = [self.pool.submit(fn, i, e) for i, e in enumerate(self.engines)]
        return [f.exception() for f in futures]

    def check_engines(self) -> None:
        """Each engine's TP size must be the configured one (it decides the ranks), and weights.dtype=auto must
        find one dtype every engine serves."""
        infos = [e.server_info(refresh=True) for e in self.engines]
        for i, (info, tp) in enumerate(zip(infos, self.tps, strict=True)):
            if info.get("tp_size") not in (None, tp):
                raise ConfigError(f"rollout engine {i} runs tp_size={info['tp_size']} but rollout.tp={tp}: the "
                                  "weight group's ranks follow rollout.tp; set it to the engines' TP size")
        if self.cfg.dtype != "auto":
            self.wire_dtype = self.cfg.dtype
            return
        served = {engine_dtype(info, info.get("model_path") or e.model_info().get("model_path"))
                  for e, info in zip(self.engines, infos, strict=True)}
        if len(served) != 1:
            raise ConfigError(f"weights.dtype=auto: the engines serve different dtypes {sorted(served)}; "
                              "serve one dtype or set weights.dtype")
        self.wire_dtype = served.pop()

    def init_group(self) -> None:
        """Form the group (engines join at their offsets while the learner hosts rank 0) and plan the buckets."""
        self.check_engines()
        if self.cfg.master_addr:
            addr, port = self.cfg.master_addr, self.cfg.master_port or find_free_port(self.cfg.master_addr)
        else:  # hosted where the learner's rank 0 runs (a multi-node cluster: any node)
            addr, port = self.learner.rendezvous_address()
            port = self.cfg.master_port or port
        joined = [
            self.pool.submit(e.init_weights_update_group, master_address=addr,
                             master_port=port, rank_offset=offset, world_size=self.world_size,
                             group_name=self.cfg.group_name, backend=self.cfg.backend)
            for e, offset in zip(self.engines, self.offsets, strict=True)
        ]
        self.learner.init_weight_group(addr, port, self.world_size, self.cfg.group_name, self.cfg.backend,
                                       self.cfg.timeout_s)
        for f in joined:
            f.result()
        self.plan()

    def plan(self) -> None:
        """Announce the buckets (as the wire dtype, in the load format): init_group does; a second WeightSync over
        the same group (another load format) calls check_engines, then this."""
        self.buckets = self.learner.weight_buckets(self.bucket_bytes, self.cfg.group_name, self.wire_dtype,
                                                   self.cfg.load_format)
        self.bytes = sum(_payload_bytes(b) for b in self.buckets)

    def _flush(self, i: int, engine: WeightSink) -> None:
        """/flush_cache until it succeeds (SGLang refuses while a request holds KV), within weights.timeout_s."""
        deadline = time.monotonic() + self.cfg.timeout_s
        delay = 0.05
        while not engine.flush_cache(timeout_s=FLUSH_WAIT_S):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout engine {i} refused /flush_cache for {self.cfg.timeout_s} s after "
                                   f"/pause_generation mode={self.pause_mode!r}: requests still hold KV")
            time.sleep(delay)
            delay = min(2 * delay, 1.0)

    def sync(self, version: int) -> SyncStats:
        """Push the learner's current weights as `version` to every engine (module docstring: the order)."""
        mode = self.pause_mode
        t0 = time.perf_counter()
        paused_at: list[float | None] = [None] * len(self.engines)
        opened = [False] * len(self.engines)

        def prepare(i: int, engine: WeightSink) -> None:
            if mode != "none":
                paused_at[i] = time.perf_counter()
                engine.pause_generation(mode)
            if mode not in NO_FLUSH:
                self._flush(i, engine)
            engine.begin_weight_update()
            opened[i] = True

        def receive(i: int, engine: WeightSink) -> None:
            """Every bucket, even after one fails: the learner sends them all, and a rank that stops receiving
            would leave it blocked until the group times out."""
            first: BaseException | None = None
            last = len(self.buckets) - 1
            for b, bucket in enumerate(self.buckets):
                try:
                    engine.update_weights_from_distributed(**bucket, flush_cache=False,
                                                           weight_version=str(version) if b == last else None)
                except Exception as e:
                    first = first or e
            if first is not None:
                raise first

        stall = [0.0] * len(self.engines)

        def finish(i: int, engine: WeightSink) -> None:
            try:
                if opened[i]:
                    engine.end_weight_update()
            finally:
                if paused_at[i] is not None:
                    engine.continue_generation()
                    stall[i] = time.perf_counter() - paused_at[i]

        errors: list[BaseException | None] = []
        transfer_s = 0.0
        try:
            errors = self._each(prepare)
            if not any(errors):
                received = [self.pool.submit(receive, i, e) for i, e in enumerate(self.engines)]
                t1 = time.perf_counter()
                self.learner.broadcast_weights(self.bucket_bytes, self.wire_dtype, self.cfg.load_format)
                transfer_s = time.perf_counter() - t1
                errors = [f.exception() for f in received]
        finally:
            closed = self._each(finish)
        failures = [(i, e) for i, e in enumerate(errors) if e is not None] or \
                   [(i, e) for i, e in enumerate(closed) if e is not None]
        if failures:
            i, e = failures[0]
            raise RuntimeError(f"weight sync to version {version} failed on rollout engine {i} ({len(failures)} of "
                               f"{len(self.engines)} engines failed): {type(e).__name__}: {e}") from e
        return SyncStats(version=version, bytes=self.bytes, seconds=time.perf_counter() - t0, transfer_s=transfer_s,
                         engine_stall_s=max(stall, default=0.0), buckets=len(self.buckets))

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def _payload_bytes(bucket: dict) -> int:
    """Bytes one /update_weights_from_distributed payload announces."""
    return sum(nbytes(str_to_dtype(dtype), shape)
               for dtype, shape in zip(bucket["dtypes"], bucket["shapes"], strict=True))
