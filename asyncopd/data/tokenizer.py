"""Tokenizers: any checkpoint's through ``transformers.AutoTokenizer``, and the one the tiny models are built with.

The tiny models get a real byte-level BPE tokenizer (``tokenizers``), saved by ``save_pretrained`` with its
tokenizer_config.json and a chat template, so the demo travels the production path: AutoTokenizer, special
tokens from the config, ``apply_chat_template``. Its base vocabulary is the task's alphabet and it has no merges,
so every character is one token with the id the shipped models were trained on (their recipe margins were
measured on those ids). Characters outside the alphabet have no token and are dropped by ``tokenizers``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from asyncopd.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
CHARS = tuple("0123456789") + tuple("+-=;:QA")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + CHARS  # id = index: <pad>=0, <eos>=1, '0'=2, ...
TOKENIZER_FILE = "tokenizer.json"
# The task's prompt "Q:38-22+64+9=" is the chat rendering of the question "38-22+64+9"; the tiny models have
# no system turn, and a template that silently dropped one would train on prompts the user never wrote.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}Q:{{ m['content'] }}="
    "{%- elif m['role'] == 'assistant' -%}{{ m['content'] }}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('the tiny task models know only user and assistant turns, not ' + m['role']) }}"
    "{%- endif -%}{%- endfor -%}"
)


def build_tiny_tokenizer(vocab: Sequence[str] = VOCAB) -> PreTrainedTokenizerBase:
    """The tiny models' tokenizer: byte-level BPE over ``vocab`` (no merges), pad/eos specials, chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=1024,
                                   clean_up_tokenization_spaces=False)


def save_tiny_tokenizer(directory: str | Path, vocab: Sequence[str] = VOCAB) -> Path:
    """Write the tiny tokenizer's files into ``directory`` in a form transformers 4.x and 5.x (and so SGLang)
    both load: the generic fast-tokenizer class, the chat template inside tokenizer_config.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(vocab).save_pretrained(str(d))
    config_file, template_file = d / "tokenizer_config.json", d / "chat_template.jinja"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    template_file.unlink(missing_ok=True)
    return d


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Put ``src``'s tokenizer (and generation defaults) beside weights saved in ``dst``, so a saved student is a
    whole checkpoint: servable, and counted over the same ids as the model it came from."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def load_tokenizer(path: str | Path, field: str = "model.tokenizer_path") -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)`` with a pad token (eos when the checkpoint has none, as Llama's);
    a clear ConfigError naming ``field`` when the path holds no usable tokenizer."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / TOKENIZER_FILE).is_file() and not (p / "tokenizer_config.json").is_file():
        raise ConfigError(f"{field}={str(path)!r} holds no tokenizer (tokenizer.json or tokenizer_config.json): "
                          "point it at a Hugging Face checkpoint directory, or run `asyncopd prepare`")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # transformers raises many types for a broken tokenizer directory
        raise ConfigError(f"{field}={str(path)!r}: the tokenizer does not load ({type(e).__name__}: {e})") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"{field}={str(path)!r}: the tokenizer has no eos token, so a response could never end; "
                          "set eos_token in its tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer_json(path: str | Path) -> Path:
    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"{f}: no tokenizer.json; run `asyncopd prepare` first or fix the tokenizer path")
    return f


def _read_vocab(path: str | Path) -> tuple[str, ...]:
    data = json.loads(_tokenizer_json(path).read_text())
    vocab = data["model"]["vocab"]  # BPE, WordLevel, WordPiece: {token: id}; Unigram: [[token, score], ...]
    table = {t: i for i, (t, _) in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
    for added in data.get("added_tokens", []):
        table[added["content"]] = added["id"]
    ids = sorted(table.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: vocabulary ids are not contiguous from 0")
    inv = {i: t for t, i in table.items()}
    return tuple(inv[i] for i in range(len(ids)))


def tokenizer_vocab_size(path: str | Path) -> int:
    """Ids the tokenizer in ``path`` (a dir or a tokenizer.json) can produce: a model's embedding may have more
    rows (padding to a multiple of 64 or 128), and those rows are never real tokens."""
    return len(_read_vocab(path))


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 (hex, first 16 chars) of the id -> token table, and a BPE model's merges, in ``path`` (a dir or a
    tokenizer.json).

    Two checkpoints may be paired as teacher and student only if their fingerprints agree: the tokenizer decides,
    not the embedding rows (a teacher may pad its embedding to a different size).
    """
    vocab = _read_vocab(path)
    merges = json.loads(_tokenizer_json(path).read_text())["model"].get("merges")
    # BPE: same ids, same merges; tokenizers >= 0.20 writes a merge as ["a", "b"], older ones as "a b"
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges or ()]
    blob = vocab if not merges else {"vocab": vocab, "merges": merges}
    return hashlib.sha256(json.dumps(blob, ensure_ascii=False).encode()).hexdigest()[:16]
