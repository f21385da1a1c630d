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


def test_non_terminal_cadence_is_one_line_per_interval(monkeypatch):
    """On a non-terminal (CI logs) with the default interval: one line about every LINE_INTERVAL seconds, however
    many updates arrive in between (a fake clock: 800 updates 0.125 s apart = 100 s)."""
    import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    out = io.StringIO()
    bar = Progress(total=800, desc="budget", unit="step", stream=out)
    assert progress.LINE_INTERVAL == 10.0 and bar._bar is None      # StringIO is not a terminal: no tqdm bar
    for _ in range(800):
        clock[0] += 0.125
        bar.update(1, valid="0.04")
    lines = out.getvalue().splitlines()
    assert lines == [f"budget: {80 * k}/800 step ({10 * k}%), {10 * k} s, ETA {100 - 10 * k} s, valid 0.04"
                     for k in range(1, 11)]


def test_terminal_gets_a_tqdm_bar_at_its_position():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    with Progress(total=5, desc="hyper", unit="step", stream=out, position=1) as bar:
        assert bar._bar is not None and bar._bar.pos in (1, -1)
        bar.update(5, valid="0.04")
    assert "hyper" in out.getvalue()
