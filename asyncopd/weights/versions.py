"""Per-token weight versions as SGLang 0.5.23 reports them: `meta_info.weight_versions` spans.

A response generated across a weight update has tokens from more than one version. SGLang records, at every
version change, how many tokens a live request had, and reports the result as contiguous spans
`[{"version": "3", "start": 0, "end": 5}, {"version": "4", "start": 5, "end": 9}]` (end exclusive; a
response with no tokens gets one empty span at the version it finished under), with `weight_version` the
last span's version (sglang/srt/utils/weight_versions.py: compute_weight_version_spans,
add_weight_versions_to_meta_info). The engine writes spans with `version_spans`; the client reads them back
into one version per token with `token_versions`, so the learner can charge staleness to a sample's oldest
token rather than to a single number that hides a mid-response update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def version_spans(versions: Sequence[int], label: Callable[[int], str] = str,
                  finished_at: int | None = None) -> list[dict[str, Any]]:
    """Run-length spans of per-token `versions`, labelled by `label`; no tokens: one empty span at `finished_at`."""
    spans: list[dict[str, Any]] = []
    for t, v in enumerate(versions):
        if spans and spans[-1]["_v"] == v:
            spans[-1]["end"] = t + 1
        else:
            spans.append({"_v": v, "start": t, "end": t + 1})
    if not spans:
        if finished_at is None:
            raise ValueError("a response with no tokens needs finished_at (the version it finished under)")
        return [{"version": label(finished_at), "start": 0, "end": 0}]
    return [{"version": label(s["_v"]), "start": s["start"], "end": s["end"]} for s in spans]


def token_versions(spans: Any, num_tokens: int, parse: Callable[[Any], int]) -> np.ndarray:
    """int64 [num_tokens]: the version of every token, from SGLang's spans; ValueError if they do not tile
    [0, num_tokens) in order (a response whose versions cannot be trusted must not reach the learner)."""
    if not isinstance(spans, list) or not spans:
        raise ValueError(f"weight_versions must be a non-empty list of spans, got {spans!r}")
    out = np.empty(num_tokens, dtype=np.int64)
    at = 0
    for span in spans:
        if not isinstance(span, dict) or not {"version", "start", "end"} <= span.keys():
            raise ValueError(f"weight_versions span {span!r} lacks version/start/end")
        start, end = span["start"], span["end"]
        if type(start) is not int or type(end) is not int or start != at or end < start or end > num_tokens:
            raise ValueError(f"weight_versions spans {spans!r} do not tile the {num_tokens} output tokens in order")
        out[start:end] = parse(span["version"])
        at = end
    if at != num_tokens:
        raise ValueError(f"weight_versions spans {spans!r} cover {at} of {num_tokens} output tokens")
    return out
