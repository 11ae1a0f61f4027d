"""Will it fit? Each role's parallel layout, GPUs and per-GPU memory, from the config alone.

A role's model shape comes from its checkpoint's config.json when the checkpoint is on this machine, else from
the config's `model.student` / `model.teacher` spec (configs/model/*.yaml declare the shapes of the models they
name). The arithmetic and its formulas are `asyncopd.config.resources`.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from asyncopd.config.resources import (
    PRECISION,
    Arch,
    MemoryEstimate,
    check_layout,
    engine_memory,
    learner_memory,
)
from asyncopd.config.schema import Config, ModelSpec
from asyncopd.core.errors import Problem
from asyncopd.data.task import max_prompt_tokens
from asyncopd.data.tokenizer import VOCAB
from asyncopd.learner.backends import LEARNER_BACKENDS
from asyncopd.model.paths import teacher_services
from asyncopd.rollout.backends import ROLLOUT_BACKENDS
from asyncopd.teacher.backends import TEACHER_BACKENDS

GIB = 2**30
_QKV_BIAS = {"qwen2"}  # families whose q/k/v projections have a bias
_QK_NORM = {"qwen3", "qwen3_moe"}  # families with per-head RMSNorm on q and k


@dataclass(frozen=True)
class RolePlan:
    role: str  # learner | rollout | teacher | teachers.<name> (one per named teacher)
    backend: str
    layout: str  # e.g. "tp=8 pp=4 dp=1" or "8 engines x tp=4"
    gpus: float  # GPUs the role asks Ray for, in all
    source: str  # where the model shape came from
    memory: MemoryEstimate
    kv_sequences: int = 0  # engines: the full-length sequences its KV cache column holds


@dataclass
class Plan:
    roles: list[RolePlan]
    gpus_available: int  # cluster.nodes * cluster.gpus_per_node (0: a CPU machine)
    seq_len: int  # longest prompt + rollout.max_new_tokens
    problems: list[Problem] = field(default_factory=list)


def _spec_of(config_json: dict) -> ModelSpec:
    """A Hugging Face config.json as the schema's ModelSpec (the fields sizing needs)."""
    heads = config_json["num_attention_heads"]
    return ModelSpec(family=config_json.get("model_type", ""), num_layers=config_json["num_hidden_layers"],
                     hidden_size=config_json["hidden_size"], num_heads=heads,
                     num_kv_heads=config_json.get("num_key_value_heads") or heads,
                     intermediate_size=config_json["intermediate_size"], vocab_size=config_json["vocab_size"],
                     head_dim=config_json.get("head_dim") or 0,
                     tie_embeddings=bool(config_json.get("tie_word_embeddings", False)),
                     num_experts=config_json.get("num_experts") or 0,
                     moe_intermediate_size=config_json.get("moe_intermediate_size") or 0)


def _arch(spec: ModelSpec, path: str) -> tuple[Arch, str, str]:
    """The shape, source and family of the model at `path` (its config.json) or, when it is not here, of the
    config's spec."""
    cfg_file = Path(path) / "config.json" if path else None
    source = "config spec"
    if cfg_file is not None and cfg_file.exists():
        spec, source = _spec_of(json.loads(cfg_file.read_text())), str(cfg_file)
    arch = Arch(num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_heads=spec.num_heads,
                num_kv_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
                vocab_size=spec.vocab_size or len(VOCAB), head_dim=spec.head_dim,
                tie_embeddings=spec.tie_embeddings, qkv_bias=spec.family in _QKV_BIAS,
                qk_norm=spec.family in _QK_NORM, num_experts=spec.num_experts,
                moe_intermediate_size=spec.moe_intermediate_size)
    return arch, source, spec.family


def plan(cfg: Config) -> Plan:
    """Every role's layout, GPU count and per-GPU memory, and the problems they show."""
    m, r, lr, c = cfg.model, cfg.rollout, cfg.learner, cfg.cluster
    student, s_src, s_family = _arch(m.student, m.student_path or str(Path(m.artifacts_dir) / "student"))
    seq = max_prompt_tokens(cfg.task) + r.max_new_tokens
    B = cfg.pipeline.batch_size
    learner_mem, micro = _learner_memory(cfg, student, seq)
    # an engine holds its share of the batch, every sequence at full length, in its KV cache
    per_engine = -(-B // r.num_engines)
    rollout_mem = engine_memory(student, tp=r.tp, kv_tokens=per_engine * seq, role="rollout")
    ranks = lr.tp * lr.pp * lr.dp
    vpp = f" vpp={lr.virtual_pp}" if lr.virtual_pp > 1 else ""
    roles = [
        RolePlan("learner", lr.backend, f"tp={lr.tp} pp={lr.pp}{vpp} dp={lr.dp} mb={micro}", ranks * lr.gpus_per_rank,
                 s_src, learner_mem),
        RolePlan("rollout", r.backend, f"{r.num_engines} engines x tp={r.tp}", r.num_engines * r.gpus_per_engine,
                 s_src, rollout_mem, per_engine),
    ]
    teacher_layouts = []
    for svc in teacher_services(cfg):  # each teacher: its own checkpoint, replicas and layout
        t = svc.cfg
        teacher, t_src, _ = _arch(m.teacher, svc.path)
        # a teacher replica scores at most max_tokens_per_forward padded tokens in one prefill
        scored = min(t.max_tokens_per_forward, B * seq)
        roles.append(RolePlan(svc.field, t.backend, f"{t.replicas} replicas x tp={t.tp}",
                              t.replicas * t.gpus_per_replica, t_src,
                              engine_memory(teacher, tp=t.tp, kv_tokens=scored, role="teacher"), max(scored // seq, 1)))
        teacher_layouts += check_layout(svc.field, teacher, t.tp)
    out = Plan(roles, c.nodes * c.gpus_per_node, seq)
    layout = check_layout("learner", student, lr.tp, lr.pp, lr.virtual_pp)
    out.problems += layout
    backend = LEARNER_BACKENDS[lr.backend]
    families = backend.families
    if families is not None and s_family not in families:
        out.problems.append(Problem("learner.backend", f"learner.backend={lr.backend} trains {sorted(families)} "
                                                        f"checkpoints; the student is {s_family!r} ({s_src}): use "
                                                        "learner=hf or a supported student"))
    if not backend.replicates_kv_heads and student.num_kv_heads % lr.tp and \
            not any(p.field == "learner.tp" for p in layout):
        out.problems.append(Problem("learner.tp", f"learner.tp={lr.tp}: the {lr.backend} learner splits the student's "
                                                   f"{student.num_kv_heads} KV heads evenly over tp ranks; use a "
                                                   f"learner.tp that divides {student.num_kv_heads}"))
    out.problems += check_layout("rollout", student, r.tp)
    out.problems += teacher_layouts
    out.problems += _gpu_problems(cfg, roles, out.gpus_available)
    return out


def _learner_memory(cfg: Config, student: Arch, seq: int) -> tuple[MemoryEstimate, int]:
    """The learner's per-GPU estimate and its micro-batch. Each DP rank takes ceil(batch / dp) samples per step, in
    micro-batches of learner.micro_batch_size (0: all at once). The megatron learner trains in learner.precision
    with megatron's optimizer (sharded over dp with learner.distributed_optimizer) and learner.recompute; the hf
    learner trains fp32 parameters with torch AdamW (two fp32 moments, no master copy, not sharded), no
    recomputation."""
    lr = cfg.learner
    dp, pp, vpp = max(lr.dp, 1), max(lr.pp, 1), max(lr.virtual_pp, 1)
    share = -(-cfg.pipeline.batch_size // dp)
    micro = lr.micro_batch_size if lr.micro_batch_size > 0 else share
    megatron = lr.backend == "megatron"
    param_b, grad_b = PRECISION.get(lr.precision, PRECISION["fp32"]) if megatron else PRECISION["fp32"]
    recompute = lr.recompute if megatron and lr.recompute in ("full", "selective") else "none"
    mem = learner_memory(student, tp=lr.tp, pp=pp, dp=dp, micro_batch=micro, seq_len=seq, param_bytes=param_b,
                         grad_bytes=grad_b, distributed_optimizer=megatron and lr.distributed_optimizer,
                         recompute=recompute, virtual_pp=vpp if megatron else 1,
                         num_microbatches=-(-share // micro))
    return mem, micro


def _gpu_problems(cfg: Config, roles: list[RolePlan], available: int) -> list[Problem]:
    """GPU totals against the allocation, a GPU per shard, and each role's memory against one GPU."""
    c, out = cfg.cluster, []
    if available <= 0:
        return out
    teachers = teacher_services(cfg)
    on_gpu = {"rollout": ROLLOUT_BACKENDS[cfg.rollout.backend].uses_gpu,
              **{t.field: TEACHER_BACKENDS[t.cfg.backend].uses_gpu for t in teachers},
              "learner": LEARNER_BACKENDS[cfg.learner.backend].uses_gpu}  # CPU backends: no GPU rules
    servers = [("rollout", "rollout.gpus_per_engine", cfg.rollout.gpus_per_engine, cfg.rollout.tp),
               *((t.field, f"{t.field}.gpus_per_replica", t.cfg.gpus_per_replica, t.cfg.tp) for t in teachers)]
    for role, name, per, tp in servers:
        if on_gpu[role] and per != tp:
            out.append(Problem(name, f"{name}={per:g} but its tp is {tp}: a tensor-parallel server needs one GPU "
                                      f"per shard; set {name}={tp}"))
        if on_gpu[role] and c.gpus_per_node > 0 and tp > c.gpus_per_node:
            out.append(Problem(f"{role}.tp", f"{role}.tp={tp} but a node has cluster.gpus_per_node="
                                             f"{c.gpus_per_node}: each replica is one Ray actor running one SGLang "
                                             f"server, which cannot span nodes; set {role}.tp <= {c.gpus_per_node} "
                                             "(a model too large for one node needs GPUs with more memory or "
                                             "lower-precision weights)"))
    if on_gpu["learner"] and c.placement_groups and c.gpus_per_node > 0 and cfg.learner.tp > c.gpus_per_node:
        out.append(Problem("learner.tp", f"learner.tp={cfg.learner.tp} but a node has cluster.gpus_per_node="
                                         f"{c.gpus_per_node}, and cluster.placement_groups keeps a TP group on one "
                                         f"node (one bundle): set learner.tp <= {c.gpus_per_node} (learner.pp and "
                                         "learner.dp span nodes), or cluster.placement_groups=false to let Ray "
                                         "split it"))
    if on_gpu["learner"] and cfg.learner.gpus_per_rank != 1:
        out.append(Problem("learner.gpus_per_rank", f"learner.gpus_per_rank={cfg.learner.gpus_per_rank:g} on a GPU "
                                                     "cluster: each learner rank drives one GPU; set it to 1"))
    total = sum(p.gpus for p in roles)
    if total > available:
        parts = " + ".join(f"{p.role} {p.gpus:g}" for p in roles)
        out.append(Problem("cluster.nodes", f"the roles ask for {parts} = {total:g} GPUs but the allocation has "
                                             f"cluster.nodes x cluster.gpus_per_node = {c.nodes} x {c.gpus_per_node} "
                                             f"= {available}: add nodes or shrink rollout.num_engines, "
                                             "teacher.replicas or the learner's tp x pp x dp"))
    if c.gpu_memory_gib > 0:
        for p in (p for p in roles if on_gpu[p.role]):
            # an engine queues what its KV pool cannot hold, so it fits once its weights and one full-length
            # sequence do; the learner holds its whole share of the batch at once
            need = p.memory.total_bytes if p.role == "learner" else \
                p.memory.params_bytes + p.memory.kv_cache_bytes / max(p.kv_sequences, 1)
            if need / GIB > c.gpu_memory_gib:
                fix = f"{p.role}.tp"
                tp = next((tp for role, _, _, tp in servers if role == p.role), 0)
                out.append(Problem(fix, f"the {p.role} needs ~{need / GIB:.1f} GiB per GPU ({p.layout}) but "
                                         f"cluster.gpu_memory_gib={c.gpu_memory_gib:g}: "
                                         + (_learner_fixes(cfg) if p.role == "learner" else
                                            f"raise {fix}" if tp < c.gpus_per_node else
                                            f"{fix}={tp} already fills a node (cluster.gpus_per_node="
                                            f"{c.gpus_per_node}, and a server cannot span nodes): use GPUs with "
                                            "more memory or lower-precision weights")))
    return out


def _learner_fixes(cfg: Config) -> str:
    """What would lower the learner's per-GPU memory, from the knobs as they stand in `cfg`."""
    lr = cfg.learner
    if lr.backend != "megatron":
        return ("raise learner.tp or shrink pipeline.batch_size (learner=megatron adds pipeline stages, "
                "micro-batches, bf16 and recomputation)")
    fixes = []
    if lr.micro_batch_size == 0:
        fixes.append("set learner.micro_batch_size (0 runs each DP rank's whole share at once)")
    elif lr.micro_batch_size > 1:
        fixes.append(f"lower learner.micro_batch_size={lr.micro_batch_size}")
    if lr.recompute != "full":
        fixes.append(f"set learner.recompute=full (now {lr.recompute})")
    if lr.precision != "bf16":
        fixes.append(f"set learner.precision=bf16 (now {lr.precision})")
    if lr.dp > 1 and not lr.distributed_optimizer:
        fixes.append("set learner.distributed_optimizer=true")
    return "; ".join(["raise learner.tp or learner.pp", *fixes])
