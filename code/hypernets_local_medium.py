"""Appendix experiment: ten per-class decays tuned by hyper-training, random search and Bayesian optimisation.

The elementary model is the linear 784-10 model; lambda (10,) weights the class-wise regulariser
(1/10) sum_i exp(lambda_i) ||W[:, i]||_2 of SPEC section 6, and the loss is the Gaussian NLL of SPEC
section 2 (the appendix reports losses near 0.5, i.e. on that scale). Three methods share one
wall-clock budget each (SPEC section 7, "Medium experiment"):

* hyper-training, Algorithm 3 (per_weight_decay.alg3_step): a linear hypernetwork [10, 7850] (86,350
  parameters) takes Adam steps on the training objective at lambdas sampled around lambda_hat; lambda_hat
  takes Adam steps on the validation loss of the hypernetwork's weights w_phi(lambda_hat);
* random search: lambda ~ Uniform(box)^10, each sample a fresh elementary model trained with Adam;
  K samples are trained at once as one stacked problem (identical to K separate runs, one GEMM);
* Bayesian optimisation: a scikit-learn Gaussian process (Matern 5/2, one length scale per decay) and
  expected improvement maximised over random candidates, each suggestion trained like random search.

Every second of each method counts, inner training and GP fitting included; the methods alternate in
slices of --slice-seconds so machine load hits all three alike (per_weight_decay.run_interleaved); only
the reporting evaluations of hyper-training's checkpoints are off the clock. Recorded against elapsed
time: the best validation loss so far and the test loss of that best setting (for hyper-training: of the
weights w_phi(lambda_hat) at the checkpoint with the best validation loss). At time 0 every method holds
the untrained initial model.

    python hypernets_local_medium.py [--seconds 150] [--quick] [--replot] ...
"""
import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.stats import norm
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

import neural_network as nn
from common import (
    check_finite,
    experiment_parser,
    positive_float,
    positive_int,
    replot_or_run,
    run_main,
    step_rng,
)
from data_loader import load_mnist, scatter_splits, synthetic_mnist
from optimizers import train_stacked
from per_weight_decay import (
    Alg3Settings,
    Budget,
    BudgetedRun,
    HyperProblem,
    alg3_step,
    current_weights,
    hypernet_size,
    init_alg3,
    minibatch,
    run_interleaved,
)
from plotting import close, resolve_out_dir, save_figure, set_paper_style

NAME = "hypernets_local_medium"
METHODS = ("hypernet", "random", "bayesopt")
LABELS = {"hypernet": "Hyper-training", "random": "Random search", "bayesopt": "Bayesian optimisation"}
COLOURS = {"hypernet": "red", "random": "blue", "bayesopt": "green"}
STREAM_RANDOM, STREAM_BO = 11, 12  # step_rng stream keys of the baselines (per_weight_decay uses 1..3)


@dataclass(frozen=True)
class Config:
    """Settings of the medium experiment (SPEC sections 6 and 7; the README lists the choices)."""

    seconds: float = 150.0            # wall-clock budget of EACH method (the paper ran ~970 s)
    slice_seconds: float = 10.0       # the methods alternate in slices of this much method time
    seed: int = 7                     # global seed (SPEC section 1)
    n_train: int = 50000              # training images 0..49,999 (SPEC section 1, scatter split)
    n_valid: int = 10000              # validation images 50,000..59,999
    n_test: int = 10000               # the 10,000 test images
    layer_sizes: tuple = (784, 10)    # linear elementary model
    init_scale: float = 1e-5          # elementary and hypernetwork init scale (SPEC section 6)
    batch_size: int = 100             # data minibatch of every gradient step (SPEC section 7 macros)
    lambda_low: float = -3.0          # search box of every decay (SPEC section 6: Uniform(-3, 3))
    lambda_high: float = 3.0
    # hyper-training (Algorithm 3)
    lambda_init: float = 0.0          # initial lambda_hat, every entry: the centre of the search box
    n_samples: int = 2                # hyperparameter samples per hypernetwork step (SPEC section 7)
    sample_sd: float = 1.0            # lambda ~ N(lambda_hat, sample_sd^2), per entry (not stated)
    inner_steps: int = 10             # hypernetwork steps per lambda_hat step (SPEC section 7 macros)
    hypernet_step: float = 1e-4       # Adam step size of the hypernetwork (SPEC section 7)
    lambda_step: float = 3e-3         # Adam step size of lambda_hat (paper 1e-4, released local code 0.01)
    eval_every: int = 20              # lambda_hat steps between validation/test checkpoints
    log_every: int = 500              # lambda_hat steps between hyper-training log lines
    # gradient-free baselines: every evaluation trains a fresh elementary model
    elementary_steps: int = 1000      # Adam steps per evaluation (SPEC section 6)
    elementary_step_size: float = 1e-4
    random_batch: int = 10            # random-search lambdas trained at once as one stacked problem
    bo_initial: int = 5               # random points before the first GP fit (one stacked batch)
    bo_batch: int = 5                 # suggestions per GP fit (kriging believer), trained as one batch
    bo_candidates: int = 2000         # uniform random candidates for maximising expected improvement
    bo_local_candidates: int = 500    # extra candidates drawn around the best point so far
    bo_local_sd: float = 0.3          # standard deviation of those local candidates (lambda units)
    bo_restarts: int = 1              # GP hyperparameter optimiser restarts
    bo_xi: float = 0.0                # expected-improvement exploration margin


QUICK = dict(seconds=4.0, slice_seconds=1.0, elementary_steps=60, random_batch=4, bo_initial=3, bo_batch=2,
             bo_candidates=200, bo_local_candidates=50, eval_every=5, log_every=50)
SYNTHETIC_SPLITS = dict(n_train=1500, n_valid=500, n_test=500)  # synthetic_mnist(2000, 500) stand-in


# ------------------------------------------------------------------------------------------ model

def class_decay_objective(layer_sizes):
    """Training objective f(flat (K, P), lams (K, 10), x, y) -> (K,): Gaussian NLL + class-wise regulariser."""
    def objective(flat, lams, x, y):
        params = nn.unflatten_batch(flat, layer_sizes)
        return nn.gaussian_nll(nn.batched_mlp_predict(params, x), y) + nn.class_norm_regulariser(params[-1][0], lams)
    return objective


def nll_loss(layer_sizes):
    """Validation/test loss f(flat (K, P), x, y) -> (K,): Gaussian NLL, no regulariser."""
    def loss(flat, x, y):
        return nn.gaussian_nll(nn.batched_mlp_predict(nn.unflatten_batch(flat, layer_sizes), x), y)
    return loss


def train_elementary(lams, splits, config, key):
    """Fresh models for lams (K, 10), trained at once by Adam (= K separate runs); returns flat (K, P).

    All start from the same init (RandomState(seed)); stream `key` of step_rng sets the minibatches."""
    init = nn.flatten_params(nn.init_mlp(config.layer_sizes, config.init_scale, np.random.RandomState(config.seed)))
    objective = class_decay_objective(config.layer_sizes)

    def batched_loss(flat, i):
        x, y = minibatch(splits.train_x, splits.train_y, config.batch_size, step_rng(config.seed, i, *key))
        return objective(flat, lams, x, y)

    flat = train_stacked(batched_loss, np.tile(init, (len(lams), 1)), config.elementary_steps,
                         config.elementary_step_size)
    check_finite(flat, config.elementary_steps, "elementary weights")
    return flat


def evaluate_batch(lams, splits, config, key):
    """Train fresh models at lams (K, 10); return their validation and test losses, (K,) each."""
    flat, loss = train_elementary(lams, splits, config, key), nll_loss(config.layer_sizes)
    return np.asarray(loss(flat, splits.valid_x, splits.valid_y)), np.asarray(loss(flat, splits.test_x, splits.test_y))


def uniform_lambdas(n, config, rs):
    """n draws from Uniform(lambda_low, lambda_high)^10 -> (n, 10)."""
    return rs.uniform(config.lambda_low, config.lambda_high, size=(n, config.layer_sizes[-1]))


def init_losses(splits, config):
    """Validation and test loss of the untrained initial model (what every method holds at time 0)."""
    init = nn.flatten_params(nn.init_mlp(config.layer_sizes, config.init_scale, np.random.RandomState(config.seed)))
    loss = nll_loss(config.layer_sizes)
    return float(loss(init[None], splits.valid_x, splits.valid_y)[0]), float(loss(init[None], splits.test_x,
                                                                                     splits.test_y)[0])


# ------------------------------------------------------------------------------ hyper-training

def alg3_settings(config):
    """Algorithm 3 with a linear hypernetwork [10, P]."""
    return Alg3Settings(hypernet_kind="linear", init_scale=config.init_scale, init_lambda=config.lambda_init,
                        algorithm="joint", n_samples=config.n_samples, sample_sd=config.sample_sd,
                        inner_steps=config.inner_steps, hypernet_step=config.hypernet_step,
                        lambda_step=config.lambda_step, batch_size=config.batch_size,
                        valid_batch_size=config.batch_size)


def make_hypernet(splits, config, lambda_log):
    """(initial state, step_fn, evaluate) of hyper-training; evaluate appends lambda_hat to lambda_log."""
    sizes, loss = config.layer_sizes, nll_loss(config.layer_sizes)
    problem = HyperProblem(class_decay_objective(sizes), loss, splits.train_x, splits.train_y, splits.valid_x,
                           splits.valid_y, sizes[-1], nn.num_params(sizes))
    settings = alg3_settings(config)

    def step_fn(state, i):
        return alg3_step(state, i, problem, settings, config.seed)

    def evaluate(state):
        lambda_log.append(state.lam.copy())
        w = current_weights(state, settings)
        return float(loss(w, splits.valid_x, splits.valid_y)[0]), float(loss(w, splits.test_x, splits.test_y)[0])

    return init_alg3(problem, settings, config.seed), step_fn, evaluate


# --------------------------------------------------------------------- gradient-free baselines

class SearchState(NamedTuple):
    """Evaluations so far: lambdas (E, 10), validation and test losses (E,), batch index of each (E,)."""

    lambdas: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    batch: np.ndarray


def empty_search(config):
    n = config.layer_sizes[-1]
    return SearchState(np.zeros((0, n)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int))


def make_search(splits, config, propose, stream):
    """(initial state, step_fn, evaluate) of a gradient-free method; step i trains the batch propose(state, i).

    evaluate returns the best validation loss so far and the test loss at that setting (the initial model's
    losses before the first evaluation); it only reads the state, no computation."""
    start = init_losses(splits, config)

    def step_fn(state, i):
        lams = propose(state, i)
        valid, test = evaluate_batch(lams, splits, config, (stream, i))
        return SearchState(np.vstack([state.lambdas, lams]), np.append(state.valid, valid),
                           np.append(state.test, test), np.append(state.batch, np.full(len(lams), i)))

    def evaluate(state):
        if len(state.valid) == 0 or state.valid.min() >= start[0]:
            return start
        k = int(np.argmin(state.valid))
        return float(state.valid[k]), float(state.test[k])

    return empty_search(config), step_fn, evaluate


def propose_random(config):
    """Random search: batch i is random_batch uniform draws from stream (seed, i, STREAM_RANDOM)."""
    return lambda state, i: uniform_lambdas(config.random_batch, config, step_rng(config.seed, i, STREAM_RANDOM))


def expected_improvement(mean, std, best, xi=0.0):
    """EI for minimisation: E[max(best - xi - f, 0)] under f ~ N(mean, std^2); arrays (M,) -> (M,)."""
    std = np.maximum(std, 1e-12)
    z = (best - xi - mean) / std
    return (best - xi - mean) * norm.cdf(z) + std * norm.pdf(z)


def gp_kernel(n_dims):
    """Amplitude * Matern 5/2 with one length scale per decay, plus observation noise."""
    return (ConstantKernel(1.0, (1e-3, 1e3)) * Matern(np.ones(n_dims), (1e-2, 1e2), nu=2.5)
            + WhiteKernel(1e-4, (1e-8, 1e-1)))


def suggest(X, y, config, rs):
    """bo_batch new lambdas (q, 10) maximising EI over random candidates; kriging believer for q > 1.

    Inputs are scaled to [0, 1]^10. After each pick the GP mean at it is added as a pseudo-observation
    and the GP refitted with its kernel hyperparameters fixed, which pushes the next pick elsewhere."""
    span = config.lambda_high - config.lambda_low
    to_unit = lambda lam: (lam - config.lambda_low) / span
    gp = GaussianProcessRegressor(gp_kernel(X.shape[1]), normalize_y=True, n_restarts_optimizer=config.bo_restarts,
                                  random_state=rs.randint(2 ** 31))
    with warnings.catch_warnings():  # length scales at a bound are expected for irrelevant decays
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(to_unit(X), y)
    best_x = X[np.argmin(y)]
    local = best_x + config.bo_local_sd * rs.randn(config.bo_local_candidates, X.shape[1])
    candidates = np.vstack([uniform_lambdas(config.bo_candidates, config, rs),
                            np.clip(local, config.lambda_low, config.lambda_high)])
    X_b, y_b, picks = to_unit(X), np.asarray(y, float), []
    while True:
        mean, std = gp.predict(to_unit(candidates), return_std=True)
        k = int(np.argmax(expected_improvement(mean, std, y_b.min(), config.bo_xi)))
        picks.append(candidates[k])
        if len(picks) == config.bo_batch:
            return np.array(picks)
        X_b, y_b = np.vstack([X_b, to_unit(candidates[k])[None]]), np.append(y_b, mean[k])
        candidates = np.delete(candidates, k, axis=0)
        gp = GaussianProcessRegressor(gp.kernel_, normalize_y=True, optimizer=None).fit(X_b, y_b)


def propose_bayesopt(config):
    """Bayesian optimisation: bo_initial uniform draws, then bo_batch EI suggestions per GP fit."""
    def propose(state, i):
        rs = step_rng(config.seed, i, STREAM_BO)
        if len(state.valid) == 0:
            return uniform_lambdas(config.bo_initial, config, rs)
        return suggest(state.lambdas, state.valid, config, rs)
    return propose


# ------------------------------------------------------------------------------------------- run

def best_so_far(valid, test):
    """Running minimum of valid and the test loss at that running argmin: (E,), (E,) -> (E,), (E,)."""
    valid, test = np.asarray(valid, float), np.asarray(test, float)
    idx = np.zeros(len(valid), dtype=int)
    for e in range(1, len(valid)):
        idx[e] = e if valid[e] < valid[idx[e - 1]] else idx[e - 1]
    return valid[idx], test[idx]


def best_at(seconds, best_valid, t):
    """Best-so-far validation loss at time t from a curve sampled at seconds (ascending)."""
    return float(best_valid[np.searchsorted(seconds, t, side="right") - 1])


def within_budget(curve, budget):
    """Indices of the curve points recorded no later than the budget (results after it do not count)."""
    return np.nonzero(curve.seconds <= budget)[0]


def run(config, splits, log=print):
    """All three methods, interleaved, each under config.seconds of its own clock -> (summary, arrays)."""
    start = time.perf_counter()
    hyper_lambdas = []
    factories = dict(hypernet=lambda: make_hypernet(splits, config, hyper_lambdas),
                     random=lambda: make_search(splits, config, propose_random(config), STREAM_RANDOM),
                     bayesopt=lambda: make_search(splits, config, propose_bayesopt(config), STREAM_BO))
    runs = {}
    for method in METHODS:
        state, step_fn, evaluate = factories[method]()
        every = (config.eval_every, config.log_every) if method == "hypernet" else (1, 1)
        runs[method] = BudgetedRun(state, step_fn, evaluate, Budget(config.seconds, None, *every), method, log)
    curves = dict(zip(METHODS, run_interleaved(list(runs.values()), config.slice_seconds), strict=True))
    summary = dict(config=config, budget_seconds=config.seconds, n_hyperparameters=config.layer_sizes[-1],
                   hypernet_parameters=hypernet_size("linear", config.layer_sizes[-1],
                                                     nn.num_params(config.layer_sizes), None),
                   methods={})
    arrays = {}
    for method in METHODS:
        curve, keep = curves[method], within_budget(curves[method], config.seconds)
        bv, bt = best_so_far(curve.valid[keep], curve.test[keep])
        arrays.update({f"{method}_seconds": curve.seconds[keep], f"{method}_valid": curve.valid[keep],
                       f"{method}_test": curve.test[keep], f"{method}_best_valid": bv, f"{method}_best_test": bt})
        entry = dict(best_valid=float(bv[-1]), test_at_best=float(bt[-1]),
                     runtime_seconds=float(runs[method].elapsed))
        if method == "hypernet":
            lams = np.array(hyper_lambdas)[keep]
            arrays["hypernet_lambda_hat"] = lams
            entry.update(best_lambda=lams[int(np.argmin(curve.valid[keep]))], final_lambda_hat=lams[-1],
                         final_valid=float(curve.valid[keep][-1]), final_test=float(curve.test[keep][-1]),
                         evaluations=len(keep), lambda_steps=int(curve.step[keep][-1]),
                         hypernet_steps=int(curve.step[keep][-1]) * config.inner_steps)
        else:
            state = runs[method].state
            counted = state.batch + 1 <= curve.step[keep][-1]  # batches finished within the budget
            finish = curve.seconds[np.searchsorted(curve.step, state.batch[counted] + 1)]
            arrays.update({f"{method}_lambdas": state.lambdas[counted], f"{method}_eval_valid": state.valid[counted],
                           f"{method}_eval_test": state.test[counted], f"{method}_eval_seconds": finish})
            entry.update(evaluations=int(counted.sum()), batches=int(curve.step[keep][-1]))
            if counted.any():
                entry["best_lambda"] = state.lambdas[counted][int(np.argmin(state.valid[counted]))]
        summary["methods"][method] = entry
        log(f"{method:>10s} done: {entry['evaluations']} evaluations, best valid {entry['best_valid']:.4f}, "
            f"test there {entry['test_at_best']:.4f}")
    # Target: at equal runtime the hypernetwork's best validation loss is below both baselines'.
    grid = np.linspace(0, config.seconds, 301)[1:]
    best = {m: np.array([best_at(arrays[f"{m}_seconds"], arrays[f"{m}_best_valid"], t) for t in grid])
            for m in METHODS}
    ahead = (best["hypernet"] < best["random"]) & (best["hypernet"] < best["bayesopt"])
    summary["hypernet_below_both_at_end"] = bool(ahead[-1])
    summary["fraction_of_budget_hypernet_below_both"] = float(np.mean(ahead))
    summary["total_seconds"] = time.perf_counter() - start
    if not summary["methods"]["random"]["evaluations"] or not summary["methods"]["bayesopt"]["evaluations"]:
        log("warning: a baseline finished no evaluation within the budget; raise --seconds")
    return summary, arrays


# ------------------------------------------------------------------------------------------ plot

def plot(summary, arrays, out_dir=None):
    """Best validation loss so far (solid) and the test loss at that setting (dashed) against runtime."""
    import matplotlib.pyplot as plt

    set_paper_style(font_size=22)
    fig, ax = plt.subplots(figsize=(10, 7.5))
    budget = summary["budget_seconds"]
    finals = []
    for method in METHODS:
        t = np.append(np.asarray(arrays[f"{method}_seconds"], float), budget)  # flat to the end of the budget
        for key, style, what in (("best_valid", "-", r"$\mathcal{L}_{\mathrm{Valid.}}$"),
                                 ("best_test", "--", r"$\mathcal{L}_{\mathrm{Test}}$")):
            values = np.asarray(arrays[f"{method}_{key}"], float)
            finals.append(values[-1])
            ax.step(t, np.append(values, values[-1]), where="post", linestyle=style, color=COLOURS[method],
                    linewidth=2, label=f"{LABELS[method]} {what}")
    low, high = min(finals), max(finals)
    pad = max(high - low, 0.02)
    ax.set_ylim(low - 0.25 * pad, high + 1.2 * pad)
    ax.set_xlim(0, budget)
    ax.set_xlabel("Runtime in seconds")
    ax.set_ylabel(r"Best loss so far $\mathcal{L}$")
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.legend(loc="upper right", frameon=False, fontsize=16)
    fig.tight_layout()
    paths = save_figure(fig, NAME, out_dir)
    close(fig)
    return paths


# ------------------------------------------------------------------------------------------- CLI

def build_config(args):
    """Config from the defaults, --quick, --synthetic and explicit flags (explicit flags win)."""
    changes = dict(seed=args.seed)
    if args.quick:
        changes.update(QUICK)
    if args.synthetic:
        changes.update(SYNTHETIC_SPLITS)
    for flag in ("seconds", "slice_seconds", "elementary_steps", "random_batch", "bo_batch", "log_every"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    return dataclasses.replace(Config(), **changes)


def load_splits(args, config):
    data = synthetic_mnist(seed=config.seed) if args.synthetic else load_mnist(args.data_dir)
    return scatter_splits(data, config.n_train, config.n_valid, config.n_test)


def main(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive_float, default=None,
                        help=f"wall-clock budget of each method (default {Config.seconds:g})")
    parser.add_argument("--slice-seconds", type=positive_float, default=None,
                        help=f"methods alternate in slices of this many seconds (default {Config.slice_seconds:g})")
    parser.add_argument("--elementary-steps", type=positive_int, default=None,
                        help=f"Adam steps per random-search / BO evaluation (default {Config.elementary_steps})")
    parser.add_argument("--random-batch", type=positive_int, default=None,
                        help=f"random-search lambdas trained at once (default {Config.random_batch})")
    parser.add_argument("--bo-batch", type=positive_int, default=None,
                        help=f"BO suggestions per GP fit, 1 = sequential (default {Config.bo_batch})")
    args = parser.parse_args(argv)
    out_dir = resolve_out_dir(args.out_dir)

    def compute():
        config = build_config(args)
        return run(config, load_splits(args, config))

    summary, _ = replot_or_run(out_dir, NAME, args.replot, compute, plot)
    for method in METHODS:
        m = summary["methods"][method]
        print(f"{method:>10s}: best valid {m['best_valid']:.4f}, test at best {m['test_at_best']:.4f}"
              f" ({m['evaluations']} evaluations)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
