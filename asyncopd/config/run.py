from dataclasses import dataclass


@dataclass
class RunConfig:
    """Where a run writes its outputs and how much it shows while running."""

    dir: str = ""  # empty = runs/<experiment>-<timestamp>
    experiment: str = "tiny_cpu"
    tensorboard: bool = True
    progress: bool = True
