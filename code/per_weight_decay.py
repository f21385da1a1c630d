"""Shared machinery of the large experiments (SPEC section 7): splits, per-weight decay, Algorithm 3/4 and a
wall-clock-budgeted training loop that records validation and test losses against elapsed time.

Used by hypernets_local_large.py and compare_number_layers.py (and usable by any script that hyper-trains a
hypernetwork jointly with its hyperparameters). The public API:

* `large_splits(data)`                        train / valid / test of 10,000 images each (indices below).
* `decay_objective(layer_sizes)`              per-weight decay training objective, for `HyperProblem`.
* `mse_loss(layer_sizes)`                     plain MSE of flat weights, the validation / test loss.
* `HyperProblem`, `Alg3Settings`              what to optimise and how (Algorithm 3 "joint" or 4 "simplified").
* `init_alg3(problem, settings, seed)`        -> Alg3State (hypernetwork, lambda_hat, both Adam states).
* `alg3_step(state, step, problem, settings, seed)` -> Alg3State: one hyperparameter step (see below).
* `current_weights(state, settings)`          the hypernetwork's elementary weights at lambda_hat, (1, P).
* `Budget`, `run_budgeted(...)`               the timed loop: step until `seconds` or `iters` runs out,
                                              evaluate every `eval_every` steps, evaluation time excluded.
* `BudgetedRun`, `run_interleaved(runs, s)`   the same loop, resumable; several methods in alternating
                                              slices of s seconds so they share the machine's load.
* `time_to_reach(curve, level)`               first method time at which the validation loss <= level.

Splits (`large_splits`): train = MNIST training images 0..9,999, valid = training images 10,000..19,999,
test = the 10,000 official test images. Everything is float64; flat elementary weights follow
neural_network.flatten_params (W row-major then b, layer after layer).
"""
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import grad
from threadpoolctl import threadpool_limits

from common import check_finite, step_rng
from data_loader import small_splits
from neural_network import (
    batched_mlp_predict,
    hypernet_activation,
    hypernet_weights,
    identity,
    init_hypernet,
    mse,
    num_params,
    per_weight_l2,
    unflatten_batch,
)
from optimizers import AdamState, adam_init, adam_inplace

N_TRAIN, N_VALID, N_TEST = 10000, 10000, 10000  # SPEC section 7 (paper macros)

# Random-stream keys for step_rng(seed, step, key): separate, reproducible streams per purpose.
STREAM_SAMPLES, STREAM_TRAIN_BATCH, STREAM_VALID_BATCH = 1, 2, 3


# ------------------------------------------------------------------------------------------- data

def large_splits(data, n_train=N_TRAIN, n_valid=N_VALID, n_test=N_TEST):
    """Train = training images [0, n_train), valid = [n_train, n_train + n_valid), test = first n_test test images."""
    return small_splits(data, n_train, n_valid, n_test)


def minibatch(x, y, batch_size, rs):
    """batch_size rows drawn uniformly with replacement (RandomState rs): (x (B, D), y (B, C))."""
    idx = rs.randint(0, len(x), size=batch_size)
    return x[idx], y[idx]


# ------------------------------------------------------------------------------------- objectives

def mse_loss(layer_sizes):
    """Validation/test loss of flat weights: f(flat (K, P), x (N, D), y (N, C)) -> (K,) plain MSE."""
    def loss(flat, x, y):
        return mse(batched_mlp_predict(unflatten_batch(flat, layer_sizes), x), y)
    return loss


def decay_objective(layer_sizes):
    """Training objective with one decay per weight and bias (SPEC section 7):
    f(flat (K, P), lambdas (K, P), x, y) = MSE(net(x), y) + sum_j exp(lambda_j) w_j^2, shape (K,)."""
    loss = mse_loss(layer_sizes)

    def objective(flat, lambdas, x, y):
        return loss(flat, x, y) + per_weight_l2(flat, lambdas)
    return objective


# ---------------------------------------------------------------------------------- Algorithm 3/4

class HyperProblem(NamedTuple):
    """What Algorithm 3 optimises.

    train_objective(flat (K, P), lambdas (K, H), x, y) -> (K,); valid_loss(flat (K, P), x, y) -> (K,);
    data arrays are (N, D) images and (N, C) targets; n_hypers = H, n_weights = P."""

    train_objective: Callable
    valid_loss: Callable
    train_x: np.ndarray
    train_y: np.ndarray
    valid_x: np.ndarray
    valid_y: np.ndarray
    n_hypers: int
    n_weights: int


@dataclass(frozen=True)
class Alg3Settings:
    """Hyper-training settings (defaults: SPEC section 7, the paper's text and macros)."""

    hypernet_kind: str = "factorised"  # 'factorised' [H, hidden, P] linear; 'linear' [H, P]; 'mlp' (ReLU)
    hidden: int = 10                   # bottleneck units of a factorised / mlp hypernetwork
    init_scale: float = 1e-3           # hypernetwork init: init_scale * N(0, 1) (not stated in the paper)
    init_lambda: float = -7.0          # every entry of lambda_hat at the start (not stated in the paper)
    algorithm: str = "joint"           # 'joint' = Algorithm 3 (sampled lambdas); 'simplified' = Algorithm 4
    n_samples: int = 2                 # hyperparameter samples per hypernetwork step
    sample_sd: float = 1e-5            # lambda ~ N(lambda_hat, sd^2); the paper's "variance" used as an sd
    inner_steps: int = 10              # hypernetwork Adam steps per lambda_hat Adam step
    hypernet_step: float = 1e-4        # Adam step size of the hypernetwork
    lambda_step: float = 1e-4          # Adam step size of lambda_hat
    batch_size: int = 100              # training minibatch per hypernetwork step
    valid_batch_size: int = 100        # validation minibatch per lambda_hat step
    input_offset: float = 0.0          # the hypernetwork sees lambda - input_offset (a fixed shift of its input)


class Alg3State(NamedTuple):
    """Hypernetwork parameters [(W, b), ...] and lambda_hat (H,), their per-array Adam states, steps done."""

    phi: list
    lam: np.ndarray
    phi_adam: list
    lam_adam: object
    step: int


def init_alg3(problem, settings, seed, w0=None):
    """Fresh hypernetwork (RandomState(seed)) and lambda_hat = init_lambda everywhere; fresh Adam states.

    w0 (P,), optional: elementary weights to start from, written into the hypernetwork's output bias (the
    other hypernetwork parameters stay init_scale * N(0, 1), so w_phi(lambda_hat) starts close to w0)."""
    rs = np.random.RandomState(seed)
    phi = init_hypernet(settings.hypernet_kind, problem.n_hypers, problem.n_weights, settings.init_scale, rs,
                        hidden=settings.hidden)
    if w0 is not None:
        phi[-1] = (phi[-1][0], np.array(w0, dtype=float).reshape(problem.n_weights))
    lam = np.full(problem.n_hypers, float(settings.init_lambda))
    phi_adam = [(adam_init(W), adam_init(b)) for W, b in phi]
    return Alg3State(phi, lam, phi_adam, adam_init(lam), 0)


def _adam_tree(params, grads, states, step_size):
    """In-place Adam on a list of (W, b) pairs, one AdamState per array: returns the new states."""
    scratch = np.empty(max(W.size for W, _ in params) + max(b.size for _, b in params))
    return [(adam_inplace(W, gW, sW, step_size, scratch), adam_inplace(b, gb, sb, step_size, scratch))
            for (W, b), (gW, gb), (sW, sb) in zip(params, grads, states, strict=True)]


def _hypernet_grad(problem, activation, offset=0.0):
    """d/dphi of the mean training objective over the K sampled lambdas (K, H): f(phi, lambdas, x, y).

    For linear / factorised hypernetworks (identity activation) autograd only differentiates the elementary
    objective, giving delta = dF/dw (K, P); the hypernetwork's layers are then back-propagated by hand
    (g_W = h^T delta, g_b = sum_k delta, delta <- delta W^T), which avoids autograd's overhead on arrays
    of up to 1.9M entries. Other hypernetworks use autograd throughout."""
    if activation is not identity:
        def objective(phi, lambdas, x, y):
            weights = hypernet_weights(phi, lambdas - offset, activation)
            return anp.mean(problem.train_objective(weights, lambdas, x, y))
        return grad(objective)

    elementary_grad = grad(lambda w, lambdas, x, y: anp.mean(problem.train_objective(w, lambdas, x, y)))

    def phi_grad(phi, lambdas, x, y):
        inputs = [lambdas - offset]  # inputs[i] = input of layer i, (K, width)
        for W, b in phi[:-1]:
            inputs.append(np.dot(inputs[-1], W) + b)
        W, b = phi[-1]
        delta = elementary_grad(np.dot(inputs[-1], W) + b, lambdas, x, y)  # (K, P)
        grads = []
        for (W, _), h in zip(reversed(phi), reversed(inputs), strict=True):
            grads.append((np.dot(h.T, delta), np.sum(delta, axis=0)))
            delta = np.dot(delta, W.T)
        return grads[::-1]
    return phi_grad


def _lambda_grad(problem, activation, offset=0.0):
    """d/dlambda_hat of the validation loss of the hypernetwork's weights at lambda_hat (H,)."""
    def objective(lam, phi, x, y):
        return problem.valid_loss(hypernet_weights(phi, lam[None, :] - offset, activation), x, y)[0]
    return grad(objective)


def alg3_step(state, step, problem, settings, seed):
    """One hyperparameter step of Algorithm 3 (joint) or 4 (simplified); returns the new Alg3State.

    The state's arrays are updated IN PLACE (speed: the hypernetwork can have 1.9M parameters); keep a
    copy (copy_state) if an older state is needed.

    (1) inner_steps Adam steps of phi on mean_k f_train(w_phi(lambda_k), lambda_k) over a training minibatch,
        lambda_k ~ N(lambda_hat, sample_sd^2) (joint, n_samples draws) or lambda_k = lambda_hat (simplified);
    (2) one Adam step of lambda_hat on f_valid(w_phi(lambda_hat)) over a validation minibatch.
    Random numbers come from step_rng(seed, inner step index, stream), so runs are reproducible."""
    activation = hypernet_activation(settings.hypernet_kind)
    offset = settings.input_offset
    phi_grad, lam_grad = _hypernet_grad(problem, activation, offset), _lambda_grad(problem, activation, offset)
    phi, phi_adam = state.phi, state.phi_adam
    for j in range(settings.inner_steps):
        inner = step * settings.inner_steps + j
        if settings.algorithm == "joint":
            noise = step_rng(seed, inner, STREAM_SAMPLES).randn(settings.n_samples, problem.n_hypers)
            lambdas = state.lam[None, :] + settings.sample_sd * noise
        else:
            lambdas = state.lam[None, :]
        x, y = minibatch(problem.train_x, problem.train_y, settings.batch_size,
                         step_rng(seed, inner, STREAM_TRAIN_BATCH))
        g = phi_grad(phi, lambdas, x, y)
        check_finite(g[-1][1], inner, "hypernetwork gradient")
        phi_adam = _adam_tree(phi, g, phi_adam, settings.hypernet_step)
    x, y = minibatch(problem.valid_x, problem.valid_y, settings.valid_batch_size,
                     step_rng(seed, step, STREAM_VALID_BATCH))
    g_lam = lam_grad(state.lam, phi, x, y)
    check_finite(g_lam, step, "hyperparameter gradient")
    lam_adam = adam_inplace(state.lam, g_lam, state.lam_adam, settings.lambda_step, np.empty(state.lam.size))
    return Alg3State(phi, state.lam, phi_adam, lam_adam, state.step + 1)


def copy_state(state):
    """Deep copy of an Alg3State (its arrays are otherwise updated in place by alg3_step)."""
    copy_adam = lambda a: AdamState(a.m.copy(), a.v.copy(), a.step)
    return Alg3State([(W.copy(), b.copy()) for W, b in state.phi], state.lam.copy(),
                     [(copy_adam(a), copy_adam(c)) for a, c in state.phi_adam], copy_adam(state.lam_adam),
                     state.step)


def current_weights(state, settings):
    """The hypernetwork's elementary weights at lambda_hat: (1, P)."""
    lam = state.lam[None, :] - settings.input_offset
    return hypernet_weights(state.phi, lam, hypernet_activation(settings.hypernet_kind))


def fan_in_init(layer_sizes, rs):
    """Flat elementary weights (P,): W ~ N(0, 1/fan_in) per layer, biases 0 (a standard MLP init)."""
    return np.concatenate([np.concatenate([rs.randn(m * n) / np.sqrt(m), np.zeros(n)])
                           for m, n in zip(layer_sizes[:-1], layer_sizes[1:], strict=True)])


def check_algorithm(name):
    """Raise ValueError for an unknown algorithm name."""
    if name not in ("joint", "simplified"):
        raise ValueError(f"unknown algorithm {name!r} (joint or simplified)")


def hypernet_size(kind, n_hypers, n_weights, hidden):
    """Number of hypernetwork parameters (factorised [H, hidden, P]: H*hidden + hidden + hidden*P + P)."""
    sizes = [n_hypers, n_weights] if kind == "linear" else [n_hypers, hidden, n_weights]
    return num_params(sizes)


# ------------------------------------------------------------------------------------ timed loop

@dataclass(frozen=True)
class Budget:
    """Stop after `seconds` of method time or after `iters` steps (whichever is given; iters wins if both).

    A fixed `iters` gives reproducible numbers; `seconds` (the figure's mode) depends on machine speed."""

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
    """Losses at evaluation points: step (E,), seconds of method time (E,), valid (E,), test (E,)."""

    step: np.ndarray
    seconds: np.ndarray
    valid: np.ndarray
    test: np.ndarray


class BudgetedRun:
    """A resumable budgeted loop: state = step_fn(state, i) for i = 0, 1, ... while the budget lasts.

    evaluate(state) -> (valid, test) runs at step 0, every eval_every / log_every steps and at the end
    (curve()). The clock counts step_fn time only: evaluations (full-set forward passes) are excluded.
    advance(until) stops early once the method clock reaches `until` seconds, so two methods can be run
    in alternating slices and share the machine's load fairly."""

    def __init__(self, state, step_fn, evaluate, budget, name="", log=print):
        self.state, self.step_fn, self.evaluate, self.budget = state, step_fn, evaluate, budget
        self.name, self.log = name, log
        self.i, self.elapsed = 0, 0.0
        self._steps, self._seconds, self._valid, self._test = [], [], [], []
        self._record()

    def _record(self):
        valid, test = self.evaluate(self.state)
        check_finite(valid, self.i, f"{self.name} validation loss".strip())
        self._steps.append(self.i)
        self._seconds.append(self.elapsed)
        self._valid.append(float(valid))
        self._test.append(float(test))
        return valid, test

    @property
    def finished(self):
        return self.budget.done(self.i, self.elapsed)

    def advance(self, until=float("inf")):
        """Take steps until the budget is used or the method clock reaches `until` seconds."""
        while not self.finished and self.elapsed < until:
            start = time.perf_counter()
            self.state = self.step_fn(self.state, self.i)
            self.elapsed += time.perf_counter() - start
            self.i += 1
            if self.i % self.budget.log_every == 0:
                valid, test = self._record()
                if self.log:
                    self.log(f"{self.name:>10s} step {self.i:6d}  {self.elapsed:7.1f} s  "
                             f"valid {valid:.5f}  test {test:.5f}")
            elif self.i % self.budget.eval_every == 0:
                self._record()
        return self

    def curve(self):
        """The recorded Curve (evaluating the current state first if it was not evaluated yet)."""
        if self._steps[-1] != self.i:
            self._record()
        return Curve(np.array(self._steps), np.array(self._seconds), np.array(self._valid), np.array(self._test))


def run_budgeted(state, step_fn, evaluate, budget, name="", log=print):
    """Run state = step_fn(state, i) for i = 0, 1, ... until the budget is used; return (state, Curve).

    evaluate(state) -> (valid, test) is called at step 0, every eval_every / log_every steps and at the end.
    The clock counts step_fn time only: evaluations (full-set forward passes) are excluded."""
    run = BudgetedRun(state, step_fn, evaluate, budget, name, log).advance()
    return run.state, run.curve()


def run_interleaved(runs, slice_seconds):
    """Advance several BudgetedRuns in turn, slice_seconds of method time each, until all are finished."""
    until = slice_seconds
    while not all(run.finished for run in runs):
        for run in runs:
            run.advance(until)
        until += slice_seconds
    return [run.curve() for run in runs]


def time_to_reach(curve, level):
    """First method time (s) at which the validation curve is <= level, or None if it never is."""
    hits = np.nonzero(curve.valid <= level)[0]
    return float(curve.seconds[hits[0]]) if len(hits) else None


def load_splits(config, data_dir):
    """large_splits of MNIST (or of the synthetic stand-in when config.synthetic) at config's sizes."""
    from data_loader import load_mnist, synthetic_mnist

    data = synthetic_mnist() if config.synthetic else load_mnist(data_dir)
    return large_splits(data, config.n_train, config.n_valid, config.n_test)


def script_main(argv, name, parse_args, build_config, run, report, plot):
    """main() of the scripts built on this module: parse, replot or run (one BLAS thread), report; returns 0."""
    from common import replot_or_run
    from plotting import resolve_out_dir

    args = parse_args(argv)
    out_dir = resolve_out_dir(args.out_dir)

    def compute():
        config = build_config(args)
        splits = load_splits(config, args.data_dir)
        # Overflow surfaces as a one-line DivergenceError; one BLAS thread: the products are small, and two
        # threads on a busy 2-core machine made a development run almost stall.
        with np.errstate(over="ignore", invalid="ignore"), threadpool_limits(limits=config.blas_threads):
            return run(config, splits)

    summary, _ = replot_or_run(out_dir, name, args.replot, compute, plot)
    report(summary)
    print(f"{summary['total_seconds']:.0f} s in total")
    return 0
