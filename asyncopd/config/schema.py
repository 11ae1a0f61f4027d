"""The config schema: one dataclass per component, the one home of every default.

Every component reads its section from here (imports run downward: this module imports nothing of the
package), Hydra composes configs/ over it (`asyncopd.config.load`), and `asyncopd.validation` checks it.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunConfig:
    """Where a run writes its outputs and how much it shows while running."""

    dir: str = ""  # empty = runs/<experiment>-<timestamp>
    experiment: str = "tiny_cpu"
    tensorboard: bool = True
    progress: bool = True
    # learner checkpoint every N steps (0 = only at the end) into <dir>/checkpoints/step-N, each written to a temp
    # dir and renamed whole; <dir>/checkpoint links to the newest; the last `keep_checkpoints` are kept
    save_every: int = 50
    keep_checkpoints: int = 3
    # an earlier run's <dir>/checkpoint (or <dir>, or one <dir>/checkpoints/step-N): weights, optimizer, version and
    # data position
    resume_from: str = ""


@dataclass
class TaskConfig:
    """The synthetic multi-step arithmetic task (chain of thought, exact-match answer)."""

    operand_counts: list[int] = field(default_factory=lambda: [2, 3, 4])
    operand_probs: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2])
    max_value: int = 99
    num_test: int = 500
    test_seed: int = 1234
    train_seed: int = 5678
    num_train: int = 20000  # training prompts `asyncopd prepare` exports (the run's stream reshuffles per epoch)


@dataclass
class DataConfig:
    """Prompt datasets, with verl's keys. No files = the built-in task, exported by `asyncopd prepare` as jsonl
    and read through the same loader as any user's data."""

    train_files: Any = field(default_factory=list)  # a path or a list: .jsonl, .json, .parquet, save_to_disk dirs
    val_files: Any = field(default_factory=list)  # empty with train_files set = no evaluation
    prompt_key: str = "prompt"  # a string (the user turn) or a list of chat messages
    answer_key: str = "answer"  # the gold answer the verifier checks ("... #### 42", "\\boxed{..}", "42")
    system_prompt: str = ""  # prepended as a system turn (or as text without a chat template)
    apply_chat_template: bool | None = None  # None = when the tokenizer has one; true = required
    max_prompt_length: int = 0  # tokens, template included; 0 = the student's context minus max_new_tokens
    shuffle: bool = True  # a fresh seeded permutation per epoch
    seed: int = 0
    verifier: str = "exact"  # exact | math (math-verify: numeric and symbolic equivalence)
    # the column naming each training sample's teacher (a key of `teachers`); "" = every sample to the one teacher
    teacher_key: str = ""


@dataclass
class ModelSpec:
    """Shape of one decoder (Hugging Face conventions): `asyncopd prepare` builds the tiny ones from it, and
    `asyncopd validate` sizes a model from it when its checkpoint is not on this machine (config.json wins)."""

    family: str = "qwen2"  # Hugging Face model_type: qwen2 | qwen3 | llama | qwen3_moe
    num_layers: int = 2
    hidden_size: int = 96
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    vocab_size: int = 0  # 0 = the tokenizer's (the tiny models are built for it)
    head_dim: int = 0  # 0 = hidden_size // num_heads
    tie_embeddings: bool = True  # the tiny models tie lm_head to the embedding
    num_experts: int = 0  # mixture of experts (qwen3_moe): experts per layer, 0 = dense
    moe_intermediate_size: int = 0  # one expert's FFN width


@dataclass
class PrepareConfig:
    """Supervised warm-start recipe that `asyncopd prepare --rebuild` uses to build teacher and student.

    Both models train on prompt + chain-of-thought response (loss on the response and eos) with AdamW;
    each batch is split into <= length_buckets micro-batches of similar length so little compute goes to
    padding. The teacher follows linear warmup then cosine decay to zero over exactly teacher_steps.
    Recipe v4 (teacher batch 128, lr 3e-3, 800 steps) replaced v3 (batch 64, lr 1.5e-3, 900 steps), which sat
    on its own gate: 92.2% on the machine it was tuned on, 88.2% on another of the same kind. v4 reached 83% at
    step 500; over 5 seeds at 2 threads 95.2-98.6% (one seed after 100 extra steps), but at 1 thread seed 1
    ended at 89.4% after the whole extra phase. Recipe v5 is v4 with a 1200-step cosine: that seed reached
    99.8% at 1 thread; `asyncopd bench prepare --seeds 5 --threads 1,2` (README) measures every cell.
    The student's accuracy climbs steeply through the 20-50% band (at constant lr: 22% at step 300, 31% at
    325, 55% at 350 in one run), so a fixed step count lands outside it whenever anything changes; it trains at
    a constant rate after warmup and stops at the first evaluation (every student_eval_every steps from
    student_min_steps) that reaches student_stop_accuracy. Left un-annealed, it also takes OPD's first updates
    without the accuracy dip an annealed student shows.
    """

    teacher_steps: int = 1200
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


@dataclass
class RolloutConfig:
    """The rollout fleet: embedded engines or SGLang servers, all spoken to through SGLang's HTTP API."""

    backend: str = "embedded"  # embedded | sglang
    num_engines: int = 1
    threads_per_engine: int = 1
    gpus_per_engine: float = 0.0  # Ray GPUs per engine actor (= tp on a GPU cluster)
    tp: int = 1  # tensor-parallel size of one engine (sglang --tp; the embedded engine is 1)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port (each engine gets its own)
    api_key: str = ""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    request_timeout_s: float = 300.0
    group_timeout_s: float = 120.0  # how long an engine waits for the learner to join the weight group
    startup_timeout_s: float = 600.0  # how long the launcher waits for an SGLang server's /health
    sglang_args: str = ""  # extra flags for `python -m sglang.launch_server` (production only)
    # embedded engine's limits: a request over either is answered 413 naming the limit (the server stays up)
    max_request_bytes: int = 128 * 2**20  # bytes of one HTTP request body
    max_batch_size: int = 8192  # inputs of one /generate request
    # dispatch (asyncopd.rollout.dispatch): each request goes to the engine with a free slot as engines free up,
    # each sample seeded by its index in the batch, so a sample's tokens do not depend on which engine drew it
    max_inflight_per_engine: int = 1  # requests in flight per engine (SGLang batches across requests: raise it)
    samples_per_request: int = 0  # 0 = the batch spread over every slot; 1 = one request per sample (SGLang's way)
    router: str = "none"  # none | sglang_router: /generate through sglang-router (pip install sglang-router)
    router_args: str = ""  # extra flags for `python -m sglang_router.launch_router` (they win over ours)


@dataclass
class TeacherConfig:
    """The teacher scoring service: prefill-only, top-k and per-position query scores."""

    backend: str = "embedded"  # embedded | sglang
    replicas: int = 1
    tp: int = 1
    threads: int = 1
    gpus_per_replica: float = 0.0  # Ray GPUs per teacher replica (its TP size on a cluster)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port (each replica gets its own)
    api_key: str = ""
    wire_dtype: str = "float32"  # float32 | float16: dtype of logprobs on the wire
    request_timeout_s: float = 300.0
    max_tokens_per_forward: int = 32768  # padded tokens per micro-batch forward inside one /score call
    startup_timeout_s: float = 600.0  # backend=sglang: how long to wait for the server's /health
    sglang_args: str = ""  # backend=sglang: extra flags for `python -m sglang.launch_server` (--tp comes from tp)
    # stop the run when an answer cannot be a trained teacher's (uniform, input-independent, NaN/inf): a server
    # that lost its weights still answers 200 (asyncopd.teacher.health)
    check_scores: bool = True


@dataclass
class NamedTeacherConfig(TeacherConfig):
    """One entry of `teachers`: a whole teacher service (TeacherConfig's defaults, not `teacher`'s) and the
    checkpoint it serves."""

    model_path: str = ""  # "" = model.teacher_path (else the prepared teacher)


@dataclass
class LearnerConfig:
    """The student learner: optimizer recipe and parallel layout."""

    backend: str = "hf"  # hf | megatron
    lr: float = 1e-3
    warmup_steps: int = 0  # linear lr warmup over the first optimizer steps (counted by the weight version)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    threads: int = 1
    gpus_per_rank: float = 0.0  # Ray GPUs per learner rank (1 on a GPU cluster; Ray hides GPUs from 0)
    seed: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1  # data-parallel replicas: the learner uses tp * pp * dp GPUs
    virtual_pp: int = 1  # megatron: model chunks per pipeline stage (> 1: the interleaved 1F1B schedule)
    micro_batch_size: int = 0  # samples per forward/backward on each DP rank (0: its whole share at once)
    precision: str = "fp32"  # fp32 | bf16 (megatron: bf16 parameters, fp32 main weights and fp32 gradients)
    recompute: str = "none"  # none | full | selective (megatron activation recomputation; selective: attention)
    distributed_optimizer: bool = True  # megatron: Adam state and fp32 main weights sharded over the DP ranks
    fp8: bool = False  # FP8 GEMMs through Transformer Engine (megatron backend; asyncopd.learner.megatron.patches.fp8)
    fp8_recipe: str = "delayed"  # delayed (DelayedScaling) | current (Float8CurrentScaling, per-tensor)
    fp8_format: str = "hybrid"  # hybrid (E4M3 forward, E5M2 backward) | e4m3
    fp8_margin: int = 0  # delayed: scale margin (powers of two)
    fp8_amax_history_len: int = 1024  # delayed: amax history window
    fp8_amax_compute_algo: str = "max"  # delayed: max | most_recent
    vocab_divisible_by: int = 128  # megatron: pad the vocabulary to a multiple of this times tp (sliced off)


@dataclass
class EstimatorConfig:
    """Which OPD loss the learner uses, and the knobs of every family.

    Every estimator reads only the knobs of its own family; `requirements(cfg)` validates them.
    Names: forward_kl, sparse_rkl, sampled_rkl, mc_rkl, ppo_clip, tis, decoupled_ppo, m2po, gkd.
    """

    name: str = "forward_kl"
    # Teacher score cache size K (forward_kl, gkd, sparse_rkl with sparse_support=teacher). The
    # estimator uses the first top_k columns of the cache, so one cache can serve smaller K.
    top_k: int = 8
    # sparse_rkl: which support the sparse reverse KL sums over: "teacher" (the teacher's top-k) or
    # "student" (the student's top-k frozen at rollout time; the teacher scores those ids).
    sparse_support: str = "teacher"
    student_top_k: int = 0  # student support size K_S frozen at rollout time (sparse_support=student)
    mc_samples: int = 0  # M i.i.d. samples per position drawn at rollout time (mc_rkl; >= 2)
    # forward_kl and gkd: how the teacher's top-k cache stands in for the whole teacher distribution.
    renormalize: bool = False  # teacher top-k mass renormalised to 1 (the teacher is taken as zero elsewhere)
    tail_bucket: bool = False  # one extra outcome holds the mass outside the top-k (both distributions)
    # Sampled family (sampled_rkl, ppo_clip, tis, decoupled_ppo, m2po): advantage baseline
    # log pi_b; False = log pi_old (stale signal), True = sg[log pi_theta] (recompute at learner time).
    recompute: bool = False
    # sampled_rkl and mc_rkl: multiply by pi_theta / pi_old (False = plain policy gradient, which is
    # only unbiased on-policy). The stabilisers always use a ratio; they reject False.
    importance_ratio: bool = True
    clip_eps: float = 0.2  # PPO clip (ppo_clip, decoupled_ppo)
    tis_cap: float = 2.0  # truncated importance sampling cap C in min(pi_theta / pi_old, C)
    behave_cap: float = 5.0  # decoupled PPO: cap on the behaviour weight pi_prox / pi_old
    behave_cap_mode: str = "mask"  # decoupled PPO: "mask" tokens above the cap (AReaL) or "clip" the weight
    m2po_budget: float = 0.01  # M2PO second-moment budget on (log pi_theta - log pi_old)^2, harmful tokens
    gkd_beta: float = 0.5  # generalised JSD interpolation (0 forward KL, 1 reverse KL)
    chunk_tokens: int = 1024  # tokens per full-vocabulary log-softmax chunk (forward and backward)


@dataclass
class PipelineConfig:
    """The OPD loop: batch size, length, and the staleness bound k (0 = strict synchronous)."""

    max_staleness: int = 2
    batch_size: int = 64
    steps: int = 200
    eval_every: int = 50
    eval_prompts: int = 500  # the first N validation prompts
    eval_k: int = 0  # avg@k: k samples per prompt at rollout.temperature besides greedy pass@1 (0 = only pass@1)
    seed: int = 0  # rollout sampling: batch s samples with seed * 2**32 + 64 * s (+ engine index)


@dataclass
class WeightSyncConfig:
    """Learner -> rollout weight broadcast over a torch.distributed group."""

    backend: str = "gloo"  # gloo | nccl
    bucket_mb: float = 128.0
    master_addr: str = "127.0.0.1"  # "" = the node of the learner's rank 0 (multi-node: Ray places it anywhere)
    master_port: int = 0  # 0 = pick a free port
    timeout_s: float = 120.0
    group_name: str = "asyncopd_weights"  # the torch.distributed group learner and engines form
    # SGLang's /pause_generation mode around an update: retract (requests wait, their KV is recomputed under the
    # new weights; the cache flushes), abort (requests in flight end with finish_reason=abort and the rollout
    # dispatcher resumes each from its partial output under the new weights: the default of rollout=sglang),
    # in_place (requests keep their KV; SGLang cannot flush then, so prefix-cache entries of the old weights
    # survive), none (no pause and no flush: for engines that swap a whole update in at once, as the embedded
    # one does), or auto (the rollout backend's: none for the embedded engine, so generation overlaps the
    # broadcast; abort for SGLang)
    pause_mode: str = "auto"
    # dtype of the weights on the wire: auto (the engine's, from its /server_info or its checkpoint's config.json,
    # resolved as SGLang resolves --dtype auto) | float32 | bfloat16 | float16; the learner casts before sending
    dtype: str = "auto"
    # "" (one broadcast per tensor) | flattened_bucket (one broadcast per bucket, SGLang's FlattenedTensorBucket)
    load_format: str = ""


@dataclass
class SupervisionConfig:
    """Keeping the serving tier whole: watchdogs in the server actors, restarts, re-dispatch, teacher retries."""

    max_restarts: int = 3  # restarts of one engine or teacher replica (its server or its Ray actor) per run
    health_interval_s: float = 5.0  # each server actor probes its server this often (0 = no watchdog)
    health_timeout_s: float = 30.0  # one probe's deadline (SGLang's /health_generate waits up to 20 s itself)
    health_failures: int = 3  # consecutive failed probes of a running server before its actor restarts it
    restart_timeout_s: float = 600.0  # how long the driver waits for a lost server to serve again
    max_redispatch: int = 3  # times one rollout request moves on after the engine serving it was lost
    retry_attempts: int = 4  # tries of one teacher /score over the replicas, with bounded exponential backoff


@dataclass
class ClusterConfig:
    """Where the Ray cluster is: empty address starts a private local one on loopback."""

    ray_address: str = ""
    num_cpus: int = 2
    namespace: str = "asyncopd"
    include_dashboard: bool = False
    # the allocation `asyncopd validate` checks GPU totals and per-GPU memory against (0 GPUs: a CPU machine)
    nodes: int = 1
    gpus_per_node: int = 0
    gpu_memory_gib: float = 0.0  # memory of one GPU (0 = not checked)
    # each role's actors in a Ray placement group of one bundle per actor, per TP group for the learner (their GPUs;
    # a sliver of CPU without), all reserved before any actor starts (asyncopd.pipeline.placements): where they
    # run is then the group's strategy, not Ray's default of "near the driver"
    placement_groups: bool = False
    learner_placement: str = "PACK"  # PACK: the learner's ranks on as few nodes as fit (a TP group on one node)
    rollout_placement: str = "SPREAD"  # SPREAD: engines over the nodes
    teacher_placement: str = "SPREAD"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several teachers, each sample scored by the one its `data.teacher_key` column names; empty = `teacher` alone
    teachers: dict[str, NamedTeacherConfig] = field(default_factory=dict)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    weights: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
