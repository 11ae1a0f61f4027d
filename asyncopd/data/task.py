"""Synthetic multi-step arithmetic with a chain of thought, and its exact-match verifier.

Prompt ``Q:38-22+64+9=``, response ``38-22=16;16+64=80;80+9=89;A:89`` (then the eos token). Operand counts
and their probabilities come from TaskConfig; values lie in 0..max_value and every running value stays in
that range. The test split is ``num_test`` unique prompts drawn from ``test_seed``; training prompts are
streamed deterministically from ``train_seed``, skipping any prompt of the test split.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from asyncopd.config.schema import TaskConfig
from asyncopd.core.errors import ConfigError

ANSWER_MARK = "A:"


@dataclass(frozen=True)
class Problem:
    prompt: str  # "Q:38-22+64+9="
    response: str  # "38-22=16;16+64=80;80+9=89;A:89" (the eos token follows it when tokenized)
    answer: str  # "89"
    operands: tuple[int, ...] = field(default=())
    ops: tuple[str, ...] = field(default=())

    @property
    def question(self) -> str:
        """The prompt without its frame: "38-22+64+9" (the tiny tokenizer's chat template adds "Q:" and "=")."""
        return self.prompt[len("Q:"):-len("=")]

    def as_row(self) -> dict:
        """A dataset row with verl's default keys (plus the chain of thought, for SFT users)."""
        return {"prompt": self.question, "answer": self.answer, "solution": self.response}


def max_prompt_tokens(cfg: TaskConfig) -> int:
    """Upper bound on prompt length in characters (= tokens): "Q:", the operands and operators, "="."""
    n = max(cfg.operand_counts)
    return 2 + n * len(str(cfg.max_value)) + (n - 1) + 1


def max_response_tokens(cfg: TaskConfig) -> int:
    """Upper bound on response length in characters (= tokens), counting the trailing eos token."""
    d = len(str(cfg.max_value))
    steps = max(cfg.operand_counts) - 1
    return steps * (3 * d + 2) + steps + len(ANSWER_MARK) + d + 1  # "a+b=c" per step, ";" each, "A:x", eos


def make_problem(operands: Sequence[int], ops: Sequence[str]) -> Problem:
    """Build prompt, chain-of-thought response and answer from operands and operators (len(ops) = n - 1)."""
    if len(ops) != len(operands) - 1:
        raise ValueError("make_problem needs exactly one operator between consecutive operands")
    prompt = "Q:" + str(operands[0]) + "".join(o + str(v) for o, v in zip(ops, operands[1:], strict=True)) + "="
    steps = []
    cur = operands[0]
    for o, v in zip(ops, operands[1:], strict=True):
        nxt = cur + v if o == "+" else cur - v
        steps.append(f"{cur}{o}{v}={nxt}")
        cur = nxt
    response = ";".join(steps) + f";{ANSWER_MARK}{cur}"
    return Problem(prompt=prompt, response=response, answer=str(cur), operands=tuple(operands), ops=tuple(ops))


def sample_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    n = rng.choices(cfg.operand_counts, weights=cfg.operand_probs)[0]
    hi = cfg.max_value
    cur = rng.randint(0, hi)
    operands, ops = [cur], []
    for _ in range(n - 1):
        op = rng.choice("+-")
        v = rng.randint(0, hi - cur) if op == "+" else rng.randint(0, cur)
        cur = cur + v if op == "+" else cur - v
        operands.append(v)
        ops.append(op)
    return make_problem(operands, ops)


def test_problems(cfg: TaskConfig) -> list[Problem]:
    """The fixed test split: ``num_test`` unique prompts drawn from ``test_seed`` (in draw order)."""
    rng = random.Random(cfg.test_seed)
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < cfg.num_test:
        attempts += 1
        if attempts > 100 * cfg.num_test + 1000:
            raise ConfigError(f"task.num_test={cfg.num_test} unique prompts cannot be drawn with "
                             f"max_value={cfg.max_value}; lower num_test")
        p = sample_problem(rng, cfg)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


test_problems.__test__ = False  # not a pytest test despite its name


class TrainStream:
    """Deterministic infinite stream of training problems from ``train_seed``, skipping test prompts.

    ``take(n)`` returns the next n problems; ``position`` counts problems handed out so far, and
    ``TrainStream(cfg, start=k)`` resumes exactly after the first k.
    """

    def __init__(self, cfg: TaskConfig, start: int = 0, exclude: Sequence[Problem] | None = None):
        self.cfg = cfg
        self._rng = random.Random(cfg.train_seed)
        tests = test_problems(cfg) if exclude is None else exclude
        self._exclude = frozenset(p.prompt for p in tests)
        self.position = 0
        for _ in range(start):
            self._next()

    def _next(self) -> Problem:
        for _ in range(100_000):
            p = sample_problem(self._rng, self.cfg)
            if p.prompt not in self._exclude:
                self.position += 1
                return p
        raise ConfigError("the test split covers (almost) every prompt this task can produce: lower "
                         "task.num_test or raise task.max_value")

    def take(self, n: int) -> list[Problem]:
        return [self._next() for _ in range(n)]

    def __iter__(self) -> Iterator[Problem]:
        while True:
            yield self._next()


def export_task(cfg: TaskConfig, directory: str | Path) -> dict[str, Path]:
    """Write the task as a dataset like any user's: train.jsonl (``num_train`` prompts of the training stream)
    and val.jsonl (the test split), each written whole or not at all."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tests = test_problems(cfg)
    out = {}
    for name, problems in (("train", TrainStream(cfg, exclude=tests).take(cfg.num_train)), ("val", tests)):
        path, tmp = d / f"{name}.jsonl", d / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(p.as_row()) + "\n" for p in problems))
        os.replace(tmp, path)
        out[name] = path
    return out


def extract_answer(text: str) -> str | None:
    """The text after the last ``A:`` (stripped), or None if there is no ``A:``."""
    i = text.rfind(ANSWER_MARK)
    if i < 0:
        return None
    return text[i + len(ANSWER_MARK):].strip()


def verify(problem: Problem, response_text: str) -> bool:
    """Exact match of the text after the last ``A:`` against the answer."""
    return extract_answer(response_text) == problem.answer
