"""`asyncopd bench prepare`: cells packed within the cores, the verdict, and one real tiny run end to end."""

import json
import time

from asyncopd.bench import prepare_bench
from asyncopd.cli.main import main

TINY = ["task.num_test=20", "model.teacher.num_layers=1", "model.teacher.hidden_size=32",
        "model.teacher.intermediate_size=64", "model.teacher.num_heads=2", "model.teacher.num_kv_heads=2",
        "model.student.num_layers=1", "model.student.hidden_size=16", "model.student.intermediate_size=32",
        "model.student.num_heads=2", "model.student.num_kv_heads=2", "model.prepare.teacher_steps=3",
        "model.prepare.warmup_steps=1", "model.prepare.student_max_steps=2", "model.prepare.student_min_steps=1",
        "model.prepare.student_eval_every=1", "model.prepare.teacher_batch_size=8",
        "model.prepare.student_batch_size=6", "model.prepare.min_teacher_accuracy=0",
        "model.prepare.teacher_target_accuracy=0", "model.prepare.student_accuracy_range=[0,1]"]


def timed_cell(seed: int, threads: int) -> dict:
    """A stand-in cell (module level, so a spawned worker can import it) that only records when it ran."""
    start = time.time()
    time.sleep(0.5)
    return {"seed": seed, "threads": threads, "start": start, "end": time.time(), "teacher_accuracy": 1.0,
            "student_accuracy": 0.3, "status": "ok"}


def test_cells_never_ask_for_more_threads_than_cores():
    cells = [(s, t) for s in range(3) for t in (1, 2)]
    rows = prepare_bench.run_cells(cells, 2, lambda s, t: (s, t), cell=timed_cell)
    assert sorted((r["seed"], r["threads"]) for r in rows) == sorted(cells)
    for r in rows:  # at the moment each cell started, the cells running beside it plus itself fit in 2 cores
        beside = sum(o["threads"] for o in rows if o is not r and o["start"] <= r["start"] < o["end"])
        assert beside + r["threads"] <= 2


def test_verdict_needs_the_worst_teacher_three_points_above_the_gate():
    row = {"teacher_accuracy": 0.95, "student_in_range": "yes", "status": "ok"}
    ok = prepare_bench.summarize([row, {**row, "teacher_accuracy": 0.931}], 0.90, [0.2, 0.5])
    assert ok["passed"] and ok["teacher_worst"] == 0.931 and ok["teacher_margin_points"] == 3.1
    short = prepare_bench.summarize([row, {**row, "teacher_accuracy": 0.929}], 0.90, [0.2, 0.5])
    assert not short["passed"]
    student_out = prepare_bench.summarize([row, {**row, "student_in_range": "NO", "status": "FAIL"}], 0.9, [0.2, 0.5])
    assert not student_out["passed"] and student_out["students_in_range"] == 1


def test_bench_prepare_runs_real_cells_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "prepare", "--seeds", "2", "--threads", "1", "--out", str(out), *TINY]) == 0
    result = json.loads((out / "prepare_bench.json").read_text())
    assert [(r["seed"], r["threads"]) for r in result["rows"]] == [(0, 1), (1, 1)]
    assert all(r["status"] == "ok" and r["teacher_steps"] == 3 for r in result["rows"])
    assert result["verdict"]["cells"] == 2 and (out / "prepare_bench.png").exists()
    # seed s also moves the data order, so the two cells trained different models
    hashes = [json.loads((out / "cells" / f"s{s}-t1" / "prepare.json").read_text())["teacher"]["sha256"]
              for s in (0, 1)]
    assert hashes[0] != hashes[1]
    assert "teacher worst" in capsys.readouterr().out
