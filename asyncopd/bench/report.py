"""What every benchmark leaves behind with `--out`: its figures as JSON and a box plot of its samples as PNG."""

import json
from pathlib import Path


def box_plot(samples: list[list[float]], labels: list[str], xlabel: str, title: str, path: Path,
             whis: tuple[float, float] = (0, 100), log: bool = False) -> None:
    """One horizontal box per label (box: quartiles, whiskers: the `whis` percentiles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.boxplot(samples, orientation="horizontal", whis=whis, showfliers=False)
    ax.set_yticks(range(1, len(labels) + 1), labels)
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str, name: str, saved: dict, plot) -> None:
    """`<out>/<name>.json` from `saved` and `<out>/<name>.png` by `plot(path)`; says where."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(saved, indent=2))
    plot(directory / f"{name}.png")
    print(f"wrote {directory / f'{name}.json'} and {directory / f'{name}.png'}")
