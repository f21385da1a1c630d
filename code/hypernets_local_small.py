"""Local best-response hypernetwork, joint optimisation on 10 MNIST points (Algorithm 3, SPEC 4, Figure 4).

A linear hypernetwork lambda -> elementary weights, [1, 7850], only has to be right near the current
hyperparameter lambda_hat. Each outer step takes one SGD step of the hypernetwork on the training
objective at lambda ~ N(lambda_hat, sigma), then one Adam step of lambda_hat on the validation loss of
the hypernetwork's weights at lambda_hat. lambda_hat travels from -3.5 to the cross-validation optimum.

    python hypernets_local_small.py [--quick] [--iters N] [--seed N] [--algorithm joint|simplified] ...
"""
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad
from threadpoolctl import threadpool_limits

import small_experiments as se
from common import (
    check_finite,
    experiment_parser,
    load_results_as,
    positive_float,
    run_main,
    save_results,
    step_rng,
)
from neural_network import gaussian_nll, hypernet_activation, hypernet_weights, init_hypernet
from optimizers import adam_init, adam_update
from plotting import close, resolve_out_dir, save_figure, set_paper_style

NAME = "hypernets_local_small"
ALGORITHMS = ("joint", "simplified")


@dataclass(frozen=True)
class Config:
    """Settings of one run; defaults are the released code's (SPEC sections 2 and 4)."""

    seed: int = 7                    # initialisations from RandomState(seed); step t's samples from step_rng(seed, t)
    data: str = "mnist"              # "mnist", or "synthetic" (tests only)
    blas_threads: int = 1            # BLAS threads during run(): the products are small, extra threads only wait
    algorithm: str = "joint"         # "joint" (Algorithm 3) or "simplified" (Algorithm 4: train at lambda_hat itself)
    init_scale: float = 0.01         # elementary and hypernetwork weights start as init_scale * N(0, 1)
    lambda_init: float = -3.5        # starting lambda_hat
    sigma: float = 0.0               # joint: lambda ~ N(lambda_hat, sigma) (a standard deviation; paper text 1e-5)
    batch_size: int = 10             # joint: lambdas per step (paper text: 2)
    num_iters: int = 3500            # outer steps (released code: up to 100,000, stopped by hand)
    hypernet_step_size: float = 1e-4  # SGD step of the hypernetwork, no momentum (paper text: Adam)
    hyper_step_size: float = 0.01    # Adam step of lambda_hat; Adam state carried across outer steps
    cv_lo: float = -1.0              # cross-validation crosses at linspace(cv_lo, cv_hi, cv_count)
    cv_hi: float = 3.0
    cv_count: int = 10
    cv_iters: int = 1000             # Adam steps of each cross-validation model
    cv_step_size: float = 1e-4
    sweep_lo: float = -2.0           # dense cross-validation sweep for lambda* (as in hypernets_global_small)
    sweep_hi: float = 4.0
    sweep_size: int = 101
    curve_lo: float = -2.0           # hypernetwork curves at linspace(curve_lo, curve_hi, curve_count)
    curve_hi: float = 4.0
    curve_count: int = 200
    trajectory_points: int = 100     # lambda_hat values kept in the JSON summary (all of them go to the .npz)
    log_every: int = 250             # steps between progress lines


# --quick: a smoke test in seconds (tests, make quick); not a converged figure.
QUICK = dict(num_iters=100, cv_iters=50, sweep_size=21, curve_count=50, log_every=25)


class Results(NamedTuple):
    """Everything the figure and the summary need; arrays are numpy."""

    config: Config
    cv: se.CVResult               # crosses and the dense sweep (lambda_star_cv = cv.lambda_star)
    curve_lambdas: np.ndarray     # (curve_count,)
    hypernet_train: np.ndarray    # (curve_count,) training objective of the hypernetwork's weights
    hypernet_valid: np.ndarray    # (curve_count,) validation loss of the hypernetwork's weights
    lambda_trajectory: np.ndarray  # (num_iters + 1,) lambda_hat before each step and at the end
    objective: np.ndarray         # (num_iters,) the hypernetwork's training objective at each step
    valid_loss: np.ndarray        # (num_iters,) validation loss at lambda_hat at each hyper-step
    valid_loss_final: float       # validation loss of the final hypernetwork at the final lambda_hat
    iterations: int
    seconds: float                # wall time of run(): cross-validation, training, evaluation
    train_seconds: float          # of which the joint optimisation loop
    cpu_seconds: float            # CPU time of run() (all threads): comparable across machine loads


# ----------------------------------------------------------------------------------------- model

def sample_lambdas(config, lambda_hat, step):
    """Hyperparameters the hypernetwork trains on at this step: (batch_size,) joint, (1,) simplified."""
    if config.algorithm == "simplified":
        return np.array([lambda_hat])
    return lambda_hat + config.sigma * step_rng(config.seed, step).randn(config.batch_size)


def hypernet_flat_weights(hyper_params, lambdas):
    """Elementary weights of the linear hypernetwork: lambdas (K,) -> flat (K, 7850) = lambdas a + c."""
    return hypernet_weights(hyper_params, anp.reshape(lambdas, (-1, 1)), hypernet_activation("linear"))


def hypernet_objective(hyper_params, lambdas, splits):
    """Mean training objective of the hypernetwork's weights over the sampled lambdas: a scalar."""
    return anp.mean(se.training_objective(hypernet_flat_weights(hyper_params, lambdas), lambdas,
                                          splits.train_x, splits.train_y))


def valid_loss_and_slope(hyper_params, lambda_hat, valid_x, valid_y):
    """Validation loss of the hypernetwork's weights at lambda_hat and its derivative in lambda_hat.

    The linear hypernetwork gives w(lambda) = lambda a + c, so the predictions are
    y = X w(lambda) and dy/dlambda = X a; both come from ONE product X @ [w(lambda_hat) | a],
    (N, 785) @ (785, 20), i.e. one pass over the validation set. With L = mean 50 (y - t)^2 + const,
    dL/dlambda = mean 100 (y - t) dy/dlambda (forward-mode; tests check it against autograd).
    valid_x: augmented (N, 785); returns two floats."""
    (a, c), = hyper_params                                     # a (1, 7850), c (7850,)
    rows = np.stack([lambda_hat * a[0] + c, a[0]])             # (2, 7850): weights and their lambda-derivative
    columns = np.concatenate(np.reshape(rows, (2, se.N_WEIGHTS // 10, 10)), axis=1)  # (785, 20)
    both = np.dot(valid_x, columns)                            # (N, 20)
    predictions, slope = both[:, :10], both[:, 10:]
    loss = gaussian_nll(predictions, valid_y)
    return float(loss), float(np.mean(100.0 * (predictions - valid_y) * slope))


# ------------------------------------------------------------------------------------------- run

def optimise_jointly(config, splits):
    """The outer loop of Algorithm 3 (or 4): returns (hypernetwork, lambda_hat trajectory, objectives, valid losses)."""
    hyper = init_hypernet("linear", 1, se.N_WEIGHTS, config.init_scale, np.random.RandomState(config.seed))
    objective_and_grad = value_and_grad(hypernet_objective)
    lambda_hat, adam_state = np.array([config.lambda_init]), adam_init(np.zeros(1))
    trajectory, objectives, valid_losses = [config.lambda_init], [], []
    train_start = time.perf_counter()  # for the progress lines
    for step in range(config.num_iters):
        # Hypernetwork: one SGD step on the mean training objective at the sampled lambdas.
        objective, grads = objective_and_grad(hyper, sample_lambdas(config, lambda_hat[0], step), splits)
        check_finite(objective, step + 1, "training objective")
        hyper = [(W - config.hypernet_step_size * gW, b - config.hypernet_step_size * gb)
                 for (W, b), (gW, gb) in zip(hyper, grads, strict=True)]
        # Hyperparameter: one Adam step on the validation loss of the hypernetwork's weights at lambda_hat;
        # the state (m, v, step count) carries over, so bias correction keeps advancing (SPEC section 2).
        valid, slope = valid_loss_and_slope(hyper, lambda_hat[0], splits.valid_x, splits.valid_y)
        check_finite([valid, slope], step + 1, "validation objective")
        lambda_hat, adam_state = adam_update(lambda_hat, np.array([slope]), adam_state, config.hyper_step_size)
        check_finite(lambda_hat, step + 1, "lambda_hat")
        trajectory.append(float(lambda_hat[0]))
        objectives.append(float(objective))
        valid_losses.append(valid)
        if (step + 1) % config.log_every == 0 or step + 1 == config.num_iters:
            print(f"step {step + 1:6d}/{config.num_iters}  objective {objective:8.4f}  valid {valid:7.4f}  "
                  f"lambda {lambda_hat[0]:7.3f}  {time.perf_counter() - train_start:7.1f} s", flush=True)
    return hyper, trajectory, objectives, valid_losses


def run(config, splits):
    """run_experiment with at most config.blas_threads BLAS threads (two made the run 9x slower on a busy machine)."""
    with threadpool_limits(limits=config.blas_threads):
        return run_experiment(config, splits)


def run_experiment(config, splits):
    """Cross-validation baseline, then joint optimisation of the hypernetwork and lambda_hat; returns Results."""
    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {config.algorithm!r}")
    start, cpu_start = time.perf_counter(), time.process_time()
    cv = se.cross_validate(splits, se.grid(config.cv_lo, config.cv_hi, config.cv_count),
                           se.grid(config.sweep_lo, config.sweep_hi, config.sweep_size),
                           config.init_scale, config.seed, config.cv_step_size, config.cv_iters)
    print(f"cross-validation: {config.cv_count} + {config.sweep_size} models x {config.cv_iters} steps, "
          f"lambda* = {cv.lambda_star:.3f}  ({time.perf_counter() - start:.1f} s)", flush=True)

    train_start = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore"):  # a divergence is reported by check_finite, with its step
        hyper, trajectory, objectives, valid_losses = optimise_jointly(config, splits)
    train_seconds = time.perf_counter() - train_start

    curve_lambdas = se.grid(config.curve_lo, config.curve_hi, config.curve_count)
    curve_weights = hypernet_flat_weights(hyper, curve_lambdas)
    train_curve = np.asarray(se.training_objective(curve_weights, curve_lambdas, splits.train_x, splits.train_y))
    valid_curve = se.evaluate_loss(curve_weights, splits.valid_x, splits.valid_y)
    valid_final = valid_loss_and_slope(hyper, trajectory[-1], splits.valid_x, splits.valid_y)[0]
    return Results(config, cv, curve_lambdas, train_curve, valid_curve, np.array(trajectory), np.array(objectives),
                   np.array(valid_losses), valid_final, config.num_iters, time.perf_counter() - start, train_seconds,
                   time.process_time() - cpu_start)


# ------------------------------------------------------------------------------------ save / load

def subsample(trajectory, points):
    """About `points` evenly strided values of a trajectory, always including the first and the last."""
    stride = max(1, (len(trajectory) - 1) // points)
    indices = np.unique(np.append(np.arange(0, len(trajectory), stride), len(trajectory) - 1))
    return trajectory[indices]


def summary_of(results):
    """The JSON summary (exactly the keys the issue lists)."""
    return {
        "lambda_init": results.config.lambda_init,
        "lambda_final": float(results.lambda_trajectory[-1]),
        "lambda_star_cv": results.cv.lambda_star,
        "lambda_trajectory": subsample(results.lambda_trajectory, results.config.trajectory_points),
        "valid_loss_final": results.valid_loss_final,
        "iterations": results.iterations,
        "seconds": results.seconds,
        "config": asdict(results.config),
    }


def save(results, out_dir):
    """<out_dir>/results/NAME.json (summary) and .npz (every array, plotted or not)."""
    arrays = {f"cv_{k}": np.asarray(v) for k, v in results.cv._asdict().items()}
    arrays.update(curve_lambdas=results.curve_lambdas, hypernet_train=results.hypernet_train,
                  hypernet_valid=results.hypernet_valid, lambda_trajectory=results.lambda_trajectory,
                  objective=results.objective, valid_loss=results.valid_loss, train_seconds=results.train_seconds,
                  cpu_seconds=results.cpu_seconds)
    return save_results(out_dir, NAME, summary_of(results), arrays)


def load(out_dir):
    """Results saved by save(); no training, no data."""
    return load_results_as(out_dir, NAME, _results_from)


def _results_from(summary, arrays):
    cv = se.CVResult(**{k: arrays[f"cv_{k}"] for k in se.CVResult._fields if k != "lambda_star"},
                     lambda_star=summary["lambda_star_cv"])
    return Results(Config(**summary["config"]), cv, arrays["curve_lambdas"], arrays["hypernet_train"],
                   arrays["hypernet_valid"], arrays["lambda_trajectory"], arrays["objective"], arrays["valid_loss"],
                   summary["valid_loss_final"], summary["iterations"], summary["seconds"],
                   float(arrays["train_seconds"]), float(arrays["cpu_seconds"]))


# ----------------------------------------------------------------------------------------- figure

FIGSIZE = (10, 10)        # inches (the legend sits above the axes, outside this box)
FONT_SIZE = 28
MARKER_SIZE = 28
LINE_WIDTH = 1.0          # thin lines, as in the published figure
DASHES = (6, 6)           # long dashes (on, off in points), as in the published figure
YLIM = (-1.5, 3.8)        # released code's y-limits
DENSITY_STD = 0.06        # the green curve: N(lambda_hat, DENSITY_STD) over lambda_hat +- DENSITY_HALF_WIDTH,
DENSITY_HALF_WIDTH = 0.5  # divided by DENSITY_DIVISOR and standing on the bottom of the axes (released code)
DENSITY_DIVISOR = 4.0
DENSITY_POINTS = 400


def plot(results, out_dir):
    """Figure 4: hypernetwork train/valid curves, cross-validation crosses, lambda*, p(lambda|lambda_hat)."""
    import matplotlib.pyplot as plt

    set_paper_style(FONT_SIZE)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    cv, lams = results.cv, results.curve_lambdas
    cross = dict(linestyle="none", marker="x", markersize=MARKER_SIZE, markeredgewidth=LINE_WIDTH)
    ax.plot(cv.lambdas, cv.train_loss, color="b", label="Train loss of optimized weights", **cross)
    ax.plot(lams, results.hypernet_train, "b-", linewidth=LINE_WIDTH, label="Train loss of hypernetwork weights")
    ax.plot(cv.lambdas, cv.valid_loss, color="r", label="Valid. loss of optimized weights", **cross)
    ax.plot(lams, results.hypernet_valid, "r-", linewidth=LINE_WIDTH, label="Valid. loss of hypernetwork weights")
    ax.axvline(cv.lambda_star, color="k", linestyle="--", dashes=DASHES, linewidth=LINE_WIDTH,
               label=r"Optimal hyperparameter $\lambda$")
    lambda_hat = float(results.lambda_trajectory[-1])
    xs = np.linspace(lambda_hat - DENSITY_HALF_WIDTH, lambda_hat + DENSITY_HALF_WIDTH, DENSITY_POINTS)
    density = np.exp(-0.5 * ((xs - lambda_hat) / DENSITY_STD) ** 2) / (DENSITY_STD * np.sqrt(2 * np.pi))
    ax.plot(xs, YLIM[0] + density / DENSITY_DIVISOR, "g-", linewidth=LINE_WIDTH,
            label=r"$p(\lambda|\hat{\lambda})$")
    ax.set_xlim(lams[0], lams[-1])
    ax.set_ylim(*YLIM)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(r"Hyperparameter $\lambda$")
    ax.set_ylabel(r"Loss $\mathcal{L}$")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, numpoints=2)
    paths = save_figure(fig, NAME, out_dir, bbox_inches="tight")
    close(fig)
    return paths


# ------------------------------------------------------------------------------------------- main

def make_config(args):
    """Config from the parsed command line: defaults, then --quick, then explicit flags."""
    config = Config(seed=args.seed, data="synthetic" if args.synthetic else "mnist", algorithm=args.algorithm)
    if args.quick:
        config = replace(config, **QUICK)
    overrides = dict(num_iters=args.iters, log_every=args.log_every, hypernet_step_size=args.step_size,
                     hyper_step_size=args.hyper_step_size)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def main(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], default_iters=Config.num_iters)
    parser.add_argument("--algorithm", choices=ALGORITHMS, default=Config.algorithm,
                        help="joint: the hypernetwork trains on lambda ~ N(lambda_hat, sigma), a batch of "
                             f"{Config.batch_size} (Algorithm 3); simplified: it trains at lambda_hat itself "
                             "(Algorithm 4). With the default sigma = 0 both compute the same thing, up to "
                             "floating-point rounding (default joint)")
    parser.add_argument("--step-size", type=positive_float, default=None,
                        help=f"hypernetwork SGD step size (default {Config.hypernet_step_size})")
    parser.add_argument("--hyper-step-size", type=positive_float, default=None,
                        help=f"Adam step size of lambda_hat (default {Config.hyper_step_size})")
    args = parser.parse_args(argv)
    out_dir = resolve_out_dir(args.out_dir)
    if args.replot:
        results = load(out_dir)
    else:
        splits = se.load_small_splits(args.data_dir, synthetic=args.synthetic)
        results = run(make_config(args), splits)
        save(results, out_dir)
    paths = plot(results, out_dir)
    summary = summary_of(results)
    print(f"lambda_hat: {summary['lambda_init']:.3f} -> {summary['lambda_final']:.3f}"
          f" (cross-validation lambda* {summary['lambda_star_cv']:.3f}); valid loss {summary['valid_loss_final']:.4f};"
          f" {results.iterations} steps, {results.train_seconds / max(results.iterations, 1) * 1e3:.1f} ms per step;"
          f" {results.seconds:.1f} s ({results.cpu_seconds:.1f} s of CPU)")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
