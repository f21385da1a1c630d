"""The CPU-time-budgeted training loop of the large experiments: step a method until its budget of CPU
seconds (or steps) runs out, evaluating the full validation and test sets every few steps, evaluation time
excluded from the method clock.

* `Budget`, `run_budgeted(...)`               step until `seconds` (CPU seconds of this process) or `iters`
                                              runs out; Curve.wall_seconds records wall time beside it.
* `BudgetedRun`, `run_interleaved(runs, s)`   the same loop, resumable; several methods in alternating
                                              slices of s CPU seconds.
* `time_to_reach(curve, level)`               first method time at which the validation loss <= level.
"""
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from common import check_finite


@dataclass(frozen=True)
class Budget:
    """Stop after `seconds` of method time or after `iters` steps (whichever is given; iters wins if both).

    Method time is CPU time of the stepping process (time.process_time, as the paper reports CPU time),
    so a busy machine changes the wall time, not the curves. A fixed `iters` gives reproducible numbers."""

    seconds: float = None
    iters: int = None
    eval_every: int = 10      # steps between evaluations of the full validation and test sets
    log_every: int = 100      # steps between progress lines (also evaluated)

    def __post_init__(self):
        if self.seconds is None and self.iters is None:
            raise ValueError("a Budget needs seconds or iters")

    def done(self, step, elapsed):
        if self.iters is not None:
            return step >= self.iters
        return elapsed >= self.seconds


class Curve(NamedTuple):
    """Losses at evaluation points: step (E,), seconds = CPU seconds of method time (E,), valid (E,),
    test (E,), wall_seconds = wall-clock seconds of method time (E,), recorded beside the CPU clock."""

    step: np.ndarray
    seconds: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    wall_seconds: np.ndarray = None


class BudgetedRun:
    """A resumable budgeted loop: state = step_fn(state, i) for i = 0, 1, ... while the budget lasts.

    evaluate(state) -> (valid, test) runs at step 0, every eval_every / log_every steps and at the end
    (curve()). The method clock (`elapsed`) counts the CPU time of step_fn only (time.process_time of this
    process; `wall` its wall-clock time): evaluations (full-set forward passes) are excluded.
    advance(until) stops early once the method clock reaches `until` CPU seconds, so several methods can be
    run in alternating slices."""

    def __init__(self, state, step_fn, evaluate, budget, name="", log=print):
        self.state, self.step_fn, self.evaluate, self.budget = state, step_fn, evaluate, budget
        self.name, self.log = name, log
        self.i, self.elapsed, self.wall = 0, 0.0, 0.0
        self._steps, self._seconds, self._wall, self._valid, self._test = [], [], [], [], []
        self._record()

    def _record(self):
        valid, test = self.evaluate(self.state)
        check_finite(valid, self.i, f"{self.name} validation loss".strip())
        self._steps.append(self.i)
        self._seconds.append(self.elapsed)
        self._wall.append(self.wall)
        self._valid.append(float(valid))
        self._test.append(float(test))
        return valid, test

    @property
    def finished(self):
        return self.budget.done(self.i, self.elapsed)

    def advance(self, until=float("inf")):
        """Take steps until the budget is used or the method clock reaches `until` CPU seconds."""
        while not self.finished and self.elapsed < until:
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            self.state = self.step_fn(self.state, self.i)
            self.elapsed += time.process_time() - start_cpu
            self.wall += time.perf_counter() - start_wall
            self.i += 1
            if self.i % self.budget.log_every == 0:
                valid, test = self._record()
                if self.log:
                    self.log(f"{self.name:>10s} step {self.i:6d}  {self.elapsed:7.1f} s CPU ({self.wall:.1f} s wall)  "
                             f"valid {valid:.5f}  test {test:.5f}")
            elif self.i % self.budget.eval_every == 0:
                self._record()
        return self

    def curve(self):
        """The recorded Curve (evaluating the current state first if it was not evaluated yet)."""
        if self._steps[-1] != self.i:
            self._record()
        return Curve(np.array(self._steps), np.array(self._seconds), np.array(self._valid), np.array(self._test),
                     np.array(self._wall))


def run_budgeted(state, step_fn, evaluate, budget, name="", log=print):
    """Run state = step_fn(state, i) for i = 0, 1, ... until the budget is used; return (state, Curve).

    evaluate(state) -> (valid, test) is called at step 0, every eval_every / log_every steps and at the end.
    The clock counts step_fn CPU time only: evaluations (full-set forward passes) are excluded."""
    run = BudgetedRun(state, step_fn, evaluate, budget, name, log).advance()
    return run.state, run.curve()


def run_interleaved(runs, slice_seconds):
    """Advance several BudgetedRuns in turn, slice_seconds of method (CPU) time each, until all are finished."""
    until = slice_seconds
    while not all(run.finished for run in runs):
        for run in runs:
            run.advance(until)
        until += slice_seconds
    return [run.curve() for run in runs]


def time_to_reach(curve, level):
    """First method time (CPU s) at which the validation curve is <= level, or None if it never is."""
    hits = np.nonzero(curve.valid <= level)[0]
    return float(curve.seconds[hits[0]]) if len(hits) else None
