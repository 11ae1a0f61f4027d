"""Admission control: the one place the staleness bound is enforced before any compute is spent.

The learner consumes batch s (tickets [s*B, (s+1)*B)) at step s, with weights of version s. Batch s may
therefore start generating only once the rollout fleet holds a version v >= s - k: every sample it yields is
then consumed at most k versions after the version that generated it. k = 0 is strict synchronous training.
This is AReaL's capacity rule `(k + v + 1) * B - started >= B`, applied per batch so the bound is exact.
"""

import threading


class PipelineClosed(RuntimeError):
    pass


class Admission:
    def __init__(self, max_staleness: int, version: int = 0):
        self.max_staleness = max_staleness
        self._published = version  # weight version every rollout engine holds
        self._closed = False
        self._cond = threading.Condition()

    def wait_admit(self, batch_index: int) -> int:
        """Block until batch `batch_index` may start; return the version it starts under."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._published >= batch_index - self.max_staleness)
            if self._closed:
                raise PipelineClosed("pipeline closed while waiting for admission")
            return self._published

    def publish(self, version: int) -> None:
        """Called once every engine has loaded `version` (after a completed weight sync)."""
        with self._cond:
            self._published = max(self._published, version)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
