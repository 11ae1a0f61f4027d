"""Client of the teacher server(s): scores rollouts, split across replicas concurrently."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from asyncopd.core.types import Rollout, TeacherScores
from asyncopd.net.client import Backoff, HttpClient, ServerError, unanswered
from asyncopd.teacher import wire
from asyncopd.teacher.health import check_scores


def _split_balanced(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, about equal in total size, at most `parts` of them, none empty."""
    n = len(sizes)
    parts = max(1, min(parts, n))
    cum = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    bounds = [0]
    for p in range(1, parts):
        cut = int(np.searchsorted(cum, cum[-1] * p / parts))
        bounds.append(min(max(cut, bounds[-1] + 1), n - (parts - p)))
    bounds.append(n)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class TeacherClient:
    """`score(rollouts, top_k, with_queries) -> list[TeacherScores]`, one per rollout, in order.

    Every replica's answer is checked (`teacher.health`) before it is returned: a teacher that lost its weights
    still answers 200. `vocab_size` is the ids its distributions span (None: no uniform test);
    `check_scores=False` turns the check off.

    A chunk whose replica fails transiently (no answer, 5xx) is scored on another one, with bounded exponential
    backoff, up to `retry_attempts` tries. A replica that gave no answer is left out of the split until `mark_up`
    (its supervisor restarted it), and `on_lost(k, error)` tells that supervisor, once per loss; with every replica
    out, all are tried again."""

    def __init__(self, urls: Sequence[str] | str, api_key: str = "", timeout_s: float = 300.0,
                 wire_dtype: str = "float32", vocab_size: int | None = None, check_scores: bool = True,
                 retry_attempts: int = 4):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("TeacherClient needs at least one teacher URL")
        if wire_dtype not in ("float32", "float16"):
            raise ValueError(f"teacher.wire_dtype must be 'float32' or 'float16', got {wire_dtype!r}")
        self.replicas = [HttpClient(u, api_key, timeout_s) for u in urls]
        self.wire_dtype = wire_dtype
        self.vocab_size, self.check_scores = vocab_size, check_scores
        self._pool = ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="teacher-client")
        self.retry = Backoff(attempts=retry_attempts, deadline_s=max(Backoff.deadline_s, 2 * timeout_s))
        self.up = [True] * len(urls)
        self.on_lost: Callable[[int, BaseException], None] | None = None
        self._lock = threading.Lock()
        self.last_stats: dict[str, float] = {}
        self.totals = {"requests": 0, "tokens": 0, "request_bytes": 0, "response_bytes": 0}

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def mark_down(self, k: int, error: BaseException) -> None:
        """Replica k gave no answer: out of the split; its supervisor hears of it once."""
        with self._lock:
            if not self.up[k]:
                return
            self.up[k] = False
        if self.on_lost is not None:
            self.on_lost(k, error)

    def mark_up(self, k: int) -> None:
        with self._lock:
            self.up[k] = True

    def _live(self, first: int = 0) -> list[int]:
        """Replicas from `first` on, in turn, those up only (all of them if none is: one may be back)."""
        n = len(self.replicas)
        order = [(first + j) % n for j in range(n)]
        return [k for k in order if self.up[k]] or order

    def _score_anywhere(self, first: int, rollouts: Sequence[Rollout], top_k: int, with_queries: bool,
                        with_student_topk: bool) -> tuple[int, list[TeacherScores], int, int]:
        """(replica, _score_chunk's answer): on replica `first`, or after a transient failure on the next one."""

        def attempt(a: int) -> tuple[int, list[TeacherScores], int, int]:
            live = self._live(first)
            k = live[a % len(live)]
            try:
                return k, *self._score_chunk(self.replicas[k], rollouts, top_k, with_queries, with_student_topk)
            except ServerError as e:
                if unanswered(e):
                    self.mark_down(k, e)
                raise

        return self.retry.call(attempt)

    def health(self) -> list[dict]:
        return [r.get_json("/health") for r in self.replicas]

    def model_info(self) -> list[dict]:
        """Every replica's /model_info; raises if the replicas disagree on vocabulary or tokenizer."""
        infos = [r.get_json("/model_info") for r in self.replicas]
        keys = ("vocab_size", "tokenizer_vocab_size", "tokenizer_fingerprint")
        for r, info in zip(self.replicas[1:], infos[1:], strict=True):
            if any(info.get(k) != infos[0].get(k) for k in keys):
                raise ServerError(f"teacher replicas disagree: {self.replicas[0].base_url} has "
                                  f"{[infos[0].get(k) for k in keys]}, {r.base_url} has {[info.get(k) for k in keys]}")
        return infos

    def _request(self, rollouts: Sequence[Rollout], top_k: int, with_queries: bool,
                  with_student_topk: bool) -> bytes:
        seqs, starts, lengths, queries = [], [], [], []
        asks = with_queries or with_student_topk
        for r in rollouts:
            seqs.append(np.asarray(r.prompt_ids, dtype=np.int32))
            seqs.append(np.asarray(r.response_ids, dtype=np.int32))
            starts.append(len(r.prompt_ids))
            lengths.append(len(r.prompt_ids) + len(r.response_ids))
            if asks:
                queries.append(_query_ids(r, with_queries, with_student_topk))
        offsets = np.zeros(len(rollouts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arrays = {
            "input_ids": np.concatenate(seqs) if seqs else np.zeros(0, np.int32),
            "offsets": offsets,
            "score_start": np.asarray(starts, dtype=np.int64),
        }
        if asks:
            arrays["query_ids"] = np.concatenate(queries) if queries else np.zeros((0, 0), np.int32)
        return wire.encode(arrays, {"top_k": int(top_k), "wire_dtype": self.wire_dtype})

    def _score_chunk(self, replica: HttpClient, rollouts: Sequence[Rollout], top_k: int, with_queries: bool,
                     with_student_topk: bool) -> tuple[list[TeacherScores], int, int]:
        body = self._request(rollouts, top_k, with_queries, with_student_topk)
        r = replica.request("POST", "/score", data=body, headers={"Content-Type": wire.CONTENT_TYPE})
        try:
            arrays, _meta = wire.decode(r.content)
        except ValueError as e:
            raise ServerError(f"{replica.base_url}/score: unreadable answer: {e}") from None
        off = arrays["offsets"]
        out = []
        f32 = np.float32
        for i, ro in enumerate(rollouts):
            a, b = int(off[i]), int(off[i + 1])
            if b - a != ro.num_tokens:
                raise ServerError(f"{replica.base_url}/score: {b - a} positions for a rollout of {ro.num_tokens}")
            q = arrays.get("query_logprobs")
            m = ro.mc_ids.shape[1] if with_queries else 0
            out.append(TeacherScores(
                topk_ids=np.array(arrays["topk_ids"][a:b], dtype=np.int32),
                topk_logprobs=np.array(arrays["topk_logprobs"][a:b], dtype=f32),
                token_logprob=np.array(arrays["token_logprob"][a:b], dtype=f32),
                query_logprobs=np.array(q[a:b, :m], dtype=f32) if with_queries else None,
                student_topk_logprobs=np.array(q[a:b, m:], dtype=f32) if with_student_topk else None,
            ))
        return out, len(body), len(r.content)

    def score(self, rollouts: Sequence[Rollout], top_k: int, with_queries: bool = False,
              with_student_topk: bool = False) -> list[TeacherScores]:
        """Top-k and sampled-token scores; with_queries adds the MC samples' scores, with_student_topk the
        scores of the student's top-k ids frozen at rollout time (sparse reverse KL on the student support)."""
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        for wanted, field, how in ((with_queries, "mc_ids", "mc_samples > 0"),
                                   (with_student_topk, "student_topk_ids", "top_logprobs_num > 0")):
            if not wanted:
                continue
            missing = [i for i, r in enumerate(rollouts) if getattr(r, field) is None]
            if missing:
                raise ValueError(f"scoring {field} needs rollouts generated with {how}; rollout {missing[0]} has none")
            widths = {int(getattr(r, field).shape[1]) for r in rollouts}
            if len(widths) > 1:
                raise ValueError(f"all rollouts in one score() call need the same {field} width; got {sorted(widths)}")
        if not rollouts:
            return []
        t0 = time.perf_counter()
        sizes = [len(r.prompt_ids) + r.num_tokens for r in rollouts]
        live = self._live()
        ranges = _split_balanced(sizes, len(live))
        futures = [self._pool.submit(self._score_anywhere, k, rollouts[a:b], top_k, with_queries, with_student_topk)
                   for k, (a, b) in zip(live, ranges, strict=False)]
        results, req_bytes, resp_bytes = [], 0, 0
        for f in futures:  # in range order
            k, scores, nb_req, nb_resp = f.result()
            if self.check_scores:
                check_scores(scores, self.vocab_size, f"teacher replica {self.replicas[k].base_url}")
            results.extend(scores)
            req_bytes += nb_req
            resp_bytes += nb_resp
        tokens = sum(r.num_tokens for r in rollouts)
        self.last_stats = {
            "tokens": tokens, "request_bytes": req_bytes, "response_bytes": resp_bytes,
            "bytes_per_token": resp_bytes / max(tokens, 1), "seconds": time.perf_counter() - t0,
            "replicas_used": len(ranges),
        }
        self.totals["requests"] += len(ranges)
        self.totals["tokens"] += tokens
        self.totals["request_bytes"] += req_bytes
        self.totals["response_bytes"] += resp_bytes
        return results


class SGLangTeacherClient(TeacherClient):
    """teacher.backend=sglang: the same `score` through stock SGLang's prefill-only `/generate`.

    One batched request per replica: input_ids = prompt + response, max_new_tokens = 0,
    return_logprob, logprob_start_len = prompt length - 1, top_logprobs_num = K; the answer's
    input_token_logprobs / input_top_logprobs after their first entry are the scores (SGLang 0.5.23 reports the
    entry at logprob_start_len as None: no logits before it are kept). Per-position query ids (MC samples) are
    not part of SGLang's API: `with_queries=True` fails early and says what to use instead.
    Scores arrive as JSON, so bytes per token are larger than the binary server's.
    """

    def score(self, rollouts: Sequence[Rollout], top_k: int, with_queries: bool = False,
              with_student_topk: bool = False) -> list[TeacherScores]:
        if with_queries or with_student_topk:
            raise ValueError("per-position query scores (MC samples, the student's top-k support) need the embedded "
                             "teacher server or a patched SGLang: stock SGLang scores one fixed id list per "
                             "request, not per position; set teacher=embedded or pick another estimator")
        return super().score(rollouts, top_k)

    def _score_chunk(self, replica: HttpClient, rollouts: Sequence[Rollout], top_k: int, with_queries: bool,
                     with_student_topk: bool) -> tuple[list[TeacherScores], int, int]:
        def empty(t: int) -> TeacherScores:
            return TeacherScores(np.zeros((t, top_k), np.int32), np.zeros((t, top_k), np.float32),
                                 np.zeros(t, np.float32))

        out = [empty(r.num_tokens) for r in rollouts]
        todo = [i for i, r in enumerate(rollouts) if r.num_tokens > 0]
        if not todo:
            return out, 0, 0
        payload: dict = {
            "input_ids": [np.concatenate([rollouts[i].prompt_ids, rollouts[i].response_ids]).tolist() for i in todo],
            "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": [len(rollouts[i].prompt_ids) - 1 for i in todo]}  # the last prompt token
        if top_k:
            payload["top_logprobs_num"] = int(top_k)
        r = replica.request("POST", "/generate", json=payload)
        items = r.json()
        if not isinstance(items, list) or len(items) != len(todo):
            raise ServerError(f"{replica.base_url}/generate: expected {len(todo)} results")
        for i, item in zip(todo, items, strict=True):
            meta, t = item.get("meta_info", {}), rollouts[i].num_tokens
            toks = (meta.get("input_token_logprobs") or [])[1:]  # [0]: the last prompt token's, None
            if len(toks) != t:
                raise ServerError(f"{replica.base_url}/generate: {len(toks) + 1} input_token_logprobs for a "
                                  f"response of {t} tokens (expected one per token and the last prompt token's)")
            sc = out[i]
            sc.token_logprob[:] = [e[0] for e in toks]
            if top_k:
                tops = (meta.get("input_top_logprobs") or [])[1:]
                if len(tops) != t or any(row is None or len(row) != top_k for row in tops):
                    raise ServerError(f"{replica.base_url}/generate: input_top_logprobs is not [{t}][{top_k}]")
                sc.topk_logprobs[:] = [[e[0] for e in row] for row in tops]
                sc.topk_ids[:] = [[e[1] for e in row] for row in tops]
        return out, r.sent_bytes, len(r.content)


def _query_ids(r: Rollout, with_queries: bool, with_student_topk: bool) -> np.ndarray:
    """Per-position ids the teacher scores: the MC samples, then the student's top-k (columns)."""
    cols = [r.mc_ids] if with_queries else []
    cols += [r.student_topk_ids] if with_student_topk else []
    return np.concatenate([np.asarray(c, dtype=np.int32) for c in cols], axis=1)

