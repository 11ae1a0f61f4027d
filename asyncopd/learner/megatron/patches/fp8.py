"""The FP8 switch: learner.fp8=true -> a Transformer Engine fp8_autocast with the configured scaling recipe.

FP8 GEMMs only exist in Transformer Engine's layers (the megatron learner then builds the TE layer spec);
megatron-core's local layers ignore fp8_autocast. `fp8_recipe_kwargs` is the pure config -> recipe mapping
(tested without TE); `fp8_context` builds the recipe and the autocast, and fails early with a clear message
when TE is missing. `cfg` is anything with the learner.fp8* fields (asyncopd.config.schema.LearnerConfig).
"""

import contextlib
import importlib.util
from typing import Any

TE_MISSING = "learner.fp8=true needs Transformer Engine: pip install .[gpu]"

# learner.fp8_recipe -> Transformer Engine recipe class (transformer_engine.common.recipe)
RECIPES = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling"}
FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}
AMAX_ALGOS = ("max", "most_recent")


def fp8_recipe_kwargs(cfg: Any) -> tuple[str, dict[str, Any]]:
    """(TE recipe class name, constructor kwargs) for the config; `fp8_format` is the Format member's name.

    delayed -> DelayedScaling(fp8_format, margin, amax_history_len, amax_compute_algo): scales from the amax
    history of previous steps; current -> Float8CurrentScaling(fp8_format): per-tensor scales from the
    current tensor (no history, so margin/history knobs do not apply).
    """
    recipe = str(cfg.fp8_recipe).lower()
    fmt = str(cfg.fp8_format).lower()
    if recipe not in RECIPES:
        raise ValueError(f"learner.fp8_recipe={cfg.fp8_recipe!r} is unknown: choose one of {sorted(RECIPES)}")
    if fmt not in FORMATS:
        raise ValueError(f"learner.fp8_format={cfg.fp8_format!r} is unknown: choose one of {sorted(FORMATS)}")
    kwargs: dict[str, Any] = {"fp8_format": FORMATS[fmt]}
    if recipe == "delayed":
        if int(cfg.fp8_margin) < 0:
            raise ValueError(f"learner.fp8_margin must be >= 0 (got {cfg.fp8_margin})")
        if int(cfg.fp8_amax_history_len) < 1:
            raise ValueError(f"learner.fp8_amax_history_len must be >= 1 (got {cfg.fp8_amax_history_len})")
        if cfg.fp8_amax_compute_algo not in AMAX_ALGOS:
            raise ValueError(f"learner.fp8_amax_compute_algo={cfg.fp8_amax_compute_algo!r} is unknown: "
                             f"choose one of {list(AMAX_ALGOS)}")
        kwargs.update(margin=int(cfg.fp8_margin), amax_history_len=int(cfg.fp8_amax_history_len),
                      amax_compute_algo=cfg.fp8_amax_compute_algo)
    return RECIPES[recipe], kwargs


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def require_transformer_engine(cfg: Any) -> None:
    """Fail early (before any model is built) when learner.fp8=true and TE is not importable."""
    if cfg.fp8 and not have_transformer_engine():
        raise RuntimeError(TE_MISSING)


def build_fp8_recipe(cfg: Any):
    require_transformer_engine(cfg)
    name, kwargs = fp8_recipe_kwargs(cfg)
    from transformer_engine.common import recipe as te_recipe

    kwargs = {**kwargs, "fp8_format": getattr(te_recipe.Format, kwargs["fp8_format"])}
    return getattr(te_recipe, name)(**kwargs)


def fp8_context(cfg: Any) -> contextlib.AbstractContextManager:
    """A no-op context with learner.fp8=false; TE's fp8_autocast with the configured recipe otherwise."""
    if not cfg.fp8:
        return contextlib.nullcontext()
    recipe = build_fp8_recipe(cfg)
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)
