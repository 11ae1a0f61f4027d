"""The errors a user can cause and a role can report, importable from anywhere below the roles."""

from dataclasses import dataclass


class ConfigError(ValueError):
    """A config value (or a path, layout or backend combination it names) that cannot work.

    The message names the field and the fix; the CLI prints it and exits 2 without a traceback."""


@dataclass(frozen=True)
class Problem:
    """One thing a config cannot do: the field to change and a message naming the values and the fix."""

    field: str  # e.g. "learner.tp"
    message: str


class StalenessViolation(RuntimeError):
    """A sample reached the learner more than `pipeline.max_staleness` versions behind: admission is broken."""


class TeacherDegenerate(RuntimeError):
    """A teacher answered 200 with scores no trained model gives (uniform, input-independent, NaN/inf): the run
    stops before the learner trains on them. The CLI prints it and exits 1 without a traceback."""


class AbortedRollout(RuntimeError):
    """A response that ended in finish_reason=abort (cut by a weight update) reached the teacher or the learner
    unresumed: training on it would teach the student to stop mid-answer."""


class Preempted(Exception):
    """The run got SIGTERM (Slurm's scancel, a preemption, `scontrol requeue`): it finished the step in flight,
    saved a checkpoint there and stopped. Not a failure: the CLI says where to resume and exits 0, and a requeued
    job script resumes from the run's checkpoint by itself."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {checkpoint} (resume with "
                         f"run.resume_from={checkpoint})")
        self.step, self.checkpoint = step, checkpoint
