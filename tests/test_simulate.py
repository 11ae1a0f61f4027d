"""`asyncopd simulate`: the discrete-event model against hand-computed pipelines, the admission rule, the long
tail, partial rollouts, calibration from a bench.json, and the command line."""

import json
from pathlib import Path

import pytest
import yaml

from asyncopd.bench.sim_model import QWEN3_1P7B, QWEN3_30B_A3B, GpuCosts, Lengths, MeasuredCosts
from asyncopd.bench.simulate import SimConfig, calibrate, simulate, splits
from asyncopd.cli.main import main
from asyncopd.core.errors import ConfigError

B = 8
CONST = Lengths(prompt_tokens=4, median_tokens=16, sigma=0)
# constant stage times per batch: rollout 2 s, teacher 3 s, learner 1 s, sync 0.5 s, each role on its own device
STAGES = MeasuredCosts(2 / B, 3 / B, 1 / B, sync_s=0.5)


def _intervals(result) -> list[float]:
    e = result.step_end_s
    return [b - a for a, b in zip(e, e[1:], strict=False)]


def test_sync_is_batch_over_the_sum_of_stages():
    r = simulate(SimConfig(B, 20, 0, CONST), STAGES)
    assert r.samples_per_s == pytest.approx(B / (2 + 3 + 1 + 0.5), rel=1e-12)
    assert dict(r.staleness) == {0: 20 * B}
    assert r.busy_s == pytest.approx({"rollout": 40.0, "teacher": 60.0, "learner": 20.0, "sync": 10.0})


def test_async_runs_at_the_slowest_stage_once_k_covers_the_cycle():
    # k=2: the teacher (3 s) sets the pace; the first step ends after one pass (6.5 s), every later one 3 s after
    r = simulate(SimConfig(B, 50, 2, CONST), STAGES)
    assert r.step_end_s[0] == pytest.approx(6.5)
    assert _intervals(r) == pytest.approx([3.0] * 49)
    assert r.samples_per_s == pytest.approx(50 * B / (6.5 + 3 * 49))
    # k=1: rollout of s+2 waits for sync of s, a cycle of 6.5 s over two steps: 3.25 s a step, not 3
    r1 = simulate(SimConfig(B, 50, 1, CONST), STAGES)
    assert sum(_intervals(r1)[10:40]) / 30 == pytest.approx(3.25)
    assert max(r1.staleness) == 1


def test_roles_on_shared_cores_split_them():
    # three 1 s stages on 2 shared cores: sync takes 3 s a step (one role at a time, full speed); async all three
    # run together at 2/3 speed: 1.5 s a step, the resource-aware bound sum / cores
    shared = MeasuredCosts(1 / B, 1 / B, 1 / B, shared_cores=2)
    assert simulate(SimConfig(B, 10, 0, CONST), shared).samples_per_s == pytest.approx(B / 3)
    r = simulate(SimConfig(B, 40, 2, CONST), shared)
    assert _intervals(r)[5:35] == pytest.approx([1.5] * 30)
    assert r.busy_s["teacher"] > r.work_s["teacher"] * 1.4  # contended: the role's wall time exceeds its work


def _gpu(teacher: int = 1, rollout: int = 2, learner: int = 1) -> GpuCosts:
    return GpuCosts(QWEN3_1P7B, QWEN3_30B_A3B, teacher, rollout, learner, mean_context=512 + 5300)


LONG = Lengths(prompt_tokens=512, median_tokens=4096, sigma=0.8, max_new_tokens=16384)


@pytest.mark.parametrize("partial", [False, True])
def test_admission_never_lets_staleness_exceed_k(partial):
    for k in (0, 1, 2, 4):
        r = simulate(SimConfig(16, 12, k, LONG, partial=partial), _gpu())
        assert max(r.staleness) <= k
        assert sum(r.staleness.values()) == r.samples
    # a teacher-bound pipeline uses all of its allowance: the bound is reached, not just respected
    teacher_bound = simulate(SimConfig(B, 30, 4, CONST), MeasuredCosts(1 / B, 5 / B, 1 / B))
    assert max(teacher_bound.staleness) == 4


def test_long_tail_makes_sync_slower_than_its_mean_length_estimate():
    tail = simulate(SimConfig(32, 8, 0, LONG), _gpu())
    mean = sum(tail.step_tokens) / tail.samples
    flat = simulate(SimConfig(32, 8, 0, Lengths(512, round(mean), 0, 16384)), _gpu())
    assert tail.tokens_per_s < 0.8 * flat.tokens_per_s  # the same tokens, but each round waits for its longest
    again = simulate(SimConfig(32, 8, 0, LONG), _gpu())
    assert (again.step_end_s, again.staleness) == (tail.step_end_s, tail.staleness)  # deterministic per seed
    assert simulate(SimConfig(32, 8, 0, LONG, seed=1), _gpu()).step_end_s != tail.step_end_s


def test_partial_rollouts_cut_the_tail():
    off = simulate(SimConfig(64, 24, 4, LONG), _gpu())
    on = simulate(SimConfig(64, 24, 4, LONG, partial=True), _gpu())
    assert on.deferred > 0 and off.deferred == 0
    assert on.work_s["rollout"] < 0.85 * off.work_s["rollout"]  # rounds end at the quantile, not the longest
    assert on.steady(6)[1] > 1.1 * off.steady(6)[1]
    assert max(on.staleness) <= 4
    # at k=0 nothing may be deferred (a carried sample would be a version old): partial changes nothing
    sync = [simulate(SimConfig(16, 6, 0, LONG, partial=p), _gpu()).step_end_s for p in (False, True)]
    assert sync[0] == sync[1]


def test_decode_closed_form_matches_a_step_by_step_sum():
    costs = GpuCosts(QWEN3_1P7B, QWEN3_30B_A3B, 1, 1, 1)
    bw = costs.gpu.hbm_gbps * 1e9 * costs.hbm_efficiency
    per_seq = 2 * QWEN3_1P7B.active_params / (costs.gpu.bf16_tflops * 1e12 * costs.decode_mfu)
    seqs = [(100, 7), (40, 3), (250, 12), (10, 0)]
    expected = sum(QWEN3_1P7B.forward_flops(c) for c, _ in seqs) / (costs.gpu.bf16_tflops * 1e12 * costs.prefill_mfu)
    for step in range(12):
        live = [c + step for c, n in seqs if n > step]
        expected += max(2 * QWEN3_1P7B.params / bw, len(live) * per_seq) + QWEN3_1P7B.kv_bytes_per_token * sum(
            live) / bw
    assert costs.engine_seconds(seqs) == pytest.approx(expected, rel=1e-12)


def _bench(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"bounds": {"cores": 2, "baseline_k": 0}, "rows": rows}))
    return path


def test_calibration_reproduces_the_sync_run(tmp_path):
    # 150 steps x 64 samples in 96 s, the roles' busy seconds adding up to the wall time
    busy = {"rollout": 36.0, "teacher": 30.0, "learner": 30.0}
    rows = [{"max_staleness": 0, "samples_per_s": 100.0, "train_wall_s": 96.0, "busy_s": busy},
            {"max_staleness": 2, "samples_per_s": 180.0, "train_wall_s": 53.3, "busy_s": busy}]
    result = calibrate(str(_bench(tmp_path, rows)), batch_size=64)
    sync, k2 = result["rows"]
    assert result["steps"] == 150
    assert sync["predicted_samples_per_s"] == pytest.approx(100.0, rel=1e-9)
    # async on 2 shared cores: the work (96 s) spread over both, plus the pipeline's fill
    assert k2["predicted_samples_per_s"] == pytest.approx(200.0, rel=0.02)
    assert k2["error"] == pytest.approx(k2["predicted_samples_per_s"] / 180 - 1)
    # other work taking half a core leaves the roles 1.5: 96 s of work in ~64 s
    loaded = calibrate(str(_bench(tmp_path, rows)), batch_size=64, background_cores=0.5)["rows"][1]
    assert loaded["predicted_samples_per_s"] == pytest.approx(150.0, rel=0.03)


def test_the_drivers_cpu_competes_with_the_roles_only_when_they_overlap(tmp_path):
    # the driver spent 12 s of CPU on the sync run's 9600 samples: 1.25 ms a sample beside 10 ms of role work
    busy = {"rollout": 36.0, "teacher": 30.0, "learner": 30.0}
    rows = [{"max_staleness": 0, "samples_per_s": 100.0, "train_wall_s": 96.0, "busy_s": busy, "driver_cpu_s": 12.0},
            {"max_staleness": 2, "samples_per_s": 180.0, "train_wall_s": 53.3, "busy_s": busy, "driver_cpu_s": 12.0}]
    result = calibrate(str(_bench(tmp_path, rows)), batch_size=64)
    sync, k2 = result["rows"]
    assert result["costs"]["driver_cpu_s_per_sample"] == pytest.approx(1.25e-3)
    # sync: one role busy at a time, the driver fits on the other core
    assert sync["predicted_samples_per_s"] == pytest.approx(100.0, rel=1e-9)
    # async: rate r with the roles' 10 ms and the driver's 1.25 ms a sample on 2 cores, r = 2 / 11.25 ms, less fill
    assert k2["predicted_samples_per_s"] == pytest.approx(2 / 11.25e-3, rel=0.03)
    assert k2["driver_cores"] == pytest.approx(1.25e-3 * k2["predicted_samples_per_s"])


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    (json.dumps({"bounds": {"cores": 2}, "rows": [{"max_staleness": 1, "samples_per_s": 1.0}]}), "sync run"),
    (json.dumps({"bounds": {"cores": 2}, "rows": [{"max_staleness": 0, "samples_per_s": -1.0, "train_wall_s": 1,
                                                   "busy_s": {"rollout": 1, "teacher": 1, "learner": 1}}]}),
     "positive"),
])
def test_bad_bench_json_is_a_config_error(tmp_path, capsys, content, message):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        calibrate(str(path))
    assert main(["simulate", "--calibrate", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("split", ["0,4,4", "1,4,4", "1,4", "a,b,c"])
def test_impossible_split_exits_2(capsys, split):
    assert main(["simulate", "--project", "paper", "--split", split]) == 2
    assert "--split" in capsys.readouterr().err


def test_cli_projects_the_paper_setting(tmp_path, capsys):
    assert len(splits(8)) == 21
    assert main(["simulate", "--project", "paper", "--steps", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "T/R/L" in out and "best split" in out and "paper split 1/4/3" in out
    saved = json.loads((tmp_path / "simulate.json").read_text())
    assert {r["split"] for r in saved["rows"]} == {"/".join(map(str, s)) for s in splits(8)}
    assert (tmp_path / "simulate.png").stat().st_size > 0


def test_paper_preset_matches_the_configs():
    root = Path(__file__).resolve().parents[1] / "configs"
    models = yaml.safe_load((root / "model/qwen3_1p7b_from_30b.yaml").read_text())
    for model, spec in ((QWEN3_1P7B, models["student"]), (QWEN3_30B_A3B, models["teacher"])):
        assert model.layers == spec["num_layers"]
        assert model.attn_width == spec["num_heads"] * spec["head_dim"]
        assert model.kv_bytes_per_token == spec["num_layers"] * 2 * spec["num_kv_heads"] * spec["head_dim"] * 2
    assert QWEN3_1P7B.params == pytest.approx(1.72e9, rel=0.01)
    assert (QWEN3_30B_A3B.params, QWEN3_30B_A3B.active_params) == pytest.approx((30.5e9, 3.35e9), rel=0.01)
    experiment = yaml.safe_load((root / "experiment/qwen3_1p7b_from_30b.yaml").read_text())
    assert experiment["pipeline"]["batch_size"] == 256  # --batch-size's default for --project paper
    assert yaml.safe_load((root / "rollout/sglang.yaml").read_text())["max_new_tokens"] == Lengths().max_new_tokens
