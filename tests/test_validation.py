"""`asyncopd validate` and the one validation home: every shipped experiment, invalid layouts, capability
mismatches, GPU totals, and user errors at the CLI (exit 2, the field named, no traceback)."""

import subprocess
import sys
from pathlib import Path

import pytest

from asyncopd.cli.main import main
from asyncopd.config.load import compose_config
from asyncopd.validation.plan import plan
from asyncopd.validation.rules import problems

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
GIB = 2**30

# What each shipped experiment cannot do yet, by the field to change. A later change that makes one valid
# must update this table (and the README): an empty set means the experiment can run.
EXPECTED = {
    "tiny_cpu": set(),
    # PP=4 is unimplemented; 32 learner + 32 rollout + 16 teacher GPUs do not fit 8 nodes x 8; the learner takes
    # the whole batch (512 x 16k tokens) in one step, with no micro-batching; 405B bf16 weights over tp=8 are
    # 94.5 GiB per 80 GiB GPU
    "llama_70b": {"learner.pp", "cluster.nodes", "learner.tp", "teacher.tp"},
    # the whole batch (256 x 16k tokens) in one step
    "qwen3_1p7b_from_30b": {"learner.tp"},
}


def fields(overrides: list[str]) -> set[str]:
    return {p.field for p in problems(compose_config(overrides))}


def test_every_shipped_experiment_is_validated():
    assert set(EXPERIMENTS) == set(EXPECTED), "a new experiment needs its expected verdict here"
    for name in EXPERIMENTS:
        assert fields([f"experiment={name}"]) == EXPECTED[name], name


def test_llama_70b_reasons_name_the_numbers():
    found = {p.field: p.message for p in problems(compose_config(["experiment=llama_70b"]))}
    assert "learner.pp=4" in found["learner.pp"]
    assert "learner 32 + rollout 32 + teacher 16 = 80 GPUs" in found["cluster.nodes"]
    assert "8 x 8 = 64" in found["cluster.nodes"]


def test_tp_must_divide_heads():
    # 64 attention heads (Llama-3.3-70B's student spec): tp=3 divides neither heads nor KV groups
    assert "learner.tp" in fields(["experiment=llama_70b", "learner.tp=3"])
    assert "learner.pp" in fields(["learner=megatron", "learner.pp=3"])  # also: 2 layers are not divisible by 3
    assert "rollout.tp" in fields(["experiment=llama_70b", "rollout.tp=3", "rollout.gpus_per_engine=3"])
    # Megatron allows tp=16 over 8 KV groups (each rank a copy), our converter does not: that is the backend's rule
    found = problems(compose_config(["experiment=llama_70b", "learner.tp=16"]))
    assert any("splits the student's 8 KV heads" in p.message for p in found)


def test_backend_limits_and_capabilities():
    assert fields(["learner.tp=2"]) == {"learner.tp"}  # the hf learner is not parallel
    assert fields(["learner.fp8=true"]) == {"learner.fp8"}  # fp8 is the megatron learner's
    assert fields(["teacher.tp=2"]) == {"teacher.tp"}  # the embedded teacher is one shard per replica
    assert fields(["learner.dp=2"]) == {"learner.dp"}
    # the megatron learner converts dense Qwen2, Qwen3 and Llama checkpoints, not a mixture of experts
    moe = ["experiment=qwen3_1p7b_from_30b", "model.student.family=qwen3_moe"]
    assert fields(moe) - EXPECTED["qwen3_1p7b_from_30b"] == {"learner.backend"}
    # mc_rkl scores a different id set at every position: stock SGLang cannot, neither can it capture M samples
    assert fields(["estimator=mc_rkl", "teacher=sglang", "teacher.tp=1"]) == {"teacher.backend"}
    assert fields(["estimator=mc_rkl", "rollout=sglang"]) == {"rollout.backend"}
    assert fields(["estimator=forward_kl", "teacher=sglang", "teacher.tp=1"]) == set()
    # MC draws are weighed by full-vocabulary logprobs (SGLang's meaning): a truncated sampler would bias them
    assert fields(["estimator=mc_rkl", "rollout.top_p=0.9"]) == {"rollout.top_p"}
    # a TP size hidden in sglang_args would leave weight-sync ranks without a receiver: refused before launch
    assert fields(["rollout=sglang", "estimator=forward_kl", "rollout.sglang_args='--tp-size 2'"]) == {
        "rollout.sglang_args"}
    # the weight sync's own values, and a pause it cannot skip: SGLang loads buckets as they come
    assert fields(["weights.pause_mode=freeze", "weights.dtype=fp8", "weights.load_format=bucket"]) == {
        "weights.pause_mode", "weights.dtype", "weights.load_format"}
    assert fields(["weights.pause_mode=none"]) == set()  # the embedded engine swaps a whole update at once
    assert fields(["weights.pause_mode=none", "rollout=sglang", "estimator=forward_kl"]) == {"weights.pause_mode"}


def test_gpu_totals_and_memory_against_the_cluster():
    base = ["experiment=qwen3_1p7b_from_30b"]
    known = EXPECTED["qwen3_1p7b_from_30b"]
    assert fields([*base, "rollout.num_engines=8"]) - known == {"cluster.nodes"}  # 1 + 8 + 1 GPUs > 8
    assert fields([*base, "teacher.gpus_per_replica=2"]) - known == {"teacher.gpus_per_replica"}  # tp=1: one GPU
    # the 30B-A3B teacher (57 GiB of bf16 weights) does not fit a 40 GiB GPU at tp=1; at tp=2 it does
    assert fields([*base, "cluster.gpu_memory_gib=40"]) - known == {"teacher.tp"}
    assert fields([*base, "cluster.gpu_memory_gib=40", "teacher.tp=2", "teacher.gpus_per_replica=2"]) == known


def test_plan_memory_terms_follow_the_layout():
    cfg = compose_config(["experiment=llama_70b"])
    roles = {p.role: p for p in plan(cfg).roles}
    assert roles["learner"].gpus == 32 and roles["rollout"].gpus == 32 and roles["teacher"].gpus == 16
    # the learners train fp32: 70.55e9 params / (tp=8 x pp=4) x 4 B = 8.2 GiB, plus stage 0's embedding shard
    assert 8.2 * GIB < roles["learner"].memory.params_bytes < 8.5 * GIB
    wider = {p.role: p for p in plan(compose_config(["experiment=llama_70b", "learner.tp=16"])).roles}
    assert wider["learner"].memory.params_bytes < roles["learner"].memory.params_bytes


def test_cli_validate_prints_the_plan_and_the_verdict(capsys):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "learner" in out and "total/GPU" in out and "verdict: can run" in out
    assert main(["validate", "experiment=llama_70b"]) == 2
    out = capsys.readouterr().out
    assert "[learner.pp]" in out and "[cluster.nodes]" in out and "verdict: cannot run" in out


@pytest.mark.parametrize("args, needle", [
    (["train", "model.student_path=/nonexistent"], "model.student_path='/nonexistent'"),
    (["train", "learner=megatron", "learner.pp=3", "learner.tp=5"], "learner.pp"),
    (["train", "learner.backend=jax"], "learner.backend='jax'"),
])
def test_user_errors_exit_2_without_a_traceback(args, needle, tmp_path):
    """A real process: the exit code, the message naming the field, and no traceback; nothing is started."""
    proc = subprocess.run([sys.executable, "-m", "asyncopd.cli.main", *args, f"run.dir={tmp_path}/run"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory, Ray or any server


def test_a_tokenizer_mismatch_fails_before_anything_starts(tmp_path):
    """The tokenizer decides, not the embedding rows: both files are named, before Ray or a server starts."""
    from asyncopd.core.errors import ConfigError
    from asyncopd.data.tokenizer import VOCAB, save_tiny_tokenizer
    from asyncopd.validation.rules import validate
    from tests._serving_fixtures import save_tiny

    teacher, student, same = (save_tiny(tmp_path / name, i) for i, name in enumerate(("t", "s", "same")))
    save_tiny_tokenizer(teacher)
    save_tiny_tokenizer(same)
    save_tiny_tokenizer(student, [*VOCAB[1:], VOCAB[0]])  # the same tokens under other ids
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')  # not the prepared task: this test needs no artifacts
    base = [f"model.teacher_path={teacher}", f"run.dir={tmp_path}/run", f"data.train_files={data}"]
    validate(compose_config([*base, f"model.student_path={same}"]), host=True)
    with pytest.raises(ConfigError, match="tokenizers differ") as e:
        validate(compose_config([*base, f"model.student_path={student}"]), host=True)
    assert str(teacher / "tokenizer.json") in str(e.value) and str(student / "tokenizer.json") in str(e.value)


def test_cpu_backends_owe_nothing_to_the_gpu_rules_and_bad_specs_are_named(tmp_path, capsys):
    # the embedded engine, teacher and hf learner run on the CPU: a GPU allocation adds no GPU or memory rule
    assert fields(["cluster.gpus_per_node=8", "cluster.gpu_memory_gib=1"]) == set()
    # a spec that sizes a checkpoint not on this machine is checked too, not divided by
    assert "model.student.num_heads" in fields(["experiment=llama_70b", "model.student.num_kv_heads=0"])
    # a resume folder without a learner state is refused before anything starts
    (tmp_path / "ckpt").mkdir()
    assert main(["train", f"run.resume_from={tmp_path / 'ckpt'}", f"run.dir={tmp_path}/run"]) == 2
    assert "learner_state" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # `asyncopd config` prints any config that composes; judging it is `asyncopd validate`'s job
    assert main(["config", "experiment=llama_70b"]) == 0


def test_bpe_merges_fingerprint_alike_in_either_format(tmp_path):
    import json

    from asyncopd.data.tokenizer import tokenizer_fingerprint

    body = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "tokenizer.json").write_text(json.dumps(body))
    body["model"]["merges"] = ["a b"]  # tokenizers < 0.20 writes merges as strings
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(body))
    assert tokenizer_fingerprint(tmp_path / "new") == tokenizer_fingerprint(tmp_path / "old")
    body["model"]["merges"] = ["b a"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(body))
    assert tokenizer_fingerprint(tmp_path / "other") != tokenizer_fingerprint(tmp_path / "old")
