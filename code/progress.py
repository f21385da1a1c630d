"""Progress reports for loops longer than a few seconds: a tqdm bar with ETA on a terminal, else (CI logs,
files) one plain line about every LINE_INTERVAL seconds.

    with Progress(total=3000, desc="hypernetwork", unit="step") as bar:
        for step in range(3000):
            ...
            bar.update(1, loss=f"{loss:.3f}")      # or bar.set(n) for budgets counted in seconds
"""
import sys
import time

LINE_INTERVAL = 10.0  # seconds between plain progress lines when the output is not a terminal


class Progress:
    """A progress counter over `total` units (None: unknown), shown on stream (default stderr); position: the
    bar's row when several bars are shown at once (plain lines carry desc instead)."""

    def __init__(self, total=None, desc="", unit="step", stream=None, interval=LINE_INTERVAL, enabled=True,
                 position=None):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = sys.stderr if stream is None else stream
        self.n, self.start = 0, time.perf_counter()
        self._last_line, self._postfix, self._bar = self.start, {}, None
        self.enabled = enabled
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is in requirements.txt; plain lines are the fallback
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                                 leave=False, position=position)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n=1, **postfix):
        """Count n more units done; postfix values are shown beside the count."""
        self.set(self.n + n, **postfix)

    def set(self, n, **postfix):
        """Set the units done to n (e.g. seconds of a time budget)."""
        if not self.enabled:
            return
        delta, self.n = n - self.n, n
        self._postfix = postfix or self._postfix
        if self._bar is not None:
            self._bar.update(delta)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now=None):
        """The plain progress line: 'desc: n/total unit (p%), elapsed s, ETA s, postfix'."""
        elapsed = (time.perf_counter() if now is None else now) - self.start
        parts = [f"{self.desc}: {self.n:g}" + (f"/{self.total:g}" if self.total else "") + f" {self.unit}"]
        if self.total:
            fraction = min(self.n / self.total, 1.0)
            parts[0] += f" ({100 * fraction:.0f}%)"
            if fraction > 0:
                parts.append(f"ETA {elapsed * (1 - fraction) / fraction:.0f} s")
        parts.insert(1, f"{elapsed:.0f} s")
        parts += [f"{k} {v}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
