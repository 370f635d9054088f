"""Training metrics on rank 0: one CSV row per logged step, mirrored to TensorBoard when the
`tensorboard` package is installed (`pip install tensorboard`; view with
`tensorboard --logdir OUTPUT_DIR/tensorboard`)."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path


def _tensorboard_writer(folder: Path):
    """A SummaryWriter for `folder`, or None with the reason when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's wrapper needs the tensorboard package
        return None, str(e).splitlines()[0]
    return SummaryWriter(log_dir=str(folder)), None


class MetricsLog:
    """CSV (always) + TensorBoard (optional) metrics writer. Columns are fixed at creation.

    `append=True` continues an existing CSV (a resumed run) without writing the header again.
    """

    def __init__(self, out_dir, columns, append=False, tensorboard=True):
        self.columns = list(columns)
        path = Path(out_dir) / "metrics.csv"
        has_rows = append and path.exists() and path.stat().st_size > 0
        self.file = open(path, "a" if append else "w", newline="")
        self.csv = csv.writer(self.file)
        if not has_rows:
            self.csv.writerow(self.columns)
        self.tb, self.tb_missing = (None, "disabled")
        if tensorboard:
            self.tb, self.tb_missing = _tensorboard_writer(Path(out_dir) / "tensorboard")

    def write(self, row: dict) -> None:
        """One row; keys must be the columns. Numbers go to TensorBoard against `row['step']`."""
        missing = set(self.columns) - set(row)
        if missing:
            raise KeyError(f"metrics row lacks {sorted(missing)}")
        self.csv.writerow([row[c] for c in self.columns])
        self.file.flush()
        if self.tb is not None:
            step = int(row["step"])
            for key in self.columns:
                if key == "step":
                    continue
                try:
                    value = float(row[key])
                except (TypeError, ValueError):
                    continue
                self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            try:
                self.tb.close()
            except Exception as e:  # noqa: BLE001 - never lose a finished run over its TB file
                warnings.warn(f"closing TensorBoard writer failed: {e}", RuntimeWarning)
