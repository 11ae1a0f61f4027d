"""End to end: Ray actors, HTTP engines and teacher, gloo weight sync, learner; sync and async mode."""

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from asyncopd.config.ray_cluster import start_ray
from asyncopd.config.schema import ClusterConfig, TaskConfig
from asyncopd.core.errors import ConfigError
from asyncopd.data.tokenizer import VOCAB, load_tokenizer, tokenizer_fingerprint
from asyncopd.model.build import build_model, save_checkpoint
from asyncopd.pipeline.run import run_training
from asyncopd.validation import load_config
from tests.conftest import TINY_TEACHER, make_artifacts

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(tmp_path_factory):
    start_ray(ClusterConfig(), tmp_path_factory.mktemp("ray"))
    yield
    ray.shutdown()


def small_run(artifacts: Path, run_dir: Path, *extra: str):
    return load_config([
        f"model.artifacts_dir={artifacts}", f"run.dir={run_dir}", "run.progress=false",
        "pipeline.steps=4", "pipeline.batch_size=8", "pipeline.eval_prompts=16", "pipeline.eval_every=2",
        "rollout.max_new_tokens=12", *extra,
    ])


def scalars(run_dir: Path) -> dict[str, list]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    return {t: acc.Scalars(t) for t in tags["scalars"]} | {"_histograms": tags["histograms"]}


@pytest.mark.parametrize("k", [0, 2])
def test_run_trains_and_logs(tiny_artifacts, tmp_path, k):
    summary = run_training(small_run(tiny_artifacts, tmp_path, f"pipeline.max_staleness={k}"))
    assert summary["steps"] == 4
    assert summary["max_observed_staleness"] <= k
    t, a0, a1 = summary["teacher_accuracy"], summary["initial_accuracy"], summary["final_accuracy"]
    assert summary["gap_closed"] == (None if t is None or t <= a0 else (a1 - a0) / (t - a0))  # same float64 ops
    assert sum(summary["staleness_histogram"].values()) == 4 * 8
    if k == 0:
        assert summary["staleness_histogram"] == {0: 32}
    events = scalars(tmp_path)
    for tag in ("loss", "kl", "eval/pass@1", "throughput/samples_per_s", "throughput/tokens_per_s",
                "weights/sync_s", "weights/bytes", "weights/gbps", "weights/engine_stall_s", "staleness/max",
                "staleness/token_max", "staleness/token_mean", "time/rollout_s", "time/teacher_s", "time/learner_s",
                "teacher/bytes_per_token", "rollout/response_len"):
        assert tag in events, tag
    assert len(events["loss"]) == 4
    assert [e.step for e in events["eval/pass@1"]] == [0, 2, 4]
    assert {"staleness/histogram", "staleness/token_histogram"} <= set(events["_histograms"])
    # by token: every response token once, none older than its sample's oldest token
    tokens = summary["token_staleness_histogram"]
    assert sum(tokens.values()) == sum(round(e.value * 8) for e in events["rollout/response_len"]) > 0
    assert max(tokens) <= summary["max_observed_staleness"]
    sync = summary["weight_sync"]
    assert sync["updates"] == 4 and sync["bytes"] > 0 and sync["median_gbps"] > 0
    assert 0 <= sync["median_engine_stall_s"] <= sync["max_s"]
    assert (tmp_path / "config.yaml").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4
    assert (tmp_path / "checkpoint" / "config.json").exists()
    # the saved student is a whole checkpoint: its tokenizer travels with it (servable, same ids counted)
    assert tokenizer_fingerprint(tmp_path / "checkpoint") == tokenizer_fingerprint(tiny_artifacts / "student")
    assert load_tokenizer(tmp_path / "checkpoint").chat_template is not None


def test_vocabulary_mismatch_stops_before_training(tmp_path):
    student_side = make_artifacts(tmp_path / "a")
    # another tokenizer: refused by validation, before the run directory, Ray or any server exists
    other = make_artifacts(tmp_path / "b", (*VOCAB, "*"))
    cfg = small_run(student_side, tmp_path / "run", f"model.teacher_path={other / 'teacher'}")
    with pytest.raises(ConfigError, match="tokenizers differ"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


def test_padded_teacher_pairs_with_its_tokenizer(tiny_artifacts, tmp_path):
    """The same tokenizer over a teacher embedding padded past it (more rows than the student's) is no mismatch:
    the teacher scores the tokenizer's ids only, so its top-k indexes the student's logits."""
    padded = build_model(TINY_TEACHER, len(VOCAB) + 5, 1)
    save_checkpoint(padded, tmp_path / "padded")
    summary = run_training(small_run(tiny_artifacts, tmp_path / "run", f"model.teacher_path={tmp_path / 'padded'}",
                                     "pipeline.steps=1", "pipeline.eval_every=0"))
    assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])


def test_resume_keeps_the_version_clock(tiny_artifacts, tmp_path):
    run_training(small_run(tiny_artifacts, tmp_path / "a", "pipeline.max_staleness=1", "pipeline.eval_every=0"))
    resumed = run_training(small_run(
        tiny_artifacts, tmp_path / "b", "pipeline.max_staleness=1", "pipeline.steps=6", "pipeline.eval_every=0",
        f"run.resume_from={tmp_path / 'a' / 'checkpoint'}"))
    assert [step for step, _ in resumed["accuracy_curve"]] == [4, 6]
    assert sum(resumed["staleness_histogram"].values()) == 2 * 8
    assert resumed["max_observed_staleness"] <= 1
    assert [e.step for e in scalars(tmp_path / "b")["loss"]] == [4, 5]
    state = torch.load(tmp_path / "b" / "checkpoint" / "learner_state.pt", weights_only=False)
    assert state["version"] == 6


@pytest.mark.parametrize("estimator", ["mc_rkl", "sparse_rkl_student", "decoupled_ppo"])
def test_estimators_that_need_extra_fields_run_through_the_pipeline(tiny_artifacts, tmp_path, estimator):
    """MC samples (engine draws M, teacher scores them), the student's top-k support (teacher scores it),
    and the proximal policy (learner recomputes it): each estimator gets exactly what it asks for."""
    summary = run_training(small_run(tiny_artifacts, tmp_path, f"estimator={estimator}", "estimator.mc_samples=4",
                                     "pipeline.steps=2", "pipeline.eval_every=0"))
    assert summary["estimator"] == estimator.removesuffix("_student")
    assert np.isfinite(summary["final_loss"])


def test_a_users_gsm8k_style_jsonl_trains_with_only_its_keys_set(tiny_artifacts, tmp_path):
    """`data.train_files=F data.val_files=G data.prompt_key=question data.answer_key=answer`: a user's file with
    GSM8K's keys and answer format, read through the same loader as the built-in task; one prompt too long for
    the context is dropped and counted, not a crash."""
    import random

    from asyncopd.data.task import sample_problem

    rng = random.Random(7)
    rows = [{"question": p.question, "answer": f"{p.response.replace(';', ', ')} #### {p.answer}", "id": i}
            for i, p in enumerate(sample_problem(rng, TaskConfig()) for _ in range(40))]
    rows[3]["question"] = "+".join(["1"] * 60)  # 119 characters: over the 128 - 12 token budget with its frame
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    summary = run_training(small_run(tiny_artifacts, tmp_path / "run", f"data.train_files={train}",
                                     f"data.val_files={val}", "data.prompt_key=question", "data.answer_key=answer",
                                     "data.verifier=math", "pipeline.eval_k=2"))
    assert summary["steps"] == 4 and sum(summary["staleness_histogram"].values()) == 4 * 8
    assert summary["data"]["train"] == {"files": [str(train)], "rows": 40, "samples": 39, "dropped_long": 1,
                                        "max_prompt_length": 128 - 12}
    assert summary["data"]["val"]["samples"] == 20
    assert summary["teacher_accuracy"] is None  # measured on the built-in task, not on this file
    assert set(summary["final_eval"]) == {"eval/pass@1", "eval/avg@2", "eval/pass@2"}
    assert 0 <= summary["final_eval"]["eval/avg@2"] <= summary["final_eval"]["eval/pass@2"] <= 1
    assert "eval/avg@2" in scalars(tmp_path / "run")


def test_bad_dataset_keys_exit_2_before_anything_starts(tiny_artifacts, tmp_path, capsys):
    from asyncopd.cli.main import main

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    code = main(["train", f"model.artifacts_dir={tiny_artifacts}", f"run.dir={tmp_path / 'run'}",
                 f"data.train_files={train}", "data.prompt_key=problem"])
    err = capsys.readouterr().err
    assert code == 2 and "data.prompt_key='problem' is not a column of" in err and "['question', 'answer']" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_abort_mode_updates_resume_cut_samples_and_train_every_prompt_once(tiny_artifacts, tmp_path):
    """weights.pause_mode=abort, max_staleness=1: a weight sync aborts the next batch's request in flight, and the
    dispatcher resumes its rows under the new weights. A sync cuts only if it lands while the engine decodes, i.e. if
    the batch decodes for longer than scoring and a learner step take: 32 new tokens (its longest row runs ~32
    steps) and 8 steps. Measured on this 2-core machine, 2 runs: 6 of the 7 syncs that had a batch to cut did,
    20-23 of 64 samples resumed (12 tokens: 15-27). mc_rkl: a resumed sample's MC draws reach the teacher and loss."""
    summary = run_training(small_run(tiny_artifacts, tmp_path, "weights.pause_mode=abort", "pipeline.max_staleness=1",
                                     "rollout.max_new_tokens=32", "pipeline.steps=8", "estimator=mc_rkl",
                                     "estimator.mc_samples=4", "pipeline.eval_every=0"))
    assert summary["resumed"] > 0 and summary["resume_pieces"] >= summary["resumed"]
    assert summary["prompts_trained"] == summary["prompts_unique"] == 8 * 8
    assert summary["max_observed_staleness"] <= 1 and np.isfinite(summary["final_loss"])
    events = scalars(tmp_path)
    assert sum(e.value for e in events["rollout/resumed"]) == summary["resumed"]
    # every token of every trained sample counted once by its own version, a resumed sample's tokens included
    assert sum(summary["token_staleness_histogram"].values()) == sum(
        round(e.value * 8) for e in events["rollout/response_len"])
