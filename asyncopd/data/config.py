from dataclasses import dataclass, field


@dataclass
class TaskConfig:
    """The synthetic multi-step arithmetic task (chain of thought, exact-match answer)."""

    operand_counts: list[int] = field(default_factory=lambda: [2, 3, 4])
    operand_probs: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2])
    max_value: int = 99
    num_test: int = 500
    test_seed: int = 1234
    train_seed: int = 5678
