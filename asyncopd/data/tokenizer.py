"""Character-level tokenizer for the arithmetic task, saved as a Hugging Face ``tokenizer.json``.

The saved files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) load with
``transformers.AutoTokenizer.from_pretrained(dir)`` and could sit beside a checkpoint served by SGLang. The
pipeline itself uses ``CharTokenizer``: a plain dict lookup (much faster than a tokenizer call per string),
built from the same vocabulary and tested to agree with the saved ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
CHARS = tuple("0123456789") + tuple("+-=;:QA")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + CHARS  # id = index: <pad>=0, <eos>=1, '0'=2, ...
TOKENIZER_FILE = "tokenizer.json"


def build_hf_tokenizer(vocab: Sequence[str] = VOCAB):
    """A ``tokenizers.Tokenizer``: one token per character, special tokens for pad and eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


class CharTokenizer:
    """Fast encode/decode by dict lookup over a fixed character vocabulary."""

    def __init__(self, vocab: Sequence[str] = VOCAB):
        self.vocab = tuple(vocab)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        self.pad_token_id = self.token_to_id[PAD_TOKEN]
        self.eos_token_id = self.token_to_id[EOS_TOKEN]
        self.special_ids = frozenset(self.token_to_id[t] for t in SPECIAL_TOKENS)
        self._decode_table = [("" if i in self.special_ids else t) for i, t in enumerate(self.vocab)]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.token_to_id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the task vocabulary {''.join(CHARS)!r}") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            table = self._decode_table
            return "".join(table[i] for i in ids)
        return "".join(self.vocab[i] for i in ids)

    def batch_decode(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # ---- persistence ----
    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        build_hf_tokenizer(self.vocab).save(str(d / TOKENIZER_FILE))
        special = {"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN}
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 1024,
            "padding_side": "left",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **special,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        """Load from a directory holding tokenizer.json (or the file itself); checks it is a char vocabulary."""
        vocab = _read_vocab(path)
        for t in vocab:
            if t not in SPECIAL_TOKENS and len(t) != 1:
                raise ValueError(f"{path}: token {t!r} is not a single character; not a CharTokenizer vocabulary")
        for t in SPECIAL_TOKENS:
            if t not in vocab:
                raise ValueError(f"{path}: special token {t!r} missing from the vocabulary")
        return cls(vocab)


def _tokenizer_json(path: str | Path) -> Path:
    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"{f}: no tokenizer.json; run `asyncopd prepare` first or fix the tokenizer path")
    return f


def _read_vocab(path: str | Path) -> tuple[str, ...]:
    data = json.loads(_tokenizer_json(path).read_text())
    table = dict(data["model"]["vocab"])
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
