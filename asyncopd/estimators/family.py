"""Imports every estimator family so each registers itself (base.build imports this module)."""

from asyncopd.estimators import (  # noqa: F401
    forward_kl,
    gkd,
    mc_reverse_kl,
    sampled_reverse_kl,
    sparse_reverse_kl,
    stabilisers,
)
