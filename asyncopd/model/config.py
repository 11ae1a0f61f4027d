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
    """Supervised warm-start recipe that `asyncopd prepare --rebuild` uses to build teacher and student.

    Both models train on prompt + chain-of-thought response (loss on the response and eos) with AdamW;
    each batch is split into <= length_buckets micro-batches of similar length so little compute goes to
    padding. The teacher follows linear warmup then cosine decay to zero over exactly teacher_steps.
    Recipe v4 (teacher batch 128, lr 3e-3, 800 steps) replaced v3 (batch 64, lr 1.5e-3, 900 steps), which sat
    on its own gate: 92.2% on the machine it was tuned on, 88.2% on another of the same kind. v4 reached 83% at
    step 500; over 5 seeds at 2 threads 95.2-98.6% (one seed after 100 extra steps), but at 1 thread seed 1
    ended at 89.4% after the whole extra phase (`asyncopd bench prepare`, README): not yet enough margin.
    The student's accuracy climbs steeply through the 20-50% band (at constant lr: 22% at step 300, 31% at
    325, 55% at 350 in one run), so a fixed step count lands outside it whenever anything changes; it trains at
    a constant rate after warmup and stops at the first evaluation (every student_eval_every steps from
    student_min_steps) that reaches student_stop_accuracy. Left un-annealed, it also takes OPD's first updates
    without the accuracy dip an annealed student shows.
    """

    teacher_steps: int = 800
    teacher_batch_size: int = 128
    teacher_lr: float = 3e-3
    student_max_steps: int = 1000
    student_min_steps: int = 250
    student_eval_every: int = 10
    student_stop_accuracy: float = 0.25
    student_batch_size: int = 128
    student_lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    length_buckets: int = 3
    seed: int = 0  # teacher init seed; the student uses seed + 1
    threads: int = 2  # torch threads while preparing
    min_teacher_accuracy: float = 0.90  # the gate: a teacher below it fails the build
    # if the teacher misses teacher_target_accuracy (a margin above the gate) after teacher_steps, train on at
    # teacher_lr * extra_lr_frac, evaluating every extra_eval_every steps, until it reaches the target or
    # teacher_extra_steps more steps have run
    teacher_target_accuracy: float = 0.95
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
