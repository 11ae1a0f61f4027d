"""The teacher server: POST /score (binary wire format in and out), GET /health, GET /model_info.

/score request (wire.encode): arrays `input_ids` int [sumL] (all sequences concatenated),
`offsets` int [N+1] (sequence i is input_ids[offsets[i]:offsets[i+1]]), `score_start` int [N]
(first scored index, i.e. the prompt length), optional `query_ids` int [sumT, M]; meta `top_k` (int)
and `wire_dtype` ("float32" | "float16"). Response arrays: `topk_ids` int32 [sumT, K],
`topk_logprobs` [sumT, K], `token_logprob` [sumT], `query_logprobs` [sumT, M] (when queried),
`offsets` int64 [N+1] over scored positions; logprobs in `wire_dtype`.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from asyncopd.config.schema import TeacherConfig
from asyncopd.model.scorer import score_sequences, token_vocab
from asyncopd.net.server import ApiError, HttpService, check_bind, make_app, model_card
from asyncopd.teacher import wire

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


def _int_array(arrays: dict, name: str, ndim: int, required: bool = True) -> np.ndarray | None:
    if name not in arrays:
        if required:
            raise ApiError(f"/score: missing array {name!r}")
        return None
    a = arrays[name]
    if a.dtype.kind not in "iu":
        raise ApiError(f"/score: {name!r} must be an integer array, got {a.dtype}")
    if a.ndim != ndim:
        raise ApiError(f"/score: {name!r} must be {ndim}-D, got shape {list(a.shape)}")
    return a.astype(np.int64, copy=False)


class TeacherServer(HttpService):
    def __init__(self, model, model_path: str = "", *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str = "", max_tokens_per_forward: int = TeacherConfig.max_tokens_per_forward):
        check_bind(host, api_key, "teacher")
        self.model = model.eval()
        self.card = model_card(model_path, model)
        self.vocab_size = token_vocab(model, self.card["tokenizer_vocab_size"])  # padded rows are no tokens
        self.max_len = self.card["max_position_embeddings"]
        self.max_tokens_per_forward = max_tokens_per_forward
        self._forward_lock = threading.Lock()  # one forward at a time: CPU threads are the budget
        self.stats = {"requests": 0, "tokens": 0, "busy_s": 0.0}
        self._listen(self._build_app(api_key), host, port)

    # ---- request handling -------------------------------------------------------------------------
    def parse(self, body: bytes) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None, int, str]:
        try:
            arrays, meta = wire.decode(body)
        except ValueError as e:
            raise ApiError(f"/score: body is not a valid wire-format body ({e}); build it with "
                           "asyncopd.teacher.wire.encode") from None
        ids = _int_array(arrays, "input_ids", 1)
        offsets = _int_array(arrays, "offsets", 1)
        starts = _int_array(arrays, "score_start", 1)
        query = _int_array(arrays, "query_ids", 2, required=False)
        top_k = meta.get("top_k", 0)
        if type(top_k) is not int or top_k < 0:
            raise ApiError(f"/score: meta 'top_k' must be an int >= 0, got {top_k!r}")
        if top_k > self.vocab_size:
            raise ApiError(f"/score: meta 'top_k' = {top_k} exceeds the vocabulary size {self.vocab_size}")
        wire_dtype = meta.get("wire_dtype", "float32")
        if wire_dtype not in WIRE_DTYPES:
            raise ApiError(f"/score: meta 'wire_dtype' must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        n = starts.shape[0]
        if offsets.shape[0] != n + 1 or offsets[0] != 0 or offsets[-1] != ids.shape[0]:
            raise ApiError(f"/score: 'offsets' must have N+1 = {n + 1} entries from 0 to len(input_ids) = "
                           f"{ids.shape[0]}, got {offsets.shape[0]} entries")
        lengths = np.diff(offsets)
        if np.any(lengths < 0):
            raise ApiError("/score: 'offsets' must be non-decreasing")
        if np.any(starts < 1) or np.any(starts > lengths):
            bad = int(np.flatnonzero((starts < 1) | (starts > lengths))[0])
            raise ApiError(f"/score: score_start[{bad}] = {int(starts[bad])} must be in [1, {int(lengths[bad])}] "
                           "(the prompt length: at least one prompt token, at most the sequence length)")
        if self.max_len and n and int(lengths.max()) > self.max_len:
            raise ApiError(f"/score: a sequence of {int(lengths.max())} tokens exceeds the teacher's "
                           f"max_position_embeddings = {self.max_len}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ApiError(f"/score: input_ids must be in [0, {self.vocab_size}) (the teacher tokenizer's vocabulary)")
        total = int((lengths - starts).sum())
        if query is not None:
            if query.shape[0] != total:
                raise ApiError(f"/score: 'query_ids' must have one row per scored position ({total}), "
                               f"got {query.shape[0]}")
            if query.size and (int(query.min()) < 0 or int(query.max()) >= self.vocab_size):
                raise ApiError(f"/score: query_ids must be in [0, {self.vocab_size})")
        seqs = [ids[offsets[i]:offsets[i + 1]] for i in range(n)]
        return seqs, starts, query, top_k, wire_dtype

    def score_body(self, body: bytes) -> bytes:
        seqs, starts, query, top_k, wire_dtype = self.parse(body)
        t0 = time.perf_counter()
        with self._forward_lock:
            res = score_sequences(self.model, seqs, starts, top_k, query, vocab_size=self.vocab_size,
                                  max_tokens_per_forward=self.max_tokens_per_forward)
            dt = time.perf_counter() - t0
            self.stats["requests"] += 1
            self.stats["tokens"] += int(res.offsets[-1])
            self.stats["busy_s"] += dt
        out_dt = WIRE_DTYPES[wire_dtype]
        arrays = {"topk_ids": res.topk_ids, "topk_logprobs": res.topk_logprobs.astype(out_dt, copy=False),
                  "token_logprob": res.token_logprob.astype(out_dt, copy=False), "offsets": res.offsets}
        if res.query_logprobs is not None:
            arrays["query_logprobs"] = res.query_logprobs.astype(out_dt, copy=False)
        return wire.encode(arrays, {"num_tokens": int(res.offsets[-1]), "forward_s": dt})

    def _build_app(self, api_key: str):
        app = make_app("asyncopd-teacher", api_key)

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/model_info")
        async def model_info():
            return dict(self.card, is_generation=False)

        @app.get("/server_info")
        async def server_info():
            return {"engine": "asyncopd-teacher", "wire_format": "AOW1", "wire_dtypes": sorted(WIRE_DTYPES),
                    "supports_query_ids": True, **self.stats}

        @app.post("/score")
        async def score(request: Request):
            ctype = request.headers.get("content-type", "")
            if ctype and not ctype.startswith(wire.CONTENT_TYPE):
                raise ApiError(f"/score takes Content-Type {wire.CONTENT_TYPE} (asyncopd.teacher.wire), "
                               f"got {ctype!r}")
            body = await request.body()
            out = await run_in_threadpool(self.score_body, body)
            return Response(out, media_type=wire.CONTENT_TYPE)

        return app
