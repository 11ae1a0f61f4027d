"""`asyncopd train -m`: a Hydra multirun, one OPD run per point of the sweep, through Hydra's own sweeper and
launchers: the basic launcher runs the points here one after another, `hydra/launcher=submitit_slurm` submits each
as a Slurm job (hydra-submitit-launcher). Every point is composed and validated before the first one starts, a
point that fails records why (`error.txt`) without stopping the others, and the sweep ends with its study table."""

import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from asyncopd.core.errors import ConfigError, Preempted

SWEEP_DIR_KEY = "hydra.sweep.dir"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _task_overrides(overrides: list[str]) -> list[str]:
    """The overrides that shape the runs: not Hydra's own (`hydra.*`, `hydra/launcher=...`)."""
    return [o for o in overrides if not _key(o).startswith(("hydra.", "hydra/"))]


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Each run's overrides, as Hydra's basic sweeper expands them (cartesian product of the `a,b` lists)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(_task_overrides(overrides))
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as e:
        raise ConfigError(f"bad sweep override: {e}") from None


def check_points(points: list[list[str]]) -> None:
    """Compose and validate every point before any starts: a bad one would otherwise fail hours into a sweep."""
    from asyncopd.validation import load_config

    bad = []
    for i, point in enumerate(points):
        try:
            if load_config(point).run.dir:
                raise ConfigError("run.dir is set, but a sweep's runs each go to <hydra.sweep.dir>/<job number>: "
                                  "drop run.dir (set hydra.sweep.dir=DIR to choose where the sweep goes)")
        except ConfigError as e:
            bad.append(f"run {i} ({' '.join(point) or 'defaults'}): {e}")
    if bad:
        raise ConfigError(f"{len(bad)} of the sweep's {len(points)} runs cannot run, nothing started:\n"
                          + "\n".join(bad))


def _job(raw: DictConfig) -> dict:
    """One point of the sweep, wherever the launcher runs it; its run directory is Hydra's job directory."""
    from hydra.core.hydra_config import HydraConfig

    from asyncopd.pipeline.run import run_training

    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = OmegaConf.to_object(raw)  # run_training validates it (with this machine's checks)
        cfg.run.dir = str(out)
        return run_training(cfg)
    except Preempted as e:  # SIGTERM: this point checkpointed; the sweep stops too (the launcher would go on)
        (out / "error.txt").write_text(f"Preempted: {e}\n")
        raise SystemExit(f"asyncopd: {e}; the sweep stopped there") from None
    except Exception as e:  # one failed point must not lose the sweep: the study lists it with the reason
        (out / "error.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        print(f"asyncopd: run in {out} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}


def run_multirun(overrides: list[str]) -> int:
    """Validate the sweep, run it with Hydra (`hydra.main`, the launcher the overrides choose), print its study.
    Exit 0 when every run finished, 1 when any failed or did not run (the study's rows say which and why)."""
    import hydra

    from asyncopd.bench.study import gather, print_study
    from asyncopd.config.load import config_dir, register_schema, sweep_dir

    points = sweep_points(overrides)
    check_points(points)
    # resolved once (a ${now:...} in it) with Hydra's own overrides checked, and passed to Hydra as that
    directory = sweep_dir(points[0] + [o for o in overrides if o not in _task_overrides(overrides)])
    if Path(directory).is_dir() and any(Path(directory).iterdir()):
        raise ConfigError(f"{SWEEP_DIR_KEY}={directory} already holds files: a sweep writes its runs into "
                          "<dir>/0, <dir>/1, ..., so pick a new directory (`asyncopd study` reads the old one)")
    print(f"asyncopd: sweep of {len(points)} runs into {directory}", flush=True)
    register_schema()
    argv, stopped = sys.argv, None
    sys.argv = [argv[0], "--multirun", *[o for o in overrides if _key(o) != SWEEP_DIR_KEY],
                f"{SWEEP_DIR_KEY}={directory}"]
    try:
        hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_job)()
    except SystemExit as e:  # a launcher's error (Hydra exits 1 after printing it) or a SIGTERM: report the sweep
        stopped = e
    finally:
        sys.argv = argv
    rows = gather(directory) if Path(directory).is_dir() else []
    if rows:
        print_study(rows, directory)
    if stopped is not None and stopped.code not in (None, 0):
        print(stopped.code if isinstance(stopped.code, str) else "asyncopd: the sweep stopped early", file=sys.stderr)
    complete = len(rows) == len(points) and all(r["status"] == "ok" for r in rows)
    return 0 if complete else 1
