"""Global best-response hypernetwork on 10 MNIST points (Algorithm 2, SPEC section 3, Figure 2).

A hypernetwork lambda -> elementary weights, [1, 50, 7850] with a ReLU hidden layer, is trained with
Adam on the mean training objective of a batch of lambdas drawn from p(lambda) every step. Its
validation loss over lambda is compared with cross-validation: fresh linear models trained at fixed
lambdas (crosses), and the optimum lambda* of a dense cross-validation sweep (dashed line).

    python hypernets_global_small.py [--quick] [--iters N] [--seed N] [--out-dir DIR] [--replot]
"""
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import common
import small_experiments as se
import texfmt
from common import check_divergence, check_finite, setting, threshold_verdict
from neural_network import hypernet_weights, init_hypernet, relu
from optimizers import adam_init
from progress import Progress

NAME = "hypernets_global_small"
TEX_PREFIX = "Global"  # every macro this script exports to the paper starts with it
DATA = "mnist"


@dataclass(frozen=True)
class Config:
    """Settings of one run; defaults are the released code's (SPEC sections 2-3) unless a comment says otherwise."""

    seed: int = setting(7, lo=0, hi=common.SEED_MAX)  # initialisations from RandomState(seed); step t's lambdas
    # from step_rng(seed, t) (SPEC: 7 everywhere)
    init_scale: float = setting(0.01, lo=0, lo_open=True)  # elementary and hypernetwork weights start as
    # init_scale * N(0, 1) (released code)
    hidden_units: int = setting(50, lo=1)  # hypernetwork [1, hidden_units, 7850], ReLU (released code)
    num_iters: int = setting(10000, lo=1, flag="iters")  # hypernetwork Adam steps. Released code: up to
    # 100,000, stopped by hand. Our choice: the argmin of the hypernetwork's validation curve creeps toward lambda*
    # for ~10,000 steps (seed 1: gap 0.38 at 2,000 steps, 0.28 at 4,000, 0.10 at 10,000, 0.06 at 14,000; 3,000,
    # the previous default, left gaps above 0.3 for several seeds); about 1 min of CPU for the hand-written steps
    step_size: float = setting(1e-4, lo=0, lo_open=True)  # hypernetwork Adam step size (released code)
    batch_size: int = setting(10, lo=1)  # lambdas per step (released code; paper text: 2)
    lambda_mean: float = setting(1.0)  # p(lambda) = lambda_mean + lambda_std * N(0, 1) ... (released code;
    # paper text: N(0, 1.5))
    lambda_std: float = setting(3.0, lo=0)  # ... (released code)
    lambda_min: float = setting(-100.0)  # ... clipped to [lambda_min, lambda_max] (released code)
    lambda_max: float = setting(4.0)  # (released code)
    cv_lo: float = setting(-1.0)  # cross-validation crosses at linspace(cv_lo, cv_hi, cv_count) (released code)
    cv_hi: float = setting(3.0)  # (released code)
    cv_count: int = setting(10, lo=3)  # (released code)
    cv_iters: int = setting(1000, lo=1)  # Adam steps of each cross-validation model (released code)
    cv_step_size: float = setting(1e-4, lo=0, lo_open=True)  # their Adam step size (released code)
    sweep_lo: float = setting(-2.0)  # dense cross-validation sweep for lambda*: linspace(sweep_lo, sweep_hi,
    # sweep_size), its argmin refined by a parabola through the grid minimum and its two neighbours. Our choice
    # (the released code hard-codes 1.8): spacing 0.06; halving it moves lambda* by < 0.005
    sweep_hi: float = setting(4.0)  # (our choice, see --sweep-lo)
    sweep_size: int = setting(101, lo=3)  # (our choice, see --sweep-lo)
    curve_lo: float = setting(-2.0)  # hypernetwork validation curve at linspace(curve_lo, curve_hi, curve_count)
    # (released code)
    curve_hi: float = setting(4.0)  # (released code)
    curve_count: int = setting(200, lo=3)  # (released code)
    log_every: int = setting(1000, lo=1)  # steps between progress lines (our choice)
    gradients: str = setting("handwritten", choices=se.GRADIENTS)  # hand-written gradients with preallocated
    # buffers, or autograd (the slow reference they equal to 1e-9; same numbers up to rounding)


# --quick: a smoke test in seconds (tests, make quick); not a converged figure.
QUICK = dict(num_iters=100, cv_iters=50, sweep_size=21, curve_count=50, log_every=25)

# Claims (SPEC section 10): "reproduced" within the first threshold, "partly" within the second.
ARGMIN_GAP_REPRODUCED = 0.3   # |lambda*_hypernet - lambda*_cv| (log weight decay); the crosses are 0.44 apart
ARGMIN_GAP_PARTLY = 0.6
CURVE_GAP_REPRODUCED = 0.05   # mean |hypernetwork - cross-validation| validation loss at the crosses (NLL);
CURVE_GAP_PARTLY = 0.15       # the published figure's curve passes through the crosses, about 0.03 apart


# ------------------------------------------------------------------------------------------- model

def sample_lambdas(config, normals, step):
    """The batch of step `step`: lambda_mean + lambda_std * N(0, 1), clipped; (batch_size,).

    normals: se.StepNormals(config.seed) (the draws of common.step_rng(seed, step))."""
    draws = normals(step, config.batch_size)
    return np.clip(config.lambda_mean + config.lambda_std * draws, config.lambda_min, config.lambda_max)


def hypernet_valid_loss(hyper_params, lambdas, splits):
    """Validation loss (no regulariser) of the hypernetwork's weights at each lambda: (K,) -> (K,)."""
    weights = hypernet_weights(hyper_params, np.reshape(lambdas, (-1, 1)), relu)
    return se.evaluate_loss(weights, splits.valid_x, splits.valid_y)


class Trained(NamedTuple):
    """What train_hypernet returns."""

    params: np.ndarray         # the trained hypernetwork, flat
    problem: se.GlobalProblem  # the training problem (shapes, minibatching)
    log_steps: list            # steps at which the objective was logged
    log_objective: list        # the objective there
    wall_seconds: float        # training wall time
    cpu_seconds: float         # training CPU time


def train_hypernet(config, splits):
    """Adam on the hypernetwork for config.num_iters steps; returns Trained."""
    problem = se.GlobalProblem(splits.train_x, splits.train_y, config.hidden_units, config.batch_size)
    params = se.global_flat_params(init_hypernet("mlp", 1, se.N_WEIGHTS, config.init_scale,
                                                 np.random.RandomState(config.seed), hidden=config.hidden_units))
    state = adam_init(params)
    step_fn = se.global_step if config.gradients == "handwritten" else se.global_step_reference
    normals = se.StepNormals(config.seed)
    log_steps, log_objective, first = [], [], None
    wall0, cpu0 = time.perf_counter(), time.process_time()
    bar = Progress(total=config.num_iters, desc="global hypernetwork", unit="step")
    for step in range(config.num_iters):
        objective, state = step_fn(problem, params, state, sample_lambdas(config, normals, step), config.step_size)
        first = objective if first is None else first
        check_divergence(objective, first, step + 1, "training objective")
        bar.update(1, objective=f"{objective:.4f}")
        if (step + 1) % config.log_every == 0 or step + 1 == config.num_iters:
            log_steps.append(step + 1)
            log_objective.append(objective)
            print(f"step {step + 1:6d}/{config.num_iters}  objective {objective:8.4f}  "
                  f"{time.perf_counter() - wall0:7.1f} s", flush=True)
    bar.close()
    check_finite(params, config.num_iters, "hypernetwork parameters")
    return Trained(params, problem, log_steps, log_objective, time.perf_counter() - wall0, time.process_time() - cpu0)


# --------------------------------------------------------------------------------------------- run

def run(config, data):
    """Cross-validation baseline, then Adam on the hypernetwork; returns (summary, arrays)."""
    wall0 = time.perf_counter()
    splits = se.splits_of(data)
    cv = se.cross_validate_config(splits, config)

    trained = train_hypernet(config, splits)
    hyper = se.global_params_list(trained.problem, trained.params)
    curve_lambdas = se.grid(config.curve_lo, config.curve_hi, config.curve_count)
    curve = hypernet_valid_loss(hyper, curve_lambdas, splits)
    at_cv = hypernet_valid_loss(hyper, cv.lambdas, splits)
    check_finite(curve, config.num_iters, "hypernetwork validation loss")
    lambda_star_hypernet = se.parabola_argmin(curve_lambdas, curve)
    summary = {
        "lambda_star_cv": cv.lambda_star,
        "lambda_star_hypernet": lambda_star_hypernet,
        "lambda_gap": abs(lambda_star_hypernet - cv.lambda_star),
        "cv_lambdas": cv.lambdas.tolist(),
        "cv_valid_loss": cv.valid_loss.tolist(),
        "hypernet_valid_at_cv": at_cv.tolist(),
        "curve_gap": float(np.mean(np.abs(at_cv - cv.valid_loss))),
        "iterations": config.num_iters,
        "final_objective": trained.log_objective[-1],
        "seconds": time.perf_counter() - wall0,
        "train_seconds": trained.wall_seconds,
        "train_cpu_seconds": trained.cpu_seconds,
        "step_ms": 1e3 * trained.cpu_seconds / config.num_iters,
    }
    arrays = {f"cv_{k}": np.asarray(v) for k, v in cv._asdict().items() if k != "lambda_star"}
    arrays.update(curve_lambdas=curve_lambdas, hypernet_valid=curve, hypernet_valid_at_cv=at_cv,
                  log_steps=np.array(trained.log_steps), log_objective=np.array(trained.log_objective))
    return summary, arrays


def report(summary):
    """The headline numbers, printed after a run."""
    print(f"lambda*: cross-validation {summary['lambda_star_cv']:.3f}, hypernetwork "
          f"{summary['lambda_star_hypernet']:.3f} (gap {summary['lambda_gap']:.3f}); mean |gap| at the crosses "
          f"{summary['curve_gap']:.4f}; {summary['iterations']} steps, {summary['step_ms']:.2f} ms of CPU per "
          f"step; {summary['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------- figure

FIGSIZE = (10, 10)       # inches
FONT_SIZE = 28
MARKER_SIZE = 28
LINE_WIDTH = 1.0         # thin lines, as in the published figure
DASHES = (6, 6)          # long dashes (on, off in points), as in the published figure
DASHED_TOP = 0.67        # the dashed line rises to this fraction of the axes height, as published
BOTTOM_PAD = 0.18        # space below the lowest point, as a fraction of the plotted range (as published)
TOP_PAD = 0.04           # space above the highest point, so that a cross there is drawn whole
LEGEND_CLEARANCE = 0.02  # data under the upper-left legend stay this fraction of the axes below it: the top
# of the axes is raised until they do (a short run's crosses and curve are high on the left)


def clear_legend(ax, legend, xs, ys, marker_points):
    """Raise the top y-limit until no point (xs, ys), drawn with a marker of marker_points, touches legend."""
    fig = ax.figure
    fig.canvas.draw()
    box = legend.get_window_extent().transformed(ax.transAxes.inverted())   # axes fractions
    x_frac = (np.asarray(xs) - ax.get_xlim()[0]) / (ax.get_xlim()[1] - ax.get_xlim()[0])
    half_marker = 0.5 * marker_points / 72.0 * fig.dpi / ax.get_window_extent().height
    under = (x_frac >= box.x0 - half_marker) & (x_frac <= box.x1 + half_marker)
    if not np.any(under):
        return
    lo, hi = ax.get_ylim()
    room = box.y0 - LEGEND_CLEARANCE - half_marker      # highest allowed axes fraction of a point's centre
    needed = lo + (float(np.max(np.asarray(ys)[under])) - lo) / room
    if needed > hi:
        ax.set_ylim(lo, needed)


def plot(summary, arrays, out_dir):
    """Figure 2: cross-validation crosses, the hypernetwork's validation curve, lambda*; returns the paths."""
    import matplotlib.pyplot as plt

    from plotting import finish_figure, schematic_axes, set_paper_style

    set_paper_style(FONT_SIZE)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    cv_lambdas, cv_valid = arrays["cv_lambdas"], arrays["cv_valid_loss"]
    curve_lambdas, curve = arrays["curve_lambdas"], arrays["hypernet_valid"]
    ax.plot(cv_lambdas, cv_valid, "kx", markersize=MARKER_SIZE, markeredgewidth=LINE_WIDTH,
            label="Cross-validation")
    ax.plot(curve_lambdas, curve, "r-", linewidth=LINE_WIDTH, label="Optimized hypernetwork")
    ax.axvline(summary["lambda_star_cv"], ymax=DASHED_TOP, color="k", linestyle="--", dashes=DASHES,
               linewidth=LINE_WIDTH, label=r"Optimal hyperparameter $\lambda^{\ast}$")
    low, high = min(np.min(cv_valid), np.min(curve)), max(np.max(cv_valid), np.max(curve))
    ax.set_xlim(curve_lambdas[0], curve_lambdas[-1])
    ax.set_ylim(low - BOTTOM_PAD * (high - low), high + TOP_PAD * (high - low))
    schematic_axes(ax, r"Hyperparameter $\lambda$", r"Validation Loss $\mathcal{L}_{\mathrm{Valid.}}$")
    legend = ax.legend(loc="upper left", frameon=False, numpoints=2)
    clear_legend(ax, legend, cv_lambdas, cv_valid, MARKER_SIZE)
    clear_legend(ax, legend, curve_lambdas, curve, LINE_WIDTH)
    return finish_figure(fig, NAME, out_dir, tight=False, bbox_inches="tight")


# ------------------------------------------------------------------------------- paper and claims

def tex_numbers(summary):
    """The numbers main.tex quotes about Figure 2 and its run: macro name -> LaTeX."""
    return texfmt.macros(TEX_PREFIX, summary, """
        LambdaStarCV        lam         lambda_star_cv
        LambdaStarHypernet  lam         lambda_star_hypernet
        LambdaGap           lam         lambda_gap
        CurveGap            nll         curve_gap
        Iterations          integer     iterations
        Seconds             seconds     provenance.cpu_seconds
        HyperBatch          integer     config.batch_size
        StepSize            scientific  config.step_size
        Hidden              integer     config.hidden_units
        LambdaMean          conf        config.lambda_mean
        LambdaStd           conf        config.lambda_std
        LambdaMax           conf        config.lambda_max
        CVLo                conf        config.cv_lo
        CVHi                conf        config.cv_hi
        CVIters             integer     config.cv_iters
        SweepSize           integer     config.sweep_size
    """) | {TEX_PREFIX + "NumCV": texfmt.integer(len(summary["cv_lambdas"]))}  # seconds: CPU, load-independent


def argmin_verdict(summary):
    """(gap between the hypernetwork's and cross-validation's argmin, verdict)."""
    return summary["lambda_gap"], threshold_verdict(summary["lambda_gap"], ARGMIN_GAP_REPRODUCED, ARGMIN_GAP_PARTLY)


def curve_verdict(summary):
    """(mean gap between the hypernetwork's curve and the cross-validation crosses, verdict)."""
    return summary["curve_gap"], threshold_verdict(summary["curve_gap"], CURVE_GAP_REPRODUCED, CURVE_GAP_PARTLY)


CLAIMS = common.claims(globals(), """
    id: fig2-argmin
    claim: The hypernetwork's validation curve has its minimum at the cross-validation optimum lambda*
    paper: gap ~0 (Figure 2: the curve's minimum sits on the dashed line)
    evaluate: argmin_verdict
    fmt: {:.3f}
    evidence: lambda_gap (lambda_star_hypernet vs lambda_star_cv); hypernets_global_small.pdf

    id: fig2-curve
    claim: The optimized hypernetwork's validation loss matches cross-validation at the crosses
    paper: curve through the crosses (Figure 2)
    evaluate: curve_verdict
    fmt: {:.3f}
    evidence: curve_gap (hypernet_valid_at_cv vs cv_valid_loss); hypernets_global_small.pdf
""")


if __name__ == "__main__":
    sys.exit(common.main(sys.modules[__name__]))
