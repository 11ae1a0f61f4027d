"""The OPD loop: from a prompt to a gradient, in one file.

      prompts (batch s = stream positions [s*B, (s+1)*B): data.seed's permutation of the train files)
         |
         v            admission: batch s starts only while s - version <= pipeline.max_staleness
    generate(s)  -- Fleet: B prompts dispatched to free engine slots, SGLang /generate over HTTP --> Rollout x B
         |                  (each token carries the weight version that sampled it: staleness is the oldest's)
         v
    score(s)     -- TeacherService: prefill-only /score at every response position --> TeacherScores x B
         |
         v
    learn(s)     -- collate -> LearnerHandle.train_step -> StepResult (version s+1, staleness counts)
         |
         v
    WeightSync   -- learner rank 0 broadcasts version s+1 in buckets (SGLang 0.5.23's session: pause, flush,
         |          begin, buckets, end, continue); every token reports the version that produced it, and a
         |          sample the pause aborted (pause_mode=abort) resumes from its partial output (rollout.dispatch)
         |
         |          (pipeline.supervisor: over the live engines; a lost engine's requests go to another, and it
         |          rejoins, restarted, with the current weights before it takes traffic again)
         +--> admission.publish(s+1): the next batches may start

Three threads run generate, score and learn concurrently (`pipeline.scheduler.run_stages`); with
max_staleness = 0 they take turns, which is strict synchronous OPD. Setup, evaluation, resume, teardown and
the summary live beside this file in `pipeline/run.py`.
"""

import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from asyncopd.config.schema import Config
from asyncopd.core.protocols import LearnerHandle
from asyncopd.core.types import Rollout, StepResult, TeacherScores
from asyncopd.data.dataset import PromptStream, Sample
from asyncopd.estimators.registry import build as build_estimator
from asyncopd.learner.collate import collate
from asyncopd.pipeline.fleet import Fleet
from asyncopd.pipeline.scheduler import StageTimes, run_stages
from asyncopd.pipeline.supervisor import Supervisor
from asyncopd.weights.sync import SyncStats

# (step, metrics, staleness by sample, staleness by token) after each learn
StepHook = Callable[[int, dict[str, float], Counter, Counter], None]


class OPDLoop:
    """The three stage functions the scheduler drives, and the running totals the summary reports."""

    def __init__(self, cfg: Config, fleet: Fleet, learner: LearnerHandle, sync: Supervisor,
                 tokenizer, samples: list[Sample], verifier: Callable[[str, str], bool], on_step: StepHook,
                 start: int = 0):
        self.cfg, self.fleet, self.learner, self.sync, self.tokenizer = cfg, fleet, learner, sync, tokenizer
        self.verifier, self.on_step = verifier, on_step
        # batch s gets stream positions [s*B, (s+1)*B): the same data in every mode, and after a resume
        self.stream = PromptStream(samples, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                   start=start * cfg.pipeline.batch_size)
        self.req = build_estimator(cfg.estimator).requirements(cfg.estimator)  # what to fetch, nothing more
        self.history: list[dict[str, float]] = []
        self.staleness: Counter = Counter()  # lag of each sample's oldest token -> samples
        self.token_staleness: Counter = Counter()  # lag of each token -> tokens
        self.syncs: list[SyncStats] = []
        self.samples = self.tokens = 0
        self.resumed = self.resume_pieces = 0  # trained samples resumed after an abort-mode update; their extra pieces
        self.trained: list[int] = []  # the stream position of every sample learned (each prompt exactly once)
        self.started = time.perf_counter()
        self.teacher_stats: dict[int, dict] = {}  # batch -> its scoring's wire bytes and per-teacher stats

    def generate(self, s: int) -> list[Rollout]:
        B = self.cfg.pipeline.batch_size
        first = self.stream.position
        samples = self.stream.take(B)
        prompts = [list(x.prompt_ids) for x in samples]
        # batch s samples with its own seed: a run is reproducible per batch, and pipeline.seed picks the run
        rollouts = self.fleet.generate(prompts, mc_samples=self.req.mc_samples, student_top_k=self.req.student_top_k,
                                       seed=self.cfg.pipeline.seed * 2**32 + s * 64)
        for i, (r, x) in enumerate(zip(rollouts, samples, strict=True)):
            r.ticket = first + i  # = s * B + i: batch s reads the stream at s * B
            r.metadata["answer"] = x.answer
            r.metadata["teacher"] = x.teacher  # the teacher router scores it on this one
        return rollouts

    def score(self, s: int, rollouts: list[Rollout]) -> list[tuple[Rollout, TeacherScores]]:
        scores = self.fleet.teacher.score(rollouts, top_k=self.req.teacher_top_k,
                                          with_queries=self.req.mc_samples > 0,
                                          with_student_topk=self.req.teacher_scores_student_topk)
        self.teacher_stats[s] = self.fleet.teacher.last_stats  # this thread's call: learn(s) logs it
        return list(zip(rollouts, scores, strict=True))

    def learn(self, s: int, pairs: list[tuple[Rollout, TeacherScores]]) -> None:
        batch = collate(pairs, pad_id=self.tokenizer.pad_token_id)
        with self.sync.lock:  # a restarted engine's catch-up never sends weights half a step old (Supervisor)
            result: StepResult = self.learner.train_step(batch)
            synced = self.sync.sync(version=result.version)
        self.trained += [r.ticket for r, _ in pairs]
        self.syncs.append(synced)
        self.staleness.update(result.staleness)
        self.token_staleness.update(result.token_staleness)
        rollouts = [r for r, _ in pairs]
        self.samples += len(rollouts)
        self.tokens += int(sum(r.num_tokens for r in rollouts))
        resumed = sum(r.pieces > 1 for r in rollouts)
        self.resumed += resumed
        self.resume_pieces += sum(r.pieces - 1 for r in rollouts)
        elapsed = time.perf_counter() - self.started
        lags, token_lags = result.staleness, result.token_staleness
        scored = self.teacher_stats.pop(s)
        metrics = {
            **result.metrics,
            **synced.metrics(),
            "rollout/response_len": float(np.mean([r.num_tokens for r in rollouts])),
            "rollout/sample_accuracy": self.sample_accuracy(rollouts),
            "rollout/resumed": float(resumed),  # samples of this batch an abort-mode update cut and that resumed
            "teacher/bytes_per_token": scored["bytes_per_token"],  # the score answers' HTTP bodies, per token
            **{f"teacher/{name}/{k}": float(v) for name, st in scored["teachers"].items() for k, v in st.items()},
            "throughput/samples_per_s": self.samples / elapsed,
            "throughput/tokens_per_s": self.tokens / elapsed,
            "staleness/max": float(max(lags)),
            "staleness/mean": _mean(lags),
            "staleness/token_max": float(max(token_lags, default=0)),
            "staleness/token_mean": _mean(token_lags),
        }
        self.history.append({"step": s, **metrics})
        self.on_step(s, metrics, Counter(lags), Counter(token_lags))

    def sample_accuracy(self, rollouts: list[Rollout]) -> float:
        """Share of the batch's sampled responses the verifier accepts (the reward a user would watch)."""
        texts = self.tokenizer.batch_decode([r.response_ids.tolist() for r in rollouts], skip_special_tokens=True)
        return float(np.mean([self.verifier(t, r.metadata["answer"]) for t, r in zip(texts, rollouts, strict=True)]))


def _mean(hist: dict[int, int]) -> float:
    """Mean lag of a lag -> count histogram (0 when empty)."""
    return float(sum(k * v for k, v in hist.items()) / max(sum(hist.values()), 1))


def train(loop: OPDLoop, start: int, after_step: Callable[[int, StageTimes], None]) -> StageTimes:
    """Learner steps `start`..`pipeline.steps - 1` through the three concurrent stages."""
    p = loop.cfg.pipeline
    return run_stages(loop, p.steps, p.max_staleness, after_step, start)
