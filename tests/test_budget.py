"""budget: the CPU-second method clock, the interleaved and parallel runners (same curves and states, failures as
one line, no process left behind, signals stop the children), and the progress each run reports."""
import functools
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import budget
import common
import per_weight_decay as pwd
import progress
import references as refs
import unrolled
from common import DivergenceError, ExperimentError
from conftest import child_pids
from data_loader import synthetic_mnist
from large_fixtures import BLOCK, one_blas_thread  # noqa: F401  (fixture)
from neural_network import num_params

CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code")


@pytest.fixture(scope="module")
def small_splits():
    """train = block 0, valid = block 1, test = the first BLOCK test images of a synthetic MNIST."""
    return refs.block_splits(synthetic_mnist(n_train=1200, n_test=300), 1, 0, BLOCK, BLOCK)


def busy(seconds):
    """Burn `seconds` of CPU time in this process."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def counter_run(name="", iters=5, log=None, seconds=None, step=None, progress_=True):
    """A BudgetedRun whose state counts its steps (evaluate: 1 / (state + 1), 2 state)."""
    step = step or (lambda s, i: s + 1)
    return budget.BudgetedRun(0, step, lambda s: (1.0 / (s + 1), 2.0 * s),
                              budget.Budget(seconds=seconds, iters=None if seconds else iters, eval_every=2,
                                            log_every=4), name, log, progress_)


# ----------------------------------------------------------------------------------- the budgeted loop

def test_budgeted_loop_counts_steps_and_excludes_evaluation():
    slow_eval = lambda s: (busy(0.05), (1.0 / (s + 1), 2.0))[1]
    state, curve = budget.run_budgeted(0, lambda s, i: s + 1, slow_eval, budget.Budget(iters=7, eval_every=3,
                                                                                 log_every=100), log=None)
    assert state == 7 and curve.step.tolist() == [0, 3, 6, 7]
    assert curve.seconds[-1] < 0.05              # evaluations (0.05 s of CPU each) are off the clock
    assert budget.time_to_reach(curve, 0.2) == curve.seconds[2] and budget.time_to_reach(curve, 0.01) is None
    with pytest.raises(ValueError):
        budget.Budget()


def test_method_clock_counts_cpu_seconds_and_records_wall_seconds():
    """Sleeping (a busy machine: the process waits) moves the wall clock, not the method clock."""
    def step(s, i):
        time.sleep(0.02)    # waiting: wall time only
        busy(0.01)          # working: CPU time
        return s + 1
    _, curve = budget.run_budgeted(0, step, lambda s: (1.0, 1.0), budget.Budget(iters=5, eval_every=1), log=None)
    assert curve.wall_seconds.shape == curve.seconds.shape == (6,)
    assert 0.05 <= curve.seconds[-1] < 0.09                  # 5 x 0.01 s of CPU
    # + 5 x 0.02 s asleep; the margin allows for CPU that other threads of the test process (workers' parent
    # watchers, BLAS) add to process_time while this one sleeps
    assert curve.wall_seconds[-1] >= 0.1 and curve.wall_seconds[-1] - curve.seconds[-1] >= 0.05
    assert np.all(np.diff(curve.seconds) > 0) and np.all(np.diff(curve.wall_seconds) > 0)
    # a seconds budget stops on CPU time: 0.05 s of CPU takes about 5 steps however long they sleep
    _, timed = budget.run_budgeted(0, step, lambda s: (1.0, 1.0), budget.Budget(seconds=0.05, eval_every=1), log=None)
    assert 5 <= timed.step[-1] <= 6


def small_problem(splits, sizes=(784, 10)):
    P = num_params(sizes)
    return pwd.HyperProblem(pwd.decay_objective(sizes), pwd.mse_loss(sizes), splits.train_x, splits.train_y,
                            splits.valid_x, splits.valid_y, P, P)


def test_iters_budget_is_bit_reproducible(small_splits):
    splits = small_splits
    problem = small_problem(splits)
    settings = pwd.Alg3Settings(inner_steps=2)
    loss = pwd.mse_loss((784, 10))

    def go():
        state = pwd.init_alg3(problem, settings, 4)
        evaluate = lambda s: (loss(pwd.current_weights(s, settings), splits.valid_x, splits.valid_y)[0],
                              loss(pwd.current_weights(s, settings), splits.test_x, splits.test_y)[0])
        return budget.run_budgeted(state, lambda s, i: pwd.alg3_step(s, i, problem, settings, 4), evaluate,
                                   budget.Budget(iters=5, eval_every=2), log=None)
    (s1, c1), (s2, c2) = go(), go()
    assert c1.step.tolist() == c2.step.tolist() == [0, 2, 4, 5]
    assert c1.valid.tobytes() == c2.valid.tobytes() and c1.test.tobytes() == c2.test.tobytes()
    assert s1.lam.tobytes() == s2.lam.tobytes()


def test_interleaved_runs_alternate_by_method_time():
    order = []

    def stepper(tag):
        def step(s, i):
            order.append(tag)
            busy(0.01)
            return s + 1
        return step
    runs = [budget.BudgetedRun(0, stepper(t), lambda s: (1.0, 1.0), budget.Budget(seconds=0.1, eval_every=5,
                                                                            log_every=100), t, None) for t in "ab"]
    budget.run_interleaved(runs, 0.03)
    assert all(r.finished for r in runs)
    first_b = order.index("b")
    assert 0 < first_b < len(order) - 1 and "a" in order[first_b:]   # a ran again after b started


# ------------------------------------------------------------------------------------- parallel runner

class UnrolledConfig:
    """The unrolled baseline's settings, small (the fields of hypernets_local_large's Config it reads)."""

    seed, batch_size, init_lambda = 7, 50, -7.0
    unroll_steps, unroll_inner, unroll_inner_step, unroll_outer_step = 5, "adam", 1e-3, 0.2
    unroll_init_scale, unroll_valid_batch = 1e-3, 0


def three_methods(splits):
    """BudgetedRuns of hyper-training, unrolled and exact descent on the small problem, fixed iters budgets."""
    problem = small_problem(splits)
    settings = pwd.Alg3Settings(hypernet_kind="factorised", hidden=3, inner_steps=2, batch_size=50,
                                valid_batch_size=50)
    loss = pwd.mse_loss((784, 10))
    lam0 = np.full(problem.n_hypers, -7.0)

    def h_eval(s):
        w = pwd.current_weights(s, settings)
        return loss(w, splits.valid_x, splits.valid_y)[0], loss(w, splits.test_x, splits.test_y)[0]
    u0, u_step, u_eval = unrolled.make_unrolled(splits, UnrolledConfig)
    e0, e_step, e_eval = refs.exact_hypergradient_descent(splits, lam0)
    specs = {"hyper": (pwd.init_alg3(problem, settings, 7), lambda s, i: pwd.alg3_step(s, i, problem, settings, 7),
                       h_eval, 6),
             "unrolled": (u0, u_step, u_eval, 4), "exact": (e0, e_step, e_eval, 5)}
    return [budget.BudgetedRun(s0, step, ev, budget.Budget(iters=iters, eval_every=2, log_every=3), name, None)
            for name, (s0, step, ev, iters) in specs.items()]


def lam_norm(run):
    """A finish() for the tests: computed where the run ran, from its final state."""
    return float(np.linalg.norm(run.state.lam)), run.i


@pytest.mark.parametrize("jobs", [2, 3])
def test_parallel_is_bit_identical_to_interleaved(small_splits, jobs):
    """With iters budgets, each method in its own process gives the bits of the one-process interleaved loop:
    curves, final states, step counts and finish() values."""
    sequential, parallel = three_methods(small_splits), three_methods(small_splits)
    curves_1 = budget.run_methods(sequential, 1, 1e-3, lam_norm)
    curves_n = budget.run_methods(parallel, jobs, 1e-3, lam_norm)
    for a, b, ca, cb in zip(sequential, parallel, curves_1, curves_n, strict=True):
        assert ca.step.tolist() == cb.step.tolist() and ca.step[-1] == a.budget.iters
        assert np.array_equal(ca.valid, cb.valid) and np.array_equal(ca.test, cb.test)  # exact, every bit
        assert np.array_equal(a.state.lam, b.state.lam) and a.i == b.i == a.budget.iters
        assert a.extra == b.extra and b.extra[1] == b.i
        assert b.child_seconds[0] > 0 and b.elapsed > 0
    assert np.array_equal(sequential[0].state.phi[0][0], parallel[0].state.phi[0][0])
    assert not np.array_equal(sequential[0].state.lam, np.full_like(sequential[0].state.lam, -7.0))  # it moved


def test_parallel_runs_really_run_at_once_in_other_processes():
    """Each run steps in a child (its pid is not ours) and the children overlap in time."""
    spans = {}

    def step(s, i):
        if i == 0:
            spans.setdefault("start", time.perf_counter())
        time.sleep(0.02)
        return s + 1
    runs = [counter_run(name, iters=15, step=step) for name in ("a", "b")]
    finish = lambda run: (os.getpid(), spans["start"], time.perf_counter())
    budget.run_parallel(runs, 2, finish)
    (pid_a, start_a, end_a), (pid_b, start_b, end_b) = (r.extra for r in runs)
    assert len({pid_a, pid_b, os.getpid()}) == 3
    assert start_b < end_a and start_a < end_b       # overlapping: not one after the other
    assert [r.i for r in runs] == [15, 15] and all(r.finished for r in runs)


def test_more_runs_than_jobs_and_log_lines_relayed():
    lines = []
    runs = [counter_run(f"m{k}", iters=4 + k, log=lines.append) for k in range(3)]
    curves = budget.run_parallel(runs, 2)
    assert [c.step[-1] for c in curves] == [4, 5, 6] and [r.state for r in runs] == [4, 5, 6]
    assert sorted(line.split()[0] for line in lines) == ["m0", "m1", "m2"]   # each logged step 4, in the parent


def _diverge(s, i):
    common.check_finite(np.nan if i == 2 else 1.0, i, "test objective")
    return s + 1


def _fail(s, i):
    if i == 1:
        raise ValueError("bad step")
    return s + 1


def _die(s, i):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("step, error, match", [
    (_diverge, DivergenceError, r"^test objective is not finite at step 2"),
    (_fail, ExperimentError, r"^method process failed on bad: ValueError: bad step$"),
    (_die, ExperimentError, r"^method process \d+ died while working on bad \(killed, or out of memory\?\)$"),
])
def test_child_failure_is_one_line_and_leaves_no_process(step, error, match):
    before = set(child_pids(os.getpid()))
    runs = [counter_run("good", iters=50, step=lambda s, i: (time.sleep(0.01), s + 1)[1]),
            counter_run("bad", iters=5, step=step)]
    with pytest.raises(error, match=match) as info:
        budget.run_parallel(runs, 2)
    assert "\n" not in str(info.value)
    assert set(child_pids(os.getpid())) == before     # every child killed and reaped: no zombie either


SIGNAL_SCRIPT = textwrap.dedent("""
    import signal, sys, time
    import budget, common

    def on_term(signum, frame):
        raise common.Terminated()
    signal.signal(signal.SIGTERM, on_term)

    def step(s, i):
        time.sleep(0.01)
        return s + 1
    runs = [budget.BudgetedRun(0, step, lambda s: (1.0, 1.0), budget.Budget(iters=10 ** 6), name, None)
            for name in ("a", "b")]
    try:
        budget.run_parallel(runs, 2)
    except KeyboardInterrupt:
        sys.exit(130)
    except common.Terminated:
        sys.exit(143)
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_children(tmp_path, sig, code):
    env = {**os.environ, "PYTHONPATH": CODE, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_SCRIPT], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(child_pids(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    kids = child_pids(proc.pid)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert proc.returncode == code
    deadline = time.monotonic() + 3
    while any(os.path.exists(f"/proc/{k}") for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{k}") for k in kids), "children outlived the interrupted run"
    assert list(tmp_path.iterdir()) == []            # no temporary files


def test_default_jobs_one_per_method_at_most_one_per_cpu(monkeypatch):
    monkeypatch.setattr(budget.forked, "available_cpus", lambda: 2)
    assert [budget.default_jobs(n) for n in (1, 2, 3)] == [1, 2, 2]
    monkeypatch.setattr(budget.forked, "available_cpus", lambda: 8)
    assert budget.default_jobs(3) == 3


# ---------------------------------------------------------------------------------------------- progress

def lines_progress(monkeypatch, stream):
    """budget's Progress writing every update to stream (interval 0), as on a non-terminal."""
    monkeypatch.setattr(budget, "Progress", functools.partial(progress.Progress, stream=stream, interval=0.0))


def test_budgeted_run_reports_its_budget_with_losses(monkeypatch):
    out = io.StringIO()
    lines_progress(monkeypatch, out)
    run = counter_run("hyper", iters=6).advance()
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and lines[-1].startswith("hyper: 6/6 step (100%)")
    assert lines[2].startswith("hyper: 3/6 step (50%)") and "ETA" in lines[2]
    assert lines[-1].endswith(f"valid {run.curve().valid[-1]:.5f}, test {run.curve().test[-1]:.5f}")
    out = io.StringIO()
    lines_progress(monkeypatch, out)
    busy_step = lambda s, i: (busy(0.005), s + 1)[1]
    counter_run("timed", seconds=0.03, step=busy_step).advance()
    assert out.getvalue().splitlines()[-1].startswith("timed: 0.03/0.03 CPU s (100%)")  # seconds budgets: CPU s
    out = io.StringIO()
    lines_progress(monkeypatch, out)
    counter_run("quiet", iters=3, progress_=False).advance()
    assert out.getvalue() == ""


def test_parallel_progress_is_drawn_by_the_parent_one_line_per_method(monkeypatch):
    out = io.StringIO()
    lines_progress(monkeypatch, out)
    monkeypatch.setattr(budget, "RELAY_SECONDS", 0.0)
    runs = [counter_run(name, iters=4, step=lambda s, i: (time.sleep(0.01), s + 1)[1]) for name in ("a", "b")]
    budget.run_parallel(runs, 2)
    lines = out.getvalue().splitlines()
    assert {line.split(":")[0] for line in lines} == {"a", "b"}     # every line names its method
    assert any(line.startswith("a: 4/4 step (100%)") for line in lines)
    assert any(line.startswith("b: 4/4 step (100%)") for line in lines)
