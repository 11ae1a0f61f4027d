"""Reward and evaluation verifiers: is a response's final answer the gold one, and pass@k / avg@k over samples.

Datasets state their gold answers in different ways (GSM8K ``#### 72``, MATH ``\\boxed{...}``, the built-in task
``A:89``), so one extractor finds the final answer in either text and two verifiers compare them: a string one and
a math-verify one that is safe in worker threads (its signal-based timeouts are off; size guards stand in for them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from asyncopd.core.errors import ConfigError

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = "####"
_ANSWER_MARK = re.compile(r"(?<![A-Za-z0-9])A:")  # the built-in task's "...;A:89", not the tail of "DATA:"
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")  # "1,000" or "-12,345.6", never "1,2"

# math-verify runs without its timeouts (signal.alarm works in the main thread only), so inputs that could keep it
# busy for minutes are left to exact_match: long texts, and powers or factorials too large to evaluate
_MAX_MATH_CHARS = 2000
_MAX_EXPONENT = 1e5
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")  # a word of prose; "\\frac" and "2x" are not


def _last_box(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` whose braces close, or None."""
    found = None
    for m in _BOX.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


def final_answer(text: str) -> str | None:
    """The final answer ``text`` states, stripped, or None when it has no answer marker.

    By priority: the last ``\\boxed{}``/``\\fbox{}`` (balanced braces), the text after the last ``####`` (GSM8K),
    after the last ``A:`` (built-in task), after the last "answer is" (any case; ``$`` and a trailing period
    stripped)."""
    if not isinstance(text, str):
        return None
    boxed = _last_box(text)
    if boxed is not None:
        return boxed.strip()
    i = text.rfind(_GSM8K)
    if i >= 0:
        return text[i + len(_GSM8K):].strip()
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        return text[marks[-1].end():].strip()
    said = list(_ANSWER_IS.finditer(text))
    if said:
        answer = text[said[-1].end():].strip().removeprefix(":").strip()
        return answer.rstrip(".").strip().strip("$").strip()
    return None


def _answer(text: str) -> str:
    """The final answer, or the whole stripped text when it states none."""
    found = final_answer(text)
    return text.strip() if found is None else found


def _normalise(answer: str) -> str:
    answer = " ".join(answer.split())
    return answer.replace(",", "") if _PLAIN_NUMBER.fullmatch(answer) else answer


def exact_match(response: str, gold: str) -> bool:
    """The response's final answer equals the gold one as strings (whitespace collapsed, "1,000" == "1000").

    A text without an answer marker is its own answer; an empty answer matches nothing."""
    if not isinstance(response, str) or not isinstance(gold, str):
        return False
    got, want = _normalise(_answer(response)), _normalise(_answer(gold))
    return bool(want) and got == want


def _tame(expr: Any) -> bool:
    """No power or factorial in ``expr`` is too large to evaluate (checked innermost first, so the check is cheap)."""
    from sympy import Basic, Pow, factorial
    from sympy.matrices import MatrixBase

    if isinstance(expr, MatrixBase):
        return all(_tame(e) for e in expr)
    if not isinstance(expr, Basic):
        return True  # a string math-verify could not parse: compared as a string
    if not all(_tame(a) for a in expr.args):
        return False
    big = expr.exp if isinstance(expr, Pow) else expr.args[0] if isinstance(expr, factorial) else None
    if big is None or not big.is_number:
        return True
    try:
        return abs(complex(big.evalf(15))) <= _MAX_EXPONENT
    except (TypeError, ValueError, OverflowError):
        return False


def _parse(text: str) -> list:
    """math-verify's parse of the final answer in ``text`` (the whole text when it states none), or [].

    A math-like answer goes in as ``$answer$`` (bare LaTeX such as ``\\frac{1}{2}`` and ``2x+1`` parse only inside
    delimiters), then as is. Prose ("so we get 0.5", "72 dollars") goes in as is only, where math-verify finds the
    math in it: inside ``$...$`` its words would parse as products of one-letter symbols ("yes" == "sey"). [] when
    nothing parses to a sympy object or the input is too large to parse and compare safely."""
    from math_verify import parse
    from sympy import Basic
    from sympy.matrices import MatrixBase

    answer = _answer(text)
    if not answer or len(answer) > _MAX_MATH_CHARS:
        return []
    candidates = [answer] if _WORD.search(answer) else [f"${answer.strip('$').strip()}$", answer]
    for candidate in candidates:
        found = parse(candidate, parsing_timeout=None)
        if any(isinstance(f, (Basic, MatrixBase)) for f in found):
            return found if all(_tame(f) for f in found) else []
    return []


def math_equal(response: str, gold: str) -> bool:
    """The response's final answer equals the gold one numerically or symbolically ("0.5" == "\\frac{1}{2}").

    math-verify compares the extracted answers, with its timeouts off so that it works in any thread; when either
    side does not parse (or is too large to evaluate safely), the result is exact_match's. Never raises."""
    try:
        if exact_match(response, gold):
            return True
        want, got = _parse(gold), _parse(response)
        if not want or not got:
            return False  # == exact_match(response, gold), checked above
        from math_verify import verify

        return bool(verify(want, got, timeout_seconds=None))  # not symmetric: gold first
    except Exception:  # a verifier scores a sample: weird input is a wrong answer, not a crashed worker
        return False


VERIFIERS: dict[str, Callable[[str, str], bool]] = {"exact": exact_match, "math": math_equal}


def build_verifier(name: str) -> Callable[[str, str], bool]:
    """The verifier ``data.verifier`` names."""
    if name not in VERIFIERS:
        raise ConfigError(f"data.verifier={name!r} is unknown: use one of {sorted(VERIFIERS)}")
    return VERIFIERS[name]


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over prompts of the fraction of its k samples that are correct."""
    if not correct or any(len(samples) == 0 for samples in correct):
        raise ValueError("avg_at_k needs at least one prompt and at least one sample per prompt")
    return sum(sum(map(bool, samples)) / len(samples) for samples in correct) / len(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomials."""
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass_at_k needs n >= 0, c >= 0 and k >= 1, got n={n}, c={c}, k={k}")
    if k > n or c > n:
        raise ValueError(f"pass_at_k needs k <= n and c <= n, got n={n}, c={c}, k={k}")
    # when n - c < k (every k-subset holds a correct sample) the factor i = k is exactly 0: the result is 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
