"""The stage scheduler: rollout, teacher scoring and learning as three threads joined by admission control.

It knows nothing about models or HTTP; the real pipeline and the tests plug stage functions into it.
"""

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from asyncopd.pipeline.admission import Admission, PipelineClosed
from asyncopd.pipeline.buffer import BatchBuffer


class Stages(Protocol):
    def generate(self, batch_index: int) -> Any:
        """Roll out batch `batch_index` with whatever weights the fleet holds now."""

    def score(self, batch_index: int, generated: Any) -> Any:
        """Teacher-score a generated batch."""

    def learn(self, batch_index: int, scored: Any) -> None:
        """One learner step on batch `batch_index`, then the weight sync to version batch_index + 1."""


def speedup_bound(busy_s: Sequence[float], cores: float) -> float:
    """The most that overlapping the roles can gain over running them in turn (which takes sum(busy_s)).

    An overlapped run lasts at least as long as its busiest role, and at least as long as all the work spread
    evenly over the `cores` the roles share: bound = sum / max(max_role, sum / cores). With a core (or device)
    per role, sum / cores <= max_role and this is the plain overlap bound sum / max."""
    total = sum(busy_s)
    return total / max(max(busy_s), total / cores, 1e-9)


@dataclass
class StageTimes:
    """Busy seconds of each role per step, from which the ideal overlap bound (sum / max) follows."""

    rollout: list[float] = field(default_factory=list)
    teacher: list[float] = field(default_factory=list)
    learner: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def ideal_speedup(self) -> float:
        """The overlap bound of this run's own busy times, as if each role had its own cores."""
        totals = [sum(self.rollout), sum(self.teacher), sum(self.learner)]
        return speedup_bound(totals, cores=len(totals))


def run_stages(stages: Stages, steps: int, max_staleness: int,
               after_step: Callable[[int, StageTimes], None] | None = None, start: int = 0) -> StageTimes:
    """Run learner steps `start`..`steps - 1` (start > 0 resumes at that version); each batch starts only
    when admission allows it."""
    admission = Admission(max_staleness, version=start)
    buffer: BatchBuffer[Any] = BatchBuffer()
    to_score: queue.Queue = queue.Queue()
    times = StageTimes()

    def rollout_loop() -> None:
        try:
            for s in range(start, steps):
                admission.wait_admit(s)
                t0 = time.perf_counter()
                generated = stages.generate(s)
                times.rollout.append(time.perf_counter() - t0)
                to_score.put((s, generated))
        except PipelineClosed:
            pass
        except BaseException as e:  # surfaced to the learner loop
            buffer.fail(e)
        finally:
            to_score.put(None)

    def score_loop() -> None:
        try:
            while (item := to_score.get()) is not None:
                s, generated = item
                t0 = time.perf_counter()
                scored = stages.score(s, generated)
                times.teacher.append(time.perf_counter() - t0)
                buffer.put(s, scored)
        except BaseException as e:
            buffer.fail(e)

    threads = [threading.Thread(target=rollout_loop, name="rollout", daemon=True),
               threading.Thread(target=score_loop, name="teacher", daemon=True)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    try:
        for s in range(start, steps):
            scored = buffer.get(s)
            t0 = time.perf_counter()
            stages.learn(s, scored)
            times.learner.append(time.perf_counter() - t0)
            admission.publish(s + 1)
            if after_step is not None:
                after_step(s, times)
    finally:
        admission.close()
        buffer.close()
        for t in threads:
            t.join(timeout=60)
    times.wall_s = time.perf_counter() - began
    return times
