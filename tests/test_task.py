"""The arithmetic task, its verifier, its export as a dataset, and the tiny models' tokenizer."""

import json
import random

import pytest

from asyncopd.config.schema import TaskConfig
from asyncopd.core.errors import ConfigError
from asyncopd.data.task import (
    TrainStream,
    extract_answer,
    make_problem,
    sample_problem,
    test_problems,
    verify,
)
from asyncopd.data.tokenizer import VOCAB, load_tokenizer, save_tiny_tokenizer, tokenizer_fingerprint


def test_problem_format_matches_spec():
    p = make_problem([38, 22, 64, 9], ["-", "+", "+"])
    assert p.prompt == "Q:38-22+64+9="
    assert p.response == "38-22=16;16+64=80;80+9=89;A:89"
    assert p.answer == "89"
    assert verify(p, p.response)


def test_sampled_problems_are_consistent_and_in_range():
    cfg = TaskConfig()
    rng = random.Random(0)
    counts = {2: 0, 3: 0, 4: 0}
    for _ in range(3000):
        p = sample_problem(rng, cfg)
        counts[len(p.operands)] += 1
        cur = p.operands[0]
        assert 0 <= cur <= cfg.max_value
        for o, v in zip(p.ops, p.operands[1:], strict=True):
            assert 0 <= v <= cfg.max_value
            cur = cur + v if o == "+" else cur - v
            assert 0 <= cur <= cfg.max_value
        assert p.answer == str(cur)
        assert eval(p.prompt[2:-1]) == cur  # noqa: S307 - digits and +/- only
        assert p == make_problem(list(p.operands), list(p.ops))
    frac = {k: v / 3000 for k, v in counts.items()}
    # a frequency over n = 3000 draws has sd sqrt(p (1 - p) / n) <= 0.0092: 0.04 is >= 4.3 sd (seeded: deterministic)
    assert abs(frac[2] - 0.5) < 0.04 and abs(frac[3] - 0.3) < 0.04 and abs(frac[4] - 0.2) < 0.04


def test_test_split_fixed_unique_and_train_stream_disjoint_deterministic():
    cfg = TaskConfig(num_test=300)
    a, b = test_problems(cfg), test_problems(cfg)
    assert a == b and len(a) == 300 and len({p.prompt for p in a}) == 300
    assert test_problems(TaskConfig(num_test=300, test_seed=cfg.test_seed + 1)) != a
    test_prompts = {p.prompt for p in a}
    s1 = TrainStream(cfg).take(3000)
    assert not test_prompts & {p.prompt for p in s1}
    assert TrainStream(cfg).take(3000) == s1
    resumed = TrainStream(cfg, start=1000)
    assert resumed.take(5) == s1[1000:1005] and resumed.position == 1005


def test_train_stream_skips_test_prompts():
    # a tiny value range makes collisions with the test split certain
    cfg = TaskConfig(max_value=5, num_test=30, operand_counts=[2], operand_probs=[1.0])  # 42 prompts exist
    test = {p.prompt for p in test_problems(cfg)}
    drawn = TrainStream(cfg).take(200)
    assert drawn and not test & {p.prompt for p in drawn}
    with pytest.raises(ValueError, match="num_test"):
        TrainStream(TaskConfig(max_value=5, num_test=42, operand_counts=[2], operand_probs=[1.0])).take(1)


def test_verifier_exact_match_after_last_answer_mark():
    p = make_problem([5, 3], ["+"])
    assert verify(p, "5+3=8;A:8")
    assert verify(p, "A:1;A:8")  # the last A: counts
    assert not verify(p, "5+3=8;A:80")
    assert not verify(p, "5+3=8;A:8;3")
    assert not verify(p, "5+3=8")
    assert extract_answer("no mark") is None
    assert extract_answer("x;A: 12 ") == "12"


def test_bad_task_config_is_named():
    from asyncopd.config.schema import Config
    from asyncopd.validation.rules import problems

    found = problems(Config(task=TaskConfig(operand_counts=[2, 3], operand_probs=[1.0])))
    assert [p.field for p in found] == ["task.operand_probs"]
    with pytest.raises(ValueError, match="num_test"):
        test_problems(TaskConfig(max_value=2, num_test=500, operand_counts=[2], operand_probs=[1.0]))


def test_tiny_tokenizer_is_a_byte_level_bpe_with_one_id_per_character(tmp_path):
    save_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)  # through transformers.AutoTokenizer, as every role loads it
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    assert raw["model"]["type"] == "BPE" and raw["pre_tokenizer"]["type"] == "ByteLevel"
    assert raw["decoder"]["type"] == "ByteLevel" and not raw["model"]["merges"]
    assert len(tok) == 19 and tok.pad_token_id == 0 and tok.eos_token_id == 1
    rng = random.Random(1)
    for _ in range(200):
        p = sample_problem(rng, TaskConfig())
        text = p.prompt + p.response
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == [VOCAB.index(c) for c in text]  # the ids the shipped models were trained on
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode([tok.eos_token_id, tok.pad_token_id]) == "<eos><pad>"


def test_chat_template_renders_the_task_prompt_and_refuses_a_system_turn(tmp_path):
    save_tiny_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"]  # 4.x and 5.x load it
    tok = load_tokenizer(tmp_path)
    for p in test_problems(TaskConfig())[:100]:
        rendered = tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                           add_generation_prompt=True)
        assert rendered == p.prompt
    with pytest.raises(Exception, match="only user and assistant turns, not system"):
        tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1"}],
                                tokenize=False)


def test_load_tokenizer_names_the_field_on_bad_input(tmp_path):
    with pytest.raises(ConfigError, match=r"model.tokenizer_path=.*holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="does not load"):
        load_tokenizer(tmp_path, field="model.tokenizer_path")


def test_fingerprint_detects_vocab_differences(tmp_path):
    save_tiny_tokenizer(tmp_path / "a")
    save_tiny_tokenizer(tmp_path / "b")
    swapped = list(VOCAB)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    save_tiny_tokenizer(tmp_path / "c", swapped)
    fa = tokenizer_fingerprint(tmp_path / "a")
    assert fa == tokenizer_fingerprint(tmp_path / "b") == tokenizer_fingerprint(tmp_path / "b" / "tokenizer.json")
    assert fa != tokenizer_fingerprint(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer_fingerprint(tmp_path / "missing")
