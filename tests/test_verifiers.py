"""Final-answer extraction, the exact and math verifiers (in worker threads too), and pass@k / avg@k."""

import itertools
import subprocess
import sys
import threading

import pytest

from asyncopd.core.errors import ConfigError
from asyncopd.data.verifiers import (
    VERIFIERS,
    avg_at_k,
    build_verifier,
    exact_match,
    final_answer,
    math_equal,
    pass_at_k,
)

GSM8K_GOLD = ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
              "It took her 1,000 more.\n#### 1,072")
MATH_GOLD = "The probability is $\\frac{2}{4}$, so the answer is $\\boxed{\\frac{1}{2}}$."
BUILTIN_RESPONSE = "38-22=16;16+64=80;80+9=89;A:89"


@pytest.mark.parametrize("text, answer", [
    (GSM8K_GOLD, "1,072"),
    (MATH_GOLD, "\\frac{1}{2}"),  # nested braces, and the box wins over the "answer is" before it
    ("first \\boxed{1}, then \\fbox{ {2}+3 } ####  7", "{2}+3"),  # the last box, whatever its kind
    ("\\boxed{\\sqrt{4}} and a cut-off \\boxed{\\frac{1}{", "\\sqrt{4}"),  # an unclosed box is skipped
    (BUILTIN_RESPONSE, "89"),
    ("A:1;A:2", "2"),
    ("The answer is 42.", "42"),
    ("so The Answer IS: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("We get 42 in the end", None),
    ("DATA: 5", None),  # "A:" ends a word here, so it is no answer mark
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize("response, gold, same", [
    ("So she sold #### 1072", GSM8K_GOLD, True),  # thousands separators
    ("#### 1,073", GSM8K_GOLD, False),
    ("Hence $\\boxed{\\frac{1}{2}}$", MATH_GOLD, True),
    ("\\boxed{\\frac{1}{3}}", MATH_GOLD, False),
    (BUILTIN_RESPONSE, "89", True),
    ("38-22=16;16+64=80;80+9=88;A:88", "89", False),
    ("The answer is 42.", "42", True),
    ("  42\n", "42", True),  # no marker: the whole stripped text
    ("42 apples", "42", False),
    ("2x  +\n1", "2x + 1", True),  # whitespace runs collapse
    ("0.5", "\\frac{1}{2}", False),  # strings only
    ("", "", False),  # an empty answer matches nothing
])
def test_exact_match(response, gold, same):
    assert exact_match(response, gold) is same


@pytest.mark.parametrize("response, gold, same", [
    ("0.5", "1/2", True),
    ("The answer is 0.5.", MATH_GOLD, True),
    ("\\boxed{0.5}", MATH_GOLD, True),
    ("0.5", "0.25", False),
    ("\\boxed{0.25}", MATH_GOLD, False),
    ("89", "89.0", True),
    ("38-22=16;16+64=80;80+9=89;A:89.0", "89", True),
    ("38-22=16;16+64=80;80+9=88;A:88", "89", False),
    ("2x+1", "1+2x", True),
    ("2x+1", "2x-1", False),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
    ("so we get 1072 clips", GSM8K_GOLD, True),  # prose without a marker: math-verify finds the number
    ("#### 72 dollars", "#### 72", True),
    ("hello", "olleh", False),  # words are not products of one-letter symbols
    ("\\boxed{\\text{yes}}", "yes", False),  # math-verify parses nothing from the words: exact_match decides
])
def test_math_equal(response, gold, same):
    assert math_equal(response, gold) is same


@pytest.mark.parametrize("response, gold", [
    (None, "1"), ("1", None), (3, 3), ("\\boxed{", "}"), ("$$", "$"), ("{", "\\frac{"), ("1/0", "0/0"),
])
def test_math_equal_never_raises_on_weird_input(response, gold):
    assert math_equal(response, gold) is False


def _in_thread(fn, timeout_s: float = 60.0) -> dict:
    """Run ``fn`` (which fills the dict it is given) in a worker thread; fail if it has not returned in time."""
    results: dict = {}
    thread = threading.Thread(target=fn, args=(results,), daemon=True)  # daemon: a hung one does not block exit
    thread.start()
    thread.join(timeout=timeout_s)
    assert not thread.is_alive(), "math_equal hung"
    return results


def test_math_equal_answers_at_once_for_answers_too_large_to_evaluate():
    # without timeouts, comparing 9^(9^(9^9)) with sympy would run for hours inside a big-integer power that holds
    # the GIL (no thread can time it out): a size guard hands it to exact_match. A subprocess, so a hang fails here
    code = ("from asyncopd.data.verifiers import math_equal\n"
            "print(math_equal('9^{9^{9^{9}}}', '5'), math_equal('\\\\boxed{10^{10^{10}}}', '10^{10^{10}}'))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("math_equal hung on a power tower")
    assert done.stdout.split() == ["False", "True"], done.stderr  # unequal: at once; equal strings still match


def test_math_equal_works_in_a_worker_thread():
    # math-verify's default timeouts call signal.alarm, which raises outside the main thread (and would be caught
    # as a wrong answer): the verifier must turn them off
    def work(results):
        results["equal"] = math_equal("The answer is 0.5", "\\frac{1}{2}")
        results["different"] = math_equal("0.5", "0.25")

    assert _in_thread(work) == {"equal": True, "different": False}


def test_build_verifier():
    assert build_verifier("exact") is exact_match and build_verifier("math") is math_equal
    assert set(VERIFIERS) == {"exact", "math"}
    with pytest.raises(ConfigError, match=r"data\.verifier='sympy' is unknown: use one of \['exact', 'math'\]"):
        build_verifier("sympy")


def _pass_at_k_brute_force(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    # each side is a few float operations on exact small rationals: the estimator a product of at most 10
    # ratios (n <= 10), each rounded once (relative error 2**-53 ~ 1.1e-16), so both land within ~1e-15 of the
    # true value; 1e-12 leaves room for that and still catches any wrong formula, as distinct values differ by at
    # least 1 / C(10, 5)**2 ~ 1.6e-5
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute_force(n, c, k), rel=0, abs=1e-12), \
                    (n, c, k)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert 0.0 < pass_at_k(1000, 1, 500) < 1.0  # large n: no binomial overflow
    for n, c, k in [(3, 0, 4), (3, 4, 1), (3, 1, 0), (-1, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_avg_at_k():
    assert avg_at_k([[True, False, False, False], [True, True, True, True]]) == pytest.approx(0.625)
    assert avg_at_k([[True], [False]]) == 0.5
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], []])
