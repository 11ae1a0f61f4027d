"""`asyncopd study DIR`: a sweep's runs in one table and one figure. A run is a directory holding its
`summary.json` (finished), `error.txt` (failed: `asyncopd train -m` records why) or Hydra's `.hydra/` (started,
not finished); its label is the overrides that differ between the runs."""

import json
from pathlib import Path

import yaml

from asyncopd.bench.report import write_report
from asyncopd.bench.table import format_table
from asyncopd.core.errors import ConfigError

ROLES = ("rollout", "teacher", "learner")


def _overrides(run: Path) -> list[str]:
    hydra = run / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(hydra.read_text()) or []) if hydra.exists() else []


def _row(run: Path, root: Path) -> dict:
    row = {"run": str(run.relative_to(root)) if run != root else run.name, "overrides": _overrides(run)}
    if (run / "summary.json").exists():
        s = json.loads((run / "summary.json").read_text())
        wall = max(s["train_wall_s"], 1e-9)
        lags = {int(k): v for k, v in s["staleness_histogram"].items()}
        total = max(sum(lags.values()), 1)
        return {**row, "status": "ok", "samples_per_s": s["samples_per_s"], "tokens_per_s": s["tokens_per_s"],
                "max_staleness": s["max_staleness"], "initial_accuracy": s["initial_accuracy"],
                "final_accuracy": s["final_accuracy"], "steps": s["steps"],
                "staleness_share": {lag: n / total for lag, n in sorted(lags.items())},
                "busy_share": {role: s[f"busy_{role}_s"] / wall for role in ROLES}, "ray_nodes": s.get("ray_nodes")}
    if (run / "error.txt").exists():
        return {**row, "status": "failed", "error": (run / "error.txt").read_text().split("\n", 1)[0]}
    return {**row, "status": "incomplete"}


def gather(directory: str | Path) -> list[dict]:
    """Every run under `directory` (itself included), in sweep order (Hydra's job number, then name)."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{directory}: no such directory (pass a sweep directory, e.g. runs/sweep-<timestamp>)")
    runs = ({p.parent for name in ("summary.json", "error.txt") for p in root.rglob(name)}
            | {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")})
    if not runs:
        raise ConfigError(f"{directory}: holds no runs (directories with summary.json, error.txt or .hydra/)")
    number = lambda r: int(r.name) if r.name.isdigit() else 1 << 30  # noqa: E731
    return [_readable(r, root) for r in sorted(runs, key=lambda r: (number(r), str(r)))]


def _readable(run: Path, root: Path) -> dict:
    """A run's row, or one saying why its files cannot be read (another tool's summary.json, an older layout)."""
    try:
        return _row(run, root)
    except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError) as e:
        return {"run": str(run.relative_to(root)), "overrides": [], "status": "unreadable",
                "error": f"{type(e).__name__}: {e} (not an asyncopd run's summary.json?)"}


def labels(rows: list[dict]) -> list[str]:
    """Each run by the overrides that vary across the sweep (all of them if none vary), else its directory."""
    keys = {o.split("=", 1)[0] for r in rows for o in r["overrides"]}
    value = lambda r, k: next((o for o in r["overrides"] if o.split("=", 1)[0] == k), f"{k}=<default>")  # noqa: E731
    varying = [k for k in sorted(keys) if len({value(r, k) for r in rows}) > 1] or sorted(keys)
    return [" ".join(value(r, k) for k in varying) if r["overrides"] else r["run"] for r in rows]


def _cells(row: dict, label: str) -> dict:
    if row["status"] != "ok":
        return {"label": label, "sps": "-", "tps": "-", "acc": "-", "k": "-", "lag": "-", "busy": "-",
                "status": row["status"] + (f": {row['error']}" if row.get("error") else "")}
    return {"label": label, "sps": f"{row['samples_per_s']:.1f}", "tps": f"{row['tokens_per_s']:.0f}",
            "acc": f"{row['initial_accuracy']:.3f} -> {row['final_accuracy']:.3f}"
            if row["final_accuracy"] is not None else "-",
            "k": str(row["max_staleness"]),
            "lag": " ".join(f"{lag}:{share:.0%}" for lag, share in row["staleness_share"].items()),
            "busy": "/".join(f"{row['busy_share'][role]:.0%}" for role in ROLES), "status": "ok"}


def print_study(rows: list[dict], out: str | Path) -> None:
    """The table on stdout, study.json and study.png in `out`."""
    names = labels(rows)
    columns = [("label", "run", ""), ("sps", "samples/s", ""), ("tps", "tokens/s", ""),
               ("acc", "pass@1 start -> end", ""), ("k", "k", ""), ("lag", "staleness (lag: share)", ""),
               ("busy", "busy r/t/l", ""), ("status", "status", "")]
    print(format_table([_cells(r, n) for r, n in zip(rows, names, strict=True)], columns))
    print("busy r/t/l: share of the training wall time rollout, teacher and learner each worked")
    write_report(str(out), "study", {"runs": [{**r, "label": n} for r, n in zip(rows, names, strict=True)]},
                 lambda path: _plot([r for r in rows if r["status"] == "ok"],
                                    [n for r, n in zip(rows, names, strict=True) if r["status"] == "ok"], path))


def _plot(rows: list[dict], names: list[str], path: Path) -> None:
    """Throughput, accuracy, staleness and per-role busy share, one bar (group) per finished run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(16, 1.5 + 0.45 * max(len(rows), 2)), sharey=True)
    axes[0].barh(y, [r["samples_per_s"] for r in rows])
    axes[0].set_xlabel("samples/s")
    axes[1].barh(y, [r["final_accuracy"] or 0 for r in rows], label="end")
    axes[1].plot([r["initial_accuracy"] or 0 for r in rows], y, "k|", markersize=14, label="start")
    axes[1].set_xlabel("pass@1")
    axes[1].legend(loc="lower right", fontsize=7)
    left = np.zeros(len(rows))
    for lag in sorted({lag for r in rows for lag in r["staleness_share"]}):
        share = np.array([r["staleness_share"].get(lag, 0.0) for r in rows])
        axes[2].barh(y, share, left=left, label=f"lag {lag}")
        left += share
    axes[2].set_xlabel("share of samples by staleness")
    axes[2].legend(loc="lower right", fontsize=7)
    for i, role in enumerate(ROLES):
        axes[3].barh(y + (i - 1) * 0.27, [r["busy_share"][role] for r in rows], height=0.27, label=role)
    axes[3].set_xlabel("busy share of wall time")
    axes[3].legend(loc="lower right", fontsize=7)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
