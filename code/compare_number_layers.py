"""Per-weight decay hyper-training for deeper models (SPEC section 7, Figure 5 bottom).

For the 784-10, 784-100-10 and 784-100-100-10 MLPs (7,850 / 79,510 / 89,610 hyperparameters: one decay
exp(lambda_j) w_j^2 per weight and bias), hyper-training by Algorithm 3 with a factorised linear
hypernetwork P -> 10 -> P (per_weight_decay.alg3_step), each model under its own wall-clock budget,
recording validation and test MSE against its runtime (evaluations are not on the clock).

Hand-tuned baselines: for each model, a batched search over one global decay exp(lambda) (n_search values
trained as one stacked problem by Adam from the same start weights and minibatches), picked by validation
MSE; its validation MSE is the dotted line, its test MSE goes into the JSON.

    python compare_number_layers.py [--seconds 45 150 150] [--iters N] [--search-steps 1000] [--quick]
"""
import dataclasses
import sys
import time
from dataclasses import dataclass

import autograd.numpy as anp
import numpy as np
from autograd import grad

from common import (
    check_finite,
    experiment_parser,
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
    HyperProblem,
    alg3_step,
    current_weights,
    decay_objective,
    fan_in_init,
    hypernet_size,
    init_alg3,
    minibatch,
    mse_loss,
    run_budgeted,
    script_main,
)

NAME = "compare_number_layers"
MODELS = ((784, 10), (784, 100, 10), (784, 100, 100, 10))
STREAM_SEARCH = 21  # step_rng stream of the hand-tuned search's minibatches


@dataclass(frozen=True)
class Config:
    """Settings (SPEC section 7; budgets, starts and the hand-tuned search are our choices)."""

    seed: int = 7
    models: tuple = MODELS
    seconds: tuple = (45.0, 150.0, 150.0)  # wall-clock hyper-training budget per model
    iters: int = None                     # if set: this many hyperparameter steps per model (reproducible)
    n_train: int = 10000                  # train = MNIST training images [0, 10,000)
    n_valid: int = 10000                  # valid = training images [10,000, 20,000)
    n_test: int = 10000                   # test = the 10,000 test images
    init_lambda: float = -7.0             # every lambda_j at the start
    hidden: int = 10                      # factorised hypernetwork bottleneck (paper)
    init_scale: float = 1e-3              # hypernetwork init, init_scale * N(0, 1)
    centre_input: bool = True             # the hypernetwork sees lambda - init_lambda (--raw-input: lambda)
    fan_in_start: bool = True             # models with hidden layers start from W ~ N(0, 1/fan_in) (see README)
    algorithm: str = "joint"
    n_samples: int = 2
    sample_sd: float = 1e-5
    inner_steps: int = 10
    hypernet_step: float = 1e-4
    lambda_step: float = 1e-4
    batch_size: int = 100
    eval_every: int = 5                   # hyperparameter steps between full-set evaluations
    log_every: int = 100                  # hyperparameter steps between progress lines
    # hand-tuned baseline: one global decay, batched search
    search_lambdas: tuple = (-12.0, -10.0, -8.0, -6.0)
    search_steps: int = 1000              # Adam steps of each searched model
    search_step: float = 1e-3             # Adam step size of the search
    blas_threads: int = 1                 # BLAS threads while training (more only wait on a busy machine)
    synthetic: bool = False


QUICK = dict(seconds=(2.0, 2.0, 2.0), n_train=500, n_valid=500, n_test=500, eval_every=2, log_every=10,
             search_steps=20, search_lambdas=(-8.0, -4.0), models=((784, 10), (784, 20, 10), (784, 20, 20, 10)))


def model_name(sizes):
    return "-".join(str(s) for s in sizes)


def start_weights(sizes, config):
    """Start weights w0 (P,) of both methods, or None: fan-in init for models with hidden layers (a net of
    three layers of 1e-3-sized weights passes almost no signal), the hypernetwork's own output for 784-10."""
    if len(sizes) > 2 and config.fan_in_start:
        return fan_in_init(sizes, np.random.RandomState(config.seed))
    return None


# --------------------------------------------------------------------------------- hand-tuned search

def global_decay_search(sizes, splits, config, log=print):
    """Train one model per global log-decay in config.search_lambdas as one stacked problem (Adam,
    same start and minibatches); returns dict of the searched values and the best one by validation MSE."""
    lams = np.array(config.search_lambdas, dtype=float)
    K, P = len(lams), num_params(sizes)
    w0 = start_weights(sizes, config)
    if w0 is None:
        w0 = flatten_params(init_mlp(sizes, config.init_scale, np.random.RandomState(config.seed)))
    W = np.tile(w0, (K, 1))
    lam_matrix = np.repeat(lams[:, None], P, axis=1)
    objective, loss = decay_objective(sizes), mse_loss(sizes)
    # Each row's loss depends on that row only, so the gradient of the sum is every model's own gradient.
    g_fn = grad(lambda W, x, y: anp.sum(objective(W, lam_matrix, x, y)))
    state, scratch = adam_init(W), np.empty(W.size)
    start = time.perf_counter()
    for i in range(config.search_steps):
        x, y = minibatch(splits.train_x, splits.train_y, config.batch_size, step_rng(config.seed, i, STREAM_SEARCH))
        g = g_fn(W, x, y)
        check_finite(g, i, "hand-tuned search gradient")
        state = adam_inplace(W, g, state, config.search_step, scratch)
    valid, test = loss(W, splits.valid_x, splits.valid_y), loss(W, splits.test_x, splits.test_y)
    check_finite(valid, config.search_steps, "hand-tuned search validation loss")
    best = int(np.argmin(valid))
    result = {"lambdas": lams.tolist(), "valid": valid.tolist(), "test": test.tolist(),
              "best_lambda": float(lams[best]), "best_valid": float(valid[best]), "best_test": float(test[best]),
              "seconds": time.perf_counter() - start}
    log(f"{model_name(sizes):>14s} hand-tuned: log-decay {lams[best]:g}, valid {valid[best]:.5f}, "
        f"test {test[best]:.5f} ({result['seconds']:.0f} s)")
    return result


# ------------------------------------------------------------------------------------ hyper-training

def hyper_train(sizes, seconds, splits, config, log=print):
    """Algorithm 3 on one model under its budget -> (Curve, final Alg3State)."""
    P = num_params(sizes)
    problem = HyperProblem(decay_objective(sizes), mse_loss(sizes), splits.train_x, splits.train_y,
                           splits.valid_x, splits.valid_y, P, P)
    settings = Alg3Settings(hypernet_kind="factorised", hidden=config.hidden, init_scale=config.init_scale,
                            init_lambda=config.init_lambda, algorithm=config.algorithm, n_samples=config.n_samples,
                            sample_sd=config.sample_sd, inner_steps=config.inner_steps,
                            hypernet_step=config.hypernet_step, lambda_step=config.lambda_step,
                            batch_size=config.batch_size, valid_batch_size=config.batch_size,
                            input_offset=config.init_lambda if config.centre_input else 0.0)
    loss = mse_loss(sizes)

    def evaluate(state):
        w = current_weights(state, settings)
        return loss(w, splits.valid_x, splits.valid_y)[0], loss(w, splits.test_x, splits.test_y)[0]

    state0 = init_alg3(problem, settings, config.seed, start_weights(sizes, config))
    budget = Budget(seconds, config.iters, config.eval_every, config.log_every)
    state, curve = run_budgeted(state0, lambda s, i: alg3_step(s, i, problem, settings, config.seed), evaluate,
                                budget, model_name(sizes), log)
    return curve, state


def run(config, splits, log=print):
    """Hand-tuned search and hyper-training for every model -> (summary dict, arrays dict)."""
    start = time.perf_counter()
    summary = {"config": config, "models": {}}
    arrays = {}
    for sizes, seconds in zip(config.models, config.seconds, strict=True):
        name, P = model_name(sizes), num_params(sizes)
        hand = global_decay_search(sizes, splits, config, log)
        curve, state = hyper_train(sizes, seconds, splits, config, log)
        for field in curve._fields:
            arrays[f"{name}_{field}"] = getattr(curve, field)
        arrays[f"{name}_lambda"] = state.lam
        summary["models"][name] = {
            "layer_sizes": list(sizes),
            "n_hyperparameters": P,
            "hypernet_parameters": hypernet_size("factorised", P, P, config.hidden),
            "steps": int(curve.step[-1]),
            "seconds": float(curve.seconds[-1]),
            "final_valid": float(curve.valid[-1]),
            "final_test": float(curve.test[-1]),
            "best_valid": float(curve.valid.min()),
            "best_test": float(curve.test.min()),
            "lambda_mean": float(state.lam.mean()),
            "lambda_std": float(state.lam.std()),
            "hand_tuned": hand,
            "final_valid_minus_hand_tuned_valid": float(curve.valid[-1]) - hand["best_valid"],
            "final_test_minus_hand_tuned_test": float(curve.test[-1]) - hand["best_test"],
        }
    names = [model_name(s) for s in config.models]
    linear = summary["models"][names[0]]["final_valid"]
    summary["target"] = {
        "deeper_models_below_linear_valid": bool(all(summary["models"][n]["final_valid"] < linear for n in names[1:])),
        "beats_hand_tuned_valid": {n: summary["models"][n]["final_valid_minus_hand_tuned_valid"] < 0 for n in names},
        "beats_hand_tuned_test": {n: summary["models"][n]["final_test_minus_hand_tuned_test"] < 0 for n in names},
    }
    summary["budget"] = "iters" if config.iters is not None else "seconds"
    summary["total_seconds"] = time.perf_counter() - start
    return summary, arrays


# ------------------------------------------------------------------------------------------- figure

COLORS = ("red", "green", "blue")
PUBLISHED_YLIM = (0.01, 0.08)


def plot(summary, arrays, out_dir):
    """Validation (solid) and test (dashed) MSE against runtime per model; hand-tuned validation dotted."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from plotting import close, save_figure, set_paper_style

    set_paper_style(font_size=24)
    fig, ax = plt.subplots(figsize=(9.1, 9.1))
    names = list(summary["models"])
    x_max, y_values = 0.0, []
    for name, color in zip(names, COLORS, strict=False):
        seconds = arrays[f"{name}_seconds"]
        ax.plot(seconds, arrays[f"{name}_valid"], "-", color=color, linewidth=1.2)
        ax.plot(seconds, arrays[f"{name}_test"], "--", color=color, linewidth=1.2)
        ax.axhline(summary["models"][name]["hand_tuned"]["best_valid"], linestyle=":", color=color, linewidth=1.2)
        x_max = max(x_max, float(seconds[-1]))
        y_values += [arrays[f"{name}_valid"][-1], arrays[f"{name}_test"][-1],
                     summary["models"][name]["hand_tuned"]["best_valid"]]
    low, high = min(y_values), max(y_values)
    if high <= 0.6 * PUBLISHED_YLIM[1]:  # the published range, extended down when our losses go lower
        ylim = (min(PUBLISHED_YLIM[0], low - 0.1 * (high - low)), PUBLISHED_YLIM[1])
    else:
        ylim = (max(0.0, low - 0.15 * (high - low)), high + 0.8 * (high - low))
    ax.set_ylim(*ylim)
    ax.set_xlim(0, x_max)
    ax.set_xlabel("Runtime in seconds")
    ax.set_ylabel(r"Loss $\mathcal{L}$")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    w_label = r"(\mathrm{w}_{\phi^*}(\hat\lambda))"
    handles = [Line2D([], [], color="k", linestyle="-", linewidth=1.2),
               Line2D([], [], color="k", linestyle=":", linewidth=1.2),
               Line2D([], [], color="k", linestyle="--", linewidth=1.2)]
    labels = [rf"$\mathcal{{L}}_{{\mathrm{{Valid.}}}}{w_label}$", r"Hand-tuned $\mathcal{L}_{\mathrm{Valid.}}$",
              rf"$\mathcal{{L}}_{{\mathrm{{Test}}}}{w_label}$"]
    for name, color in zip(names, COLORS, strict=False):
        handles.append(Line2D([], [], color=color, linewidth=1.2))
        labels.append(name)
    ax.legend(handles, labels, frameon=False, fontsize=20, loc="upper right")
    fig.tight_layout()
    paths = save_figure(fig, NAME, out_dir)
    close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ CLI

def parse_args(argv):
    parser = experiment_parser("Per-weight decay hyper-training for 784-10, 784-100-10 and 784-100-100-10 "
                               "models (paper Figure 5 bottom).", default_iters="none: the --seconds budgets")
    parser.add_argument("--seconds", type=positive_float, nargs=3, default=None, metavar=("S1", "S2", "S3"),
                        help="wall-clock hyper-training budget of each model (default 45 150 150)")
    parser.add_argument("--algorithm", choices=("joint", "simplified"), default=None,
                        help="joint = Algorithm 3, simplified = Algorithm 4 (default joint)")
    parser.add_argument("--init-lambda", type=float, default=None, help="starting value of every lambda (-7)")
    parser.add_argument("--raw-input", action="store_true",
                        help="feed the hypernetwork lambda itself, not lambda - init_lambda (noisier training)")
    parser.add_argument("--init-scale", type=positive_float, default=None, help="hypernetwork init scale (1e-3)")
    parser.add_argument("--lambda-step", type=positive_float, default=None, help="Adam step of lambda_hat (1e-4)")
    parser.add_argument("--hypernet-step", type=positive_float, default=None, help="Adam step of the hypernet (1e-4)")
    parser.add_argument("--search-steps", type=positive_int, default=None,
                        help="Adam steps of each hand-tuned search model (1000)")
    parser.add_argument("--search-step", type=positive_float, default=None, help="Adam step of the search (1e-3)")
    return parser.parse_args(argv)


FLAG_FIELDS = ("iters", "algorithm", "init_lambda", "init_scale", "lambda_step", "hypernet_step", "search_steps",
               "search_step", "log_every")


def build_config(args):
    from common import ExperimentError

    overrides = dict(QUICK) if args.quick else {}
    overrides.update(seed=args.seed, synthetic=args.synthetic)
    if args.raw_input:
        overrides["centre_input"] = False
    for field in FLAG_FIELDS:
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    if args.seconds is not None:
        overrides["seconds"] = tuple(args.seconds)
    if not np.isfinite(overrides.get("init_lambda", 0.0)):
        raise ExperimentError("--init-lambda must be finite")
    return dataclasses.replace(Config(), **overrides)


def report(summary, log=print):
    for name, m in summary["models"].items():
        h = m["hand_tuned"]
        log(f"{name}: {m['steps']} steps in {m['seconds']:.0f} s; final valid {m['final_valid']:.5f} test "
            f"{m['final_test']:.5f}; hand-tuned valid {h['best_valid']:.5f} test {h['best_test']:.5f} "
            f"(log-decay {h['best_lambda']:g})")
    log(f"deeper models below the linear model's validation loss: "
        f"{summary['target']['deeper_models_below_linear_valid']}")


def main(argv=None):
    return script_main(argv, NAME, parse_args, build_config, run, report, plot)


if __name__ == "__main__":
    sys.exit(run_main(main))
