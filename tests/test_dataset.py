"""Prompt datasets from files (jsonl, parquet, save_to_disk) and the resumable stream over them."""

import json
from pathlib import Path

import pytest

from asyncopd.config.schema import DataConfig, TaskConfig
from asyncopd.core.errors import ConfigError
from asyncopd.data.dataset import PromptStream, Sample, as_list, load_prompts
from asyncopd.data.task import export_task, make_problem, test_problems
from asyncopd.data.tokenizer import load_tokenizer, save_tiny_tokenizer

ROWS = [{"question": q, "answer": f"{q} makes #### {eval(q)}"} for q in ("12+5", "30-4", "7+8+9", "99-1")]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(files, tok, tok_dir, max_len: int = 64, **data) -> "list[Sample]":
    cfg = DataConfig(prompt_key="question", answer_key="answer", **data)
    return load_prompts(as_list(files), cfg, tok, tokenizer_path=str(tok_dir), max_prompt_length=max_len,
                        field="data.train_files")


def test_gsm8k_style_jsonl_renders_through_the_chat_template(tmp_path, tok, tok_dir):
    f = write_jsonl(tmp_path / "train.jsonl", ROWS)
    got = load(str(f), tok, tok_dir)
    assert got.rows == 4 and got.dropped_long == 0
    assert [tok.decode(s.prompt_ids) for s in got.samples] == [f"Q:{r['question']}=" for r in ROWS]
    assert [s.answer for s in got.samples] == [r["answer"] for r in ROWS]
    assert got.samples[2].source == f"{f}:2"
    plain = load(str(f), tok, tok_dir, apply_chat_template=False)  # the raw question, no template
    assert [tok.decode(s.prompt_ids) for s in plain.samples] == [r["question"] for r in ROWS]


def test_parquet_save_to_disk_and_file_lists_load_alike(tmp_path, tok, tok_dir):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    jsonl = write_jsonl(tmp_path / "train.jsonl", ROWS)
    ref = [s.prompt_ids for s in load(jsonl, tok, tok_dir).samples]
    assert [s.prompt_ids for s in load(tmp_path / "train.parquet", tok, tok_dir).samples] == ref
    assert [s.prompt_ids for s in load(tmp_path / "saved", tok, tok_dir).samples] == ref
    both = load([str(jsonl), str(tmp_path / "saved")], tok, tok_dir)
    assert [s.prompt_ids for s in both.samples] == ref + ref and both.rows == 8
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ConfigError, match=r"holds the splits \['test', 'train'\]: name one"):
        load(tmp_path / "splits", tok, tok_dir)


def test_chat_message_prompts_and_system_prompts(tmp_path, tok, tok_dir):
    rows = [{"question": [{"role": "user", "content": "1+2"}], "answer": "3"}]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert tok.decode(load(f, tok, tok_dir).samples[0].prompt_ids) == "Q:1+2="
    with pytest.raises(ConfigError, match="need a chat template"):
        load(f, tok, tok_dir, apply_chat_template=False)
    # the tiny template has no system turn and says so, naming the row and the fields to check
    with pytest.raises(ConfigError, match=r"row 0 .*not system.*data.system_prompt"):
        load(f, tok, tok_dir, system_prompt="Be brief.")


def test_prompts_over_the_limit_are_dropped_and_counted(tmp_path, tok, tok_dir):
    f = write_jsonl(tmp_path / "train.jsonl", ROWS)  # rendered lengths 7, 7, 8, 7
    got = load(f, tok, tok_dir, max_len=7)
    assert got.dropped_long == 1 and len(got.samples) == 3 and got.summary()["dropped_long"] == 1
    assert all(len(s.prompt_ids) <= 7 for s in got.samples)
    with pytest.raises(ConfigError, match="all 4 prompts are longer than 3 tokens"):
        load(f, tok, tok_dir, max_len=3)


def test_bad_files_and_keys_name_the_problem(tmp_path, tok, tok_dir):
    f = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"data.prompt_key='prompt' is not a column of .*\['question', 'answer'\]"):
        load_prompts([str(f)], DataConfig(), tok, tokenizer_path=str(tok_dir), max_prompt_length=64,
                     field="data.train_files")
    with pytest.raises(ConfigError, match="data.answer_key='solution'"):
        load_prompts([str(f)], DataConfig(prompt_key="question", answer_key="solution"), tok,
                     tokenizer_path=str(tok_dir), max_prompt_length=64, field="data.train_files")
    with pytest.raises(ConfigError, match=r"data.train_files: .*missing.jsonl does not exist"):
        load(tmp_path / "missing.jsonl", tok, tok_dir)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"empty.jsonl is empty"):
        load(tmp_path / "empty.jsonl", tok, tok_dir)
    (tmp_path / "bad.jsonl").write_text('{"question": "1+1", "answer": "2"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl cannot be read as json"):
        load(tmp_path / "bad.jsonl", tok, tok_dir)
    (tmp_path / "data.csv").write_text("question,answer\n1+1,2\n")
    with pytest.raises(ConfigError, match=r"unknown format '.csv'"):
        load(tmp_path / "data.csv", tok, tok_dir)
    no_template = save_tiny_tokenizer(tmp_path / "plain")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"data.apply_chat_template=true but the tokenizer at .*plain"):
        load(f, load_tokenizer(no_template), no_template, apply_chat_template=True)


def test_the_exported_task_is_the_task(tmp_path, tok, tok_dir):
    cfg = TaskConfig(num_train=300, num_test=50)
    files = export_task(cfg, tmp_path)
    rows = [json.loads(line) for line in files["val"].read_text().splitlines()]
    tests = test_problems(cfg)
    assert rows == [{"prompt": p.question, "answer": p.answer, "solution": p.response} for p in tests]
    val = load_prompts([str(files["val"])], DataConfig(), tok, tokenizer_path=str(tok_dir), max_prompt_length=64,
                       field="data.val_files")
    assert [list(s.prompt_ids) for s in val.samples] == [tok.encode(p.prompt) for p in tests]
    train = [json.loads(line)["prompt"] for line in files["train"].read_text().splitlines()]
    assert len(train) == 300 and not {f"Q:{q}=" for q in train} & {p.prompt for p in tests}
    assert make_problem([38, 22], ["-"]).as_row() == {"prompt": "38-22", "answer": "16", "solution": "38-22=16;A:16"}


def test_stream_permutes_each_epoch_and_resumes_exactly():
    samples = [Sample((i,), str(i), f"f:{i}") for i in range(10)]
    stream = PromptStream(samples, seed=3, shuffle=True)
    first = [s.answer for s in stream.take(25)]
    for epoch in range(2):  # every epoch is a permutation: each sample exactly once
        assert sorted(first[10 * epoch:10 * epoch + 10], key=int) == [str(i) for i in range(10)]
    assert first[:10] != first[10:20]  # a fresh order per epoch
    for k in (0, 7, 10, 13, 24):
        resumed = PromptStream(samples, seed=3, shuffle=True, start=k)
        assert [s.answer for s in resumed.take(25 - k)] == first[k:]
    assert [s.answer for s in PromptStream(samples, seed=4, shuffle=True).take(10)] != first[:10]
    assert [s.answer for s in PromptStream(samples, seed=3, shuffle=False).take(12)] == \
        [str(i) for i in range(10)] + ["0", "1"]


def test_verl_parquet_with_chat_messages_and_a_nested_answer(tmp_path, tok, tok_dir):
    """verl's preprocessed GSM8K: `prompt` is a message list, the gold answer sits at reward_model.ground_truth."""
    import datasets

    rows = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": r["question"]}],
             "reward_model": {"style": "rule", "ground_truth": r["answer"].split("#### ")[1]}} for r in ROWS]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "verl.parquet"))
    cfg = DataConfig(prompt_key="prompt", answer_key="reward_model.ground_truth")
    got = load_prompts([str(tmp_path / "verl.parquet")], cfg, tok, tokenizer_path=str(tok_dir), max_prompt_length=64,
                       field="data.train_files")
    assert [tok.decode(s.prompt_ids) for s in got.samples] == [f"Q:{r['question']}=" for r in ROWS]
    assert [s.answer for s in got.samples] == ["17", "26", "24", "98"]
    with pytest.raises(ConfigError, match=r"no field 'truth' inside 'reward_model'"):
        load_prompts([str(tmp_path / "verl.parquet")], DataConfig(answer_key="reward_model.truth"), tok,
                     tokenizer_path=str(tok_dir), max_prompt_length=64, field="data.train_files")
