"""The staleness invariant of DESIGN.md, checked by the learner for every sample it consumes.

A sample's staleness is its OLDEST token's: a response that began under version v and finished under v + 3
(the weights changed while it was generated) is v's sample, since its first tokens, and the KV every later
token attended to, came from v. Charging it to the newest token, or to the one number a server reports at the
end, would let a too-old sample through whenever an update lands mid-response.
"""

from collections import Counter
from collections.abc import Sequence

import numpy as np

from asyncopd.core.errors import StalenessViolation


def check_staleness(step: int, versions: list[int], max_staleness: int) -> Counter:
    """Raise if any sample (its oldest token's version) is more than `max_staleness` versions behind `step`, or
    ahead of it; return the histogram lag -> samples."""
    lags = Counter(step - v for v in versions)
    worst = max(lags)
    if worst > max_staleness or min(lags) < 0:
        raise StalenessViolation(
            f"learner step {step} got samples with staleness {sorted(lags)} "
            f"(pipeline.max_staleness={max_staleness}); admission control let a too-old sample through"
        )
    return lags


def token_staleness(step: int, token_versions: Sequence[np.ndarray]) -> Counter:
    """Histogram lag -> tokens over every sample's per-token versions; raise if a token claims a version the
    learner has not produced yet (its spans are wrong, so nothing about the sample can be trusted)."""
    if not token_versions:
        return Counter()
    lags = step - np.concatenate([np.asarray(v, dtype=np.int64) for v in token_versions])
    if lags.size and lags.min() < 0:
        raise StalenessViolation(f"learner step {step} got tokens of version {step - int(lags.min())}, which it "
                                 "has not produced: the server's weight_versions spans are wrong")
    values, counts = np.unique(lags, return_counts=True)
    return Counter({int(v): int(c) for v, c in zip(values, counts, strict=True)})
