from dataclasses import dataclass


@dataclass
class RunConfig:
    """Where a run writes its outputs and how much it shows while running."""

    dir: str = ""  # empty = runs/<experiment>-<timestamp>
    experiment: str = "tiny_cpu"
    tensorboard: bool = True
    progress: bool = True
    save_every: int = 0  # learner checkpoint every N steps into <dir>/checkpoint (0 = only at the end)
    resume_from: str = ""  # a <dir>/checkpoint of an earlier run: weights, optimizer, version and data position
