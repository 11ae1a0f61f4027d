"""The OPD loop: from a prompt to a gradient, in one file.

      prompts (batch s = stream positions [s*B, (s+1)*B): data.seed's permutation of the train files)
         |
         v            admission: batch s starts only while s - version <= pipeline.max_staleness
    generate(s)  -- Fleet: B prompts split over the engines, SGLang /generate over HTTP --> Rollout x B
         |                                       (each carries the weight version that sampled it)
         v
    score(s)     -- TeacherService: prefill-only /score at every response position --> TeacherScores x B
         |
         v
    learn(s)     -- collate -> LearnerHandle.train_step -> StepResult (version s+1, staleness counts)
         |
         v
    WeightSync   -- learner rank 0 broadcasts version s+1 in buckets; every engine swaps it in at once
         |
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
from asyncopd.weights.sync import WeightSync

StepHook = Callable[[int, dict[str, float], Counter], None]  # (step, metrics, staleness counts) after each learn


class OPDLoop:
    """The three stage functions the scheduler drives, and the running totals the summary reports."""

    def __init__(self, cfg: Config, fleet: Fleet, learner: LearnerHandle, sync: WeightSync,
                 tokenizer, samples: list[Sample], verifier: Callable[[str, str], bool], on_step: StepHook,
                 start: int = 0):
        self.cfg, self.fleet, self.learner, self.sync, self.tokenizer = cfg, fleet, learner, sync, tokenizer
        self.verifier, self.on_step = verifier, on_step
        # batch s gets stream positions [s*B, (s+1)*B): the same data in every mode, and after a resume
        self.stream = PromptStream(samples, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                   start=start * cfg.pipeline.batch_size)
        self.req = build_estimator(cfg.estimator).requirements(cfg.estimator)  # what to fetch, nothing more
        self.history: list[dict[str, float]] = []
        self.staleness: Counter = Counter()
        self.samples = self.tokens = 0
        self.started = time.perf_counter()

    def generate(self, s: int) -> list[Rollout]:
        B = self.cfg.pipeline.batch_size
        samples = self.stream.take(B)
        prompts = [list(x.prompt_ids) for x in samples]
        # batch s samples with its own seed: a run is reproducible per batch, and pipeline.seed picks the run
        rollouts = self.fleet.generate(prompts, mc_samples=self.req.mc_samples, student_top_k=self.req.student_top_k,
                                       seed=self.cfg.pipeline.seed * 2**32 + s * 64)
        for i, (r, x) in enumerate(zip(rollouts, samples, strict=True)):
            r.ticket = s * B + i
            r.metadata["answer"] = x.answer
        return rollouts

    def score(self, s: int, rollouts: list[Rollout]) -> list[tuple[Rollout, TeacherScores]]:
        scores = self.fleet.teacher.score(rollouts, top_k=self.req.teacher_top_k,
                                          with_queries=self.req.mc_samples > 0,
                                          with_student_topk=self.req.teacher_scores_student_topk)
        return list(zip(rollouts, scores, strict=True))

    def learn(self, s: int, pairs: list[tuple[Rollout, TeacherScores]]) -> None:
        batch = collate(pairs, pad_id=self.tokenizer.pad_token_id)
        result: StepResult = self.learner.train_step(batch)
        sync_s = self.sync.sync(version=result.version)
        self.staleness.update(result.staleness)
        rollouts = [r for r, _ in pairs]
        self.samples += len(rollouts)
        self.tokens += int(sum(r.num_tokens for r in rollouts))
        elapsed = time.perf_counter() - self.started
        lags = result.staleness
        metrics = {
            **result.metrics,
            "weights/sync_s": sync_s,
            "rollout/response_len": float(np.mean([r.num_tokens for r in rollouts])),
            "rollout/sample_accuracy": self.sample_accuracy(rollouts),
            "teacher/bytes_per_token": sum(sc.nbytes for _, sc in pairs) / max(batch.est.mask.sum().item(), 1),
            "throughput/samples_per_s": self.samples / elapsed,
            "throughput/tokens_per_s": self.tokens / elapsed,
            "staleness/max": float(max(lags)),
            "staleness/mean": float(sum(k * v for k, v in lags.items()) / max(sum(lags.values()), 1)),
        }
        self.history.append({"step": s, **metrics})
        self.on_step(s, metrics, Counter(lags))

    def sample_accuracy(self, rollouts: list[Rollout]) -> float:
        """Share of the batch's sampled responses the verifier accepts (the reward a user would watch)."""
        texts = self.tokenizer.batch_decode([r.response_ids.tolist() for r in rollouts], skip_special_tokens=True)
        return float(np.mean([self.verifier(t, r.metadata["answer"]) for t, r in zip(texts, rollouts, strict=True)]))


def train(loop: OPDLoop, start: int, after_step: Callable[[int, StageTimes], None]) -> StageTimes:
    """Learner steps `start`..`pipeline.steps - 1` through the three concurrent stages."""
    p = loop.cfg.pipeline
    return run_stages(loop, p.steps, p.max_staleness, after_step, start)
