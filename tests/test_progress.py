"""progress.Progress: plain lines at most every interval on a non-terminal, with counts, percent and ETA."""
import io

from progress import Progress


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress(total=10, desc="train", unit="step", stream=out, interval=0.0) as bar:
        for _ in range(10):
            bar.update(1, loss="0.5")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[4].startswith("train: 5/10 step (50%)") and "ETA" in lines[4] and lines[4].endswith("loss 0.5")


def test_interval_limits_the_lines():
    out = io.StringIO()
    bar = Progress(total=None, desc="budget", unit="s", stream=out, interval=3600.0)
    for n in range(100):
        bar.set(n)
    assert out.getvalue() == ""  # nothing until the interval has passed
    assert bar.line().startswith("budget: 99 s")


def test_disabled_is_silent():
    out = io.StringIO()
    Progress(total=3, stream=out, interval=0.0, enabled=False).update(3)
    assert out.getvalue() == ""
