"""Pick the learner backend named by `learner.backend`."""

from asyncopd.config.schema import Config
from asyncopd.learner.protocol import Learner


def build_learner(cfg: Config, model_path: str) -> Learner:
    kwargs = dict(estimator_cfg=cfg.estimator, model_path=model_path,
                  max_staleness=cfg.pipeline.max_staleness, temperature=cfg.rollout.temperature)
    if cfg.learner.backend == "torch":
        from asyncopd.learner.torch_learner import TorchLearner

        return TorchLearner(cfg.learner, **kwargs)
    if cfg.learner.backend == "megatron":
        from asyncopd.learner.megatron_learner import MegatronLearner

        return MegatronLearner(cfg.learner, **kwargs)
    raise ValueError(f"learner.backend={cfg.learner.backend!r} is unknown: use 'torch' or 'megatron'")
