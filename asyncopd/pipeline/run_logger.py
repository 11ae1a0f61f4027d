"""TensorBoard scalars and histograms, a live progress bar, and the run's summary table."""

import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, progress: bool):
        self.run_dir = run_dir
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, desc="opd", unit="step", disable=not progress, dynamic_ncols=True)
        self.staleness: Counter = Counter()
        self.token_staleness: Counter = Counter()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def step(self, step: int, values: dict[str, float], staleness: Counter, token_staleness: Counter | None = None
             ) -> None:
        """Scalars, and the cumulative staleness histograms: by sample (its oldest token's lag) and by token."""
        self.staleness.update(staleness)
        self.token_staleness.update(token_staleness or {})
        self.scalars(step, values)
        if self.writer is not None and staleness:
            self.writer.add_histogram("staleness/histogram", _expand(self.staleness), step, bins="auto")
        if self.writer is not None and self.token_staleness:
            self.writer.add_histogram("staleness/token_histogram", _expand(self.token_staleness), step, bins="auto")
        shown = {k: values[k] for k in ("loss", "kl", "eval/pass@1", "throughput/samples_per_s") if k in values}
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(1)

    def summary(self, rows: dict[str, object]) -> str:
        self.bar.close()
        (self.run_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
        width = max(len(k) for k in rows)
        lines = ["", "AsyncOPD run summary", "-" * (width + 24)]
        lines += [f"{k:<{width}}  {_fmt(v)}" for k, v in rows.items()]
        text = "\n".join(lines)
        if self.writer is not None:
            self.writer.add_text("summary", "```\n" + text + "\n```")
            self.writer.flush()
        return text

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _expand(counts: Counter) -> list[int]:
    import numpy as np

    return np.repeat(np.array(list(counts.keys())), np.array(list(counts.values())))


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
