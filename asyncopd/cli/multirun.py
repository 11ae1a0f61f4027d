"""`asyncopd train -m`: a Hydra multirun, one OPD run per point of the sweep, through Hydra's own sweeper and
launchers: the basic launcher runs the points here one after another, `hydra/launcher=submitit_slurm` submits each
as a Slurm job (hydra-submitit-launcher). Every point is composed and validated before the first one starts, a
point that fails records why (`error.txt`) without stopping the others, and the sweep ends with its study table."""

import sys
import traceback
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from asyncopd.core.errors import ConfigError

SWEEP_DIR_KEY = "hydra.sweep.dir"


def _task_overrides(overrides: list[str]) -> list[str]:
    """The overrides that shape the runs: not Hydra's own (`hydra.*`, `hydra/launcher=...`)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


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
            load_config(point)
        except ConfigError as e:
            bad.append(f"run {i} ({' '.join(point) or 'defaults'}): {e}")
    if bad:
        raise ConfigError(f"{len(bad)} of the sweep's {len(points)} runs cannot run, nothing started:\n"
                          + "\n".join(bad))


def _job(raw: DictConfig) -> dict:
    """One point of the sweep, wherever the launcher runs it; its run directory is Hydra's job directory."""
    from hydra.core.hydra_config import HydraConfig

    from asyncopd.pipeline.run import run_training
    from asyncopd.validation.rules import validate

    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = validate(OmegaConf.to_object(raw))
        cfg.run.dir = cfg.run.dir or str(out)
        return run_training(cfg)
    except Exception as e:  # one failed point must not lose the sweep: the study lists it with the reason
        (out / "error.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        print(f"asyncopd: run in {out} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}


def run_multirun(overrides: list[str]) -> int:
    """Validate the sweep, run it with Hydra (`hydra.main`, the launcher the overrides choose), print its study.
    Exit 0 when every run finished, 1 when any failed (their rows say why)."""
    import hydra

    from asyncopd.bench.study import gather, print_study
    from asyncopd.config.load import config_dir, register_schema

    points = sweep_points(overrides)
    check_points(points)
    given = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{SWEEP_DIR_KEY}=")]
    sweep_dir = given[-1] if given else f"runs/sweep-{datetime.now():%Y%m%d-%H%M%S}"
    print(f"asyncopd: sweep of {len(points)} runs into {sweep_dir}", flush=True)
    register_schema()
    argv = sys.argv
    sys.argv = [argv[0], "--multirun", *[o for o in overrides if not o.startswith(f"{SWEEP_DIR_KEY}=")],
                f"{SWEEP_DIR_KEY}={sweep_dir}"]
    try:
        hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_job)()
    finally:
        sys.argv = argv
    rows = gather(sweep_dir)
    print_study(rows, sweep_dir)
    return 1 if any(r["status"] != "ok" for r in rows) or len(rows) < len(points) else 0
