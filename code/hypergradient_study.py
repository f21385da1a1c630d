"""Does hyper-training's lambda step follow the true hypergradient at 7,850 decays? (issue 10 item 4, SPEC 7, 9)

On the problem of Figure 5 top (linear 784-10 model, plain MSE, one decay exp(lambda_j) w_j^2 per weight and bias,
train / valid / test 10,000 images, factorised hypernetwork 7,850 -> hidden -> 7,850, lambda_hat starting at -7),
Algorithm 3 is run in several variants (VARIANTS below: the paper's settings, then one change at a time, then all
helpful changes at once). For each variant the run records, at EVAL_POINTS evaluations:

* the cosine between the hypernetwork's hypergradient J_phi(lambda_hat)' dL_V/dw (full validation set) and the exact
  implicit-differentiation hypergradient dL_V(w*(lambda))/dlambda at lambda_hat (references.exact_hypergradient);
* ||lambda_hat - lambda_hat_0|| and, at the end, the distribution of |lambda_hat_j - lambda_hat_0| over the weights;
* the validation loss of the hypernetwork's weights and of the closed form w*(lambda_hat) (what the lambda_hat found
  is worth), against the fixed-lambda reference L_V(w*(lambda_hat_0)) (the level plain training at -7 converges to)
  and against exact-hypergradient descent (references.exact_hypergradient_descent) at equal CPU time.

Algorithm 3 is re-implemented here (study_step) because two variants are not in per_weight_decay: the hypernetwork's
input centred on the CURRENT lambda_hat (it sees lambda - lambda_hat, so it models the best response locally, as in
Self-Tuning Networks) and antithetic sample pairs (lambda_hat +- sd eps, both on the same training minibatch). With
centre='initial' and antithetic off it equals per_weight_decay.alg3_step (tests/test_hypergradient_study.py).

    python hypergradient_study.py [--quick] [--iters N] [--variants paper,sd_1,...] [--valid-block K]
"""
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import common
import references as ref
import texfmt
from budget import Budget, run_budgeted
from common import ExperimentError, check_finite, setting, step_rng
from hypernets_local_large import COSINE_ALIGNED, COSINE_ZERO  # the verdicts' cosine bands
from neural_network import init_hypernet, num_params
from optimizers import adam_init, adam_inplace
from per_weight_decay import STREAM_SAMPLES, STREAM_TRAIN_BATCH, STREAM_VALID_BATCH, minibatch

NAME = "hypergradient_study"
TEX_PREFIX = "Hg"  # every macro this script exports to the paper starts with it
DATA = "mnist"
LAYERS = (784, 10)
N_PIXELS, N_CLASSES = LAYERS
TABLE_NAME = "hypergradient_study_table"


class Variant(NamedTuple):
    """One hyper-training setting of the study (defaults: the paper's, SPEC section 7)."""

    name: str
    label: str                   # legend / table text
    sample_sd: float = 1e-5      # lambda ~ N(lambda_hat, sd^2) (paper's "variance 1e-5", used as an sd)
    centre: str = "initial"      # hypernetwork input lambda - lambda_hat_0 ('initial') or - lambda_hat ('current')
    antithetic: bool = False     # samples in pairs lambda_hat +- sd eps on the same minibatch
    inner_steps: int = 10        # hypernetwork Adam steps per lambda_hat step (paper macro)
    hypernet_step: float = 1e-4  # hypernetwork Adam step (paper)
    lambda_step: float = 1e-4    # lambda_hat Adam step (paper)
    hidden: int = 10             # factorised hypernetwork bottleneck (paper)
    warm_start: bool = False     # hypernetwork output bias starts at w*(lambda_hat_0) (our addition)


PAPER = Variant("paper", "paper settings")
VARIANTS = (
    PAPER,
    PAPER._replace(name="sd_1e-3", label="sd 1e-3", sample_sd=1e-3),
    PAPER._replace(name="sd_1e-1", label="sd 0.1", sample_sd=1e-1),
    PAPER._replace(name="sd_1", label="sd 1", sample_sd=1.0),
    PAPER._replace(name="centre_current", label="sd 0.1, centred on current", sample_sd=1e-1, centre="current"),
    PAPER._replace(name="antithetic", label="sd 0.1, antithetic pairs", sample_sd=1e-1, antithetic=True),
    PAPER._replace(name="inner_1", label="sd 0.1, 1 hypernet step per lambda step", sample_sd=1e-1, inner_steps=1),
    PAPER._replace(name="inner_50", label="sd 0.1, 50 hypernet steps per lambda step", sample_sd=1e-1,
                   inner_steps=50),
    PAPER._replace(name="hypernet_step_1e-3", label="sd 0.1, hypernet step 1e-3", sample_sd=1e-1,
                   hypernet_step=1e-3),
    PAPER._replace(name="hidden_50", label="sd 0.1, 50 hidden units", sample_sd=1e-1, hidden=50),
    PAPER._replace(name="lambda_step_1e-2", label="sd 0.1, lambda step 1e-2", sample_sd=1e-1, lambda_step=1e-2),
    PAPER._replace(name="combined", label="sd 0.1, centred, antithetic, steps 1e-3 / 1e-2, 50 hidden, warm start",
                   sample_sd=1e-1, centre="current",
                   antithetic=True, hypernet_step=1e-3, lambda_step=1e-2, hidden=50, warm_start=True),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)

# Verdict thresholds (named here, used by CLAIMS)
GAIN_MIN = 2e-4      # MSE: a validation gain over the fixed-lambda reference smaller than this is no tuning
# (about 0.5% of the level 0.041, ten times the spread of the hypernetwork's curve between evaluations)
EXACT_EVAL_EVERY = 5  # exact-hypergradient descent steps between evaluations (each costs about one step)
SPLIT_GAP_SPEC = 0.003  # SPEC section 9: the validation block moves the valid-test gap by about this much


@dataclass(frozen=True)
class Config:
    """Settings of the study (defaults: SPEC section 7 for the problem; the budget is our choice)."""

    seed: int = setting(7, lo=0, hi=common.SEED_MAX)  # hypernetwork init RandomState(seed); minibatches and
    # samples from step_rng(seed, step, stream) (SPEC: 7 everywhere)
    hypernet_steps: int = setting(6000, lo=1, flag="iters")  # hypernetwork Adam steps per variant (our choice:
    # 600 lambda steps at 10 inner steps, ~10-40 s each, the whole study ~6 min on one core)
    variants: tuple[str, ...] = setting(VARIANT_NAMES, choices=VARIANT_NAMES)  # which variants to run
    eval_points: int = setting(10, lo=2)  # evaluations per run (cosine, losses), evenly spaced in lambda steps
    init_lambda: float = setting(-7.0)  # every lambda_j at the start (hypernets_local_large; not in the paper)
    init_scale: float = setting(1e-3, lo=0, lo_open=True)  # hypernetwork init scale (per_weight_decay)
    n_samples: int = setting(2, lo=1)  # lambda samples per hypernetwork step (paper; even for antithetic pairs)
    batch_size: int = setting(100, lo=1)  # training and validation minibatch (paper macros)
    block: int = setting(10000, lo=10)  # images per split (paper macros: 10,000 each)
    valid_block: int = setting(1, lo=1, hi=5)  # validation = training images [k*block, (k+1)*block); train =
    # block 0; test = the official test images. 1 = per_weight_decay.large_splits (SPEC section 9)
    exact_steps: int = setting(150, lo=1)  # Adam steps of exact-hypergradient descent (our choice: ~35 s, near
    # its optimum: the validation loss changes by < 1e-4 over the last 50 steps; the equal-time comparison
    # reads its curve at each variant's CPU time)
    exact_step: float = setting(ref.EXACT_STEP, lo=0, lo_open=True)  # its Adam step on lambda (our choice)


QUICK = dict(hypernet_steps=40, eval_points=2, block=500, exact_steps=3, variants=("paper", "combined"))


def validate(config):
    """Cross-field checks."""
    if any(v.antithetic for v in selected(config)) and config.n_samples % 2:
        raise ExperimentError(f"antithetic pairs need an even --n-samples (got {config.n_samples})")
    short = [v.name for v in selected(config) if config.hypernet_steps < v.inner_steps]
    if short:
        raise ExperimentError(f"--iters {config.hypernet_steps} is less than one lambda step of {', '.join(short)}")


def selected(config):
    """The Variants named in config.variants, in VARIANTS order."""
    return [v for v in VARIANTS if v.name in config.variants]


# ---------------------------------------------------------------------------------- Algorithm 3 variant

class StudyState(NamedTuple):
    """Factorised hypernetwork [(W1 (H, r), b1 (r,)), (W2 (r, P), b2 (P,))], lambda_hat (H,), lambda_hat_0 (H,),
    Adam states of phi (per array) and lambda_hat, lambda steps done."""

    phi: list
    lam: np.ndarray
    lam0: np.ndarray
    phi_adam: list
    lam_adam: object
    step: int


def init_study(variant, config, w0=None):
    """Fresh state: hypernetwork init_scale * N(0, 1) from RandomState(seed) (as per_weight_decay.init_alg3),
    lambda_hat = init_lambda; with w0 (P,) the output bias starts at w0 (warm start)."""
    P = num_params(LAYERS)
    rs = np.random.RandomState(config.seed)
    phi = init_hypernet("factorised", P, P, config.init_scale, rs, hidden=variant.hidden)
    if w0 is not None:
        phi[-1] = (phi[-1][0], np.array(w0, dtype=float))
    lam = np.full(P, float(config.init_lambda))
    return StudyState(phi, lam, lam.copy(), [(adam_init(W), adam_init(b)) for W, b in phi], adam_init(lam), 0)


def decay_grad(w, lambdas, x, y):
    """d/dw of mean_k [MSE(x W_k + b_k, y) + sum_j exp(lambda_kj) w_kj^2]: w, lambdas (K, P) -> (K, P).

    Derivation: MSE = mean over B x C of r^2 with r = x W_k + b_k - y, so dMSE/dW_k = 2 x'r / (B C),
    dMSE/db_k = 2 sum_rows(r) / (B C); the decay adds 2 exp(lambda) w; the mean over K samples scales by 1/K.
    All K models in one GEMM: W side by side as (D, K*C) (neural_network's wide layout)."""
    K, B = w.shape[0], x.shape[0]
    W = w[:, :N_PIXELS * N_CLASSES].reshape(K, N_PIXELS, N_CLASSES)
    wide = W.transpose(1, 0, 2).reshape(N_PIXELS, K * N_CLASSES)
    residual = x @ wide + w[:, N_PIXELS * N_CLASSES:].reshape(K * N_CLASSES) - np.tile(y, (1, K))  # (B, K*C)
    scale = 2.0 / (B * N_CLASSES)
    g_W = (scale * (x.T @ residual)).reshape(N_PIXELS, K, N_CLASSES).transpose(1, 0, 2).reshape(K, -1)
    g_b = scale * residual.sum(axis=0).reshape(K, N_CLASSES)
    return (np.concatenate([g_W, g_b], axis=1) + 2.0 * np.exp(lambdas) * w) / K


def hypernet_forward(phi, inputs):
    """Factorised linear hypernetwork: inputs (K, H) -> hidden (K, r), weights (K, P)."""
    (W1, b1), (W2, b2) = phi
    hidden = inputs @ W1 + b1
    return hidden, hidden @ W2 + b2


def offset_of(state, variant):
    """What the hypernetwork's input is centred on: lambda_hat_0 or the current lambda_hat, (H,)."""
    return state.lam if variant.centre == "current" else state.lam0


def sample_lambdas(state, variant, n_samples, rs):
    """n_samples lambdas (n, H) around lambda_hat: iid N(0, sd^2) noise, or antithetic pairs +- eps."""
    H = state.lam.size
    if variant.antithetic:
        eps = rs.randn(n_samples // 2, H)
        noise = np.concatenate([eps, -eps])
    else:
        noise = rs.randn(n_samples, H)
    return state.lam[None, :] + variant.sample_sd * noise


def study_step(state, step, variant, config, splits):
    """One lambda step of Algorithm 3 in this variant (arrays updated in place; returns the new StudyState).

    (1) inner_steps Adam steps of phi on mean_k f_train(w_phi(lambda_k - c), lambda_k) over one training minibatch
        per step, lambda_k from sample_lambdas, c = offset_of (held fixed: centring is not differentiated);
    (2) one Adam step of lambda_hat along J_phi' dL_V/dw at w_phi(lambda_hat - c) on a validation minibatch.
    Random streams as per_weight_decay.alg3_step (step_rng(seed, inner step, stream))."""
    phi, phi_adam = state.phi, state.phi_adam
    (W1, b1), (W2, b2) = phi
    offset = offset_of(state, variant)
    scratch = np.empty(max(W1.size, W2.size))
    for j in range(variant.inner_steps):
        inner = step * variant.inner_steps + j
        lambdas = sample_lambdas(state, variant, config.n_samples, step_rng(config.seed, inner, STREAM_SAMPLES))
        x, y = minibatch(splits.train_x, splits.train_y, config.batch_size,
                         step_rng(config.seed, inner, STREAM_TRAIN_BATCH))
        inputs = lambdas - offset
        hidden, w = hypernet_forward(phi, inputs)
        delta = decay_grad(w, lambdas, x, y)          # dF/dw (K, P)
        grads = [None, (hidden.T @ delta, delta.sum(axis=0))]
        delta = delta @ W2.T                          # dF/dhidden (K, r)
        grads[0] = (inputs.T @ delta, delta.sum(axis=0))
        check_finite(grads[1][1], inner, "hypernetwork gradient")
        phi_adam = [(adam_inplace(W, gW, sW, variant.hypernet_step, scratch),
                     adam_inplace(b, gb, sb, variant.hypernet_step, scratch))
                    for (W, b), (gW, gb), (sW, sb) in zip(phi, grads, phi_adam, strict=True)]
    x, y = minibatch(splits.valid_x, splits.valid_y, config.batch_size,
                     step_rng(config.seed, step, STREAM_VALID_BATCH))
    g_lam = lambda_direction(phi, state.lam, offset, x, y)
    check_finite(g_lam, step, "hyperparameter gradient")
    lam_adam = adam_inplace(state.lam, g_lam, state.lam_adam, variant.lambda_step, np.empty(state.lam.size))
    return StudyState(phi, state.lam, state.lam0, phi_adam, lam_adam, state.step + 1)


def lambda_direction(phi, lam, offset, x, y):
    """J_phi' dL_V/dw at w_phi(lam - offset) on (x, y): (H,). w = ((lam - c) W1 + b1) W2 + b2, so J' g = W1 W2 g."""
    _, w = hypernet_forward(phi, (lam - offset)[None, :])
    g_w = ref.linear_loss_grad(w[0], x, y)
    return phi[0][0] @ (phi[1][0] @ g_w)


# ------------------------------------------------------------------------------------------------- run

def study_splits(config, data):
    """Train = block 0, valid = block valid_block, test = the first `block` test images (references.block_splits)."""
    try:
        return ref.block_splits(data, config.valid_block, 0, config.block, min(config.block, len(data.test_images)))
    except ValueError as err:
        raise ExperimentError(str(err)) from None


def eval_steps(n_lambda_steps, points):
    """The lambda-step counts at which a run is evaluated: 0, ..., n_lambda_steps (points values, unique)."""
    return sorted({int(round(s)) for s in np.linspace(0, n_lambda_steps, points)})


def run_variant(variant, config, splits, ridge, log=print):
    """One variant: (summary dict, arrays dict). The clock counts study_step only, not the evaluations."""
    w0 = ref.best_response(ridge, config.init_lambda) if variant.warm_start else None
    state = init_study(variant, config, w0)
    n_steps = config.hypernet_steps // variant.inner_steps
    marks, done, seconds = eval_steps(n_steps, config.eval_points), 0, 0.0
    rows = []
    for mark in marks:
        start = time.process_time()
        while done < mark:
            state = study_step(state, done, variant, config, splits)
            done += 1
        seconds += time.process_time() - start
        exact, _, closed_valid = ref.exact_hypergradient(ridge, state.lam, splits.valid_x, splits.valid_y)
        direction = lambda_direction(state.phi, state.lam, offset_of(state, variant), splits.valid_x, splits.valid_y)
        _, w = hypernet_forward(state.phi, (state.lam - offset_of(state, variant))[None, :])
        valid, test = ref.linear_loss(w[0], splits.valid_x, splits.valid_y), ref.linear_loss(w[0], splits.test_x,
                                                                                             splits.test_y)
        check_finite(valid, done, f"{variant.name} validation loss")
        rows.append((done, seconds, ref.cosine(direction, exact), valid, test, closed_valid,
                     float(np.linalg.norm(state.lam - state.lam0))))
    if log:
        log(f"{variant.name:>20s}: {n_steps} lambda steps in {seconds:5.1f} s; cosine {rows[-1][2]:+.3f}; "
            f"valid {rows[-1][3]:.5f}; at w*(lambda_hat) {rows[-1][5]:.5f}; |dlambda| {rows[-1][6]:.4f}")
    columns = dict(zip(("steps", "seconds", "cosine", "valid", "test", "closed_valid", "dlam_norm"),
                       map(np.array, zip(*rows, strict=True)), strict=True))
    dlam = np.abs(state.lam - state.lam0)
    closed_test = ref.linear_loss(ref.best_response(ridge, state.lam), splits.test_x, splits.test_y)
    cos = columns["cosine"][1:]  # after training started
    summary = {
        "label": variant.label, "settings": variant._asdict(), "lambda_steps": n_steps,
        "seconds": seconds, "cosine_mean": float(np.mean(cos)), "cosine_final": float(cos[-1]),
        "cosine_min": float(np.min(cos)), "cosine_max": float(np.max(cos)),
        "final_valid": float(columns["valid"][-1]), "final_test": float(columns["test"][-1]),
        "closed_form_valid": float(columns["closed_valid"][-1]), "closed_form_test": closed_test,
        "dlambda_norm": float(np.linalg.norm(state.lam - state.lam0)), "dlambda_mean_abs": float(dlam.mean()),
        "dlambda_quantiles": {f"q{q}": float(np.percentile(dlam, q)) for q in (5, 50, 95, 100)},
    }
    arrays = {f"{variant.name}_{k}": v for k, v in columns.items()}
    arrays[f"{variant.name}_dlambda"] = state.lam - state.lam0
    return summary, arrays


def value_at_time(seconds, values, t):
    """The last recorded value at or before time t (the first one when t precedes every record)."""
    idx = np.searchsorted(seconds, t, side="right") - 1
    return float(values[max(idx, 0)])


def run(config, data, log=print):
    """Every selected variant, the exact-hypergradient method and the references -> (summary, arrays)."""
    splits = study_splits(config, data)
    ridge = ref.ridge_problem(splits.train_x, splits.train_y)
    reference = ref.fixed_lambda_reference(config.init_lambda, splits, ridge)
    log(f"fixed-lambda reference at {config.init_lambda:g}: valid {reference['valid']:.5f} "
        f"test {reference['test']:.5f}")
    # method 3: exact-hypergradient descent, on the CPU clock like the variants (evaluations excluded)
    state, step_fn, evaluate = ref.exact_hypergradient_descent(splits, config.init_lambda, config.exact_step, ridge)
    cpu = _ProcessClock(step_fn)
    budget = Budget(iters=config.exact_steps, eval_every=EXACT_EVAL_EVERY, log_every=10**9)
    state, curve = run_budgeted(state, cpu.step, evaluate, budget, "exact", log=None)
    exact_seconds = np.array(cpu.marks)[curve.step]  # CPU seconds after each evaluated step
    log(f"exact-hypergradient descent: {config.exact_steps} steps in {exact_seconds[-1]:.1f} s; valid "
        f"{curve.valid[-1]:.5f} test {curve.test[-1]:.5f}")
    summary = {
        "n_hyperparameters": num_params(LAYERS),
        "reference": reference,
        "exact": {"steps": config.exact_steps, "seconds": float(exact_seconds[-1]),
                  "final_valid": float(curve.valid[-1]), "final_test": float(curve.test[-1]),
                  "best_valid": float(curve.valid.min()), "test_at_best_valid": float(curve.test[curve.valid.argmin()]),
                  "gain": reference["valid"] - float(curve.valid[-1]),
                  "dlambda_norm": float(np.linalg.norm(state.lam - config.init_lambda))},
        "variants": {},
    }
    arrays = {"exact_seconds": exact_seconds, "exact_valid": curve.valid, "exact_test": curve.test,
              "exact_dlambda": state.lam - config.init_lambda}
    for variant in selected(config):
        s, a = run_variant(variant, config, splits, ridge, log)
        s["gain_hypernet"] = reference["valid"] - s["final_valid"]
        s["gain_lambda"] = reference["valid"] - s["closed_form_valid"]
        s["exact_valid_same_time"] = value_at_time(exact_seconds, curve.valid, s["seconds"])
        s["exact_gain_same_time"] = reference["valid"] - s["exact_valid_same_time"]
        summary["variants"][variant.name] = s
        arrays.update(a)
    # what a perfectly trained rank-r hypernetwork could reach: the best rank-r approximation of the exact
    # best-response Jacobian at lambda_hat_0 (references.low_rank_cosines), for each width in the study
    widths = sorted({v.hidden for v in selected(config)})
    bound = ref.low_rank_cosines(ridge, config.init_lambda, splits.valid_x, splits.valid_y, widths)
    summary["rank_bound"] = {str(r): c for r, c in bound.items()}
    log("cosine of a perfect rank-r hypernetwork: " + ", ".join(f"r={r}: {c:.3f}" for r, c in bound.items()))
    summary["split_sensitivity"] = ref.split_sensitivity(
        data, config.init_lambda, blocks=available_blocks(data, config.block), block=config.block,
        n_test=min(config.block, len(data.test_images)))
    gaps = [row["gap"] for row in summary["split_sensitivity"]]
    summary["split_gap_spread"] = float(max(gaps) - min(gaps))
    summary["tuning_variants"] = [name for name, s in summary["variants"].items() if tunes(s)]
    return summary, arrays


class _ProcessClock:
    """Wraps a step function and records the cumulative process CPU time after each call."""

    def __init__(self, step_fn):
        self.step_fn, self.total, self.marks = step_fn, 0.0, [0.0]

    def step(self, state, i):
        start = time.process_time()
        state = self.step_fn(state, i)
        self.total += time.process_time() - start
        self.marks.append(self.total)
        return state


def available_blocks(data, block):
    """Validation blocks 1..5 that the loaded training images contain (all five for MNIST's 60,000)."""
    return tuple(k for k in ref.VALID_BLOCKS if (k + 1) * block <= len(data.train_images))


def tunes(s):
    """A variant tunes lambda: clear gain at w*(lambda_hat) over the reference and a cosine well above 0."""
    return s["gain_lambda"] > GAIN_MIN and s["cosine_mean"] > COSINE_ALIGNED


# ----------------------------------------------------------------------------------------- figure, table

GAIN_LINTHRESH = 1e-4  # panel (c): linear within +-1e-4 MSE, logarithmic beyond
COLORS = ("k", "tab:red", "tab:orange", "tab:olive", "tab:green", "tab:cyan", "tab:blue", "tab:purple",
          "tab:pink", "tab:brown", "tab:gray", "gold")
DLAMBDA_FLOOR = 1e-6  # panel (b): |dlambda| below this (decays of always-zero pixels) drawn at this value


def plot(summary, arrays, out_dir):
    """Three panels (cosine over the run, |lambda_hat - lambda_hat_0| per variant, validation gains) and the table."""
    import matplotlib.pyplot as plt

    from plotting import close, save_figure, set_paper_style

    names = ordered(summary["variants"])
    set_paper_style(font_size=11)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    ax = axes[0]
    for i, name in enumerate(names):
        ax.plot(arrays[f"{name}_steps"] * summary["variants"][name]["settings"]["inner_steps"],
                arrays[f"{name}_cosine"], "o-", color=COLORS[i % len(COLORS)], markersize=3, linewidth=1,
                label=name)
    for level in (COSINE_ZERO, -COSINE_ZERO):
        ax.axhline(level, color="0.6", linewidth=0.6, linestyle=":")
    ax.axhline(1.0, color="0.3", linewidth=0.6, linestyle="--")
    for r, c in summary["rank_bound"].items():
        ax.axhline(c, color="0.3", linewidth=0.8, linestyle="--")
        ax.text(ax.get_xlim()[1], c, f" best rank-{r} hypernet", fontsize=7, va="bottom", ha="right")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("hypernetwork steps")
    ax.set_ylabel(r"cosine($J_\phi^\top \partial L_V/\partial w$, exact hypergradient)")
    ax.set_title("(a) direction of hyper-training's lambda step")
    ax.legend(fontsize=7, frameon=False, loc="lower left", ncol=3)
    ax = axes[1]
    data = [np.maximum(np.abs(arrays[f"{name}_dlambda"]), DLAMBDA_FLOOR) for name in names] + \
        [np.maximum(np.abs(arrays["exact_dlambda"]), DLAMBDA_FLOOR)]
    ax.boxplot(data, orientation="horizontal", whis=(5, 95), showfliers=False)
    ax.set_yticks(range(1, len(data) + 1), names + ["exact descent"], fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()  # same order as panel (c), top to bottom
    ax.set_xlabel(r"$|\hat\lambda_j - \hat\lambda_{0,j}|$ over the 7,850 decays" "\n(box 25-75%, whiskers 5-95%)")
    ax.set_title(r"(b) how far $\hat\lambda$ moved")
    ax = axes[2]
    y = np.arange(len(names))
    gains_h = [summary["variants"][n]["gain_hypernet"] for n in names]
    gains_l = [summary["variants"][n]["gain_lambda"] for n in names]
    gains_e = [summary["variants"][n]["exact_gain_same_time"] for n in names]
    ax.barh(y - 0.27, gains_h, 0.27, color="tab:red", label=r"hypernetwork $w_\phi(\hat\lambda)$")
    ax.barh(y, gains_l, 0.27, color="tab:blue", label=r"closed form $w^*(\hat\lambda)$")
    ax.barh(y + 0.27, gains_e, 0.27, color="tab:green", label="exact descent, same CPU time")
    ax.axvline(0, color="k", linewidth=0.8)
    ax.axvline(GAIN_MIN, color="0.5", linewidth=0.6, linestyle=":")
    ax.set_xscale("symlog", linthresh=GAIN_LINTHRESH)  # undertrained hypernetworks lose far more than lambda gains
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ref_valid = summary["reference"]["valid"]
    ax.set_xlabel(f"validation gain over the fixed-lambda level {ref_valid:.4f}\n(MSE, symlog axis)")
    ax.set_title("(c) validation gain at equal CPU time")
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    paths = save_figure(fig, NAME, out_dir)
    close(fig)
    table = out_dir / "results" / f"{TABLE_NAME}.tex"
    table.parent.mkdir(parents=True, exist_ok=True)
    common.atomic_write_bytes(table, table_tex(summary).encode())
    return [*paths, table]


def ordered(variants):
    """Variant names in VARIANTS order (a saved summary's keys come back sorted), unknown names last."""
    rank = {name: i for i, name in enumerate(VARIANT_NAMES)}
    return sorted(variants, key=lambda n: (rank.get(n, len(rank)), n))


GAIN_UNIT = 1e-4  # the table's gains are in units of 1e-4 MSE


def table_tex(summary):
    """LaTeX tabular: one row per variant, then exact descent and the reference; gains in units of GAIN_UNIT."""
    gain = lambda value: texfmt.fixed(value / GAIN_UNIT, 2)
    unit = texfmt.scientific(GAIN_UNIT)
    lines = [r"\begin{tabular}{lrrrrrrr}", r"\toprule",
             r"setting & cosine & $\|\hat\lambda-\hat\lambda_0\|$ & valid $w_\phi(\hat\lambda)$ & "
             rf"valid $w^*(\hat\lambda)$ & gain $w^*(\hat\lambda)$ [{unit}] & gain exact [{unit}] & CPU s \\",
             r"\midrule"]
    for s in (summary["variants"][n] for n in ordered(summary["variants"])):
        lines.append(f"{texfmt.text(s['label'])} & {texfmt.fixed(s['cosine_mean'], 3)} & "
                     f"{texfmt.significant(s['dlambda_norm'], 2)} & {texfmt.significant(s['final_valid'], 4)} & "
                     f"{texfmt.significant(s['closed_form_valid'], 4)} & {gain(s['gain_lambda'])} & "
                     f"{gain(s['exact_gain_same_time'])} & {texfmt.seconds(s['seconds'])} \\\\")
    e, r = summary["exact"], summary["reference"]
    lines += [r"\midrule",
              f"exact-hypergradient descent & {texfmt.fixed(1.0, 3)} & {texfmt.significant(e['dlambda_norm'], 2)} & "
              f"-- & {texfmt.significant(e['final_valid'], 4)} & {gain(e['gain'])} & -- & "
              f"{texfmt.seconds(e['seconds'])} \\\\",
              f"fixed-$\\lambda$ reference & -- & 0 & -- & {texfmt.significant(r['valid'], 4)} & 0 & -- & -- \\\\",
              r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def report(summary):
    """Headline numbers."""
    r, e = summary["reference"], summary["exact"]
    print(f"reference valid {r['valid']:.5f} test {r['test']:.5f}; exact descent valid {e['final_valid']:.5f} "
          f"test {e['final_test']:.5f} in {e['seconds']:.0f} s")
    for name in ordered(summary["variants"]):
        s = summary["variants"][name]
        print(f"{name:>20s}: cosine {s['cosine_mean']:+.3f} (final {s['cosine_final']:+.3f}); |dlambda| "
              f"{s['dlambda_norm']:.4f}; gain hypernet {s['gain_hypernet']:+.5f}, at w* {s['gain_lambda']:+.5f}; "
              f"exact same time {s['exact_gain_same_time']:+.5f}")
    print(f"variants that tune lambda: {', '.join(summary['tuning_variants']) or 'none'}")


# ------------------------------------------------------------------------------------------ paper, claims

def tex_numbers(summary):
    """Every number the paper quotes from this study: macro name -> LaTeX."""
    variants = summary["variants"]
    numbers = texfmt.macros(TEX_PREFIX, summary, """
        RefValid         mse           reference.valid
        RefTest          mse           reference.test
        ExactValid       mse           exact.final_valid
        ExactTest        mse           exact.final_test
        ExactGain        significant2  exact.gain
        ExactSeconds     seconds       exact.seconds
        ExactSteps       integer       exact.steps
        SplitGapSpread   significant2  split_gap_spread
    """)
    numbers[TEX_PREFIX + "MaxAbsCosine"] = texfmt.fixed(max(abs(v["cosine_mean"]) for v in variants.values()), 3)
    numbers[TEX_PREFIX + "NumTuning"] = texfmt.integer(len(summary["tuning_variants"]))
    if "10" in summary["rank_bound"]:
        numbers[TEX_PREFIX + "RankTenBound"] = texfmt.fixed(summary["rank_bound"]["10"], 2)
    if "paper" in variants:
        numbers |= texfmt.macros(TEX_PREFIX + "Paper", variants["paper"], """
            Cosine   fixed3        cosine_mean
            Dlambda  significant2  dlambda_mean_abs
            Gain     significant2  gain_lambda
            Valid    mse           final_valid
        """)
    return numbers


def paper_cosine_verdict(summary):
    """(mean cosine of the paper's setting with the exact hypergradient, verdict)."""
    c = summary["variants"]["paper"]["cosine_mean"]
    verdict = "reproduced" if c > COSINE_ALIGNED else "partly" if c > COSINE_ZERO else "refuted"
    return c, verdict


def paper_gain_verdict(summary):
    """(validation gain of the paper's setting over the fixed-lambda level, verdict)."""
    p = summary["variants"]["paper"]
    gain = p["gain_lambda"]
    if gain > GAIN_MIN:
        return gain, "reproduced"
    return gain, "refuted" if abs(p["cosine_mean"]) < COSINE_ZERO else "not reproduced"


def any_setting_verdict(summary):
    """(the variants that tune lambda and the best gain, verdict)."""
    variants, tuning = summary["variants"], summary["tuning_variants"]
    best = max(variants, key=lambda n: variants[n]["gain_lambda"])
    value = f"{', '.join(tuning) or 'none'} (best gain {variants[best]['gain_lambda']:.2g}: {best})"
    return value, "reproduced" if tuning else "not reproduced"


def exact_verdict(summary):
    """(gain of exact-hypergradient descent over the fixed-lambda level, verdict)."""
    return summary["exact"]["gain"], "reproduced" if summary["exact"]["gain"] > GAIN_MIN else "not reproduced"


def split_verdict(summary):
    """(spread of the fixed-lambda valid-test gap over validation blocks, verdict against SPEC's ~0.003)."""
    spread = summary["split_gap_spread"]
    return spread, "reproduced" if 0.5 * SPLIT_GAP_SPEC <= spread <= 2 * SPLIT_GAP_SPEC else "not reproduced"


CLAIMS = common.claims(globals(), """
    id: hg-direction
    claim: Hyper-training's lambda step points along the true hypergradient at 7,850 hyperparameters
    paper: implied: Algorithm 3's lambda step descends L_V(w*(lambda)) (Figure 5 top)
    evaluate: paper_cosine_verdict
    fmt: {:+.3f}
    evidence: variants.paper.cosine_mean; hypergradient_study.pdf (a)

    id: hg-tunes
    claim: Hyper-training with the paper's settings tunes the 7,850 decays (gain over the fixed-lambda level)
    paper: hypernetwork valid ~0.0391 below the starting level (Figure 5 top)
    evaluate: paper_gain_verdict
    fmt: {:.2g}
    evidence: variants.paper.gain_lambda, reference.valid; hypergradient_study.pdf (c)

    id: hg-any-setting
    claim: Some sampling / centring / step / width setting makes hyper-training tune lambda (issue 10)
    paper: not in the paper (our question)
    evaluate: any_setting_verdict
    fmt: {}
    evidence: tuning_variants, variants.*.gain_lambda, variants.*.cosine_mean; hypergradient_study_table.tex

    id: hg-exact-tunes
    claim: The 7,850 decays can be tuned: exact-hypergradient descent beats the fixed-lambda level
    paper: the unrolled baseline descends in Figure 5 top
    evaluate: exact_verdict
    fmt: {:.2g}
    evidence: exact.gain, exact.final_valid; hypergradient_study.pdf (c)

    id: hg-split-gap
    claim: Which 10,000-image block is the validation set moves the fixed-lambda valid-test gap by ~0.003 MSE
    paper: not stated (SPEC section 9)
    evaluate: split_verdict
    fmt: {:.4f}
    evidence: split_sensitivity, split_gap_spread; hypergradient_study_table.tex
""")


if __name__ == "__main__":
    sys.exit(common.main(sys.modules[__name__]))
