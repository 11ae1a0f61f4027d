"""Every config rule, in one place, checked before any process starts.

`problems(cfg)` lists what the config alone rules out: bad values, backends that cannot do what the estimator
needs, parallel layouts the model's heads and layers do not allow, more GPUs than the cluster has, a role that
does not fit its GPUs. `host_problems(cfg)` adds what this machine rules out: modules that do not import,
NCCL without CUDA, checkpoints that are not there. Each names the field and the fix; `validate` raises them
as one ConfigError, which the CLI prints and exits 2 on.
"""

import importlib.util
from pathlib import Path

from asyncopd.config.ray_cluster import STRATEGIES
from asyncopd.config.resources import PRECISION, RECOMPUTE
from asyncopd.config.schema import Config, LearnerConfig, SupervisionConfig, TeacherConfig
from asyncopd.core.errors import ConfigError, Problem
from asyncopd.data.dataset import as_list
from asyncopd.data.tokenizer import tokenizer_fingerprint
from asyncopd.data.verifiers import VERIFIERS
from asyncopd.estimators.registry import build as build_estimator
from asyncopd.learner.backends import LEARNER_BACKENDS
from asyncopd.learner.checkpoints import resolve_checkpoint
from asyncopd.model.paths import resolve_data_files, teacher_services
from asyncopd.rollout.backends import ROLLOUT_BACKENDS
from asyncopd.rollout.sglang_router import MISSING as ROUTER_MISSING
from asyncopd.rollout.sglang_router import ROUTERS
from asyncopd.teacher.backends import TEACHER_BACKENDS
from asyncopd.validation.plan import Plan, plan
from asyncopd.weights.sync import config_rules as weight_sync_rules


def _teacher_values(t: TeacherConfig, f: str) -> list[tuple[bool, str, str]]:
    """(ok, field, message) for one teacher service's values; `f` is its prefix (teacher, teachers.<name>)."""
    return [
        (t.replicas >= 1, f"{f}.replicas", f"{f}.replicas must be >= 1 (got {t.replicas})"),
        (t.tp >= 1, f"{f}.tp", f"{f}.tp must be >= 1 (got {t.tp})"),
        (t.threads >= 1, f"{f}.threads", f"{f}.threads must be >= 1 (got {t.threads})"),
        (t.wire_dtype in ("float32", "float16"), f"{f}.wire_dtype",
         f"{f}.wire_dtype={t.wire_dtype!r} is unknown: use 'float32' or 'float16'"),
        (t.max_tokens_per_forward >= 1, f"{f}.max_tokens_per_forward",
         f"{f}.max_tokens_per_forward must be >= 1 (got {t.max_tokens_per_forward})"),
    ]


def _routing(cfg: Config) -> list[tuple[bool, str, str]]:
    """Several teachers need the column that picks each sample's; the column needs `teachers` to name."""
    names = sorted(cfg.teachers)
    return [
        (len(names) < 2 or bool(cfg.data.teacher_key), "data.teacher_key",
         f"teachers has {len(names)} entries {names} but data.teacher_key is empty: set it to the dataset column "
         "that names each training sample's teacher"),
        (bool(names) or not cfg.data.teacher_key, "data.teacher_key",
         f"data.teacher_key={cfg.data.teacher_key!r} picks a teacher per sample among `teachers`, which is empty: "
         "define them (e.g. '+teachers={math: {model_path: A}, code: {model_path: B}}') or unset data.teacher_key"),
    ]


def _supervision(sv: SupervisionConfig) -> list[tuple[bool, str, str]]:
    """supervision.*: counts and periods a restart or a retry can run on."""
    checks = (("max_restarts", sv.max_restarts >= 0, ">= 0"),
              ("health_interval_s", sv.health_interval_s >= 0, ">= 0 (0 = no watchdog)"),
              ("health_timeout_s", sv.health_timeout_s > 0, "> 0"),
              ("health_failures", sv.health_failures >= 1, ">= 1"),
              ("restart_timeout_s", sv.restart_timeout_s > 0, "> 0"),
              ("max_redispatch", sv.max_redispatch >= 0, ">= 0"),
              ("retry_attempts", sv.retry_attempts >= 1, ">= 1"))
    return [(ok, f"supervision.{name}", f"supervision.{name} must be {bound} (got {getattr(sv, name)})")
            for name, ok, bound in checks]


def _values(cfg: Config) -> list[tuple[bool, str, str]]:
    """(ok, field, message) for every single-value rule."""
    p, r, lr, w, task, prep, d = (cfg.pipeline, cfg.rollout, cfg.learner, cfg.weights, cfg.task, cfg.model.prepare,
                                  cfg.data)
    lo_hi = list(prep.student_accuracy_range)
    return [
        *(rule for t in teacher_services(cfg) for rule in _teacher_values(t.cfg, t.field)),
        *_routing(cfg),
        *((getattr(cfg.cluster, f"{role}_placement") in STRATEGIES, f"cluster.{role}_placement",
           f"cluster.{role}_placement={getattr(cfg.cluster, f'{role}_placement')!r} is not a Ray placement "
           f"strategy: use one of {list(STRATEGIES)}") for role in ("learner", "rollout", "teacher")),
        (d.verifier in VERIFIERS, "data.verifier", f"data.verifier={d.verifier!r} is unknown: use one of "
         f"{sorted(VERIFIERS)}"),
        (bool(d.prompt_key) and bool(d.answer_key), "data.prompt_key",
         "data.prompt_key and data.answer_key must name the dataset's columns (got empty)"),
        (d.max_prompt_length >= 0, "data.max_prompt_length", f"data.max_prompt_length must be >= 0 (got "
         f"{d.max_prompt_length}); 0 = the student's context minus rollout.max_new_tokens"),
        (p.eval_k >= 0, "pipeline.eval_k", f"pipeline.eval_k must be >= 0 (got {p.eval_k}); 0 = pass@1 only"),
        (task.num_train >= 1, "task.num_train", f"task.num_train must be >= 1 (got {task.num_train})"),
        (p.max_staleness >= 0, "pipeline.max_staleness", f"pipeline.max_staleness must be >= 0 (got "
         f"{p.max_staleness}); use pipeline.max_staleness=0 for strict synchronous training"),
        (p.batch_size >= 1, "pipeline.batch_size", f"pipeline.batch_size must be >= 1 (got {p.batch_size})"),
        (p.steps >= 1, "pipeline.steps", f"pipeline.steps must be >= 1 (got {p.steps})"),
        (p.eval_every >= 0, "pipeline.eval_every", f"pipeline.eval_every must be >= 0 (got {p.eval_every}); "
         "0 disables it"),
        (p.eval_prompts >= 1, "pipeline.eval_prompts", f"pipeline.eval_prompts must be >= 1 (got {p.eval_prompts})"),
        (cfg.run.save_every >= 0, "run.save_every", f"run.save_every must be >= 0 (got {cfg.run.save_every}); 0 saves "
         "only at the end"),
        (cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints",
         f"run.keep_checkpoints must be >= 1 (got {cfg.run.keep_checkpoints})"),
        *_supervision(cfg.supervision),
        (r.num_engines >= 1, "rollout.num_engines", f"rollout.num_engines must be >= 1 (got {r.num_engines})"),
        (r.tp >= 1, "rollout.tp", f"rollout.tp must be >= 1 (got {r.tp})"),
        (r.temperature >= 0, "rollout.temperature", f"rollout.temperature must be >= 0 (got {r.temperature})"),
        (0 < r.top_p <= 1, "rollout.top_p", f"rollout.top_p must be in (0, 1] (got {r.top_p})"),
        (r.max_new_tokens >= 1, "rollout.max_new_tokens",
         f"rollout.max_new_tokens must be >= 1 (got {r.max_new_tokens})"),
        (r.max_request_bytes >= 1, "rollout.max_request_bytes",
         f"rollout.max_request_bytes must be >= 1 (got {r.max_request_bytes})"),
        (r.max_batch_size >= 1, "rollout.max_batch_size",
         f"rollout.max_batch_size must be >= 1 (got {r.max_batch_size})"),
        (r.threads_per_engine >= 1, "rollout.threads_per_engine",
         f"rollout.threads_per_engine must be >= 1 (got {r.threads_per_engine})"),
        (r.max_inflight_per_engine >= 1, "rollout.max_inflight_per_engine",
         f"rollout.max_inflight_per_engine must be >= 1 (got {r.max_inflight_per_engine})"),
        (r.samples_per_request >= 0, "rollout.samples_per_request",
         f"rollout.samples_per_request must be >= 0 (got {r.samples_per_request}); 0 spreads the batch over "
         "every engine slot"),
        (r.router in ROUTERS, "rollout.router", f"rollout.router={r.router!r} is unknown: use one of {list(ROUTERS)}"),
        (lr.lr > 0, "learner.lr", f"learner.lr must be > 0 (got {lr.lr})"),
        (lr.warmup_steps >= 0, "learner.warmup_steps", f"learner.warmup_steps must be >= 0 (got {lr.warmup_steps})"),
        (lr.threads >= 1, "learner.threads", f"learner.threads must be >= 1 (got {lr.threads})"),
        (min(lr.tp, lr.pp, lr.dp) >= 1, "learner.tp",
         f"learner.tp, learner.pp and learner.dp must all be >= 1 (got {lr.tp}, {lr.pp}, {lr.dp})"),
        (lr.virtual_pp >= 1, "learner.virtual_pp", f"learner.virtual_pp must be >= 1 (got {lr.virtual_pp}); 1 = "
         "no interleaving"),
        (lr.micro_batch_size >= 0, "learner.micro_batch_size", f"learner.micro_batch_size must be >= 0 (got "
         f"{lr.micro_batch_size}); 0 = each data-parallel rank's whole share of the batch at once"),
        (lr.precision in PRECISION, "learner.precision", f"learner.precision={lr.precision!r} is unknown: use one of "
         f"{sorted(PRECISION)}"),
        (lr.recompute in RECOMPUTE, "learner.recompute", f"learner.recompute={lr.recompute!r} is unknown: use one of "
         f"{list(RECOMPUTE)}"),
        (p.batch_size >= lr.dp, "pipeline.batch_size", f"pipeline.batch_size={p.batch_size} < learner.dp={lr.dp}: "
         f"every data-parallel replica needs a sample each step; set pipeline.batch_size >= {lr.dp} or lower "
         "learner.dp"),
        (w.backend in ("gloo", "nccl"), "weights.backend",
         f"weights.backend={w.backend!r} is unknown: use 'gloo' or 'nccl'"),
        (w.bucket_mb > 0, "weights.bucket_mb", f"weights.bucket_mb must be > 0 (got {w.bucket_mb})"),
        *weight_sync_rules(w),
        (w.pause_mode != "none" or r.backend != "sglang", "weights.pause_mode",
         "weights.pause_mode=none with rollout.backend=sglang: SGLang loads each bucket as it arrives and keeps its "
         "prefix cache, so responses would mix weights and reuse KV of the old ones; use abort (aborted samples "
         "resume from their partial output), retract or in_place"),
        (len(task.operand_counts) == len(task.operand_probs) > 0, "task.operand_probs",
         "task.operand_counts and task.operand_probs must be non-empty and of equal length"),
        (all(c >= 2 for c in task.operand_counts), "task.operand_counts",
         f"task.operand_counts must all be >= 2 (got {task.operand_counts})"),
        (all(q >= 0 for q in task.operand_probs) and sum(task.operand_probs) > 0, "task.operand_probs",
         f"task.operand_probs must be non-negative with a positive sum (got {task.operand_probs})"),
        (task.max_value >= 1, "task.max_value", f"task.max_value must be >= 1 (got {task.max_value})"),
        (task.num_test >= 1, "task.num_test", f"task.num_test must be >= 1 to measure accuracy (got {task.num_test})"),
        (prep.teacher_steps >= 1, "model.prepare.teacher_steps",
         f"model.prepare.teacher_steps must be >= 1 (got {prep.teacher_steps})"),
        (1 <= prep.student_min_steps <= prep.student_max_steps, "model.prepare.student_min_steps",
         f"model.prepare.student_min_steps must be in [1, student_max_steps] (got {prep.student_min_steps}, "
         f"student_max_steps={prep.student_max_steps})"),
        (prep.student_eval_every >= 1, "model.prepare.student_eval_every",
         "model.prepare.student_eval_every must be >= 1"),
        (0 <= prep.student_stop_accuracy <= 1, "model.prepare.student_stop_accuracy",
         "model.prepare.student_stop_accuracy must be in [0, 1]"),
        (prep.teacher_batch_size >= 1 and prep.student_batch_size >= 1, "model.prepare.teacher_batch_size",
         "model.prepare.teacher_batch_size and model.prepare.student_batch_size must be >= 1"),
        (prep.teacher_lr > 0 and prep.student_lr > 0, "model.prepare.teacher_lr",
         "model.prepare.teacher_lr and model.prepare.student_lr must be > 0"),
        (prep.threads >= 1, "model.prepare.threads", f"model.prepare.threads must be >= 1 (got {prep.threads})"),
        (0 <= prep.min_teacher_accuracy <= prep.teacher_target_accuracy <= 1, "model.prepare.min_teacher_accuracy",
         f"model.prepare.min_teacher_accuracy <= model.prepare.teacher_target_accuracy must hold within [0, 1] "
         f"(got {prep.min_teacher_accuracy}, {prep.teacher_target_accuracy})"),
        (len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] <= 1, "model.prepare.student_accuracy_range",
         f"model.prepare.student_accuracy_range must be [low, high] within [0, 1] (got {lo_hi})"),
        (prep.extra_eval_every >= 1, "model.prepare.extra_eval_every", "model.prepare.extra_eval_every must be >= 1"),
    ]


def _backend_names(cfg: Config) -> list[tuple[str, str, dict]]:
    """(field, backend name, its table) of every role, one per teacher."""
    return [("rollout.backend", cfg.rollout.backend, ROLLOUT_BACKENDS),
            *((f"{t.field}.backend", t.cfg.backend, TEACHER_BACKENDS) for t in teacher_services(cfg)),
            ("learner.backend", cfg.learner.backend, LEARNER_BACKENDS)]


def _backends(cfg: Config) -> list[Problem]:
    """Backend names against the tables, and each backend's limits."""
    out = []
    for field, name, table in _backend_names(cfg):
        if name not in table:
            out.append(Problem(field, f"{field}={name!r} is unknown: use one of {sorted(table)}"))
    if out:
        return out
    rb, lb = ROLLOUT_BACKENDS[cfg.rollout.backend], LEARNER_BACKENDS[cfg.learner.backend]
    for field, tp, b, other in (("rollout.tp", cfg.rollout.tp, rb, "rollout.backend=sglang"),
                                *((f"{t.field}.tp", t.cfg.tp, TEACHER_BACKENDS[t.cfg.backend],
                                   f"{t.field}.backend=sglang (or {t.field}.replicas)") for t in teacher_services(cfg)),
                                ("learner.tp", cfg.learner.tp, lb, "learner.backend=megatron")):
        if b.max_tp is not None and tp > b.max_tp:
            out.append(Problem(field, f"{field}={tp}: the {b.name} backend runs at most tp={b.max_tp}; set "
                                      f"{field}={b.max_tp} or use {other}"))
    for field, size, most, what in (("learner.pp", cfg.learner.pp, lb.max_pp, "pipeline stage"),
                                    ("learner.dp", cfg.learner.dp, lb.max_dp, "data-parallel replica")):
        if most is not None and size > most:
            out.append(Problem(field, f"{field}={size}: the {lb.name} learner runs "
                                      + ("one " + what if most == 1 else f"at most {most} {what}s")
                                      + f"; set learner.backend=megatron or {field}={most}"))
    out += _megatron_knobs(cfg.learner, cfg.pipeline.batch_size)
    if cfg.learner.fp8 and not lb.fp8:
        out.append(Problem("learner.fp8", f"learner.fp8=true needs the megatron learner (Transformer Engine); set "
                                          f"learner.fp8=false or learner=megatron (learner.backend={lb.name})"))
    sglang_roles = [("rollout", cfg.rollout)] * (cfg.rollout.backend == "sglang") + [
        (t.field, t.cfg) for t in teacher_services(cfg) if t.cfg.backend == "sglang"]
    if sglang_roles:
        from asyncopd.rollout.sglang_launcher import sglang_args_problem  # imports ray: only when SGLang is used

        for role, c in sglang_roles:
            if msg := sglang_args_problem(role, c.sglang_args):
                out.append(Problem(f"{role}.sglang_args", msg))
    return out


def _megatron_knobs(lr: LearnerConfig, batch_size: int) -> list[Problem]:
    """Interleaving, bf16 and recomputation are megatron-core's (the hf learner trains fp32 in
    one process); the interleaved schedule also needs several stages and micro-batches in groups of learner.pp
    (megatron/core/pipeline_parallel/schedules.py, forward_backward_pipelining_with_interleaving)."""
    out, megatron = [], lr.backend == "megatron"
    fix = "or set learner.backend=megatron"
    sane = min(lr.pp, lr.dp) >= 1 and batch_size >= lr.dp and lr.micro_batch_size >= 0  # else value rules name them
    if lr.virtual_pp > 1 and not (megatron and lr.pp > 1):
        out.append(Problem("learner.virtual_pp", f"learner.virtual_pp={lr.virtual_pp} interleaves model chunks over "
                                                 f"pipeline stages, which needs the megatron learner and learner.pp > "
                                                 f"1 (got learner.backend={lr.backend}, learner.pp={lr.pp}): set "
                                                 "learner.virtual_pp=1, or "
                                                 + ("learner.pp >= 2" if megatron else
                                                    "learner.backend=megatron with learner.pp >= 2")))
    elif lr.virtual_pp > 1 and sane:
        # replica r takes rows [r*B//dp, (r+1)*B//dp): floor or ceil of B/dp samples, ceil(share/size) micro-batches
        shares = sorted({batch_size // lr.dp, -(-batch_size // lr.dp)})
        micro = lr.micro_batch_size or shares[-1]
        counts = [-(-share // (lr.micro_batch_size or share)) for share in shares]
        if any(count % lr.pp for count in counts):
            good = [m for m in range(1, shares[-1] + 1) if all(n % m == 0 and (n // m) % lr.pp == 0 for n in shares)]
            good = [m for m in good if m <= micro][-3:] or good[:3]  # the largest that do not grow the micro-batch
            out.append(Problem("learner.micro_batch_size",
                               f"learner.virtual_pp={lr.virtual_pp}: the interleaved schedule runs micro-batches in "
                               f"groups of learner.pp={lr.pp}, but the data-parallel ranks' shares of "
                               f"pipeline.batch_size={batch_size} ({' or '.join(map(str, shares))} samples) make "
                               f"{' or '.join(map(str, counts))} micro-batches of learner.micro_batch_size="
                               f"{lr.micro_batch_size}: "
                               + (f"set learner.micro_batch_size to one of {good}" if good else
                                  f"set pipeline.batch_size to a multiple of learner.dp x learner.pp = "
                                  f"{lr.dp * lr.pp}")
                               + " or learner.virtual_pp=1"))
    if lr.precision == "bf16" and not megatron:
        out.append(Problem("learner.precision", f"learner.precision=bf16 needs the megatron learner (the {lr.backend} "
                                                f"learner trains fp32): set learner.precision=fp32 {fix}"))
    if lr.recompute in ("full", "selective") and not megatron:
        out.append(Problem("learner.recompute", f"learner.recompute={lr.recompute} needs the megatron learner: set "
                                                f"learner.recompute=none {fix}"))
    return out


def _estimator(cfg: Config) -> list[Problem]:
    """The estimator's own knobs, then what it needs fetched against what the backends can return."""
    try:
        req = build_estimator(cfg.estimator).requirements(cfg.estimator)
    except (ValueError, ConfigError) as e:
        return [Problem("estimator.name", str(e))]
    out = []
    name = cfg.estimator.name
    rb = ROLLOUT_BACKENDS.get(cfg.rollout.backend)
    if req.mc_samples and rb is not None and not rb.mc_samples:
        out.append(Problem("rollout.backend", f"estimator={name} draws {req.mc_samples} samples per position at "
                                              f"rollout time, which rollout.backend={rb.name} cannot capture; use "
                                              "rollout=embedded or another estimator (e.g. sampled_rkl)"))
    if req.mc_samples and cfg.rollout.top_p < 1:
        out.append(Problem("rollout.top_p", f"estimator={name} weighs its {req.mc_samples} draws per position by their "
                                            "log-probabilities, which engines report over the full vocabulary (as "
                                            f"SGLang does) while rollout.top_p={cfg.rollout.top_p:g} draws from the "
                                            "truncated distribution: set rollout.top_p=1"))
    for t in teacher_services(cfg):
        tb, f = TEACHER_BACKENDS.get(t.cfg.backend), f"{t.field}.backend"
        if (req.mc_samples or req.teacher_scores_student_topk) and tb is not None and not tb.per_position_queries:
            out.append(Problem(f, f"estimator={name} needs per-position query scores (a different id set at every "
                                  f"position) that {f}={tb.name} cannot give (stock SGLang scores one fixed id list "
                                  f"per request); use {f}=embedded or an estimator on the teacher's top-k "
                                  "(forward_kl, sparse_rkl)"))
    return out


def _prepared(cfg: Config) -> list[Problem]:
    """A model with no path is built by `asyncopd prepare` from its spec: a small dense Qwen2 on the task's
    tokenizer, whose heads divide its width."""
    out = []
    for role, path in (("teacher", cfg.model.teacher_path), ("student", cfg.model.student_path)):
        s, f = getattr(cfg.model, role), f"model.{role}"
        if min(s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.intermediate_size) < 1:
            out.append(Problem(f"{f}.num_heads", f"{f}: num_layers, hidden_size, num_heads, num_kv_heads and "
                                                 "intermediate_size must all be >= 1"))
            continue
        if path:  # sizes a checkpoint that may not be here; `asyncopd prepare` builds only the others
            continue
        if s.family != "qwen2" or s.num_experts or s.head_dim or s.vocab_size:
            out.append(Problem(f"{f}.family", f"{f} is built by `asyncopd prepare`, which builds dense Qwen2 models "
                                              f"on the task's tokenizer: set {f}.family=qwen2, num_experts=0, "
                                              f"head_dim=0, vocab_size=0, or set model.{role}_path to a checkpoint"))
        if s.hidden_size % s.num_heads or s.num_heads % s.num_kv_heads:
            out.append(Problem(f"{f}.num_heads", f"{f}: hidden_size={s.hidden_size}, num_heads={s.num_heads} and "
                                                 f"num_kv_heads={s.num_kv_heads} must divide in turn"))
    return out


def _config_problems(cfg: Config) -> tuple[Plan | None, list[Problem]]:
    out = [Problem(f, m) for ok, f, m in _values(cfg) if not ok] + _prepared(cfg)
    known = all(name in table for _, name, table in _backend_names(cfg))
    out += _backends(cfg)
    out += _estimator(cfg)
    # layouts, GPUs and memory need sane sizes and known backends, not a config that can run otherwise
    the_plan = plan(cfg) if known and not any(_sizes(p.field) for p in out) else None
    if the_plan is not None:
        out += the_plan.problems
    return the_plan, out


_SIZES = frozenset({"model.teacher.num_heads", "model.student.num_heads", "learner.tp", "rollout.tp",
                    "teacher.tp", "learner.dp", "pipeline.batch_size", "rollout.num_engines", "teacher.replicas",
                    "rollout.max_new_tokens", "task.operand_counts", "task.max_value", "task.operand_probs"})


def _sizes(field: str) -> bool:
    """A field the plan's arithmetic needs sane (a named teacher's teachers.<name>.tp counts as teacher.tp)."""
    parts = field.split(".")
    return field in _SIZES or (parts[0] == "teachers" and len(parts) == 3 and f"teacher.{parts[2]}" in _SIZES)


def problems(cfg: Config) -> list[Problem]:
    """Everything the config alone rules out (no files, no GPUs, nothing started)."""
    return _config_problems(cfg)[1]


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a missing parent package
        return True


def host_problems(cfg: Config) -> list[Problem]:
    """What this machine rules out: modules, CUDA, and the checkpoints the run reads."""
    import torch

    out = []
    hint = "install the GPU extras with `pip install .[gpu]` on a CUDA machine"
    for field, name, table in _backend_names(cfg):
        b = table.get(name)
        for module in (b.needs if b else ()):
            if _missing(module):
                out.append(Problem(field, f"{field}={b.name} needs {module}, which is not importable here: {hint}"))
    if cfg.rollout.router == "sglang_router" and _missing("sglang_router"):
        out.append(Problem("rollout.router", ROUTER_MISSING))
    if cfg.learner.fp8 and _missing("transformer_engine"):
        out.append(Problem("learner.fp8", f"learner.fp8=true needs Transformer Engine, which is not importable: "
                                          f"{hint}, or set learner.fp8=false"))
    if cfg.weights.backend == "nccl" and not torch.cuda.is_available():
        out.append(Problem("weights.backend", "weights.backend=nccl needs CUDA GPUs; on a CPU machine use "
                                              "weights.backend=gloo"))
    root = Path(cfg.model.artifacts_dir)
    teachers = _teacher_checkpoints(cfg)
    for field, path in (*((f, p) for p, f in teachers.items()),
                        ("model.student_path", cfg.model.student_path or root / "student")):
        if not (Path(path) / "config.json").exists():
            out.append(Problem(field, f"{field}={str(path)!r} holds no Hugging Face checkpoint (config.json "
                                      f"missing): run `asyncopd prepare` to build the embedded models, or point "
                                      f"{field} at a checkpoint directory"))
    out += _tokenizer_pair(cfg)
    builtin = "" if as_list(cfg.data.train_files) else (": run `asyncopd prepare` to export the built-in task, "
                                                       "or set data.train_files to your dataset")
    for field, files in zip(("data.train_files", "data.val_files"), resolve_data_files(cfg), strict=True):
        out += [Problem(field, f"{field}: {f} does not exist{builtin}") for f in files if not Path(f).exists()]
    resume = resolve_checkpoint(cfg.run.resume_from) if cfg.run.resume_from else None
    if resume is not None and not any(resume.glob("learner_state*.pt")):
        out.append(Problem("run.resume_from", f"run.resume_from={cfg.run.resume_from!r} holds no learner state "
                                              "(learner_state*.pt): point it at an earlier run's checkpoint/ (its "
                                              "newest checkpoint), its run dir, or one of its checkpoints/step-N"))
    return out


def _teacher_checkpoints(cfg: Config) -> dict[str, str]:
    """Every teacher checkpoint the run serves -> the field it comes from (teachers sharing one: the first)."""
    out: dict[str, str] = {}
    for t in teacher_services(cfg):
        out.setdefault(t.path, t.path_field)
    return out


def _tokenizer_pair(cfg: Config) -> list[Problem]:
    """Teacher scores index the student's vocabulary: refuse a teacher whose tokenizer differs from the student's
    before anything starts, naming both files (only when both checkpoints carry one; the servers check again on
    start). Every teacher: each sample's scores index the one student vocabulary."""
    root = Path(cfg.model.artifacts_dir)

    def file(p: str | Path) -> Path:
        return Path(p) / "tokenizer.json" if Path(p).is_dir() else Path(p)

    student_file = file(cfg.model.tokenizer_path or cfg.model.student_path or root / "student")
    out = []
    for path, field in _teacher_checkpoints(cfg).items():
        files = [file(path), student_file]
        if not all(f.is_file() for f in files):
            continue
        try:
            teacher, student = (tokenizer_fingerprint(f) for f in files)
        except (ValueError, KeyError) as e:
            out.append(Problem("model.tokenizer_path", f"a tokenizer file cannot be read ({e}): {files[0]}, "
                                                       f"{files[1]}"))
            continue
        if teacher != student:
            out.append(Problem(field, f"teacher and student tokenizers differ: {files[0]} (fingerprint {teacher}) vs "
                                      f"{files[1]} ({student}); on-policy distillation needs one shared tokenizer: "
                                      f"point {field} and model.student_path at a pair built with the same one"))
    return out


def validate(cfg: Config, *, host: bool = False) -> Config:
    """Raise one ConfigError listing every problem (host: also this machine's); returns cfg when it can run."""
    found = problems(cfg) + (host_problems(cfg) if host else [])
    if found:
        raise ConfigError(found[0].message if len(found) == 1 else
                          f"{len(found)} problems:\n" + "\n".join(f"- {p.message}" for p in found))
    return cfg


def report(cfg: Config) -> tuple[Plan | None, list[Problem], list[Problem]]:
    """For `asyncopd validate`: the per-role plan (when sizes allow one), the config's problems, this machine's."""
    the_plan, found = _config_problems(cfg)
    return the_plan, found, host_problems(cfg)
