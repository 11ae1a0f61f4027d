"""The staleness invariant of DESIGN.md, checked by the learner for every sample it consumes."""

from collections import Counter

from asyncopd.core.errors import StalenessViolation


def check_staleness(step: int, versions: list[int], max_staleness: int) -> Counter:
    """Raise if any sample is more than `max_staleness` versions behind `step`; return the histogram."""
    lags = Counter(step - v for v in versions)
    worst = max(lags)
    if worst > max_staleness or min(lags) < 0:
        raise StalenessViolation(
            f"learner step {step} got samples with staleness {sorted(lags)} "
            f"(pipeline.max_staleness={max_staleness}); admission control let a too-old sample through"
        )
    return lags
