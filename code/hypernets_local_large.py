"""7,850 hyperparameters: hyper-training versus unrolled differentiation (SPEC section 7, Figure 5 top).

One L2 decay exp(lambda_j) w_j^2 per weight and bias of the linear 784-10 model, plain MSE, train / valid /
test 10,000 images each (per_weight_decay.large_splits). Two methods get the same wall-clock budget and
record validation and test MSE against their own elapsed time (evaluations are not on the clock):

* hyper-training, Algorithm 3 (or 4 with --algorithm simplified): a factorised linear hypernetwork
  7,850 -> 10 -> 7,850 (164,860 parameters) trained jointly with lambda_hat (per_weight_decay.alg3_step);
  its loss is that of w_phi(lambda_hat).
* unrolled differentiation (Maclaurin et al. 2015): w_T(lambda) = T steps of Adam (or SGD) on training
  minibatches from a fixed init and a fixed minibatch schedule; autograd differentiates the validation MSE
  of w_T(lambda) through the whole unrolled loop; outer Adam on lambda. Its loss is that of w_T(lambda).

The two runs alternate in slices of --slice-seconds of method time, so machine load hits both alike.

    python hypernets_local_large.py [--seconds 240] [--iters N] [--algorithm joint|simplified] [--quick]
"""
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad

from common import (
    ExperimentError,
    check_finite,
    experiment_parser,
    nonnegative_int,
    positive_float,
    positive_int,
    run_main,
    step_rng,
)
from neural_network import flatten_params, init_mlp, num_params
from optimizers import adam_init, adam_inplace
from per_weight_decay import (
    Alg3Settings,
    Budget,
    BudgetedRun,
    HyperProblem,
    alg3_step,
    current_weights,
    decay_objective,
    hypernet_size,
    init_alg3,
    mse_loss,
    run_interleaved,
    script_main,
    time_to_reach,
)

NAME = "hypernets_local_large"
LAYERS = (784, 10)
N_PIXELS, N_CLASSES = LAYERS
STREAM_UNROLL_SCHEDULE, STREAM_UNROLL_VALID = 11, 12  # step_rng streams of the baseline
METHODS = ("hyper", "unrolled")


@dataclass(frozen=True)
class Config:
    """Settings (SPEC section 7; the paper leaves lambda_hat's start, init scales and the baseline open)."""

    seed: int = 7
    seconds: float = 240.0            # wall-clock budget of EACH method (seconds of its own training time)
    iters: int = None                 # if set: fixed number of outer steps per method instead (reproducible)
    slice_seconds: float = 10.0       # the two methods alternate in slices of this much method time
    n_train: int = 10000              # train = MNIST training images [0, 10,000)
    n_valid: int = 10000              # valid = training images [10,000, 20,000)
    n_test: int = 10000               # test = the 10,000 test images
    init_lambda: float = -7.0         # every lambda_j at the start (both methods); near the best global decay
    # hyper-training (Algorithm 3 / 4)
    algorithm: str = "joint"
    hidden: int = 10                  # factorised hypernetwork bottleneck (paper)
    init_scale: float = 1e-3          # hypernetwork init, init_scale * N(0, 1)
    centre_input: bool = True         # the hypernetwork sees lambda - init_lambda (see README; --raw-input: lambda)
    n_samples: int = 2                # lambda samples per hypernetwork step (paper)
    sample_sd: float = 1e-5           # sd of lambda ~ N(lambda_hat, sd^2) (paper's "variance 1e-5", used as an sd)
    inner_steps: int = 10             # hypernetwork steps per lambda_hat step (paper macro)
    hypernet_step: float = 1e-4       # Adam step size of the hypernetwork (paper)
    lambda_step: float = 1e-4         # Adam step size of lambda_hat (paper)
    batch_size: int = 100             # data minibatch (paper macro), training and validation
    eval_every: int = 20              # hyper-training steps between full-set evaluations
    log_every: int = 500              # hyper-training steps between progress lines
    # unrolled baseline
    unroll_steps: int = 200           # T: inner training steps that are unrolled
    unroll_inner: str = "adam"        # inner optimiser: 'adam' (b1 0.9, b2 0.999) or 'sgd'
    unroll_inner_step: float = 1e-3   # inner step size
    unroll_outer_step: float = 0.2    # Adam step size on lambda (outer)
    unroll_init_scale: float = 1e-3   # fixed elementary init w0 = unroll_init_scale * N(0, 1)
    unroll_valid_batch: int = 0       # validation points per hypergradient; 0 = the full validation set
    unroll_eval_every: int = 2        # outer steps between evaluations
    unroll_log_every: int = 10        # outer steps between progress lines
    blas_threads: int = 1             # BLAS threads while training (more only wait on a busy machine)
    synthetic: bool = False           # tests: synthetic stand-in data


QUICK = dict(seconds=3.0, slice_seconds=1.0, n_train=500, n_valid=500, n_test=500, eval_every=5, log_every=20,
             unroll_steps=10, unroll_eval_every=1, unroll_log_every=5)


# ---------------------------------------------------------------------------------- unrolled baseline

class UnrolledState(NamedTuple):
    """Outer state of the baseline: lambda (P,), its Adam state, steps done."""

    lam: np.ndarray
    adam: object
    step: int


def linear_decay_grad(w, lam, x, y):
    """Gradient of MSE(x W + b, y) + sum_j exp(lambda_j) w_j^2 for the linear model, written out so the
    unrolled loop stays cheap: flat w (P,), lam (P,), x (B, 784), y (B, 10) -> (P,); autograd-traceable."""
    W = anp.reshape(w[:N_PIXELS * N_CLASSES], (N_PIXELS, N_CLASSES))
    b = w[N_PIXELS * N_CLASSES:]
    residual = anp.dot(x, W) + b - y            # (B, 10)
    scale = 2.0 / (x.shape[0] * N_CLASSES)      # d/dy of mean((y - t)^2)
    g_W = scale * anp.dot(x.T, residual)
    g_b = scale * anp.sum(residual, axis=0)
    return anp.concatenate([anp.ravel(g_W), g_b]) + 2.0 * anp.exp(lam) * w


def unrolled_train(lam, w0, batches_x, batches_y, config):
    """w_T(lambda): T inner steps of Adam or SGD from w0 on the fixed minibatches (T, B, D), (T, B, C)."""
    w, m, v = w0, anp.zeros_like(w0), anp.zeros_like(w0)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(config.unroll_steps):
        g = linear_decay_grad(w, lam, batches_x[t], batches_y[t])
        if config.unroll_inner == "sgd":
            w = w - config.unroll_inner_step * g
        else:  # Adam, bias-corrected, differentiable in lambda
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g ** 2
            m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
            w = w - config.unroll_inner_step * m_hat / (anp.sqrt(v_hat) + eps)
    return w


def unrolled_schedule(splits, config):
    """The fixed training minibatches of the inner loop: (T, B, 784), (T, B, 10); the same every outer step."""
    rs = step_rng(config.seed, 0, STREAM_UNROLL_SCHEDULE)
    idx = rs.randint(0, len(splits.train_x), size=(config.unroll_steps, config.batch_size))
    return splits.train_x[idx], splits.train_y[idx]


def make_unrolled(splits, config):
    """(initial state, step_fn, evaluate) of the unrolled baseline."""
    w0 = flatten_params(init_mlp(LAYERS, config.unroll_init_scale, np.random.RandomState(config.seed)))
    batches_x, batches_y = unrolled_schedule(splits, config)
    loss = mse_loss(LAYERS)

    def valid_objective(lam, vx, vy):
        return loss(unrolled_train(lam, w0, batches_x, batches_y, config)[None, :], vx, vy)[0]
    hypergrad = value_and_grad(valid_objective)

    def step_fn(state, i):
        if config.unroll_valid_batch:
            rs = step_rng(config.seed, i, STREAM_UNROLL_VALID)
            idx = rs.randint(0, len(splits.valid_x), size=config.unroll_valid_batch)
            vx, vy = splits.valid_x[idx], splits.valid_y[idx]
        else:
            vx, vy = splits.valid_x, splits.valid_y
        value, g = hypergrad(state.lam, vx, vy)
        check_finite(value, i, "unrolled validation loss")
        check_finite(g, i, "unrolled hypergradient")
        lam = state.lam.copy()
        adam = adam_inplace(lam, g, state.adam, config.unroll_outer_step, np.empty(lam.size))
        return UnrolledState(lam, adam, state.step + 1)

    def evaluate(state):
        w = unrolled_train(state.lam, w0, batches_x, batches_y, config)[None, :]
        return loss(w, splits.valid_x, splits.valid_y)[0], loss(w, splits.test_x, splits.test_y)[0]

    lam0 = np.full(num_params(LAYERS), float(config.init_lambda))
    return UnrolledState(lam0, adam_init(lam0), 0), step_fn, evaluate


# ------------------------------------------------------------------------------------ hyper-training

def alg3_settings(config):
    """The Algorithm 3 settings of this experiment."""
    return Alg3Settings(hypernet_kind="factorised", hidden=config.hidden, init_scale=config.init_scale,
                        init_lambda=config.init_lambda, algorithm=config.algorithm, n_samples=config.n_samples,
                        sample_sd=config.sample_sd, inner_steps=config.inner_steps,
                        hypernet_step=config.hypernet_step, lambda_step=config.lambda_step,
                        batch_size=config.batch_size, valid_batch_size=config.batch_size,
                        input_offset=config.init_lambda if config.centre_input else 0.0)


def make_hyper(splits, config):
    """(initial state, step_fn, evaluate) of hyper-training."""
    P = num_params(LAYERS)
    problem = HyperProblem(decay_objective(LAYERS), mse_loss(LAYERS), splits.train_x, splits.train_y,
                           splits.valid_x, splits.valid_y, P, P)
    settings = alg3_settings(config)
    loss = mse_loss(LAYERS)

    def step_fn(state, i):
        return alg3_step(state, i, problem, settings, config.seed)

    def evaluate(state):
        w = current_weights(state, settings)
        return loss(w, splits.valid_x, splits.valid_y)[0], loss(w, splits.test_x, splits.test_y)[0]

    return init_alg3(problem, settings, config.seed), step_fn, evaluate


# --------------------------------------------------------------------------------------------- run

def curve_summary(curve, steps):
    """Final / best losses, and the time to come within 1% of the final validation loss."""
    final = float(curve.valid[-1])
    return {
        "steps": int(steps),
        "seconds": float(curve.seconds[-1]),
        "final_valid": final,
        "final_test": float(curve.test[-1]),
        "best_valid": float(curve.valid.min()),
        "best_test": float(curve.test.min()),
        "test_at_best_valid": float(curve.test[np.argmin(curve.valid)]),
        "seconds_to_1pct_of_final_valid": time_to_reach(curve, 1.01 * final),
    }


def run(config, splits, log=print):
    """Both methods under the same budget -> (summary dict, arrays dict)."""
    start = time.perf_counter()
    P = num_params(LAYERS)
    h0, h_step, h_eval = make_hyper(splits, config)
    u0, u_step, u_eval = make_unrolled(splits, config)
    hyper = BudgetedRun(h0, h_step, h_eval, Budget(config.seconds, config.iters, config.eval_every,
                                                   config.log_every), "hyper", log)
    unrolled = BudgetedRun(u0, u_step, u_eval, Budget(config.seconds, config.iters, config.unroll_eval_every,
                                                      config.unroll_log_every), "unrolled", log)
    curves = dict(zip(METHODS, run_interleaved([hyper, unrolled], config.slice_seconds), strict=True))
    summary = {
        "config": config,
        "n_hyperparameters": P,
        "hypernet_parameters": hypernet_size("factorised", P, P, config.hidden),
        "budget": "iters" if config.iters is not None else "seconds",
        "hyper": curve_summary(curves["hyper"], hyper.i),
        "unrolled": curve_summary(curves["unrolled"], unrolled.i),
    }
    # Target: hyper-training within 1% of its final validation loss in < half the time the baseline needs
    # to reach that same loss.
    level = 1.01 * summary["hyper"]["final_valid"]
    t_hyper, t_unrolled = time_to_reach(curves["hyper"], level), time_to_reach(curves["unrolled"], level)
    summary["target"] = {
        "level": level,
        "hyper_seconds": t_hyper,
        "unrolled_seconds": t_unrolled,
        "met": bool(t_hyper is not None and (t_unrolled is None or t_hyper < 0.5 * t_unrolled)),
        "note": "unrolled_seconds null = the baseline never reached the level within its budget",
    }
    summary["total_seconds"] = time.perf_counter() - start
    arrays = {f"{m}_{field}": getattr(curves[m], field) for m in METHODS for field in curves[m]._fields}
    arrays["hyper_lambda"] = hyper.state.lam
    arrays["unrolled_lambda"] = unrolled.state.lam
    return summary, arrays


# ------------------------------------------------------------------------------------------- figure

COLORS = {"valid": "red", "test": "green"}
STYLES = {"hyper": "-", "unrolled": "--"}
LABELS = {
    ("unrolled", "valid"): r"Unrolled $\mathcal{L}_{\mathrm{Valid.}}$",
    ("hyper", "valid"): r"Hypernet $\mathcal{L}_{\mathrm{Valid.}}(\mathrm{w}_{\phi^*}(\hat\lambda))$",
    ("unrolled", "test"): r"Unrolled $\mathcal{L}_{\mathrm{Test}}$",
    ("hyper", "test"): r"Hypernet $\mathcal{L}_{\mathrm{Test}}(\mathrm{w}_{\phi^*}(\hat\lambda))$",
}
PUBLISHED_YLIM = (0.038, 0.044)


def y_limits(arrays):
    """The published range [0.038, 0.044] when our curves settle inside it, else a range that shows them."""
    settled = [arrays[f"{m}_{s}"][len(arrays[f"{m}_{s}"]) // 10:] for m in METHODS for s in ("valid", "test")]
    low, high = min(a.min() for a in settled), max(a.max() for a in settled)
    if PUBLISHED_YLIM[0] <= low and high <= PUBLISHED_YLIM[1]:
        return PUBLISHED_YLIM
    pad = 0.1 * (high - low)
    return low - pad, high + pad


def plot(summary, arrays, out_dir):
    """Validation (red) and test (green) MSE against runtime; hypernet solid, unrolled dashed."""
    import matplotlib.pyplot as plt

    from plotting import close, save_figure, set_paper_style

    set_paper_style(font_size=24)
    fig, ax = plt.subplots(figsize=(9.6, 7.2))
    for split in ("valid", "test"):
        for method in ("unrolled", "hyper"):
            ax.plot(arrays[f"{method}_seconds"], arrays[f"{method}_{split}"], STYLES[method],
                    color=COLORS[split], linewidth=1.5, label=LABELS[(method, split)])
    ax.set_ylim(*y_limits(arrays))
    ax.set_xlim(left=0)
    ax.set_xlabel("Runtime in seconds")
    ax.set_ylabel(r"Loss $\mathcal{L}$")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    order = [("unrolled", "valid"), ("hyper", "valid"), ("unrolled", "test"), ("hyper", "test")]
    handles = {h.get_label(): h for h in ax.get_lines()}
    ax.legend([handles[LABELS[k]] for k in order], [LABELS[k] for k in order], frameon=False, fontsize=20,
              loc="upper right")
    fig.tight_layout()
    paths = save_figure(fig, NAME, out_dir)
    close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ CLI

def parse_args(argv):
    parser = experiment_parser("7,850 per-weight decays: hyper-training versus unrolled differentiation "
                               "(paper Figure 5 top).", default_iters="none: the --seconds budget")
    parser.add_argument("--seconds", type=positive_float, default=None,
                        help="wall-clock training budget of each method (default 240; ignored with --iters)")
    parser.add_argument("--algorithm", choices=("joint", "simplified"), default=None,
                        help="joint = Algorithm 3 (sampled lambdas), simplified = Algorithm 4 (default joint)")
    parser.add_argument("--init-lambda", type=float, default=None, help="starting value of every lambda (-7)")
    parser.add_argument("--raw-input", action="store_true",
                        help="feed the hypernetwork lambda itself, not lambda - init_lambda (noisier training)")
    parser.add_argument("--init-scale", type=positive_float, default=None, help="hypernetwork init scale (1e-3)")
    parser.add_argument("--lambda-step", type=positive_float, default=None, help="Adam step of lambda_hat (1e-4)")
    parser.add_argument("--hypernet-step", type=positive_float, default=None, help="Adam step of the hypernet (1e-4)")
    parser.add_argument("--unroll-steps", type=positive_int, default=None, help="baseline: unrolled steps T (200)")
    parser.add_argument("--unroll-inner", choices=("adam", "sgd"), default=None, help="baseline inner optimiser")
    parser.add_argument("--unroll-inner-step", type=positive_float, default=None, help="baseline inner step (1e-3)")
    parser.add_argument("--unroll-outer-step", type=positive_float, default=None,
                        help="baseline outer Adam step on lambda (0.2)")
    parser.add_argument("--unroll-valid-batch", type=nonnegative_int, default=None,
                        help="baseline validation points per hypergradient, 0 = all (default 0)")
    parser.add_argument("--slice-seconds", type=positive_float, default=None,
                        help="the methods alternate in slices of this much training time (10)")
    return parser.parse_args(argv)


FLAG_FIELDS = ("seconds", "iters", "algorithm", "init_lambda", "init_scale", "lambda_step", "hypernet_step",
               "unroll_steps", "unroll_inner", "unroll_inner_step", "unroll_outer_step", "unroll_valid_batch",
               "slice_seconds", "log_every")


def build_config(args):
    overrides = dict(QUICK) if args.quick else {}
    overrides.update(seed=args.seed, synthetic=args.synthetic)
    if args.raw_input:
        overrides["centre_input"] = False
    for field in FLAG_FIELDS:
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    if not np.isfinite(overrides.get("init_lambda", 0.0)):
        raise ExperimentError("--init-lambda must be finite")
    return dataclasses.replace(Config(), **overrides)


def report(summary, log=print):
    for method in METHODS:
        s = summary[method]
        t = s["seconds_to_1pct_of_final_valid"]
        log(f"{method}: {s['steps']} steps in {s['seconds']:.0f} s; final valid {s['final_valid']:.5f} test "
            f"{s['final_test']:.5f}; best valid {s['best_valid']:.5f}; within 1% of final after {t:.1f} s")
    tg = summary["target"]
    tu = "never" if tg["unrolled_seconds"] is None else f"{tg['unrolled_seconds']:.1f} s"
    log(f"target: hyper reaches {tg['level']:.5f} after {tg['hyper_seconds']:.1f} s, unrolled after {tu}: "
        f"{'met' if tg['met'] else 'not met'}")


def main(argv=None):
    return script_main(argv, NAME, parse_args, build_config, run, report, plot)


if __name__ == "__main__":
    sys.exit(run_main(main))
