"""The demo's shipped teacher and student: bytes as recorded, accuracy re-verified here, clear failures.

Their accuracy on this machine may differ from the recorded one only on near-tie prompts (top-2 logit gap
under evaluate.TIE_DELTA, far above float32 rounding of these logits), each of which moves it by 1/N.
"""

import json
import shutil

import pytest

from asyncopd.config.schema import Config
from asyncopd.data.task import max_response_tokens, test_problems
from asyncopd.data.tokenizer import load_tokenizer
from asyncopd.model import prepare as prepare_mod
from asyncopd.model.build import load_model
from asyncopd.model.evaluate import greedy_eval
from asyncopd.model.prepare import PREPARE_FILE, SHIPPED_DIR, PrepareError, install_shipped, run_prepare


def shipped_record() -> dict:
    return json.loads((SHIPPED_DIR / PREPARE_FILE).read_text())


def test_shipped_models_match_the_default_config_and_their_gates():
    cfg = Config()
    rec = shipped_record()
    assert rec["config_hash"] == prepare_mod.prepare_hash(cfg), "shipped models are stale: rebuild and ship them"
    p = cfg.model.prepare
    assert rec["teacher"]["accuracy"] >= p.min_teacher_accuracy + 0.03
    lo, hi = p.student_accuracy_range
    assert lo <= rec["student"]["accuracy"] <= hi


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_shipped_accuracy_reproduces_within_near_ties(name):
    cfg = Config()
    rec = shipped_record()[name]
    tests = test_problems(cfg.task)
    ev = greedy_eval(load_model(SHIPPED_DIR / name), tests, load_tokenizer(SHIPPED_DIR / name),
                     max_new_tokens=max_response_tokens(cfg.task))
    ties = max(rec["near_ties"], ev.near_ties())
    assert abs(ev.accuracy - rec["accuracy"]) <= ties / len(tests) + 1e-12


def test_prepare_installs_shipped_models_without_training(tmp_path, monkeypatch):
    cfg = Config()
    cfg.model.artifacts_dir = str(tmp_path / "artifacts")

    def boom(*a, **k):
        raise AssertionError("installing shipped models must not train")

    monkeypatch.setattr(prepare_mod, "train_sft", boom)
    info = run_prepare(cfg, progress=False)
    assert info["source"] == "shipped" and info["cached"] is False
    for name in ("teacher", "student"):  # runs report the accuracy measured here (checked against the record
        assert info[name]["recorded_accuracy"] == shipped_record()[name]["accuracy"]  # by install_shipped)
    assert run_prepare(cfg, progress=False)["cached"] is True
    # any change to the recipe means the shipped models are not these: train (and here, fail loudly)
    cfg.model.prepare.teacher_steps += 1
    with pytest.raises(AssertionError, match="must not train"):
        run_prepare(cfg, progress=False)


def _copy_shipped(tmp_path):
    src = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, src)
    cfg = Config()
    cfg.model.artifacts_dir = str(tmp_path / "artifacts")
    return cfg, src


def test_shipped_accuracy_that_does_not_reproduce_fails_clearly(tmp_path):
    cfg, src = _copy_shipped(tmp_path)
    rec = json.loads((src / PREPARE_FILE).read_text())
    rec["student"]["accuracy"] += 0.1
    (src / PREPARE_FILE).write_text(json.dumps(rec))
    with pytest.raises(PrepareError, match=r"shipped student: greedy test accuracy here is .*recorded"):
        install_shipped(cfg, src, progress=False)
    assert not (tmp_path / "artifacts" / PREPARE_FILE).exists()


def test_corrupted_shipped_weights_fail_clearly(tmp_path):
    cfg, src = _copy_shipped(tmp_path)
    weights = src / "teacher" / prepare_mod.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PrepareError, match="do not match the sha256"):
        install_shipped(cfg, src, progress=False)
