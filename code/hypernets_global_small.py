"""Global best-response hypernetwork on 10 MNIST points (Algorithm 2, SPEC section 3, Figure 2).

A hypernetwork lambda -> elementary weights, [1, 50, 7850] with a ReLU hidden layer, is trained with
Adam on the mean training objective of a batch of lambdas drawn from p(lambda) every step. Its
validation loss over lambda is compared with cross-validation: fresh linear models trained at fixed
lambdas (crosses), and the optimum lambda* of a dense cross-validation sweep (dashed line).

    python hypernets_global_small.py [--quick] [--iters N] [--seed N] [--out-dir DIR] [--replot]
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
from neural_network import hypernet_activation, hypernet_weights, init_hypernet
from optimizers import adam
from plotting import close, resolve_out_dir, save_figure, set_paper_style

NAME = "hypernets_global_small"


@dataclass(frozen=True)
class Config:
    """Settings of one run; defaults are the released code's (SPEC sections 2-3)."""

    seed: int = 7                 # initialisations from RandomState(seed); step t's lambdas from step_rng(seed, t)
    data: str = "mnist"           # "mnist", or "synthetic" (tests only)
    blas_threads: int = 1         # BLAS threads during run(): the products are small, extra threads only wait
    init_scale: float = 0.01      # elementary and hypernetwork weights start as init_scale * N(0, 1)
    hidden_units: int = 50        # hypernetwork [1, hidden_units, 7850], ReLU
    num_iters: int = 3000         # hypernetwork Adam steps (released code: up to 100,000, stopped by hand)
    step_size: float = 1e-4       # hypernetwork Adam step size
    batch_size: int = 10          # lambdas per step (paper text: 2)
    lambda_mean: float = 1.0      # p(lambda) = lambda_mean + lambda_std * N(0, 1) ... (paper text: N(0, 1.5))
    lambda_std: float = 3.0
    lambda_min: float = -100.0    # ... clipped to [lambda_min, lambda_max]
    lambda_max: float = 4.0
    cv_lo: float = -1.0           # cross-validation crosses at linspace(cv_lo, cv_hi, cv_count)
    cv_hi: float = 3.0
    cv_count: int = 10
    cv_iters: int = 1000          # Adam steps of each cross-validation model
    cv_step_size: float = 1e-4
    sweep_lo: float = -2.0        # dense cross-validation sweep for lambda*: linspace(sweep_lo, sweep_hi, sweep_size),
    sweep_hi: float = 4.0         # its argmin refined by a parabola through the grid minimum and its two neighbours
                                  # (spacing 0.06; the sweep is smooth, halving the grid moves lambda* by < 0.005)
    sweep_size: int = 101
    curve_lo: float = -2.0        # hypernetwork validation curve at linspace(curve_lo, curve_hi, curve_count)
    curve_hi: float = 4.0
    curve_count: int = 200
    log_every: int = 500          # steps between progress lines


# --quick: a smoke test in seconds (tests, make quick); not a converged figure.
QUICK = dict(num_iters=100, cv_iters=50, sweep_size=21, curve_count=50, log_every=25)


class Results(NamedTuple):
    """Everything the figure and the summary need; arrays are numpy."""

    config: Config
    cv: se.CVResult                 # crosses and the dense sweep (lambda_star_cv = cv.lambda_star)
    curve_lambdas: np.ndarray       # (curve_count,)
    hypernet_valid: np.ndarray      # (curve_count,) validation loss of the hypernetwork's weights
    hypernet_valid_at_cv: np.ndarray  # (cv_count,) the same at the cross-validation lambdas
    lambda_star_hypernet: float     # argmin of hypernet_valid (same parabola refinement as lambda*)
    log_steps: np.ndarray           # steps of the progress lines ...
    log_objective: np.ndarray       # ... and the training objective there
    iterations: int
    seconds: float                  # wall time of run(): cross-validation, training, evaluation
    train_seconds: float            # of which the hypernetwork's training loop
    cpu_seconds: float              # CPU time of run() (all threads): comparable across machine loads


# ----------------------------------------------------------------------------------------- model

def sample_lambdas(config, step):
    """The batch of step `step`: lambda_mean + lambda_std * N(0, 1), clipped; (batch_size,)."""
    draws = step_rng(config.seed, step).randn(config.batch_size)
    return np.clip(config.lambda_mean + config.lambda_std * draws, config.lambda_min, config.lambda_max)


def hypernet_flat_weights(hyper_params, lambdas):
    """Elementary weights proposed by the hypernetwork: lambdas (K,) -> flat (K, 7850)."""
    return hypernet_weights(hyper_params, anp.reshape(lambdas, (-1, 1)), hypernet_activation("mlp"))


def hypernet_objective(hyper_params, lambdas, splits):
    """Mean training objective of the hypernetwork's weights over a batch of lambdas: a scalar."""
    return anp.mean(se.training_objective(hypernet_flat_weights(hyper_params, lambdas), lambdas,
                                          splits.train_x, splits.train_y))


def hypernet_valid_loss(hyper_params, lambdas, splits):
    """Validation loss (no regulariser) of the hypernetwork's weights at each lambda: (K,) -> (K,)."""
    return se.evaluate_loss(hypernet_flat_weights(hyper_params, np.asarray(lambdas)), splits.valid_x, splits.valid_y)


# ------------------------------------------------------------------------------------------- run

def run(config, splits):
    """run_experiment with at most config.blas_threads BLAS threads (two made the run 9x slower on a busy machine)."""
    with threadpool_limits(limits=config.blas_threads):
        return run_experiment(config, splits)


def run_experiment(config, splits):
    """Cross-validation baseline, then Adam on the hypernetwork; returns Results."""
    start, cpu_start = time.perf_counter(), time.process_time()
    cv = se.cross_validate(splits, se.grid(config.cv_lo, config.cv_hi, config.cv_count),
                           se.grid(config.sweep_lo, config.sweep_hi, config.sweep_size),
                           config.init_scale, config.seed, config.cv_step_size, config.cv_iters)
    print(f"cross-validation: {config.cv_count} + {config.sweep_size} models x {config.cv_iters} steps, "
          f"lambda* = {cv.lambda_star:.3f}  ({time.perf_counter() - start:.1f} s)", flush=True)

    hyper0 = init_hypernet("mlp", 1, se.N_WEIGHTS, config.init_scale, np.random.RandomState(config.seed),
                           hidden=config.hidden_units)
    objective_and_grad = value_and_grad(lambda params, step: hypernet_objective(
        params, sample_lambdas(config, step), splits))
    log_steps, log_objective, train_start = [], [], time.perf_counter()

    def grad(params, step):
        value, g = objective_and_grad(params, step)
        check_finite(value, step + 1, "training objective")
        if (step + 1) % config.log_every == 0 or step + 1 == config.num_iters:
            log_steps.append(step + 1)
            log_objective.append(float(value))
            print(f"step {step + 1:6d}/{config.num_iters}  objective {value:8.4f}  "
                  f"{time.perf_counter() - train_start:7.1f} s", flush=True)
        return g

    with np.errstate(over="ignore", invalid="ignore"):  # a divergence is reported by check_finite, with its step
        hyper = adam(grad, hyper0, num_iters=config.num_iters, step_size=config.step_size)
    train_seconds = time.perf_counter() - train_start

    curve_lambdas = se.grid(config.curve_lo, config.curve_hi, config.curve_count)
    curve = hypernet_valid_loss(hyper, curve_lambdas, splits)
    at_cv = hypernet_valid_loss(hyper, cv.lambdas, splits)
    check_finite(curve, config.num_iters, "hypernetwork validation loss")
    return Results(config, cv, curve_lambdas, curve, at_cv, se.parabola_argmin(curve_lambdas, curve),
                   np.array(log_steps), np.array(log_objective), config.num_iters,
                   time.perf_counter() - start, train_seconds,
                   time.process_time() - cpu_start)


# ------------------------------------------------------------------------------------ save / load

def summary_of(results):
    """The JSON summary (exactly the keys the issue lists)."""
    return {
        "lambda_star_cv": results.cv.lambda_star,
        "lambda_star_hypernet": results.lambda_star_hypernet,
        "cv_lambdas": results.cv.lambdas,
        "cv_valid_loss": results.cv.valid_loss,
        "hypernet_valid_at_cv": results.hypernet_valid_at_cv,
        "iterations": results.iterations,
        "seconds": results.seconds,
        "config": asdict(results.config),
    }


def save(results, out_dir):
    """<out_dir>/results/NAME.json (summary) and .npz (every array, plotted or not)."""
    arrays = {f"cv_{k}": np.asarray(v) for k, v in results.cv._asdict().items()}
    arrays.update(curve_lambdas=results.curve_lambdas, hypernet_valid=results.hypernet_valid,
                  hypernet_valid_at_cv=results.hypernet_valid_at_cv, log_steps=results.log_steps,
                  log_objective=results.log_objective, train_seconds=results.train_seconds,
                  cpu_seconds=results.cpu_seconds)
    return save_results(out_dir, NAME, summary_of(results), arrays)


def load(out_dir):
    """Results saved by save(); no training, no data."""
    return load_results_as(out_dir, NAME, _results_from)


def _results_from(summary, arrays):
    cv = se.CVResult(**{k: arrays[f"cv_{k}"] for k in se.CVResult._fields if k != "lambda_star"},
                     lambda_star=summary["lambda_star_cv"])
    return Results(Config(**summary["config"]), cv, arrays["curve_lambdas"], arrays["hypernet_valid"],
                   arrays["hypernet_valid_at_cv"], summary["lambda_star_hypernet"], arrays["log_steps"],
                   arrays["log_objective"], summary["iterations"], summary["seconds"], float(arrays["train_seconds"]),
                   float(arrays["cpu_seconds"]))


# ----------------------------------------------------------------------------------------- figure

FIGSIZE = (10, 10)       # inches
FONT_SIZE = 28
MARKER_SIZE = 28
LINE_WIDTH = 1.0         # thin lines, as in the published figure
DASHES = (6, 6)          # long dashes (on, off in points), as in the published figure
DASHED_TOP = 0.67        # the dashed line rises to this fraction of the axes height, as published
BOTTOM_PAD = 0.18        # space below the lowest point, as a fraction of the plotted range


def plot(results, out_dir):
    """Figure 2: cross-validation crosses, the hypernetwork's validation curve, lambda*; returns paths."""
    import matplotlib.pyplot as plt

    set_paper_style(FONT_SIZE)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    cv = results.cv
    ax.plot(cv.lambdas, cv.valid_loss, "kx", markersize=MARKER_SIZE, markeredgewidth=LINE_WIDTH,
            label="Cross-validation")
    ax.plot(results.curve_lambdas, results.hypernet_valid, "r-", linewidth=LINE_WIDTH,
            label="Optimized hypernetwork")
    ax.axvline(cv.lambda_star, ymax=DASHED_TOP, color="k", linestyle="--", dashes=DASHES, linewidth=LINE_WIDTH,
               label=r"Optimal hyperparameter $\lambda^{\ast}$")
    low = min(np.min(cv.valid_loss), np.min(results.hypernet_valid))
    high = max(np.max(cv.valid_loss), np.max(results.hypernet_valid))
    ax.set_xlim(results.curve_lambdas[0], results.curve_lambdas[-1])
    ax.set_ylim(low - BOTTOM_PAD * (high - low), high)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(r"Hyperparameter $\lambda$")
    ax.set_ylabel(r"Validation Loss $\mathcal{L}_{\mathrm{Valid.}}$")
    ax.legend(loc="upper left", frameon=False, numpoints=2)
    paths = save_figure(fig, NAME, out_dir, bbox_inches="tight")
    close(fig)
    return paths


# ------------------------------------------------------------------------------------------- main

def make_config(args):
    """Config from the parsed command line: defaults, then --quick, then explicit flags."""
    config = Config(seed=args.seed, data="synthetic" if args.synthetic else "mnist")
    if args.quick:
        config = replace(config, **QUICK)
    if args.iters is not None:
        config = replace(config, num_iters=args.iters)
    if args.log_every is not None:
        config = replace(config, log_every=args.log_every)
    if args.step_size is not None:
        config = replace(config, step_size=args.step_size)
    return config


def main(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], default_iters=Config.num_iters)
    parser.add_argument("--step-size", type=positive_float, default=None,
                        help=f"hypernetwork Adam step size (default {Config.step_size})")
    args = parser.parse_args(argv)
    out_dir = resolve_out_dir(args.out_dir)
    if args.replot:
        results = load(out_dir)
    else:
        splits = se.load_small_splits(args.data_dir, synthetic=args.synthetic)
        results = run(make_config(args), splits)
        save(results, out_dir)
    paths = plot(results, out_dir)
    print(f"lambda*: cross-validation {results.cv.lambda_star:.3f}, hypernetwork {results.lambda_star_hypernet:.3f};"
          f" mean |gap| at the crosses {np.mean(np.abs(results.hypernet_valid_at_cv - results.cv.valid_loss)):.4f};"
          f" {results.iterations} steps, {results.train_seconds / max(results.iterations, 1) * 1e3:.1f} ms per step;"
          f" {results.seconds:.1f} s ({results.cpu_seconds:.1f} s of CPU)")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
