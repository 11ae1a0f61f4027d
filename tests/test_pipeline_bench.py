"""`asyncopd bench`: the speed-up bounds, the table's assembly from run summaries, and the run order and
outputs, with training replaced by canned summaries (no timing is asserted)."""

import argparse
import json

import pytest

from asyncopd.bench import pipeline_bench
from asyncopd.pipeline import run as runner
from asyncopd.pipeline.scheduler import StageTimes, speedup_bound

SYNC_BUSY = (1.8, 3.4, 2.8)  # the calibration bench's sync run: 8.0 s of work, teacher busiest


@pytest.mark.parametrize(("busy", "cores", "bound"), [
    (SYNC_BUSY, 2, 2.0),  # 8.0 / max(3.4, 8.0 / 2): the two cores, not the teacher, limit the overlap
    (SYNC_BUSY, 3, 8.0 / 3.4),  # 8.0 / 3 < 3.4: a core per role, the plain overlap bound
    (SYNC_BUSY, 64, 8.0 / 3.4),  # cores beyond one per role cannot help
    ((1.0, 1.0, 1.0), 1, 1.0),  # one core: overlapping gains nothing
    ((1.0, 1.0, 1.0), 2, 2.0),  # balanced roles: the cores are the limit, 3 / (3 / 2)
    ((1.0, 5.0, 1.0), 2, 1.4),  # one role dominates: 7 / 5 whatever the cores
    ((0.0, 0.0, 0.0), 2, 0.0),  # no work: no division by zero
])
def test_speedup_bound_hand_computed(busy, cores, bound):
    assert speedup_bound(busy, cores) == pytest.approx(bound)


def test_stage_times_ideal_is_the_overlap_bound_of_its_totals():
    times = StageTimes(rollout=[0.8, 1.0], teacher=[1.4, 2.0], learner=[2.8])
    assert times.ideal_speedup() == pytest.approx(8.0 / 3.4)


def summary(busy: tuple[float, float, float], samples_per_s: float, k: int = 0, accuracy: float = 0.5,
            driver: float = 1.0) -> dict:
    """The keys of a run summary the bench reads."""
    return {"samples_per_s": samples_per_s, "final_accuracy": accuracy, "max_observed_staleness": k,
            "train_wall_s": 1000.0 / samples_per_s, "driver_cpu_s": driver,
            **{f"busy_{role}_s": s for role, s in zip(pipeline_bench.ROLES, busy, strict=True)}}


def test_assemble_bounds_from_the_sync_run_and_paired_speedups():
    runs = {
        0: [summary(SYNC_BUSY, 100.0, driver=2.0), summary((1.9, 3.5, 2.9), 90.0, driver=3.0),
            summary((1.7, 3.3, 2.7), 110.0, driver=2.5)],
        # async busy seconds are inflated by contention; the bounds must not use them
        2: [summary((2.0, 6.0, 3.0), 180.0, 2, 0.6), summary((2.0, 6.0, 3.0), 171.0, 1, 0.4),
            summary((2.0, 6.0, 3.0), 198.0, 2, 0.5)],
    }
    result = pipeline_bench.assemble(runs, cores=2)
    bounds = result["bounds"]
    assert bounds["baseline_k"] == 0 and bounds["repeats"] == 3 and bounds["cores"] == 2
    assert bounds["busy_s"] == {"rollout": 1.8, "teacher": 3.4, "learner": 2.8}  # per-role medians
    assert bounds["overlap_bound"] == pytest.approx(8.0 / 3.4)
    assert bounds["resource_bound"] == pytest.approx(2.0)

    sync, k2 = result["rows"]
    assert (sync["mode"], sync["speedup"], sync["speedup_spread"]) == ("sync", 1.0, 0.0)
    assert sync["samples_per_s"] == 100.0 and sync["samples_per_s_spread"] == pytest.approx(0.2)
    assert sync["efficiency_resource"] == pytest.approx(0.5)
    assert sync["driver_cpu_s"] == 2.5  # the median repeat's: the simulator's calibration reads it
    assert k2["mode"] == "async" and k2["max_staleness"] == 2
    assert k2["speedup_all"] == pytest.approx([1.8, 1.9, 1.8])  # repeat r over sync's repeat r
    assert k2["speedup"] == pytest.approx(1.8) and k2["speedup_spread"] == pytest.approx(0.1 / 1.8)
    assert k2["samples_per_s"] == 180.0 and k2["samples_per_s_spread"] == pytest.approx(27.0 / 180.0)
    assert k2["efficiency_overlap"] == pytest.approx(1.8 / (8.0 / 3.4))
    assert k2["efficiency_resource"] == pytest.approx(0.9)
    assert k2["final_accuracy"] == 0.5 and k2["max_observed_staleness"] == 2
    assert k2["busy_s"] == {"rollout": 2.0, "teacher": 6.0, "learner": 3.0}

    report = pipeline_bench.format_report(result)
    assert "note:" not in report
    assert "resource-aware bound sum/max(max, sum/2) = 2.00x" in report and "2-core bound" in report
    assert [line.split()[:2] for line in report.splitlines()[-2:]] == [["sync", "0"], ["async", "2"]]


def test_assemble_without_sync_says_so_and_uses_the_smallest_k():
    runs = {4: [summary((2.0, 2.0, 2.0), 120.0, 4)], 1: [summary((2.0, 4.0, 2.0), 100.0, 1)]}
    result = pipeline_bench.assemble(runs, cores=2)
    assert result["bounds"]["baseline_k"] == 1
    assert result["bounds"]["resource_bound"] == pytest.approx(8.0 / 4.0)
    assert [r["speedup"] for r in result["rows"]] == pytest.approx([1.2, 1.0])
    report = pipeline_bench.format_report(result)
    assert "no sync (k=0) mode was run" in report and "vs k=1" in report


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pipeline_bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cores_default_is_the_detected_affinity_and_counts_must_be_positive():
    assert parse().cores == pipeline_bench.available_cores() >= 1
    assert parse("--cores", "3").cores == 3
    for flag in ("--cores", "--repeats"):
        with pytest.raises(SystemExit):
            parse(flag, "0")


def test_bench_interleaves_repeats_and_writes_json_and_png(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_training(cfg):
        calls.append((cfg.pipeline.max_staleness, cfg.run.dir, cfg.pipeline.steps, cfg.pipeline.eval_every))
        k = cfg.pipeline.max_staleness
        return summary(SYNC_BUSY if k == 0 else (2.0, 5.0, 3.0), 100.0 * (1 + k / 2) + len(calls), k)

    monkeypatch.setattr(runner, "run_training", fake_training)
    out = tmp_path / "bench"
    result = pipeline_bench.run_pipeline_bench(parse("--quick", "--staleness", "0,2", "--repeats", "2",
                                                     "--cores", "2", "--out", str(out)))
    steps = pipeline_bench.QUICK_STEPS
    assert calls == [(0, str(out / "k0-r0"), steps, 0), (2, str(out / "k2-r0"), steps, 0),
                     (0, str(out / "k0-r1"), steps, 0), (2, str(out / "k2-r1"), steps, 0)]
    assert json.loads((out / "bench.json").read_text()) == result
    assert result["bounds"]["resource_bound"] == pytest.approx(2.0)
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vs sync" in capsys.readouterr().out
