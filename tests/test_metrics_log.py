"""The metrics log: CSV rows (fresh and appended on resume) and the optional TensorBoard mirror."""
import csv
import sys
import types

from hvfm import metrics_log
from hvfm.metrics_log import MetricsLog

COLS = ["step", "loss", "lr", "note"]


def rows(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_csv_fresh_then_appended(tmp_path):
    log = MetricsLog(tmp_path, COLS, tensorboard=False)
    log.write({"step": 1, "loss": "2.5", "lr": "1e-4", "note": "x"})
    log.close()
    log = MetricsLog(tmp_path, COLS, append=True, tensorboard=False)  # resumed run: no 2nd header
    log.write({"step": 2, "loss": "2.0", "lr": "1e-4", "note": "y"})
    log.close()
    assert rows(tmp_path / "metrics.csv") == [COLS, ["1", "2.5", "1e-4", "x"], ["2", "2.0", "1e-4", "y"]]
    log = MetricsLog(tmp_path, COLS, tensorboard=False)  # a new run starts the file over
    log.close()
    assert rows(tmp_path / "metrics.csv") == [COLS]


def test_row_missing_a_column_is_an_error(tmp_path):
    log = MetricsLog(tmp_path, COLS, tensorboard=False)
    try:
        log.write({"step": 1, "loss": 1.0})
    except KeyError as e:
        assert "lr" in str(e) and "note" in str(e)
    else:
        raise AssertionError("expected KeyError")
    finally:
        log.close()


def test_tensorboard_gets_numeric_columns(tmp_path, monkeypatch):
    seen = []

    class FakeWriter:
        def __init__(self, log_dir):
            seen.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            seen.append((tag, value, step))

        def close(self):
            seen.append(("closed",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = MetricsLog(tmp_path, COLS)
    log.write({"step": 7, "loss": "1.5", "lr": 3e-4, "note": "text is skipped"})
    log.close()
    assert seen == [("dir", str(tmp_path / "tensorboard")), ("train/loss", 1.5, 7),
                    ("train/lr", 3e-4, 7), ("closed",)]


def test_without_tensorboard_the_reason_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_log, "_tensorboard_writer", lambda folder: (None, "No module named 'tensorboard'"))
    log = MetricsLog(tmp_path, COLS)
    assert log.tb is None and "tensorboard" in log.tb_missing
    log.write({"step": 1, "loss": 1, "lr": 1, "note": ""})
    log.close()
    assert len(rows(tmp_path / "metrics.csv")) == 2
