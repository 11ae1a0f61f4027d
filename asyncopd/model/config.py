from dataclasses import dataclass, field


@dataclass
class ModelSpec:
    """Shape of one Qwen2-architecture model (Hugging Face format)."""

    num_layers: int = 2
    hidden_size: int = 96
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 128


@dataclass
class PrepareConfig:
    """Supervised warm-start recipe that `asyncopd prepare` uses to build teacher and student."""

    teacher_steps: int = 700
    student_steps: int = 325
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    threads: int = 2
    min_teacher_accuracy: float = 0.90
    student_accuracy_range: list[float] = field(default_factory=lambda: [0.20, 0.50])


@dataclass
class ModelConfig:
    """Where teacher, student and tokenizer live; empty paths mean the prepared artifacts."""

    artifacts_dir: str = ".cache/tiny_cpu"
    teacher_path: str = ""
    student_path: str = ""
    tokenizer_path: str = ""
    teacher: ModelSpec = field(
        default_factory=lambda: ModelSpec(num_layers=3, hidden_size=160, num_heads=4, num_kv_heads=4,
                                          intermediate_size=448)
    )
    student: ModelSpec = field(default_factory=ModelSpec)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
