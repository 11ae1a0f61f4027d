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

# What each shipped experiment cannot do yet, by the field to change. A later change that makes one invalid
# must update this table (and the README): an empty set means the experiment can run.
EXPECTED = {
    "tiny_cpu": set(),
    # learner TP=8 x PP=4 (bf16, micro-batches of one sequence, full recomputation) 32 + rollout 4 x TP=4 16 +
    # teacher 2 x TP=8 16 = the 64 GPUs of 8 nodes x 8 H200
    "llama_70b": set(),
    # learner DP=2 (bf16, distributed optimizer) 2 + rollout 5 + teacher 1 = 8 GPUs
    "qwen3_1p7b_from_30b": set(),
    # the flagship script's rehearsal on CPU Slurm nodes (tests/test_slurm_rehearsal.py)
    "cluster_tiny": set(),
}


def fields(overrides: list[str]) -> set[str]:
    return {p.field for p in problems(compose_config(overrides))}


def test_every_shipped_experiment_is_validated():
    assert set(EXPERIMENTS) == set(EXPECTED), "a new experiment needs its expected verdict here"
    for name in EXPERIMENTS:
        assert fields([f"experiment={name}"]) == EXPECTED[name], name


def test_llama_70b_fits_the_allocation_its_sbatch_script_asks_for():
    """The flagship: every GPU of its allocation placed, every role within 90% of a GPU, and the allocation the
    config checks against is the one slurm/asyncopd_70b.sh requests."""
    import re

    cfg = compose_config(["experiment=llama_70b"])
    the_plan = plan(cfg)
    assert the_plan.problems == [] and problems(cfg) == []
    roles = {p.role: p for p in the_plan.roles}
    assert (roles["learner"].gpus, roles["rollout"].gpus, roles["teacher"].gpus) == (32, 16, 16)
    assert sum(p.gpus for p in the_plan.roles) == the_plan.gpus_available == 64
    for p in the_plan.roles:  # what _gpu_problems checks: an engine's weights and one full-length sequence
        need = p.memory.total_bytes if p.role == "learner" else \
            p.memory.params_bytes + p.memory.kv_cache_bytes / max(p.kv_sequences, 1)
        assert need / GIB <= 0.9 * cfg.cluster.gpu_memory_gib, p.role
    script = (ROOT / "slurm" / "asyncopd_70b.sh").read_text()
    assert int(re.search(r"^#SBATCH --nodes=(\d+)$", script, re.M)[1]) == cfg.cluster.nodes
    gpu_type, per_node = re.search(r"^#SBATCH --gpus-per-node=(?:(\w+):)?(\d+)$", script, re.M).groups()
    assert int(per_node) == cfg.cluster.gpus_per_node
    # each node's Ray worker offers every GPU Slurm gave the node
    assert "gpus=${SLURM_GPUS_ON_NODE:-0}" in script and script.count('--num-gpus="$gpus"') == 2
    memory = {"h100": 80, "h200": 140}  # GiB of one GPU, as torch.cuda reports it (H200: 143771 MiB)
    assert cfg.cluster.gpu_memory_gib == memory[gpu_type]


def test_allocation_reasons_name_the_numbers():
    found = {p.field: p.message for p in problems(compose_config(["experiment=llama_70b", "rollout.num_engines=8"]))}
    assert "learner 32 + rollout 32 + teacher 16 = 80 GPUs" in found["cluster.nodes"]
    assert "8 x 8 = 64" in found["cluster.nodes"]
    # a replica is one Ray actor and one SGLang server: it cannot take two nodes' GPUs
    two_nodes = ["experiment=llama_70b", "teacher.replicas=1", "teacher.tp=16", "teacher.gpus_per_replica=16"]
    found = {p.field: p.message for p in problems(compose_config(two_nodes))}
    assert set(found) == {"teacher.tp"} and "cannot span nodes" in found["teacher.tp"]
    # with placement groups a learner TP group is one bundle, so it too stays on one node
    small_nodes = ["experiment=llama_70b", "cluster.nodes=16", "cluster.gpus_per_node=4"]
    found = {p.field: p.message for p in problems(compose_config(small_nodes))}
    assert set(found) == {"teacher.tp", "learner.tp"} and "set learner.tp <= 4" in found["learner.tp"]
    assert fields([*small_nodes, "cluster.placement_groups=false"]) == {"teacher.tp"}
    # the bf16 405B teacher does not fit an 80 GiB GPU at TP=8, and TP=8 already fills a node
    h100 = ["experiment=llama_70b", "cluster.gpu_memory_gib=80"]
    found = {p.field: p.message for p in problems(compose_config(h100))}
    assert set(found) == {"teacher.tp"} and "already fills a node" in found["teacher.tp"]


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
    found = {p.field: p.message for p in problems(compose_config(["learner.dp=2", "learner.pp=2"]))}
    assert set(found) == {"learner.dp", "learner.pp"}  # the hf learner is one process: no replicas, no stages
    assert "learner.dp=2: the hf learner runs one data-parallel replica; set learner.backend=megatron or " \
           "learner.dp=1" in found["learner.dp"]
    assert "the hf learner runs one pipeline stage" in found["learner.pp"]
    assert fields(["learner=megatron", "learner.dp=2", "learner.pp=2"]) == set()  # megatron runs any
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
    assert fields([*base, "rollout.num_engines=8"]) - known == {"cluster.nodes"}  # 2 + 8 + 1 GPUs > 8
    assert fields([*base, "rollout.num_engines=4", "teacher.gpus_per_replica=2"]) - known == {
        "teacher.gpus_per_replica"}  # tp=1: one GPU
    # on a 40 GiB GPU the 30B-A3B teacher (57 GiB of bf16 weights) needs tp=2, and the learner's one 16k-token
    # sequence (its unfused attention's s^2 scores, its logits) needs tp=2 as well
    small = [*base, "cluster.gpu_memory_gib=40", "rollout.num_engines=2"]
    assert fields(small) - known == {"teacher.tp", "learner.tp"}
    assert fields([*small, "teacher.tp=2", "teacher.gpus_per_replica=2", "learner.tp=2"]) == known


def test_plan_memory_terms_follow_the_layout():
    cfg = compose_config(["experiment=llama_70b"])
    roles = {p.role: p for p in plan(cfg).roles}
    learner = roles["learner"].memory
    # bf16: 70.55e9 params / (tp=8 x pp=4) x 2 B = 4.1 GiB, plus stage 0's embedding shard; fp32 grads (x2) and
    # fp32 main weights + two Adam moments (x6: 12 B/param, dp=1 so the distributed optimizer shards nothing)
    assert 4.1 * GIB < learner.params_bytes < 4.3 * GIB
    assert learner.grads_bytes == 2 * learner.params_bytes and learner.optimizer_bytes == 6 * learner.params_bytes
    assert roles["learner"].layout == "tp=8 pp=4 dp=1 mb=1"
    wider = {p.role: p for p in plan(compose_config(["experiment=llama_70b", "learner.tp=16"])).roles}
    assert wider["learner"].memory.params_bytes < learner.params_bytes
    # the knobs move the terms they own
    fp32 = {p.role: p for p in plan(compose_config(["experiment=llama_70b", "learner.precision=fp32"])).roles}
    assert fp32["learner"].memory.params_bytes == 2 * learner.params_bytes
    assert fp32["learner"].memory.optimizer_bytes == 4 * learner.params_bytes  # two fp32 moments, no main copy
    assert fp32["learner"].memory.activations_bytes > learner.activations_bytes  # fp32 activations
    dp2 = {p.role: p for p in plan(compose_config(["experiment=llama_70b", "learner.pp=2", "learner.dp=2"])).roles}
    plain = {p.role: p for p in plan(compose_config(["experiment=llama_70b", "learner.pp=2", "learner.dp=2",
                                                     "learner.distributed_optimizer=false"])).roles}
    assert dp2["learner"].memory.optimizer_bytes * 2 == plain["learner"].memory.optimizer_bytes
    interleaved = {p.role: p for p in plan(compose_config(["experiment=llama_70b", "learner.virtual_pp=2"])).roles}
    assert interleaved["learner"].layout == "tp=8 pp=4 vpp=2 dp=1 mb=1"
    assert interleaved["learner"].memory.activations_bytes > learner.activations_bytes
    for recompute in ("none", "selective"):
        other = plan(compose_config(["experiment=llama_70b", f"learner.recompute={recompute}"])).roles[0]
        assert other.memory.activations_bytes > learner.activations_bytes
    whole = plan(compose_config(["experiment=llama_70b", "learner.micro_batch_size=0"])).roles[0]
    assert whole.layout.endswith("mb=512") and whole.memory.activations_bytes > 100 * learner.activations_bytes


def test_learner_knobs_name_their_field_and_fix():
    def found(overrides: list[str]) -> dict[str, str]:
        return {p.field: p.message for p in problems(compose_config(overrides))}

    bad = found(["learner.virtual_pp=0", "learner.micro_batch_size=-1", "learner.precision=fp16",
                 "learner.recompute=all"])
    assert set(bad) == {"learner.virtual_pp", "learner.micro_batch_size", "learner.precision", "learner.recompute"}
    assert "['bf16', 'fp32']" in bad["learner.precision"]
    assert "['none', 'full', 'selective']" in bad["learner.recompute"]
    # megatron's knobs on the hf learner
    hf = found(["learner.precision=bf16", "learner.recompute=full", "learner.virtual_pp=2"])
    assert set(hf) == {"learner.precision", "learner.recompute", "learner.virtual_pp"}
    assert all("learner.backend=megatron" in m for m in hf.values())
    assert found(["learner=megatron", "learner.precision=bf16", "learner.recompute=selective"]) == {}
    # interleaving needs stages, chunks that divide each stage's layers, and micro-batches in groups of pp
    assert set(found(["learner=megatron", "learner.virtual_pp=2"])) == {"learner.virtual_pp"}
    assert "learner.pp >= 2" in found(["learner=megatron", "learner.virtual_pp=2"])["learner.virtual_pp"]
    chunks = found(["experiment=llama_70b", "learner.virtual_pp=3"])
    assert set(chunks) == {"learner.virtual_pp"} and "12 does not divide num_layers=80" in chunks["learner.virtual_pp"]
    assert "[1, 2, 4, 5, 10, 20]" in chunks["learner.virtual_pp"]
    assert found(["experiment=llama_70b", "learner.virtual_pp=2"]) == {}
    groups = found(["experiment=llama_70b", "learner.virtual_pp=2", "learner.micro_batch_size=3"])
    assert "(512 samples) make 171 micro-batches of learner.micro_batch_size=3" in groups["learner.micro_batch_size"]
    assert "one of [1, 2]" in groups["learner.micro_batch_size"]
    uneven = found(["experiment=llama_70b", "learner.virtual_pp=2", "learner.pp=2", "learner.dp=2",
                    "pipeline.batch_size=510"])  # shares of 255 samples: odd micro-batch counts
    assert set(uneven) == {"learner.micro_batch_size"}
    assert "a multiple of learner.dp x learner.pp = 4" in uneven["learner.micro_batch_size"]
    assert found(["experiment=llama_70b", "learner.virtual_pp=2", "learner.pp=2", "learner.dp=2",
                  "pipeline.batch_size=508"]) == {}
    # every data-parallel replica needs a sample
    few = found(["learner=megatron", "learner.dp=4", "pipeline.batch_size=2"])
    assert set(few) == {"pipeline.batch_size"} and "learner.dp=4" in few["pipeline.batch_size"]


def test_megatron_needs_psutil_on_this_machine(monkeypatch):
    from asyncopd.validation import rules

    cfg = compose_config(["learner=megatron"])
    missing = rules._missing
    monkeypatch.setattr(rules, "_missing", lambda module: module == "psutil" or missing(module))
    assert any("psutil" in p.message for p in rules.host_problems(cfg) if p.field == "learner.backend")
    monkeypatch.setattr(rules, "_missing", lambda module: module != "psutil" and missing(module))
    assert not any("psutil" in p.message for p in rules.host_problems(cfg))


def test_cli_validate_prints_the_plan_and_the_verdict(capsys):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "learner" in out and "total/GPU" in out and "verdict: can run" in out
    # this machine's problems (no sglang, no CUDA, no checkpoints) are shown but do not decide the verdict
    assert main(["validate", "experiment=llama_70b"]) == 0
    out = capsys.readouterr().out
    assert "on this machine" in out and "verdict: can run" in out and "cannot run:" not in out
    assert main(["validate", "experiment=llama_70b", "rollout.num_engines=8"]) == 2
    out = capsys.readouterr().out
    assert "[cluster.nodes]" in out and "verdict: cannot run" in out


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
