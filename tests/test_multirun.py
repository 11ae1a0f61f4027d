"""Scaling studies as users run them: `asyncopd train -m` is Hydra's own multirun (sweeper + basic launcher here;
the Slurm launcher is in tests/test_slurm_rehearsal.py), every point validated before any starts, and
`asyncopd study` tabling a sweep."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asyncopd.bench.study import gather, labels
from asyncopd.cli.main import main

SMALL = ["run.progress=false", "pipeline.steps=6", "pipeline.batch_size=8", "pipeline.eval_prompts=16",
         "pipeline.eval_every=0", "rollout.max_new_tokens=12"]


def _summary(**kw) -> dict:
    """The summary.json keys the study reads (a run writes many more)."""
    return {"train_wall_s": 10.0, "samples_per_s": 4.0, "tokens_per_s": 80.0, "max_staleness": 1, "steps": 5,
            "initial_accuracy": 0.25, "final_accuracy": 0.5, "staleness_histogram": {"0": 30, "1": 10},
            "busy_rollout_s": 8.0, "busy_teacher_s": 2.0, "busy_learner_s": 5.0, "ray_nodes": {}} | kw


def _job(root: Path, name: str, overrides: list[str], summary: dict | None = None, error: str = "") -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if error:
        (run / "error.txt").write_text(error)


def test_study_orders_runs_labels_what_varies_and_lists_failed_and_unfinished_ones(tmp_path, capsys):
    _job(tmp_path, "10", ["pipeline.max_staleness=2",
         "rollout.num_engines=2"], _summary(max_staleness=2, staleness_histogram={"0": 10, "1": 20, "2": 10}))
    _job(tmp_path, "2", ["pipeline.max_staleness=0",
         "rollout.num_engines=2"], _summary(max_staleness=0, staleness_histogram={"0": 40}))
    _job(tmp_path, "3", ["pipeline.max_staleness=1",
         "rollout.num_engines=2"], error="ConfigError: out of memory\n\ntraceback...")
    _job(tmp_path, "4", ["pipeline.max_staleness=4",
         "rollout.num_engines=2"])
    rows = gather(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "failed", "incomplete", "ok"]  # by job number, not by name
    assert labels(rows) == [f"pipeline.max_staleness={k}" for k in (0, 1, 4, 2)]  # num_engines never varies
    assert rows[3]["staleness_share"] == {0: 0.25, 1: 0.5, 2: 0.25}
    assert rows[0]["busy_share"] == {"rollout": 0.8, "teacher": 0.2, "learner": 0.5}
    assert rows[1]["error"] == "ConfigError: out of memory"

    assert main(["study", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pipeline.max_staleness=2" in out and "0:25% 1:50% 2:25%" in out and "80%/20%/50%" in out
    assert "failed: ConfigError: out of memory" in out and "incomplete" in out
    saved = json.loads((tmp_path / "study.json").read_text())["runs"]
    assert [r["label"] for r in saved] == labels(rows)
    assert (tmp_path / "study.png").stat().st_size > 0


def test_study_of_a_directory_without_runs_exits_2(tmp_path, capsys):
    assert main(["study", str(tmp_path)]) == 2
    assert "holds no runs" in capsys.readouterr().err


def test_a_sweep_with_a_point_that_cannot_run_starts_nothing(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["train", "-m", "learner.tp=1,2", "pipeline.max_staleness=0,1", f"hydra.sweep.dir={sweep}"]) == 2
    err = capsys.readouterr().err
    assert "2 of the sweep's 4 runs cannot run, nothing started" in err
    assert "run 2 (learner.tp=2 pipeline.max_staleness=0)" in err and "learner.tp" in err
    assert not sweep.exists()


def test_a_sweep_refuses_a_used_sweep_dir_a_fixed_run_dir_and_an_unknown_launcher(tmp_path, capsys):
    (tmp_path / "used" / "0").mkdir(parents=True)
    assert main(["train", "-m", "pipeline.max_staleness=0,1", f"hydra.sweep.dir={tmp_path / 'used'}"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(["train", "-m", "pipeline.max_staleness=0,1", f"run.dir={tmp_path / 'run'}",
                 f"hydra.sweep.dir={tmp_path / 'new'}"]) == 2
    assert "drop run.dir" in capsys.readouterr().err
    assert main(["train", "-m", "pipeline.max_staleness=0,1", "hydra/launcher=no_such_launcher",
                 f"hydra.sweep.dir={tmp_path / 'new'}"]) == 2
    assert "no_such_launcher" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "run").exists()


def test_study_marks_a_summary_it_cannot_read(tmp_path, capsys):
    _job(tmp_path, "0", ["pipeline.max_staleness=0"], {"samples_per_s": 1.0})  # not an asyncopd summary
    _job(tmp_path, "1", ["pipeline.max_staleness=1"], _summary())
    assert [r["status"] for r in gather(tmp_path)] == ["unreadable", "ok"]
    assert main(["study", str(tmp_path)]) == 0
    assert "unreadable: KeyError" in capsys.readouterr().out


@pytest.mark.e2e
def test_a_failed_point_is_recorded_and_the_sweep_goes_on(tiny_artifacts, tmp_path):
    """The second point validates (its teacher path is well-formed) but has no checkpoint there: it fails when its
    run starts, writes error.txt, and the first point's run still lands; the sweep exits 1."""
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "asyncopd.cli.main", "train", "-m",
                           f"model.teacher_path={tiny_artifacts / 'teacher'},{tmp_path / 'missing'}",
                           f"model.artifacts_dir={tiny_artifacts}", *SMALL, f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert (sweep / "0" / "summary.json").exists() and not (sweep / "1" / "summary.json").exists()
    assert "model.teacher_path" in (sweep / "1" / "error.txt").read_text()
    rows = json.loads((sweep / "study.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["ok", "failed"] and "model.teacher_path" in rows[1]["error"]


@pytest.mark.e2e
def test_a_local_multirun_trains_every_point_and_ends_with_its_study(tiny_artifacts, tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "asyncopd.cli.main", "train", "-m", "pipeline.max_staleness=0,2",
                           f"model.artifacts_dir={tiny_artifacts}", *SMALL, f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, k in zip(jobs, (0, 2), strict=True):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["run_dir"] == str(job) and summary["max_staleness"] == k and summary["steps"] == 6
        assert summary["driver_cpu_s"] > 0
        assert f"pipeline.max_staleness={k}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    study = json.loads((sweep / "study.json").read_text())["runs"]
    assert [r["label"] for r in study] == ["pipeline.max_staleness=0", "pipeline.max_staleness=2"]
    assert set(study[0]["staleness_share"]) == {"0"}  # strict sync trains only on current-policy samples
    assert all(r["status"] == "ok" for r in study) and (sweep / "study.png").exists()
    assert "pipeline.max_staleness=2" in done.stdout and "samples/s" in done.stdout
