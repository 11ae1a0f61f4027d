"""Every estimator, listed explicitly: the registry imports the families, no family imports the registry."""

from asyncopd.config.schema import EstimatorConfig
from asyncopd.core.errors import ConfigError
from asyncopd.estimators import forward_kl, gkd, mc_reverse_kl, sampled_reverse_kl, sparse_reverse_kl, stabilisers
from asyncopd.estimators.base import Estimator

ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    forward_kl.ESTIMATOR, gkd.ESTIMATOR, sparse_reverse_kl.ESTIMATOR, sampled_reverse_kl.ESTIMATOR,
    mc_reverse_kl.ESTIMATOR, stabilisers.PPO_CLIP, stabilisers.TIS, stabilisers.DECOUPLED_PPO, stabilisers.M2PO,
)}


def build(cfg: EstimatorConfig) -> Estimator:
    """Look an estimator up by `estimator.name`, with a clear error listing the choices."""
    if cfg.name not in ESTIMATORS:
        raise ConfigError(f"estimator.name={cfg.name!r} is not a known estimator; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[cfg.name]
