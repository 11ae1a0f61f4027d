"""Value checks that types alone cannot express; each error names the field and the fix."""

from asyncopd.config.schema import Config


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    p, r, t, lr, w = cfg.pipeline, cfg.rollout, cfg.teacher, cfg.learner, cfg.weights
    _require(p.max_staleness >= 0, f"pipeline.max_staleness must be >= 0 (got {p.max_staleness}); "
             "use pipeline.max_staleness=0 for strict synchronous training")
    _require(p.batch_size >= 1, f"pipeline.batch_size must be >= 1 (got {p.batch_size})")
    _require(p.steps >= 1, f"pipeline.steps must be >= 1 (got {p.steps})")
    _require(p.eval_every >= 0, f"pipeline.eval_every must be >= 0 (got {p.eval_every}); 0 disables it")
    _require(r.backend in ("embedded", "sglang"),
             f"rollout.backend={r.backend!r} is unknown: use 'embedded' or 'sglang'")
    _require(t.backend in ("embedded", "sglang"),
             f"teacher.backend={t.backend!r} is unknown: use 'embedded' or 'sglang'")
    _require(r.num_engines >= 1, f"rollout.num_engines must be >= 1 (got {r.num_engines})")
    _require(t.replicas >= 1, f"teacher.replicas must be >= 1 (got {t.replicas})")
    _require(r.temperature >= 0, f"rollout.temperature must be >= 0 (got {r.temperature})")
    _require(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1] (got {r.top_p})")
    _require(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1 (got {r.max_new_tokens})")
    _require(lr.lr > 0, f"learner.lr must be > 0 (got {lr.lr})")
    _require(lr.warmup_steps >= 0, f"learner.warmup_steps must be >= 0 (got {lr.warmup_steps})")
    _require(lr.backend in ("torch", "megatron"),
             f"learner.backend={lr.backend!r} is unknown: use 'torch' or 'megatron'")
    _require(w.backend in ("gloo", "nccl"), f"weights.backend={w.backend!r} is unknown: use 'gloo' or 'nccl'")
    _require(w.bucket_mb > 0, f"weights.bucket_mb must be > 0 (got {w.bucket_mb})")
    _require(t.wire_dtype in ("float32", "float16"),
             f"teacher.wire_dtype={t.wire_dtype!r} is unknown: use 'float32' or 'float16'")
    from asyncopd.estimators.base import build

    try:
        build(cfg.estimator).requirements(cfg.estimator)  # each estimator validates its own knobs
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def check_runtime(cfg: Config) -> None:
    """Fail before any work starts when the config needs the GPU stack and this machine lacks it."""
    import torch

    gpu_hint = "install the GPU extras with `pip install .[gpu]` on a CUDA machine"
    _require(cfg.rollout.backend != "sglang" or not _missing("sglang"),
             f"rollout.backend=sglang needs SGLang, which is not importable: {gpu_hint}, "
             "or use rollout=embedded")
    _require(cfg.teacher.backend != "sglang" or not _missing("sglang"),
             f"teacher.backend=sglang needs SGLang, which is not importable: {gpu_hint}, or use teacher=embedded")
    _require(not cfg.learner.fp8 or not _missing("transformer_engine"),
             f"learner.fp8=true needs Transformer Engine, which is not importable: {gpu_hint}, "
             "or set learner.fp8=false")
    _require(cfg.learner.backend != "megatron" or not _missing("megatron.core"),
             "learner.backend=megatron needs megatron-core: `pip install .[dev]` (CPU) or `.[gpu]`")
    _require(cfg.weights.backend != "nccl" or torch.cuda.is_available(),
             "weights.backend=nccl needs CUDA GPUs; on a CPU machine use weights.backend=gloo")
