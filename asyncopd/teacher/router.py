"""Several named teachers behind one TeacherService: each rollout scored by the teacher its sample names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from asyncopd.core.errors import TeacherDegenerate
from asyncopd.core.types import Rollout, TeacherScores, require_finished
from asyncopd.teacher.client import TeacherClient

STATS = ("samples", "tokens", "seconds", "bytes")  # per teacher; bytes: score answers as they crossed HTTP


class TeacherRouter:
    """`score` groups the rollouts by `rollout.metadata["teacher"]` (the sample's `data.teacher_key` value; none:
    the only teacher), scores the groups concurrently, each on its own teacher, and merges the scores back in
    rollout order. `last_stats` holds the latest call's wire bytes per scored token and per-teacher STATS (read
    it from the thread that called `score`); `totals` sums STATS per teacher over the run."""

    def __init__(self, clients: Mapping[str, TeacherClient]):
        if not clients:
            raise ValueError("TeacherRouter needs at least one teacher")
        self.clients = dict(clients)
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="teacher-router")
        self.last_stats: dict = {}
        self.totals: dict[str, dict[str, float]] = {name: dict.fromkeys(STATS, 0) for name in self.clients}

    def teacher_of(self, rollout: Rollout) -> str:
        """The name of the teacher that scores `rollout`."""
        name = rollout.metadata.get("teacher") or (next(iter(self.clients)) if len(self.clients) == 1 else "")
        if name not in self.clients:
            raise ValueError(f"a rollout names teacher {name!r}; the teachers are {sorted(self.clients)} (set "
                             "data.teacher_key to the column that names one of them for every sample)")
        return name

    def score(self, rollouts: Sequence[Rollout], top_k: int, with_queries: bool = False,
              with_student_topk: bool = False) -> list[TeacherScores]:
        require_finished(rollouts, "the teacher")
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rollouts):
            groups.setdefault(self.teacher_of(r), []).append(i)
        futures = {name: self._pool.submit(self.clients[name].score, [rollouts[i] for i in idx], top_k,
                                           with_queries, with_student_topk) for name, idx in groups.items()}
        out: list[TeacherScores] = [None] * len(rollouts)  # type: ignore[list-item]
        per: dict[str, dict[str, float]] = {}
        for name, idx in groups.items():
            try:
                scores = futures[name].result()
            except TeacherDegenerate as e:
                raise TeacherDegenerate(f"teacher {name!r}: {e}") from None
            for i, sc in zip(idx, scores, strict=True):
                out[i] = sc
            st = self.clients[name].last_stats  # this client scores one call at a time: this router's
            per[name] = {"samples": len(idx), "tokens": st["tokens"], "seconds": st["seconds"],
                         "bytes": st["response_bytes"]}
            for k, v in per[name].items():
                self.totals[name][k] += v
        tokens = sum(p["tokens"] for p in per.values())
        nbytes = sum(p["bytes"] for p in per.values())
        self.last_stats = {"tokens": tokens, "bytes": nbytes, "bytes_per_token": nbytes / max(tokens, 1),
                           "teachers": per}
        return out

    def model_info(self) -> list[dict]:
        """Every teacher's replicas' /model_info, teacher by teacher (the teachers may be different models)."""
        return [info for c in self.clients.values() for info in c.model_info()]

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self.clients.values():
            c.close()
