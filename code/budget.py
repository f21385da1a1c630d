"""The CPU-time-budgeted training loop of the large experiments: step a method until its budget of CPU
seconds (or steps) runs out, evaluating the full validation and test sets every few steps, evaluation time
excluded from the method clock.

* `Budget`, `run_budgeted(...)`               step until `seconds` (CPU seconds of this process) or `iters`
                                              runs out; Curve.wall_seconds records wall time beside it.
* `BudgetedRun`, `run_interleaved(runs, s)`   the same loop, resumable; several methods in alternating
                                              slices of s CPU seconds, in this process.
* `run_parallel(runs, jobs)`                  each run in its own forked process (at most `jobs` at once, one
                                              BLAS thread each); the same curves and final states.
* `run_methods(runs, jobs, s, finish)`        jobs == 1: run_interleaved, else run_parallel; finish(run) runs
                                              where the run did, its value kept as run.extra.
* `default_jobs(n)`, `time_to_reach(curve, level)`  min(n methods, CPUs); first method time at which the
                                              validation loss <= level.

Every run reports progress (progress.Progress: a bar on a terminal, else a line about every 10 s) over its
budget, with its latest validation and test loss. In run_parallel the children send their progress and log
lines to the parent, which draws one bar (or line) per method, named by it.
"""
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import forked
from common import blas_limited, check_finite
from progress import Progress

RELAY_SECONDS = 0.5       # a child sends its progress to the parent at most this often (wall seconds)
BLAS_THREADS = 1          # each child of run_parallel computes with one BLAS thread (equal bits to the parent's)


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
    run in alternating slices. progress: report over the budget (a progress.Progress, made on the first
    advance; False: none). extra: whatever run_methods' finish(run) returned."""

    def __init__(self, state, step_fn, evaluate, budget, name="", log=print, progress=True):
        self.state, self.step_fn, self.evaluate, self.budget = state, step_fn, evaluate, budget
        self.name, self.log = name, log
        self.i, self.elapsed, self.wall = 0, 0.0, 0.0
        self._steps, self._seconds, self._wall, self._valid, self._test = [], [], [], [], []
        self.progress, self.extra = None, None
        self._report = progress
        self._record()

    def make_progress(self, position=None):
        """The Progress of this run's budget: CPU seconds (or steps with an iters budget), named by the run."""
        if self.budget.iters is not None:
            return Progress(self.budget.iters, desc=self.name, unit="step", position=position)
        return Progress(self.budget.seconds, desc=self.name, unit="CPU s", position=position)

    def _tick(self):
        if self.progress is None:
            return
        n = self.i if self.budget.iters is not None else round(min(self.elapsed, self.budget.seconds), 2)
        self.progress.set(n, valid=f"{self._valid[-1]:.5f}", test=f"{self._test[-1]:.5f}")

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
        if self.progress is None and self._report and not self.finished:
            self.progress = self.make_progress()
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
            self._tick()
        if self.finished and self.progress is not None:
            self.progress.close()
        return self

    def curve(self):
        """The recorded Curve (evaluating the current state first if it was not evaluated yet)."""
        if self._steps[-1] != self.i:
            self._record()
        return Curve(np.array(self._steps), np.array(self._seconds), np.array(self._valid), np.array(self._test),
                     np.array(self._wall))


def run_budgeted(state, step_fn, evaluate, budget, name="", log=print, progress=True):
    """Run state = step_fn(state, i) for i = 0, 1, ... until the budget is used; return (state, Curve).

    evaluate(state) -> (valid, test) is called at step 0, every eval_every / log_every steps and at the end.
    The clock counts step_fn CPU time only: evaluations (full-set forward passes) are excluded."""
    run = BudgetedRun(state, step_fn, evaluate, budget, name, log, progress).advance()
    return run.state, run.curve()


def run_interleaved(runs, slice_seconds):
    """Advance several BudgetedRuns in turn, slice_seconds of method (CPU) time each, until all are finished."""
    until = slice_seconds
    while not all(run.finished for run in runs):
        for run in runs:
            run.advance(until)
        until += slice_seconds
    return [run.curve() for run in runs]


def default_jobs(n_methods):
    """Processes for n_methods methods with independent clocks: one per method, at most one per CPU."""
    return max(1, min(n_methods, forked.available_cpus()))


def resolve_jobs(jobs, n_tasks):
    """Processes for n_tasks independent tasks: jobs (a --jobs setting), or with 0 one per task, at most one per
    CPU."""
    return min(jobs, n_tasks) if jobs else default_jobs(n_tasks)


def parallel_summary(jobs, child_seconds, sequential_mode):
    """The results' record of how independent tasks ran: jobs processes, and with jobs > 1 each task's process's
    CPU and wall seconds (child_seconds: {name: (CPU s, wall s)}; provenance cpu_seconds includes them too)."""
    out = {"jobs": int(jobs), "mode": "parallel processes" if jobs > 1 else sequential_mode}
    if jobs > 1:
        out["process_cpu_seconds"] = {n: round(c, 3) for n, (c, _) in child_seconds.items()}
        out["process_wall_seconds"] = {n: round(w, 3) for n, (_, w) in child_seconds.items()}
    return out


class _Relay:
    """Child side of run_parallel: a Progress stand-in that sends (n, postfix) to the parent, at most every
    RELAY_SECONDS, and the final count when closed."""

    def __init__(self):
        self._last, self._pending = 0.0, None

    def set(self, n, **postfix):
        self._pending = ("progress", n, postfix)
        now = time.perf_counter()
        if now - self._last >= RELAY_SECONDS:
            self._last = now
            forked.send_message(self._pending)

    def close(self):
        if self._pending is not None:
            forked.send_message(self._pending)
            self._pending = None


_FIELDS = ("state", "i", "elapsed", "wall", "_steps", "_seconds", "_wall", "_valid", "_test", "extra")


def _advance_in_child(run, finish):
    """Child side of run_parallel: run to the end with one BLAS thread, progress and log lines relayed to the
    parent; returns the run's fields (its final state and records) and the child's CPU and wall seconds."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if run.log:
        run.log = lambda text: forked.send_message(("log", text))
    if run._report:
        run.progress = _Relay()
    with blas_limited(BLAS_THREADS, f"the process of {run.name}"):
        run.advance()
        run.curve()
        if finish is not None:
            run.extra = finish(run)
    fields = {k: getattr(run, k) for k in _FIELDS}
    return fields, time.process_time() - cpu0, time.perf_counter() - wall0


def run_parallel(runs, jobs, finish=None):
    """Run each BudgetedRun to the end in its own forked process, at most `jobs` at a time; return their Curves.

    Afterwards every run holds what running it here would have left: its final state, steps, clocks and
    records (bit-identical under an iters budget), and run.extra = finish(run) computed in the child after the
    run's last evaluation. run.child_seconds = (CPU, wall) seconds of its process, evaluations included.
    Results come back through a pipe (pickled in memory, never in files); the children's progress is drawn
    here, one bar or line per run. A failure or divergence in a child is one ExperimentError (DivergenceError)
    line; any exception or signal here kills and reaps them."""
    runs = list(runs)
    jobs = max(1, min(jobs, len(runs)))
    bars = {}

    def on_message(k, message):
        kind, *rest = message
        if kind == "log":
            runs[k].log(rest[0])
        elif kind == "progress" and runs[k]._report:
            if k not in bars:
                bars[k] = runs[k].make_progress(position=k)
            bars[k].set(rest[0], **rest[1])

    def work(k):
        return _advance_in_child(runs[k], finish)

    try:
        with forked.ForkedWorkers(jobs, work, role="method process", describe=lambda k: runs[k].name or f"run {k}",
                                  hint="try --jobs 1") as workers:
            for k, (fields, cpu, wall) in workers.run(range(len(runs)), on_message):
                for key, value in fields.items():
                    setattr(runs[k], key, value)
                runs[k].child_seconds = (cpu, wall)
    finally:
        for bar in bars.values():
            bar.close()
    return [run.curve() for run in runs]


def run_methods(runs, jobs=1, slice_seconds=float("inf"), finish=None):
    """Run every BudgetedRun to the end: in this process in alternating slices (jobs == 1, run_interleaved) or
    in parallel processes (run_parallel). finish(run) is then called where the run ran, after its last
    evaluation, and kept as run.extra. Returns the Curves, in the order of runs."""
    if jobs > 1 and len(runs) > 1:
        return run_parallel(runs, jobs, finish)
    curves = run_interleaved(runs, slice_seconds)
    for run in runs:
        run.extra = finish(run) if finish is not None else None
    return curves


def time_to_reach(curve, level):
    """First method time (CPU s) at which the validation curve is <= level, or None if it never is."""
    hits = np.nonzero(curve.valid <= level)[0]
    return float(curve.seconds[hits[0]]) if len(hits) else None
