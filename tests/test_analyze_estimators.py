"""`asyncopd analyze-estimators`: table, JSON and plot, and the expected qualitative findings."""

import argparse
import json

import pytest

from asyncopd.bench import estimator_analysis as analyze

REQUIRED = {"estimator", "K", "M", "staleness", "bias", "variance"}


def run(*argv: str) -> list[dict]:
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    return analyze.run(parser.parse_args(list(argv)))


def test_quick_synthetic_run_writes_json_and_png(tmp_path, capsys):
    rows = run("--quick", "--out", str(tmp_path))
    saved = json.loads((tmp_path / "estimators.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert all(REQUIRED <= set(r) for r in saved)
    png = (tmp_path / "estimators.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    out = capsys.readouterr().out
    assert "mc_rkl" in out and "noise flr" in out

    def row(estimator, staleness, **match):
        found = [r for r in rows if r["estimator"] == estimator and r["staleness"] == staleness
                 and all(r[k] == v for k, v in match.items())]
        assert len(found) == 1, (estimator, staleness, match)
        return found[0]

    # sparse estimators are deterministic (no variance) and biased; the bias does not depend on
    # staleness when the support is the teacher's (pi_old is never read: the same ops on the same values, exact)
    for k in (1, 8):
        a, b = row("sparse_rkl[teacher]", 0.0, K=k), row("sparse_rkl[teacher]", 1.0, K=k)
        assert a["variance"] == 0 and a["bias"] == b["bias"] and a["relative_bias"] > 0.1
    # importance-corrected MC stays within its noise floor when stale; dropping the ratio does not. The noise
    # floor is the standard error sqrt(variance / R) of the mean estimate: 3 of them, a statistical bound
    # (fixed seed), not a rounding one
    stale_mc = row("mc_rkl", 1.0, M=8)
    assert stale_mc["bias"] < 3 * stale_mc["bias_noise_floor"]
    no_is = row("mc_rkl[no-IS]", 1.0, M=8)
    assert no_is["bias"] > 3 * no_is["bias_noise_floor"]
    # more samples, less variance: 1/4 of it in expectation for 4x the samples, 0.5 leaves room for sampling noise
    assert row("mc_rkl", 1.0, M=8)["variance"] < 0.5 * row("mc_rkl", 1.0, M=2)["variance"]
    # staleness is measured as KL(pi_old || pi_theta): zero on-policy
    assert row("mc_rkl", 0.0, M=2)["staleness_kl"] == 0 < row("mc_rkl", 1.0, M=2)["staleness_kl"]


def test_too_few_replicates_is_a_clear_error():
    with pytest.raises(ValueError, match="replicates"):
        run("--replicates", "1", "--positions", "2", "--vocab", "16", "--k", "1", "--m", "2", "--staleness", "0")


def test_embedded_source_uses_checkpoint_logits(tmp_path):
    """Tiny random student/teacher checkpoints stand in for the prepared ones."""
    build = pytest.importorskip("asyncopd.model.build")
    from asyncopd.config.schema import ModelSpec
    from asyncopd.data.tokenizer import VOCAB

    spec = ModelSpec(num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=2, intermediate_size=32)
    for name, seed in (("teacher", 1), ("student", 2)):
        build.save_checkpoint(build.build_model(spec, len(VOCAB), seed), tmp_path / name)
    rows = run("--source", "embedded", "--quick", "--prompts", "4", "--artifacts-dir", str(tmp_path),
               "--out", str(tmp_path / "out"))
    assert rows and all(r["source"] == "embedded" and r["vocab"] == len(VOCAB) for r in rows)
    assert {r["K"] for r in rows if r["name"] == "sparse_rkl"} == {1, 8}
