"""small_experiments' cross-validation training loops report their progress (progress.Progress, issue 12)."""
import numpy as np
import pytest

import small_experiments as se
from data_loader import synthetic_mnist


class RecordingProgress:
    """Stands in for progress.Progress: records the total, the description and every update."""

    made = []

    def __init__(self, total=None, desc="", unit="step", **kwargs):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        RecordingProgress.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1, **postfix):
        self.n += n


@pytest.mark.parametrize("train", [se.train_elementary, se.train_elementary_handwritten])
def test_cross_validation_reports_every_step(train, monkeypatch):
    monkeypatch.setattr(se, "Progress", RecordingProgress)
    RecordingProgress.made = []
    splits = se.splits_of(synthetic_mnist())
    weights = train(np.array([0.0, 1.0, 2.0]), splits.train_x, splits.train_y, 0.01, 3, 1e-3, 7)
    assert weights.shape == (3, se.N_WEIGHTS)
    bar, = RecordingProgress.made
    assert (bar.total, bar.n, bar.unit) == (7, 7, "step")
    assert "cross-validation" in bar.desc and "3 models" in bar.desc


def test_cross_validation_progress_prints_plain_lines_off_a_terminal(capsys):
    with se.cv_progress(4, 2) as bar:
        bar.interval = 0.0              # every update prints a line (a CI log is not a terminal)
        for _ in range(4):
            bar.update(1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("cross-validation (2 models): 4/4 step (100%)")
