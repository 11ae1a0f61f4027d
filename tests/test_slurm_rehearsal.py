"""The cluster path, rehearsed for real: a local Slurm cluster of two virtual nodes (slurm/local_cluster.sh: Debian's
slurmctld, slurmd and munge), the flagship sbatch script unchanged, multi-node Ray started by srun inside the job,
roles in placement groups on both Ray nodes, and a student that learns."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from asyncopd.model.prepare import run_prepare
from asyncopd.validation import load_config

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
# the rehearsal's sbatch options: CPU nodes (no GRES), one CPU per task; the script itself is the flagship's
REHEARSAL = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm():
    """A 2-node cluster on free ports, in a short temp dir of its own; torn down by the PIDs it recorded."""
    if os.geteuid() != 0 and not shutil.which("slurmctld"):
        pytest.skip("Slurm is not installed and installing it needs root")
    base = _free_port()
    env = {**os.environ, "ASYNCOPD_SLURMCTLD_PORT": str(base), "ASYNCOPD_SLURMD_PORT": str(_free_port())}
    directory = tempfile.mkdtemp(prefix="aslurm-")
    up = subprocess.run([str(SCRIPT), "up", "--nodes", "2", "--dir", directory], env=env, capture_output=True,
                        text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = f"{directory}/slurm.conf"
    yield env
    subprocess.run([str(SCRIPT), "down", "--dir", directory], env=env, timeout=120)
    shutil.rmtree(directory, ignore_errors=True)


def _sbatch(env: dict, out: Path, *args: str, wait: bool = True) -> tuple[int, str]:
    """(exit code, job log) of the flagship script as the rehearsal submits it (wait=False: (job id, ""))."""
    done = subprocess.run(["sbatch", *(["--wait"] if wait else ["--parsable", "--requeue"]), *REHEARSAL,
                           f"--output={out}", str(REPO / "slurm" / "asyncopd_70b.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=1200)
    if not wait:
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().split(";")[0]), ""
    return done.returncode, out.read_text() if out.exists() else done.stderr


def _until(what: str, ready, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not happen in {seconds:g} s"
        time.sleep(1)


def _job_gone(env: dict, job: int) -> bool:
    return str(job) not in subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True,
                                          text=True).stdout.split()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    run_prepare(load_config([f"model.artifacts_dir={root}"]), progress=False)  # the shipped tiny models
    return root


def test_the_flagship_script_runs_on_two_slurm_nodes_and_learns(slurm, artifacts, tmp_path):
    env = {**slurm, "ASYNCOPD_REPO": str(REPO), "ASYNCOPD_RUN_DIR": str(tmp_path / "run")}
    rc, log = _sbatch(env, tmp_path / "job.out", "experiment=cluster_tiny", f"model.artifacts_dir={artifacts}",
                      "run.progress=false")
    assert rc == 0, log[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    nodes = summary["ray_nodes"]
    assert {n for role in nodes.values() for n in role} == {"n1", "n2"}  # roles on both Slurm nodes' raylets
    assert set(nodes["rollout"]) == {"n1", "n2"}  # SPREAD: one engine per node
    assert summary["steps"] == 80 and summary["weight_sync"]["updates"] == 80
    assert summary["final_accuracy"] > summary["initial_accuracy"]  # the student learned


def test_a_config_that_cannot_run_stops_before_ray(slurm, tmp_path):
    env = {**slurm, "ASYNCOPD_REPO": str(REPO), "ASYNCOPD_RUN_DIR": str(tmp_path / "run")}
    rc, log = _sbatch(env, tmp_path / "job.out", "experiment=cluster_tiny", "learner.tp=2")  # the hf learner: tp=1
    assert rc != 0
    assert "validate refused the config" in log and "learner.tp=2" in log
    assert "Ray runtime started" not in log and not (tmp_path / "run" / "summary.json").exists()


def _submit_until_checkpoint(slurm: dict, artifacts: Path, tmp_path: Path, steps: int, every: int
                             ) -> tuple[dict, Path, int]:
    """(env, run dir, job id) of a tiny run submitted with --requeue, once its step-`every` checkpoint exists."""
    run = tmp_path / "run"
    env = {**slurm, "ASYNCOPD_REPO": str(REPO), "ASYNCOPD_RUN_DIR": str(run)}
    job, _ = _sbatch(env, tmp_path / "job.out", "experiment=cluster_tiny", f"model.artifacts_dir={artifacts}",
                     "run.progress=false", f"pipeline.steps={steps}", f"run.save_every={every}",
                     "pipeline.eval_every=0", wait=False)
    _until(f"step {every}'s checkpoint", lambda: (run / "checkpoints" / f"step-{every:08d}").is_dir())
    return env, run, job


def test_scancel_batch_checkpoints_the_step_and_exits_cleanly(slurm, artifacts, tmp_path):
    """SIGTERM to the batch script (what Slurm sends before the time limit with --signal=B:TERM@N) reaches the
    driver, which finishes its step, checkpoints it and exits 0."""
    env, run, job = _submit_until_checkpoint(slurm, artifacts, tmp_path, steps=1000, every=5)
    subprocess.run(["scancel", "--batch", "--signal=TERM", str(job)], env=env, check=True)
    _until("the job's end", lambda: _job_gone(env, job), seconds=300)
    log = (tmp_path / "job.out").read_text()
    assert "asyncopd: stopped by SIGTERM after step" in log
    step = int(log.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert step >= 5 and (run / "checkpoint").resolve().name == f"step-{step:08d}"
    assert (run / "checkpoint" / "learner_state.pt").exists()


def test_a_requeued_job_resumes_from_its_checkpoint(slurm, artifacts, tmp_path):
    """Requeued (a preemption), the job restarts the script, which finds the run's checkpoint and resumes there."""
    env, run, job = _submit_until_checkpoint(slurm, artifacts, tmp_path, steps=30, every=10)
    subprocess.run(["scontrol", "requeue", str(job)], env=env, check=True)
    # a requeued job waits ~2 minutes before it is eligible again: let it start now
    _until("the requeue", lambda: subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env,
                                                 capture_output=True).returncode == 0, seconds=60)
    _until("the requeued job's end", lambda: _job_gone(env, job) and (run / "summary.json").exists(), seconds=900)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30
    assert summary["weight_sync"]["updates"] < 30  # a resumed run syncs only the steps it trained itself


def test_a_hydra_sweep_runs_each_point_as_a_slurm_job(slurm, artifacts, tmp_path):
    """`asyncopd train -m ... hydra/launcher=submitit_slurm`: Hydra's Slurm launcher (hydra-submitit-launcher)
    submits the points as one job array on the real cluster, waits for them, and the sweep ends with its study."""
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "asyncopd.cli.main", "train", "-m", "pipeline.max_staleness=0,2",
                           "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1",
                           "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep}",
                           f"model.artifacts_dir={artifacts}", "run.progress=false", "pipeline.steps=10",
                           "pipeline.batch_size=16", "pipeline.eval_prompts=50", "pipeline.eval_every=0"],
                          env=slurm, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert len({s["slurm"]["array_job_id"] for s in summaries}) == 1  # one job array, a task per point
    assert [s["slurm"]["array_task_id"] for s in summaries] == ["0", "1"]
    assert [s["max_staleness"] for s in summaries] == [0, 2] and all(s["steps"] == 10 for s in summaries)
    assert all(s["weight_sync"]["updates"] == 10 for s in summaries)  # (learning on Slurm: the flagship test)
    study = json.loads((sweep / "study.json").read_text())["runs"]
    assert [r["label"] for r in study] == ["pipeline.max_staleness=0", "pipeline.max_staleness=2"]
    assert "pipeline.max_staleness=2" in done.stdout and (sweep / "study.png").exists()
