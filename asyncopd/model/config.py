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
    """Supervised warm-start recipe that `asyncopd prepare` uses to build teacher and student.

    Both models train on prompt + chain-of-thought response (loss on the response and eos) with AdamW,
    linear warmup then cosine decay to zero over exactly the given number of steps; each batch is split
    into <= length_buckets micro-batches of similar length so little compute goes to padding.
    Measured on the 2-core machine (seed 0, 2 threads, otherwise idle): the 3x160 teacher at batch 64,
    lr 1.5e-3 reaches 95.4% greedy test accuracy in 1000 steps (314 s; 88% after 800), where batch 128 at
    lr 3e-3 needed 1100 steps (about twice the compute) for 91.8%. The 2x96 student reaches 26% in 325 steps
    (64 s); it is mid-way up a steep, non-monotone learning curve there (15% at 300, 17% at 350 steps), so
    student_steps is a fixed count, not a stopping rule.
    """

    teacher_steps: int = 1000
    teacher_batch_size: int = 64
    teacher_lr: float = 1.5e-3
    student_steps: int = 325
    student_batch_size: int = 128
    student_lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    length_buckets: int = 3
    seed: int = 0  # teacher init seed; the student uses seed + 1
    threads: int = 2  # torch threads while preparing
    min_teacher_accuracy: float = 0.90
    # if the teacher misses min_teacher_accuracy after teacher_steps, train on at teacher_lr * extra_lr_frac,
    # evaluating every extra_eval_every steps, for at most teacher_extra_steps more steps before failing
    teacher_extra_steps: int = 300
    extra_eval_every: int = 50
    extra_lr_frac: float = 0.1
    student_accuracy_range: list[float] = field(default_factory=lambda: [0.20, 0.50])
    eval_batch_size: int = 250


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
