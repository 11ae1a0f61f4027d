"""End to end with real teacher servers: two named teachers chosen per sample by a dataset column, and a teacher
without its weights stopping the run before the learner trains on its scores."""

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from asyncopd.cli.main import main
from asyncopd.config.ray_cluster import start_ray
from asyncopd.config.schema import ClusterConfig
from asyncopd.data.tokenizer import EOS_TOKEN, PAD_TOKEN, VOCAB
from asyncopd.model.build import build_model, save_checkpoint
from asyncopd.pipeline.run import run_training
from asyncopd.validation import load_config
from tests.conftest import TINY_TEACHER
from tests.test_e2e_pipeline import scalars

pytestmark = pytest.mark.e2e
STEPS, BATCH = 2, 8


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(tmp_path_factory):
    start_ray(ClusterConfig(), tmp_path_factory.mktemp("ray"))
    yield
    ray.shutdown()


def _teacher(path: Path, seed: int, zero: bool = False) -> Path:
    """A tiny teacher on the tests' tokenizer; `zero`: its weights lost (every logit 0, a uniform answer)."""
    model = build_model(TINY_TEACHER, len(VOCAB), seed, VOCAB.index(PAD_TOKEN), VOCAB.index(EOS_TOKEN))
    if zero:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return save_checkpoint(model, path)


def _overrides(artifacts: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.artifacts_dir={artifacts}", f"run.dir={run_dir}", "run.progress=false", f"pipeline.steps={STEPS}",
            f"pipeline.batch_size={BATCH}", "pipeline.eval_every=0", "rollout.max_new_tokens=12", *extra]


def test_two_teachers_score_the_samples_their_column_names(tiny_artifacts, tmp_path):
    """Rows in file order (no shuffle): rows 0, 3, 6, ... go to teacher b (another checkpoint, a float16 wire),
    the others to a (the prepared teacher). Each teacher's counts are exactly its rows among those trained."""
    other = _teacher(tmp_path / "teacher_b", seed=7)
    rows = [json.loads(line) for line in (tiny_artifacts / "data" / "train.jsonl").read_text().splitlines()[:40]]
    for i, r in enumerate(rows):
        r["expert"] = "b" if i % 3 == 0 else "a"
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_training(load_config(_overrides(
        tiny_artifacts, tmp_path / "run", f"data.train_files={train}", "data.shuffle=false", "data.teacher_key=expert",
        f"+teachers={{a: {{}}, b: {{model_path: {other}, wire_dtype: float16}}}}")))
    trained = rows[:STEPS * BATCH]
    per = summary["teachers"]
    assert set(per) == {"a", "b"}
    assert per["b"]["samples"] == sum(r["expert"] == "b" for r in trained) == 6
    assert per["a"]["samples"] == sum(r["expert"] == "a" for r in trained) == 10
    assert np.isfinite(summary["final_loss"]) and sum(summary["staleness_histogram"].values()) == STEPS * BATCH
    events = scalars(tmp_path / "run")
    for name in ("a", "b"):
        for stat in ("samples", "tokens", "seconds", "bytes"):
            assert len(events[f"teacher/{name}/{stat}"]) == STEPS, (name, stat)
        assert sum(e.value for e in events[f"teacher/{name}/samples"]) == per[name]["samples"]
        assert sum(e.value for e in events[f"teacher/{name}/tokens"]) == per[name]["tokens"] > 0
    # bytes per token: the answers' HTTP bodies over the scored tokens, not the scores' size in memory
    for s in range(STEPS):
        nbytes = sum(events[f"teacher/{n}/bytes"][s].value for n in ("a", "b"))
        tokens = sum(events[f"teacher/{n}/tokens"][s].value for n in ("a", "b"))
        assert events["teacher/bytes_per_token"][s].value == pytest.approx(nbytes / tokens, rel=1e-6)
    # b's float16 wire carries fewer bytes per token than a's float32 one
    assert per["b"]["bytes"] / per["b"]["tokens"] < per["a"]["bytes"] / per["a"]["tokens"]


def test_a_teacher_without_its_weights_stops_the_run_before_training(tiny_artifacts, tmp_path, capsys):
    """It answers 200 with logprob -log V everywhere (miles issue 1958): exit 1 with what happened, no traceback,
    no step trained."""
    blank = _teacher(tmp_path / "blank", seed=1, zero=True)
    run_dir = tmp_path / "run"
    code = main(["train", *_overrides(tiny_artifacts, run_dir, f"model.teacher_path={blank}")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "asyncopd: teacher failed: teacher 'default': teacher replica http://" in err
    assert f"uniform: the top-1 logprob is -log V = {-np.log(len(VOCAB)):.4f}" in err and "Traceback" not in err
    assert "loss" not in scalars(run_dir)  # the learner took no step
    assert not (run_dir / "summary.json").exists()
