"""Prompt datasets from files, and the stream that hands a run its batches.

Files load through the `datasets` library (jsonl/json, parquet, a `save_to_disk` directory) with verl's keys
(`data.prompt_key`, `data.answer_key`). Each prompt is rendered once, at load, with the tokenizer's chat
template (or as plain text) and tokenized; prompts longer than the limit are dropped and counted, never
truncated (a truncated question has a different answer). `PromptStream` walks the samples in a fresh seeded
permutation per epoch and resumes at any position without replaying.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncopd.config.schema import DataConfig
from asyncopd.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Sample:
    """One prompt as the engines see it (token ids) and the gold answer its responses are verified against."""

    prompt_ids: tuple[int, ...]
    answer: str
    source: str  # "<file>:<row>" for logs and error messages
    teacher: str = ""  # the teacher that scores its responses (its data.teacher_key value); "" = the only one


@dataclass
class PromptSet:
    """The samples of one split, and what loading them cost: rows read, prompts dropped as too long."""

    samples: list[Sample]
    files: list[str]
    rows: int
    dropped_long: int
    max_prompt_length: int

    def summary(self) -> dict:
        return {"files": self.files, "rows": self.rows, "samples": len(self.samples),
                "dropped_long": self.dropped_long, "max_prompt_length": self.max_prompt_length}


def as_list(files: Any) -> list[str]:
    """`data.train_files` as given: one path or a list of them (empty = none)."""
    if not files:
        return []
    return [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]


def uses_chat_template(data: DataConfig, tokenizer: PreTrainedTokenizerBase, tokenizer_path: str) -> bool:
    """`data.apply_chat_template`: None = when the tokenizer has one; true insists on one."""
    has = tokenizer.chat_template is not None
    if data.apply_chat_template and not has:
        raise ConfigError(f"data.apply_chat_template=true but the tokenizer at {tokenizer_path!r} has no chat "
                          "template: set data.apply_chat_template=false to send prompts as plain text, or use a "
                          "tokenizer whose tokenizer_config.json has one")
    return has if data.apply_chat_template is None else bool(data.apply_chat_template)


def render_prompt(prompt: Any, data: DataConfig, tokenizer: PreTrainedTokenizerBase, template: bool) -> str:
    """The text the model is prompted with: the chat template over [system?, user] (or the row's own message
    list), else the system prompt and the prompt as plain text."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        messages = list(prompt)
    else:
        raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, not "
                         f"{type(prompt).__name__}")
    if data.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data.system_prompt}, *messages]
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError("chat-message prompts need a chat template: set data.apply_chat_template to null or true "
                         "with a tokenizer that has one")
    return "\n".join(m["content"] for m in messages)


def read_rows(path: str, field: str):
    """One file or `save_to_disk` directory as a `datasets.Dataset`; ConfigError naming the file if it is
    missing, empty, of an unknown format, or unreadable."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{field}: {path} does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise ConfigError(f"{field}: {path} is empty")
    kind = "save_to_disk directory" if p.is_dir() else FORMATS.get(p.suffix)
    if kind is None:
        raise ConfigError(f"{field}: {path} has an unknown format {p.suffix!r}: use {sorted(FORMATS)} or a "
                          "directory written by Dataset.save_to_disk")
    try:
        ds = datasets.load_from_disk(str(p)) if p.is_dir() else datasets.load_dataset(
            kind, data_files=str(p), split="train")
    except Exception as e:  # datasets and pyarrow raise many types for a malformed file
        raise ConfigError(f"{field}: {path} cannot be read as {kind}: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"{field}: {path} holds the splits {sorted(ds)}: name one, e.g. {p / sorted(ds)[0]}")
    if len(ds) == 0:
        raise ConfigError(f"{field}: {path} holds no rows")
    return ds


def column(ds, key: str, name: str, path: str) -> list:
    """The values of column ``key``, or of a field nested in a struct column with a dotted key (verl's parquet
    keeps the gold answer at ``reward_model.ground_truth``); ConfigError naming ``name`` and the columns."""
    head, *rest = key.split(".") if key not in ds.column_names else (key,)
    if head not in ds.column_names:
        raise ConfigError(f"{name}={key!r} is not a column of {path}; its columns are {ds.column_names}: set {name} "
                          "to one of them (a dotted key reaches into a nested field)")
    values = ds[head]
    for part in rest:
        try:
            values = [v[part] for v in values]
        except (KeyError, TypeError, IndexError):
            raise ConfigError(f"{name}={key!r}: {path} has no field {part!r} inside {head!r} in every row") from None
    return values


def load_prompts(files: Sequence[str], data: DataConfig, tokenizer: PreTrainedTokenizerBase, *,
                 tokenizer_path: str, max_prompt_length: int, field: str,
                 teachers: Collection[str] | None = None) -> PromptSet:
    """Every row of ``files`` (in order) as a Sample, dropping and counting prompts over ``max_prompt_length``
    tokens; ``field`` (data.train_files / data.val_files) is named in every error. ``teachers``: the run's teacher
    names, for a split the teachers score: with ``data.teacher_key`` set, each row's value must be one of them."""
    template = uses_chat_template(data, tokenizer, tokenizer_path)
    samples: list[Sample] = []
    rows = dropped = 0
    for path in files:
        ds = read_rows(path, field)
        prompts = column(ds, data.prompt_key, "data.prompt_key", path)
        answers = column(ds, data.answer_key, "data.answer_key", path)
        routed = teachers is not None and bool(data.teacher_key)
        names = column(ds, data.teacher_key, "data.teacher_key", path) if routed else [""] * len(ds)
        for i, name in enumerate(names):
            if routed and name not in teachers:
                raise ConfigError(f"{field}: {path} row {i} names teacher {name!r} (data.teacher_key="
                                  f"{data.teacher_key!r}), which is not one of the run's teachers {sorted(teachers)}: "
                                  "fix the row or add it to `teachers`")
        texts = []
        for i, prompt in enumerate(prompts):
            try:
                texts.append(render_prompt(prompt, data, tokenizer, template))
            except Exception as e:  # a template's raise_exception, a malformed message list
                raise ConfigError(f"{field}: {path} row {i} ({data.prompt_key}={str(prompt)[:80]!r}) cannot be "
                                  f"rendered: {e}. Check data.prompt_key, data.system_prompt and "
                                  "data.apply_chat_template") from None
        ids = tokenizer(texts, add_special_tokens=not template)["input_ids"]  # a template carries its own bos
        for i, (tokens, answer, name) in enumerate(zip(ids, answers, names, strict=True)):
            if answer is None:
                raise ConfigError(f"{field}: {path} row {i} has no {data.answer_key!r} (data.answer_key)")
            if len(tokens) > max_prompt_length:
                dropped += 1
                continue
            samples.append(Sample(tuple(tokens), str(answer), f"{path}:{i}", name))
        rows += len(ds)
    if dropped:
        log.warning("%s: dropped %d of %d prompts longer than %d tokens (data.max_prompt_length)",
                    field, dropped, rows, max_prompt_length)
    if rows and not samples:
        raise ConfigError(f"{field}: all {rows} prompts are longer than {max_prompt_length} tokens: raise "
                          "data.max_prompt_length (with the model's context in mind) or shorten the prompts")
    return PromptSet(samples, list(files), rows, dropped, max_prompt_length)


class PromptStream:
    """Samples in a seeded permutation per epoch (file order without shuffling); ``take(n)`` hands out the next
    n, crossing epochs, and ``PromptStream(..., start=k)`` continues exactly after the first k."""

    def __init__(self, samples: Sequence[Sample], *, seed: int, shuffle: bool, start: int = 0):
        if not samples:
            raise ValueError("PromptStream needs at least one sample")
        self.samples, self.seed, self.shuffle = samples, seed, shuffle
        self.position = start
        self._epoch, self._order = -1, np.arange(0)

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s sample order: a function of (seed, epoch) alone, so a resume recomputes it."""
        n = len(self.samples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def take(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.samples))
            if epoch != self._epoch:
                self._epoch, self._order = epoch, self.order(epoch)
            out.append(self.samples[int(self._order[i])])
            self.position += 1
        return out
