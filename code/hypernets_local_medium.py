"""Ten per-class decays tuned by hyper-training, random search and Bayesian optimisation (SPEC section 7, appendix).

The elementary model is the linear 784-10 model; lambda (10,) weights the class-wise regulariser
(1/10) sum_c exp(lambda_c) ||W[:, c]||_2 of SPEC section 6, and the loss is the Gaussian NLL of SPEC
section 2 (the appendix reports losses near 0.5, i.e. on that scale). Each method gets the same budget of
CPU seconds of its own clock (SPEC section 7, "Medium experiment"; the paper reports CPU time):

* hyper-training, Algorithm 3: a linear hypernetwork [10, 7850] (86,350 parameters) takes Adam steps on
  the training objective at lambdas sampled around lambda_hat; lambda_hat takes Adam steps on the
  validation loss of the hypernetwork's weights w_phi(lambda_hat) (hand-written gradients, HyperTrainer);
* random search: lambda ~ Uniform(box)^10, each sample a fresh elementary model trained with Adam;
  K samples are trained at once as one stacked problem (identical to K separate runs);
* Bayesian optimisation: a scikit-learn Gaussian process (Matern 5/2, one length scale per decay) and
  expected improvement maximised over random candidates, each suggestion trained like random search.

Inner training and GP fitting count; only the reporting evaluations of hyper-training's checkpoints are off
its clock. Two checks of the ranking follow (issue 10 item 7):
* the control: one model at the untuned lambda_hat_0, trained plainly for as many Adam steps (same step
  size, same minibatches) as the hypernetwork took; it shows what training length alone buys;
* the common retraining: every method's best lambda, and lambda_hat_0, retrained from the same start for
  the same (long) number of steps on the same minibatches, scored by the mean loss over the retraining's
  second half (converged); the claims are judged on these numbers.

Exact diagnostics (issue 10 item 2; off every clock, a few CPU seconds): the objective is convex and decouples per
class, so the converged weights w*(lambda) and the exact hypergradient dL_V/dlambda (implicit differentiation) cost
one Gram matrix and one eigendecomposition, then a scalar root per class (see "exact references" below). At every
diag_every-th checkpoint of hyper-training, the cosine of its hypergradient H dL_V/dw at w_phi(lambda_hat) with the
exact one (both on the full validation set); ||lambda_hat - lambda_hat_0|| and each class's change; the fixed-lambda
reference L_V(w*(lambda_hat_0)); every method's best lambda scored at w*(lambda). Companion figure
hypernets_local_medium_diagnostics; claim medium-hg-direction.

The baselines' batches are independent evaluations: --jobs N trains each batch split across N forked processes,
--scheduler ADDRESS (or --backend dask with it) on that dask.distributed cluster (scaleout.ChunkPool: the splits
sent once per worker). Any split gives the bits of --jobs 1; the workers' CPU seconds are added to the method's
clock, so a budget means the same CPU time wherever the work runs.

    python hypernets_local_medium.py [--seconds 45] [--iters N --search-iters B] [--paper-budgets] [--quick]
    python hypernets_local_medium.py --jobs 2 | --scheduler tcp://host:8786
"""
import functools
import os
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

import common
import neural_network as nn
import references as refs
import scaleout
import texfmt
from budget import Budget, BudgetedRun, run_interleaved
from common import ExperimentError, UsageError, check_divergence, check_finite, setting, step_rng
from data_loader import scatter_splits
from hypernets_local_large import COSINE_ALIGNED, COSINE_ZERO
from optimizers import adam_init, adam_inplace
from per_weight_decay import STREAM_SAMPLES, STREAM_TRAIN_BATCH, STREAM_VALID_BATCH, StepStreams, minibatch
from progress import Progress

NAME = "hypernets_local_medium"
TEX_PREFIX = "Medium"  # every macro this script exports to the paper starts with it
DATA = "mnist"
PARALLEL = True                    # --jobs N processes (or --scheduler: a dask cluster) train the baselines' batches
LAYER_SIZES = (784, 10)            # the linear elementary model (SPEC section 7)
N_IN, N_CLASSES = LAYER_SIZES
N_WEIGHTS = N_IN * N_CLASSES + N_CLASSES  # 7,850 flat weights: W (784, 10) row-major, then b (10,)
METHODS = ("hypernet", "random", "bayesopt")
RESCORED = ("hypernet", "random", "bayesopt", "control")  # rows of the common retraining
LABELS = {"hypernet": "Hyper-training", "random": "Random search", "bayesopt": "Bayesian opt.",
          "control": r"Untuned $\hat\lambda_0$"}
STREAM_RANDOM, STREAM_BO, STREAM_RESCORE = 11, 12, 13  # step_rng streams (per_weight_decay uses 1..3)
PAPER_SECONDS = 970.0              # the appendix's runtime axis (SPEC section 7)
NLL_SCALE = 50.0                   # Gaussian NLL with sigma 0.1: 50 (pred - t)^2 + const (SPEC section 2)

# Up-front checks (issue 11): a run that cannot make progress or cannot fit in memory is refused.
FAST_FLOPS = 2e11                  # FLOP/s no core here reaches: a budget shorter than one batch at it is hopeless
MAX_SLICES = 10 ** 6               # budget / slice_seconds above this: slices too small to make progress
GP_MAX_OBSERVATIONS = 5000         # memory estimate: the GP's observations at most (kernel matrices)

# The exact best response (scalar root per class, Brent's method on log u): bracket steps and tolerances.
BRACKET_STEP = 2.0                 # log-u step while bracketing the root (a factor e^2 per step)
BRENT_XTOL = 1e-15                 # absolute tolerance on log u (machine precision near log u ~ 1)
BRENT_RTOL = 4 * np.finfo(float).eps  # the smallest relative tolerance brentq accepts
BRENT_MAXITER = 200                # Brent's method converges in far fewer on this monotone function

# Verdict thresholds (SPEC section 10), in NLL units.
RANKING_MARGIN = 0.002             # a lead smaller than this is within the spread of one retraining
PAPER_LEAD = 0.592 - 0.485         # published lead of hyper-training over BO in validation loss (appendix)
PLATEAU_FRACTION = 0.25            # a noisy current-value curve is read as its mean over the last quarter of runtime


@dataclass(frozen=True)
class Config:
    """Settings of one run."""

    seed: int = setting(7, lo=0, hi=2**32 - 1)  # random seed (SPEC: 7 everywhere)
    seconds: float = setting(45.0, lo=0, lo_open=True)  # CPU-second budget of EACH method (our choice: in about
    # 3 min of wall time every method gets at least the steps of the earlier committed run; the paper ran ~970 s)
    paper_budgets: bool = setting(os.environ.get("PAPER_BUDGETS", "") == "1")  # the paper's budget of 970 CPU s
    # per method instead of --seconds (default on when PAPER_BUDGETS=1 is in the environment)
    num_iters: int | None = setting(None, lo=1, flag="iters")  # fixed step counts instead of the budget
    # (bit-reproducible): this many lambda_hat steps of hyper-training, and --search-iters batches of each baseline
    search_iters: int = setting(10, lo=1)  # with --iters: batches of random search and of Bayesian optimisation
    slice_seconds: float = setting(10.0, lo=0, lo_open=True)  # the methods alternate in slices of this much CPU
    # time (keeps their progress together; no effect on the numbers)
    n_train: int = setting(50000, lo=1)  # training images 0..49,999 (SPEC section 1, scatter split)
    n_valid: int = setting(10000, lo=1)  # validation images 50,000..59,999
    n_test: int = setting(10000, lo=1)  # the 10,000 test images
    init_scale: float = setting(1e-5, lo=0, lo_open=True)  # elementary and hypernetwork init scale (SPEC section 6)
    batch_size: int = setting(100, lo=1)  # data minibatch of every gradient step (SPEC section 7 macros)
    lambda_low: float = setting(-3.0)  # search box of every decay (SPEC section 6: Uniform(-3, 3))
    lambda_high: float = setting(3.0)  # upper end of the search box
    lambda_init: float = setting(0.0)  # initial lambda_hat, every entry: the centre of the search box (our choice)
    n_samples: int = setting(2, lo=1)  # hyperparameter samples per hypernetwork step (SPEC section 7)
    sample_sd: float = setting(1.0, lo=0)  # lambda ~ N(lambda_hat, sample_sd^2) per entry (not stated; our choice)
    inner_steps: int = setting(10, lo=1)  # hypernetwork steps per lambda_hat step (SPEC section 7 macros)
    hypernet_step: float = setting(1e-4, lo=0, lo_open=True)  # Adam step size of the hypernetwork and of the
    # control (SPEC section 7)
    lambda_step: float = setting(3e-3, lo=0, lo_open=True)  # Adam step size of lambda_hat (paper 1e-4, released
    # local code 0.01; our choice between them: lambda_hat settles within the budget)
    eval_every: int = setting(20, lo=1)  # lambda_hat steps between validation/test checkpoints
    log_every: int = setting(500, lo=1)  # lambda_hat steps between hyper-training log lines
    elementary_steps: int = setting(1000, lo=1)  # Adam steps per random-search / BO evaluation (SPEC section 6)
    elementary_step_size: float = setting(1e-4, lo=0, lo_open=True)  # Adam step size of those evaluations and
    # of the common retraining (SPEC section 7)
    random_batch: int = setting(10, lo=1)  # random-search lambdas trained at once as one stacked problem
    bo_initial: int = setting(5, lo=1)  # random points before the first GP fit (one stacked batch)
    bo_batch: int = setting(5, lo=1)  # BO suggestions per GP fit (kriging believer), 1 = sequential
    bo_candidates: int = setting(2000, lo=1)  # uniform random candidates for maximising expected improvement
    bo_local_candidates: int = setting(500, lo=0)  # extra candidates drawn around the best point so far
    bo_local_sd: float = setting(0.3, lo=0)  # standard deviation of those local candidates (lambda units)
    bo_restarts: int = setting(1, lo=0)  # GP hyperparameter optimiser restarts
    bo_xi: float = setting(0.0, lo=0)  # expected-improvement exploration margin
    rescore_steps: int = setting(15000, lo=1)  # Adam steps of the common retraining of every method's best
    # lambda (our choice: 30 epochs, 15 times a baseline evaluation; the validation loss levels off by about
    # 10,000; rescored.*.valid_drift checks it)
    rescore_points: int = setting(20, lo=1)  # evaluations along the common retraining (its convergence record)
    diag_every: int = setting(5, lo=1)  # hyper-training evaluations between hypergradient diagnostics (our choice:
    # every 100 lambda steps at --eval-every 20, about 30 checkpoints of ~0.1 CPU s each, off the method clock)
    backend: str = setting("local", choices=scaleout.BACKENDS)  # where the baselines' batches train: "local"
    # (this machine, --jobs processes) or "dask" (the cluster at --scheduler); the same bits either way
    scheduler: str = setting("")  # dask scheduler address, e.g. tcp://host:8786 (implies --backend dask); empty
    # starts nothing. Workers need code/ on their PYTHONPATH and the same numpy/BLAS


QUICK = dict(seconds=1.5, slice_seconds=0.5, elementary_steps=60, random_batch=4, bo_initial=3, bo_batch=2,
             bo_candidates=200, bo_local_candidates=50, eval_every=5, log_every=50, rescore_steps=300,
             rescore_points=5, diag_every=1, n_train=1500, n_valid=500, n_test=500)


def budget_seconds(config):
    """The CPU-second budget of each method: the paper's with --paper-budgets, else --seconds."""
    return PAPER_SECONDS if config.paper_budgets else config.seconds


# ------------------------------------------------------------------------------------------ validation

def memory_estimate(config):
    """Bytes the run's largest arrays need at once (data, stacked models, BO candidates and kernels)."""
    f8 = 8
    data = (config.n_train + config.n_valid + config.n_test) * (N_IN + N_CLASSES) * f8
    stacked = max(config.random_batch, config.bo_batch, config.bo_initial, len(RESCORED))
    models = stacked * N_WEIGHTS * f8 * 5                       # weights, two Adam moments, gradient, norms
    full_eval = stacked * max(config.n_valid, config.n_test) * N_CLASSES * f8 * 3  # predictions and residuals
    hypernet = (N_CLASSES + 1) * N_WEIGHTS * f8 * 4 + config.n_samples * N_WEIGHTS * f8 * 3
    candidates = config.bo_candidates + config.bo_local_candidates
    bo = candidates * N_CLASSES * f8 * 4 + candidates * GP_MAX_OBSERVATIONS * f8 * 3
    return data + models + full_eval + hypernet + bo


def batch_flops(config, k):
    """Floating-point operations of training k stacked models for elementary_steps (forward + backward)."""
    return 6.0 * config.batch_size * N_WEIGHTS * k * config.elementary_steps


def validate(config):
    """One-line UsageError for settings that contradict each other, cannot fit in memory, or make no progress."""
    if not config.lambda_low < config.lambda_high:
        raise UsageError(f"--lambda-low {config.lambda_low:g} must be below --lambda-high {config.lambda_high:g}")
    if config.bo_batch > config.bo_candidates + config.bo_local_candidates:
        raise UsageError(f"--bo-batch {config.bo_batch} is larger than its {config.bo_candidates} + "
                         f"{config.bo_local_candidates} candidates")
    if config.paper_budgets and config.seconds != Config.seconds:
        raise UsageError("give --seconds or --paper-budgets, not both")
    try:
        scaleout.resolve_backend(config.backend, config.scheduler)
    except ExperimentError as err:
        raise UsageError(str(err)) from None
    common.check_memory(memory_estimate(config), "these settings")
    if config.num_iters is None:
        budget = budget_seconds(config)
        if budget / config.slice_seconds > MAX_SLICES:
            raise UsageError(f"--slice-seconds {config.slice_seconds:g} is too small to make progress "
                             f"(more than {MAX_SLICES:,} slices in a budget of {budget:g} s)")
        fastest = max(batch_flops(config, config.random_batch), batch_flops(config, config.bo_initial)) / FAST_FLOPS
        if fastest > budget:
            raise UsageError(f"a budget of {budget:g} CPU s cannot finish one baseline batch (at least "
                             f"{fastest:.0f} s); raise --seconds or lower --elementary-steps")


# ------------------------------------------------------------------------------------------ model

def class_decay_objective(flat, lams, x, y):
    """Reference training objective (autograd-traceable): flat (K, P), lams (K, 10), x (N, 784), y (N, 10) -> (K,)
    Gaussian NLL + (1/10) sum_c exp(lambda_c) ||W[:, c]||_2."""
    params = nn.unflatten_batch(flat, LAYER_SIZES)
    return nn.gaussian_nll(nn.batched_mlp_predict(params, x), y) + nn.class_norm_regulariser(params[-1][0], lams)


def nll_reference(flat, x, y):
    """Reference validation/test loss (autograd-traceable): flat (K, P), x, y -> (K,) Gaussian NLL."""
    return nn.gaussian_nll(nn.batched_mlp_predict(nn.unflatten_batch(flat, LAYER_SIZES), x), y)


def split_weights(flat):
    """Views W (K, 784, 10) and b (K, 10) of flat weights (K, P) (flatten_params order: W row-major, then b)."""
    K = flat.shape[0]
    return flat[:, :N_IN * N_CLASSES].reshape(K, N_IN, N_CLASSES), flat[:, N_IN * N_CLASSES:]


def predict(flat, x):
    """Linear model outputs: flat (K, P), x (N, 784) -> (K, N, 10)."""
    W, b = split_weights(flat)
    return np.matmul(x, W) + b[:, None, :]


def nll(flat, x, y):
    """Gaussian NLL of each of K models: flat (K, P), x (N, 784), y (N, 10) -> (K,); equals nll_reference."""
    r = predict(flat, x) - y
    return NLL_SCALE * np.mean(r * r, axis=(1, 2)) + nn.LOG_SIGMA_CONST


def nll_grad(flat, x, y, out):
    """d nll / d flat for K models, written into out (K, P); returns out.

    NLL_k = (50 / (N C)) sum_{n,c} (p_knc - t_nc)^2 + const with p_k = x W_k + b_k, so
    dNLL_k/dp_k = (100 / (N C)) (p_k - t) =: R_k (N, C); dW_k = x' R_k (784, C), db_k = sum_n R_k (C,)."""
    N = x.shape[0]
    R = predict(flat, x)
    R -= y
    R *= 2.0 * NLL_SCALE / (N * N_CLASSES)
    gW, gb = split_weights(out)
    np.matmul(x.T, R, out=gW)
    np.sum(R, axis=1, out=gb)
    return out


def class_decay_grad(flat, lams, x, y, out):
    """d class_decay_objective / d flat for K models, into out (K, P): nll_grad plus the regulariser's part.

    reg_k = (1/C) sum_c exp(lambda_kc) ||W_k[:, c]||, so d reg_k / d W_k[:, c] = (exp(lambda_kc) / C)
    W_k[:, c] / ||W_k[:, c]|| (the biases are not regularised; W_k[:, c] = 0 is never met: the init is random)."""
    nll_grad(flat, x, y, out)
    W, _ = split_weights(flat)
    gW, _ = split_weights(out)
    norms = np.sqrt(np.einsum("kdc,kdc->kc", W, W))  # (K, C)
    gW += (np.exp(lams) / (N_CLASSES * norms))[:, None, :] * W
    return out


def init_weights(config):
    """The common start of every trained elementary model: init_scale * N(0, 1) from RandomState(seed), (P,)."""
    return nn.flatten_params(nn.init_mlp(LAYER_SIZES, config.init_scale, np.random.RandomState(config.seed)))


def train_elementary(lams, splits, config, key, steps, step_size, record=(), desc=None):
    """Fresh models at lams (K, 10) trained at once by Adam from init_weights (= K separate runs).

    Minibatch i comes from step_rng(seed, i, *key) (drawn through StepStreams: the same numbers). Returns
    (flat (K, P), valid (R, K), test (R, K)) with the full-set losses after each step count in `record` (R entries).
    With desc, a progress.Progress named desc reports the steps (for the long common retraining)."""
    flat = np.tile(init_weights(config), (len(lams), 1))
    adam, grad, scratch = adam_init(flat), np.empty_like(flat), np.empty(flat.size)
    streams = StepStreams(config.seed)
    start = nll(flat[:1], splits.valid_x, splits.valid_y)[0]
    valid, test, marks = [], [], set(record)
    bar = Progress(steps, desc=desc or "", unit="step", enabled=desc is not None)
    for i in range(steps):
        x, y = minibatch(splits.train_x, splits.train_y, config.batch_size, streams(i, *key))
        class_decay_grad(flat, lams, x, y, grad)
        check_finite(grad, i, "elementary training gradient")
        adam = adam_inplace(flat, grad, adam, step_size, scratch)
        if i + 1 in marks:
            valid.append(nll(flat, splits.valid_x, splits.valid_y))
            test.append(nll(flat, splits.test_x, splits.test_y))
            check_divergence(valid[-1], start, i + 1, "elementary validation loss")
            bar.set(i + 1, valid=f"{valid[-1].min():.4f}")
    bar.close()
    return flat, np.array(valid).reshape(len(valid), len(lams)), np.array(test).reshape(len(test), len(lams))


def evaluate_batch(lams, splits, config, key):
    """Train fresh models at lams (K, 10) for elementary_steps; their validation and test losses, (K,) each."""
    _, valid, test = train_elementary(lams, splits, config, key, config.elementary_steps,
                                      config.elementary_step_size, record=(config.elementary_steps,))
    return valid[-1], test[-1]


def evaluation_chunk(chunk, shared):
    """scaleout chunk function: chunk = (lams (k, 10), key), shared = {"splits", "config"} -> (valid (k,), test (k,),
    CPU seconds the training took where it ran)."""
    lams, key = chunk
    cpu0 = time.thread_time()  # this thread only: a dask worker's other threads are not this chunk's work
    valid, test = evaluate_batch(lams, shared["splits"], shared["config"], key)
    return valid, test, time.thread_time() - cpu0


class Evaluator:
    """evaluate_batch through a scaleout.ChunkPool: a batch (K, 10) is split into at most pool.workers chunks of
    consecutive rows, trained where the pool runs them. Each row's training is independent of the rows stacked
    with it (batched matmul per model, one minibatch stream per batch key), so any split gives the bits of one
    stacked batch (tests). Returns (valid (K,), test (K,), CPU seconds spent in other processes)."""

    def __init__(self, pool):
        self.pool = pool

    def __call__(self, lams, key):
        parts = np.array_split(lams, min(self.pool.workers, len(lams)))
        out = self.pool.map(evaluation_chunk, [(part, key) for part in parts])
        valid, test = np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])
        return valid, test, (sum(o[2] for o in out) if self.pool.remote else 0.0)


class ChargedRun(BudgetedRun):
    """A BudgetedRun whose method clock also counts the CPU seconds its steps spent in other processes (worker
    processes or a cluster): step_fn(state, i) -> (state, other CPU seconds). `charged` is their total."""

    def __init__(self, state, step_fn, *args, **kwargs):
        self.charged = 0.0

        def step(state, i):
            state, other = step_fn(state, i)
            self.charged += other
            self.elapsed += other  # BudgetedRun then adds this process's own CPU time of the step
            return state

        super().__init__(state, step, *args, **kwargs)


def uniform_lambdas(n, config, rs):
    """n draws from Uniform(lambda_low, lambda_high)^10 -> (n, 10)."""
    return rs.uniform(config.lambda_low, config.lambda_high, size=(n, N_CLASSES))


def init_losses(splits, config):
    """Validation and test loss of the untrained initial model (what every baseline holds at time 0)."""
    w = init_weights(config)[None]
    return float(nll(w, splits.valid_x, splits.valid_y)[0]), float(nll(w, splits.test_x, splits.test_y)[0])


# --------------------------------------------------------- exact references (issue 10 item 2)
#
# The training objective decouples per class c: with mu_c = exp(lambda_c) / 10 and w_c = [W[:, c], b_c],
#     F_c = (5/N) ||X W_c + b_c - t_c||^2 + mu_c ||W_c||          (NLL = (50 / (N C)) sum ||.||^2 + const, C = 10;
# the bias is not regularised, as in class_decay_objective). Minimising over b_c gives b_c = tbar_c - xbar' W_c,
# leaving (5/N) ||Xc W_c - tc_c||^2 + mu_c ||W_c|| with the centred Xc = X - 1 xbar', tc_c = t_c - tbar_c. Its
# gradient A W_c - r_c + mu_c W_c / s_c (A = (10/N) Xc'Xc = Q diag(L) Q', r_c = (10/N) Xc' tc_c, s_c = ||W_c||) is
# zero at W_c = Q (L + u_c)^-1 z_c with z_c = Q' r_c and u_c = mu_c / s_c, where u_c solves the scalar equation
#     h(u) = || u (L + u)^-1 z_c || = mu_c        (h rises from 0 to ||z_c||: a root iff mu_c < ||r_c||, else W_c = 0).
# Implicit differentiation: the reduced Hessian is A + (mu/s)(I - What What') (What = W/s; the Schur complement of
# the full 785 x 785 Hessian in the bias), d(grad_W F)/d lambda_c = mu_c What, and the validation gradient seen
# through b_c = tbar_c - xbar' W_c is gh_c = g_W[:, c] - xbar g_b[c]. In the eigenbasis (a = Q' What, bb = Q' gh,
# D = L + u) the Hessian is D - u a a', and Sherman-Morrison with 1 - u a' D^-1 a = sum a^2 L / D gives
#     dL_V/d lambda_c = -mu_c What' H^-1 gh_c = -mu_c (sum a bb / D) / (sum a^2 L / D).

class ClassProblem(NamedTuple):
    """The per-class training problem with the bias eliminated (see above): eigenvalues L (784,) and vectors
    Q (784, 784) of A, z = Q' r (784, 10), the training means xbar (784,) and tbar (10,)."""

    L: np.ndarray
    Q: np.ndarray
    z: np.ndarray
    xbar: np.ndarray
    tbar: np.ndarray


class BestResponse(NamedTuple):
    """w*(lambda): flat weights (1, P), u = mu / ||W_c|| (10,) (inf where W_c = 0), the lambda it is for (10,)."""

    flat: np.ndarray
    u: np.ndarray
    lam: np.ndarray


def class_problem(x, y):
    """ClassProblem of training data x (N, 784), y (N, 10): one Gram (syrk) and one 784 x 784 eigendecomposition."""
    from scipy.linalg import blas, eigh

    N = len(x)
    xbar, tbar = x.mean(axis=0), y.mean(axis=0)
    gram = blas.dsyrk(1.0, np.asarray(x, np.float64).T, trans=0)  # upper triangle of x'x (x.T is Fortran-ordered)
    gram = np.triu(gram) + np.triu(gram, 1).T
    A = (2.0 * NLL_SCALE / (N * N_CLASSES)) * (gram - N * np.outer(xbar, xbar))
    L, Q = eigh(A)
    r = (2.0 * NLL_SCALE / (N * N_CLASSES)) * (x.T @ (y - tbar))  # Xc' tc = X' (t - tbar)
    return ClassProblem(np.maximum(L, 0.0), Q, Q.T @ r, xbar, tbar)


def decay_weights(lam):
    """mu_c = exp(lambda_c) / 10, the weight of ||W[:, c]|| in the objective: (10,) -> (10,)."""
    return np.exp(np.asarray(lam, float)) / N_CLASSES


def best_response(problem, lam):
    """BestResponse at lam (10,): each class's u_c from h(u) = mu_c by Brent's method on log u (to machine
    precision), then W_c = Q (L + u_c)^-1 z_c and b_c = tbar_c - xbar' W_c."""
    from scipy.optimize import brentq

    lam = np.asarray(lam, float)
    mu, L = decay_weights(lam), problem.L
    W, u = np.zeros((N_IN, N_CLASSES)), np.full(N_CLASSES, np.inf)
    for c in range(N_CLASSES):
        z = problem.z[:, c]
        if mu[c] >= np.linalg.norm(z):  # the norm's subgradient holds W_c at 0 (group-lasso threshold)
            continue
        def excess(t, z=z, m=mu[c]):
            v = np.exp(t)
            return np.log(np.linalg.norm(v * z / (L + v))) - np.log(m)
        lo = hi = np.log(mu[c])
        while excess(lo) > 0:
            lo -= BRACKET_STEP
        while excess(hi) < 0:
            hi += BRACKET_STEP
        u[c] = np.exp(brentq(excess, lo, hi, xtol=BRENT_XTOL, rtol=BRENT_RTOL, maxiter=BRENT_MAXITER))
        W[:, c] = problem.Q @ (z / (L + u[c]))
    b = problem.tbar - problem.xbar @ W
    return BestResponse(np.concatenate([W.ravel(), b])[None, :], u, lam)


def reduced_gradient(problem, g_flat):
    """The validation gradient (1, P) seen by W through b = tbar - xbar' W, in the eigenbasis: Q' gh (784, 10)."""
    gW, gb = split_weights(g_flat)
    return problem.Q.T @ (gW[0] - np.outer(problem.xbar, gb[0]))


def exact_hypergradient(problem, response, g_flat):
    """dL_V/dlambda (10,) at response = w*(lambda), g_flat (1, P) = dL_V/dw there (implicit differentiation, see
    above; 0 for a class whose W_c is held at 0)."""
    W, _ = split_weights(response.flat)
    s = np.linalg.norm(W[0], axis=0)
    live = s > 0
    a = problem.Q.T @ (W[0][:, live] / s[live])
    bb = reduced_gradient(problem, g_flat)[:, live]
    D = problem.L[:, None] + response.u[None, live]
    out = np.zeros(N_CLASSES)
    out[live] = -decay_weights(response.lam)[live] * np.sum(a * bb / D, axis=0) / np.sum(a * a * problem.L[:, None] / D,
                                                                                         axis=0)
    return out


def adjoint(problem, response, g_flat):
    """y = H^-1 g (1, P): the full (weights and biases) Hessian of the training objective at w*, solved against
    g_flat (1, P); exact_hypergradient is -(d grad_w F / d lambda)' y. For the tests (autograd checks H y = g)."""
    W, _ = split_weights(response.flat)
    gW, gb = split_weights(g_flat)
    s = np.linalg.norm(W[0], axis=0)
    live = s > 0  # a class held at W_c = 0 has no Hessian there; its rows of y are left 0
    a = problem.Q.T @ (W[0][:, live] / s[live])
    bb = reduced_gradient(problem, g_flat)[:, live]
    D = problem.L[:, None] + response.u[None, live]
    # (D - u a a')^-1 bb = bb / D + u (a / D) (a' bb / D) / (1 - u a' a / D), with 1 - u a'a/D = sum a^2 L / D
    coef = response.u[live] * np.sum(a * bb / D, axis=0) / np.sum(a * a * problem.L[:, None] / D, axis=0)
    yW = np.zeros((N_IN, N_CLASSES))
    yW[:, live] = problem.Q @ (bb / D + coef * a / D)
    yb = np.where(live, gb[0] / (2.0 * NLL_SCALE / N_CLASSES) - problem.xbar @ yW, 0.0)  # the bias rows
    return np.concatenate([yW.ravel(), yb])[None, :]


def reference_losses(problem, lam, splits):
    """Validation and test NLL of the converged weights w*(lam): the level training at lam reaches."""
    w = best_response(problem, lam).flat
    return float(nll(w, splits.valid_x, splits.valid_y)[0]), float(nll(w, splits.test_x, splits.test_y)[0])


class HyperDiagnostics:
    """Hyper-training's hypergradient against the exact one, at checkpoints (off its clock): rows of (lambda step,
    ||lambda_hat - lambda_hat_0||, cosine of H dL_V/dw at w_phi(lambda_hat) with the exact dL_V/dlambda at
    w*(lambda_hat), both on the full validation set, the exact L_V(w*(lambda_hat)), and ||exact dL_V/dlambda||
    (how far lambda_hat is from a stationary point of the exact validation loss))."""

    def __init__(self, problem, splits, lam0):
        self.problem, self.splits, self.lam0, self.rows = problem, splits, np.asarray(lam0, float), []
        self.g, self.cpu_seconds = np.empty((1, N_WEIGHTS)), 0.0

    def record(self, state):
        if self.rows and self.rows[-1][0] == state.step:
            return
        cpu0, s = time.process_time(), self.splits
        response = best_response(self.problem, state.lam)
        exact = exact_hypergradient(self.problem, response, nll_grad(response.flat, s.valid_x, s.valid_y, self.g))
        w = (state.lam @ state.H + state.h)[None, :]  # w_phi(lambda_hat)
        method = state.H @ nll_grad(w, s.valid_x, s.valid_y, self.g)[0]  # what the lambda_hat step follows
        self.rows.append((state.step, float(np.linalg.norm(state.lam - self.lam0)), refs.cosine(method, exact),
                          float(nll(response.flat, s.valid_x, s.valid_y)[0]), float(np.linalg.norm(exact))))
        self.cpu_seconds += time.process_time() - cpu0

    def arrays(self):
        rows = np.array(self.rows, float).reshape(-1, 5)
        return {"hypernet_diag_step": rows[:, 0].astype(np.int64), "hypernet_lambda_shift": rows[:, 1],
                "hypernet_cosine": rows[:, 2], "hypernet_exact_valid": rows[:, 3], "hypernet_exact_norm": rows[:, 4]}


# ------------------------------------------------------------------------------ hyper-training

class HyperState(NamedTuple):
    """Linear hypernetwork w = lambda H + h (H (10, P), h (P,)), lambda_hat (10,), Adam states, steps done."""

    H: np.ndarray
    h: np.ndarray
    lam: np.ndarray
    adam_H: object
    adam_h: object
    adam_lam: object
    step: int


def init_hypernet(config):
    """Hypernetwork init_scale * N(0, 1) from RandomState(seed) (neural_network.init_hypernet 'linear'),
    lambda_hat = lambda_init everywhere, fresh Adam states."""
    [(H, h)] = nn.init_hypernet("linear", N_CLASSES, N_WEIGHTS, config.init_scale, np.random.RandomState(config.seed))
    lam = np.full(N_CLASSES, float(config.lambda_init))
    return HyperState(H, h, lam, adam_init(H), adam_init(h), adam_init(lam), 0)


class HyperTrainer:
    """Algorithm 3 with the linear hypernetwork, hand-written gradients and preallocated buffers.

    step(state, i) = inner_steps Adam steps of (H, h) on mean_k f_train(w(lambda_k), lambda_k) over a training
    minibatch, lambda_k ~ N(lambda_hat, sample_sd^2) (n_samples draws); then one Adam step of lambda_hat on
    the validation NLL of w(lambda_hat) over a validation minibatch. Random numbers: step_rng(seed, inner step
    index or lambda step, stream), the streams of per_weight_decay.alg3_step. Arrays change IN PLACE."""

    def __init__(self, splits, config):
        self.splits, self.config = splits, config
        K = config.n_samples
        self.w, self.g = np.empty((K, N_WEIGHTS)), np.empty((K, N_WEIGHTS))
        self.gH, self.w1, self.g1 = np.empty((N_CLASSES, N_WEIGHTS)), np.empty((1, N_WEIGHTS)), np.empty((1, N_WEIGHTS))
        self.scratch = np.empty(N_CLASSES * N_WEIGHTS)
        self.streams = StepStreams(config.seed)

    def weights(self, state, lambdas, out):
        """w(lambda) = lambda H + h for lambdas (K, 10) -> out (K, P)."""
        np.matmul(lambdas, state.H, out=out)
        out += state.h
        return out

    def step(self, state, i):
        c, s = self.config, self.splits
        adam_H, adam_h = state.adam_H, state.adam_h
        for j in range(c.inner_steps):
            inner = i * c.inner_steps + j
            noise = self.streams(inner, STREAM_SAMPLES).randn(c.n_samples, N_CLASSES)
            lambdas = state.lam[None, :] + c.sample_sd * noise
            x, y = minibatch(s.train_x, s.train_y, c.batch_size, self.streams(inner, STREAM_TRAIN_BATCH))
            # Chain rule through w_k = lambda_k H + h: with delta_k = (1/K) df_k/dw_k (mean over the K samples),
            # dF/dH = sum_k lambda_k' delta_k = lambdas' delta (10, P) and dF/dh = sum_k delta_k (P,).
            delta = class_decay_grad(self.weights(state, lambdas, self.w), lambdas, x, y, self.g)
            delta /= c.n_samples
            check_finite(delta, inner, "hypernetwork gradient")
            np.matmul(lambdas.T, delta, out=self.gH)
            adam_H = adam_inplace(state.H, self.gH, adam_H, c.hypernet_step, self.scratch)
            adam_h = adam_inplace(state.h, delta.sum(axis=0), adam_h, c.hypernet_step, self.scratch)
        x, y = minibatch(s.valid_x, s.valid_y, c.batch_size, self.streams(i, STREAM_VALID_BATCH))
        # dL_V/dlambda_hat = H dL_V/dw at w = lambda_hat H + h (the validation loss has no direct lambda term).
        g_w = nll_grad(self.weights(state, state.lam[None, :], self.w1), x, y, self.g1)
        g_lam = state.H @ g_w[0]
        check_finite(g_lam, i, "hyperparameter gradient")
        adam_lam = adam_inplace(state.lam, g_lam, state.adam_lam, c.lambda_step, self.scratch)
        return HyperState(state.H, state.h, state.lam, adam_H, adam_h, adam_lam, state.step + 1)


def make_hypernet(splits, config, lambda_log, diag=None):
    """(initial state, step_fn, evaluate) of hyper-training; evaluate appends lambda_hat to lambda_log and, every
    diag_every evaluations, records a HyperDiagnostics row (off the clock, as every evaluation)."""
    trainer, start = HyperTrainer(splits, config), init_losses(splits, config)[0]

    def evaluate(state):
        lambda_log.append(state.lam.copy())
        if diag is not None and (len(lambda_log) - 1) % config.diag_every == 0:
            diag.record(state)
        w = trainer.weights(state, state.lam[None, :], np.empty((1, N_WEIGHTS)))
        valid = float(nll(w, splits.valid_x, splits.valid_y)[0])
        check_divergence(valid, start, state.step, "hyper-training validation loss")
        return valid, float(nll(w, splits.test_x, splits.test_y)[0])

    return init_hypernet(config), trainer.step, evaluate


# ------------------------------------------------------------------------------ the control

class ControlState(NamedTuple):
    """One elementary model (1, P) trained plainly at lambda_hat_0, its Adam state, steps done."""

    w: np.ndarray
    adam: object
    step: int


def make_control(splits, config):
    """(initial state, step_fn, evaluate) of plain training at lambda_hat_0: step i uses the hypernetwork's
    inner step i's training minibatch and its Adam step size, from init_weights."""
    lams = np.full((1, N_CLASSES), float(config.lambda_init))
    grad, scratch, streams = np.empty((1, N_WEIGHTS)), np.empty(N_WEIGHTS), StepStreams(config.seed)
    start = init_losses(splits, config)[0]

    def step_fn(state, i):
        x, y = minibatch(splits.train_x, splits.train_y, config.batch_size, streams(i, STREAM_TRAIN_BATCH))
        class_decay_grad(state.w, lams, x, y, grad)
        check_finite(grad, i, "control gradient")
        return ControlState(state.w, adam_inplace(state.w, grad, state.adam, config.hypernet_step, scratch),
                            state.step + 1)

    def evaluate(state):
        valid = float(nll(state.w, splits.valid_x, splits.valid_y)[0])
        check_divergence(valid, start, state.step, "control validation loss")
        return valid, float(nll(state.w, splits.test_x, splits.test_y)[0])

    w = init_weights(config)[None].copy()
    return ControlState(w, adam_init(w), 0), step_fn, evaluate


# --------------------------------------------------------------------- gradient-free baselines

class SearchState(NamedTuple):
    """Evaluations so far: lambdas (E, 10), validation and test losses (E,), batch index of each (E,)."""

    lambdas: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    batch: np.ndarray


def empty_search():
    return SearchState(np.zeros((0, N_CLASSES)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int))


def make_search(splits, config, propose, stream, evaluator):
    """(initial state, step_fn, evaluate) of a gradient-free method; step i trains the batch propose(state, i)
    through evaluator (an Evaluator) and returns (state, CPU seconds spent elsewhere) (ChargedRun).

    evaluate returns the best validation loss so far and the test loss at that setting (the initial model's
    losses before the first evaluation); it only reads the state, no computation."""
    start = init_losses(splits, config)

    def step_fn(state, i):
        lams = propose(state, i)
        valid, test, other = evaluator(lams, (stream, i))
        return SearchState(np.vstack([state.lambdas, lams]), np.append(state.valid, valid),
                           np.append(state.test, test), np.append(state.batch, np.full(len(lams), i))), other

    def evaluate(state):
        if len(state.valid) == 0 or state.valid.min() >= start[0]:
            return start
        k = int(np.argmin(state.valid))
        return float(state.valid[k]), float(state.test[k])

    return empty_search(), step_fn, evaluate


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


def within_budget(curve, budget):
    """Indices of the curve points recorded no later than the budget (all of them in --iters mode)."""
    return np.arange(len(curve.seconds)) if budget is None else np.nonzero(curve.seconds <= budget)[0]


def plateau_points(seconds):
    """Checkpoints in the last quarter of a curve's runtime (its plateau; at least the last point)."""
    seconds = np.asarray(seconds, float)
    return np.nonzero(seconds >= seconds[-1] - PLATEAU_FRACTION * (seconds[-1] - seconds[0]))[0]


def make_budget(config, method):
    """Budget of one method: its CPU seconds, or with --iters a fixed number of its own steps."""
    every = (config.eval_every, config.log_every) if method == "hypernet" else (1, 1)
    if config.num_iters is None:
        return Budget(seconds=budget_seconds(config), eval_every=every[0], log_every=every[1])
    iters = config.num_iters if method == "hypernet" else config.search_iters
    return Budget(iters=iters, eval_every=every[0], log_every=every[1])


def rescore(lams, splits, config):
    """The common retraining: every row of lams (M, 10) trained from init_weights for rescore_steps on the
    same minibatches (stream STREAM_RESCORE) -> (record steps (R,), valid (R, M), test (R, M))."""
    marks = np.unique(np.linspace(0, config.rescore_steps, config.rescore_points + 1).round().astype(int)[1:])
    _, valid, test = train_elementary(lams, splits, config, (STREAM_RESCORE,), config.rescore_steps,
                                      config.elementary_step_size, record=tuple(marks), desc="common retraining")
    return marks, valid, test


def evaluation_pool(splits, config, jobs, log=print):
    """The scaleout.ChunkPool the baselines' batches train in: inline (--jobs 1), --jobs forked processes (capped at
    the CPUs and the largest batch; forked.ForkedWorkers), or the dask cluster at --scheduler (the splits sent once
    per worker)."""
    backend, pool = scaleout.resolve_backend(config.backend, config.scheduler), None
    if backend == "dask":
        log(f"baseline batches on the dask cluster at {config.scheduler}")
    elif jobs > 1:
        import forked

        largest = max(config.random_batch, config.bo_initial, config.bo_batch)
        capped = max(1, min(jobs, forked.available_cpus(), largest))
        if capped < jobs:
            print(f"note: --jobs {jobs} capped at {capped} ({forked.available_cpus()} CPUs, batches of at most "
                  f"{largest})", file=sys.stderr)
        jobs = capped
        pool = functools.partial(forked.ForkedWorkers, role="evaluation worker", describe=lambda t: f"chunk {t.index}")
    return scaleout.ChunkPool({"splits": splits, "config": config}, backend, config.scheduler, jobs, pool)


def run(config, data, jobs=1, log=print):
    """The three methods (interleaved, each on its own clock; the baselines' batches through --jobs / --scheduler),
    the control, the common retraining and the exact diagnostics -> (summary, arrays)."""
    splits = scatter_splits(data, config.n_train, config.n_valid, config.n_test)
    cpu0 = time.process_time()
    problem = class_problem(splits.train_x, splits.train_y)  # the exact references' one-off set-up
    diag = HyperDiagnostics(problem, splits, np.full(N_CLASSES, float(config.lambda_init)))
    diag.cpu_seconds += time.process_time() - cpu0
    with evaluation_pool(splits, config, jobs, log) as pool:
        summary, arrays, runs = run_methods(splits, config, diag, Evaluator(pool), log)
    control_and_rescore(splits, config, summary, arrays, log)
    diagnose(problem, diag, splits, config, summary, arrays, runs["hypernet"])
    return summary, arrays


def run_methods(splits, config, diag, evaluator, log):
    """The three methods, interleaved, each on its own clock -> (summary, arrays, BudgetedRuns)."""
    budget = None if config.num_iters is not None else budget_seconds(config)
    hyper_lambdas = []
    factories = dict(hypernet=lambda: make_hypernet(splits, config, hyper_lambdas, diag),
                     random=lambda: make_search(splits, config, propose_random(config), STREAM_RANDOM, evaluator),
                     bayesopt=lambda: make_search(splits, config, propose_bayesopt(config), STREAM_BO, evaluator))
    runs = {}
    for method in METHODS:
        state, step_fn, evaluate = factories[method]()
        kind = BudgetedRun if method == "hypernet" else ChargedRun
        runs[method] = kind(state, step_fn, evaluate, make_budget(config, method), method, log)
    curves = dict(zip(METHODS, run_interleaved(list(runs.values()), config.slice_seconds), strict=True))
    summary = dict(budget_seconds=budget, n_hyperparameters=N_CLASSES,
                   hypernet_parameters=nn.num_params([N_CLASSES, N_WEIGHTS]), methods={},
                   workers=max(1, evaluator.pool.workers), backend=evaluator.pool.backend)
    arrays = {}
    for method in METHODS:
        curve, keep = curves[method], within_budget(curves[method], budget)
        bv, bt = best_so_far(curve.valid[keep], curve.test[keep])
        arrays.update({f"{method}_seconds": curve.seconds[keep], f"{method}_valid": curve.valid[keep],
                       f"{method}_test": curve.test[keep], f"{method}_best_valid": bv, f"{method}_best_test": bt})
        entry = dict(best_valid=float(bv[-1]), test_at_best=float(bt[-1]),
                     runtime_seconds=float(curve.seconds[keep][-1]))
        if method == "hypernet":
            lams = np.array(hyper_lambdas)[keep]
            arrays["hypernet_lambda_hat"] = lams
            lambda_steps = int(curve.step[keep][-1])
            plateau = plateau_points(curve.seconds[keep])
            entry.update(best_lambda=lams[int(np.argmin(curve.valid[keep]))].tolist(),
                         final_lambda_hat=lams[-1].tolist(),
                         final_valid=float(curve.valid[keep][-1]), final_test=float(curve.test[keep][-1]),
                         plateau_valid=float(curve.valid[keep][plateau].mean()),
                         plateau_test=float(curve.test[keep][plateau].mean()),
                         evaluations=len(keep), lambda_steps=lambda_steps,
                         hypernet_steps=lambda_steps * config.inner_steps)
        else:
            state = runs[method].state
            counted = state.batch + 1 <= curve.step[keep][-1]  # batches finished within the budget
            finish = curve.seconds[np.searchsorted(curve.step, state.batch[counted] + 1)]
            arrays.update({f"{method}_lambdas": state.lambdas[counted], f"{method}_eval_valid": state.valid[counted],
                           f"{method}_eval_test": state.test[counted], f"{method}_eval_seconds": finish})
            entry.update(evaluations=int(counted.sum()), batches=int(curve.step[keep][-1]),
                         worker_cpu_seconds=float(runs[method].charged))
            if not counted.any():
                raise ExperimentError(f"{LABELS[method].lower()} finished no evaluation within the budget of "
                                      f"{budget:g} CPU s; raise --seconds")
            entry["best_lambda"] = state.lambdas[counted][int(np.argmin(state.valid[counted]))].tolist()
        summary["methods"][method] = entry
        log(f"{method:>10s} done: {entry['evaluations']} evaluations, best valid {entry['best_valid']:.4f}, "
            f"test there {entry['test_at_best']:.4f} ({entry['runtime_seconds']:.1f} CPU s)")
    arrays["hypernet_step"] = curves["hypernet"].step[within_budget(curves["hypernet"], budget)]
    return summary, arrays, runs


def control_and_rescore(splits, config, summary, arrays, log):
    """The control (plain training at lambda_hat_0 for the hypernetwork's Adam steps) and the common retraining
    of every method's best lambda and of lambda_hat_0; adds summary["control"], ["rescored"] and their arrays."""

    # The control: plain training at lambda_hat_0 for the hypernetwork's number of Adam steps.
    control_steps = summary["methods"]["hypernet"]["hypernet_steps"]
    state, step_fn, evaluate = make_control(splits, config)
    every = config.eval_every * config.inner_steps
    control = BudgetedRun(state, step_fn, evaluate, Budget(iters=control_steps, eval_every=every,
                                                           log_every=config.log_every * config.inner_steps),
                          "control", log).advance().curve()
    arrays.update(control_seconds=control.seconds, control_valid=control.valid, control_test=control.test,
                  control_step=control.step)
    plateau = plateau_points(control.seconds)
    summary["control"] = dict(steps=control_steps, lambda_hat=float(config.lambda_init),
                              final_valid=float(control.valid[-1]), final_test=float(control.test[-1]),
                              plateau_valid=float(control.valid[plateau].mean()),
                              plateau_test=float(control.test[plateau].mean()),
                              runtime_seconds=float(control.seconds[-1]))

    # The common retraining of every method's best lambda and of lambda_hat_0.
    lams = np.array([summary["methods"][m]["best_lambda"] for m in METHODS] + [[config.lambda_init] * N_CLASSES])
    cpu0 = time.process_time()
    marks, valid, test = rescore(lams, splits, config)
    summary["rescore_cpu_seconds"] = time.process_time() - cpu0
    arrays.update(rescore_steps=marks, rescore_valid=valid, rescore_test=test, rescore_lambdas=lams)
    # The converged level: the mean over the records of the retraining's second half (the rows share their
    # minibatches, so their minibatch noise is common; the mean removes most of it). drift: last quarter's mean
    # minus third quarter's (about 0 once converged).
    half = marks > config.rescore_steps / 2
    third = half & (marks <= 0.75 * config.rescore_steps)
    last = marks > 0.75 * config.rescore_steps
    summary["rescored"] = {m: dict(valid=float(valid[half, k].mean()), test=float(test[half, k].mean()),
                                   final_valid=float(valid[-1, k]), final_test=float(test[-1, k]),
                                   valid_drift=float(valid[last, k].mean() - valid[third, k].mean())
                                   if third.any() and last.any() else 0.0)
                           for k, m in enumerate(RESCORED)}
    summary["rescore_steps"] = config.rescore_steps
    log("common retraining: " + ", ".join(f"{m} {summary['rescored'][m]['valid']:.4f}" for m in RESCORED))


def diagnose(problem, diag, splits, config, summary, arrays, hyper_run):
    """Issue 10 item 2: the cosines of hyper-training's hypergradient with the exact one at its checkpoints within
    the budget, how far lambda_hat moved (each class), the fixed-lambda reference (w*(lambda_hat_0), converged
    exactly) and every method's best lambda scored at w*(lambda) (an exact common retraining). Adds
    summary["diagnostics"], ["reference"], ["exact"] and arrays hypernet_diag_* / hypernet_cosine / ..."""
    cpu0 = time.process_time()
    d = diag.arrays()
    kept = d["hypernet_diag_step"] <= arrays["hypernet_step"][-1]  # checkpoints within the budget
    d = {k: v[kept] for k, v in d.items()}
    curve = hyper_run.curve()
    d["hypernet_diag_seconds"] = curve.seconds[np.searchsorted(curve.step, d["hypernet_diag_step"])]
    arrays.update(d)
    trained = d["hypernet_diag_step"] > 0  # at step 0 the hypernetwork is its random init: its direction is noise
    cos = d["hypernet_cosine"][trained] if trained.any() else d["hypernet_cosine"]
    lam0 = np.full(N_CLASSES, float(config.lambda_init))
    final = np.array(summary["methods"]["hypernet"]["final_lambda_hat"])
    delta = final - lam0
    arrays["hypernet_lambda_delta"] = delta
    ref_valid, ref_test = reference_losses(problem, lam0, splits)
    response0 = best_response(problem, lam0)
    stationarity = float(np.max(np.abs(class_decay_grad(response0.flat, lam0[None, :], splits.train_x,
                                                        splits.train_y, np.empty((1, N_WEIGHTS))))))
    exact = {}
    for m in RESCORED:
        lam = lam0 if m == "control" else np.array(summary["methods"][m]["best_lambda"])
        valid, test = reference_losses(problem, lam, splits)
        exact[m] = dict(valid=valid, test=test)
    final_valid = reference_losses(problem, final, splits)[0]
    r, c = summary["rescored"], summary["control"]
    summary["reference"] = dict(lambda_hat=float(config.lambda_init), valid=ref_valid, test=ref_test,
                                stationarity=stationarity,
                                rescored_control_gap=r["control"]["valid"] - ref_valid,
                                control_plateau_gap=c["plateau_valid"] - ref_valid)
    summary["exact"] = exact
    summary["diagnostics"] = dict(
        cosine=dict(mean=float(np.mean(cos)), final=float(d["hypernet_cosine"][-1]), min=float(np.min(cos)),
                    max=float(np.max(cos)), checkpoints=int(len(cos))),
        lambda_shift=dict(l2=float(np.linalg.norm(delta)), per_class=delta.tolist(),
                          max_abs=float(np.max(np.abs(delta)))),
        exact_valid_final=final_valid, exact_gain=ref_valid - final_valid,
        exact_norm=dict(first=float(d["hypernet_exact_norm"][0]), final=float(d["hypernet_exact_norm"][-1])),
        cpu_seconds=diag.cpu_seconds + time.process_time() - cpu0)


# ---------------------------------------------------------------------------------------- claims

def rescored_lead(summary):
    """Best baseline's re-scored validation loss minus hyper-training's (positive: hyper-training ahead)."""
    r = summary["rescored"]
    return min(r["random"]["valid"], r["bayesopt"]["valid"]) - r["hypernet"]["valid"]


def figure_lead(summary):
    """At the end of the budget: best baseline's best validation loss minus hyper-training's plateau."""
    m = summary["methods"]
    return min(m["random"]["best_valid"], m["bayesopt"]["best_valid"]) - m["hypernet"]["plateau_valid"]


def tuning_gain(summary):
    """Re-scored validation loss at lambda_hat_0 minus at hyper-training's lambda (positive: tuning helped)."""
    r = summary["rescored"]
    return r["control"]["valid"] - r["hypernet"]["valid"]


def verdict_cosine(summary):
    """The mean cosine of hyper-training's hypergradient with the exact one (checkpoints after step 0), in the
    bands of the hypergradient study: reproduced above COSINE_ALIGNED (points along it), partly above COSINE_ZERO
    (positively correlated only), else refuted (uninformative or uphill)."""
    c = summary["diagnostics"]["cosine"]["mean"]
    return c, "reproduced" if c > COSINE_ALIGNED else "partly" if c > COSINE_ZERO else "refuted"


def verdict_figure(summary):
    lead = figure_lead(summary)
    if lead <= 0:
        return lead, "not reproduced"
    return lead, "reproduced" if lead >= PAPER_LEAD / 2 else "partly"


def verdict_ranking(summary):
    """(re-scored lead of hyper-training over the best baseline, verdict)."""
    lead = rescored_lead(summary)
    return lead, "reproduced" if lead > RANKING_MARGIN else "not reproduced"


def verdict_tunes(summary):
    """(re-scored gain of hyper-training's lambda over lambda_hat_0, verdict)."""
    gain = tuning_gain(summary)
    return gain, "reproduced" if gain > RANKING_MARGIN else "refuted"


CLAIMS = common.claims(globals(), """
    id: medium-figure
    claim: Within equal runtime, hyper-training's validation loss ends below random search's and BO's best
    paper: hypernet 0.485 vs BO 0.592 (appendix, right)
    evaluate: verdict_figure
    fmt: {:.3f}
    evidence: methods.*.best_valid, methods.hypernet.plateau_valid; hypernets_local_medium.pdf

    id: medium-beats-bo-random
    claim: Hyper-training finds better per-class decays than BO and random search (best lambdas retrained alike)
    paper: hypernet valid 0.485 vs BO 0.592
    evaluate: verdict_ranking
    fmt: {:.4f}
    evidence: rescored.*.valid; hypernets_local_medium_rescored.pdf

    id: medium-tunes-lambda
    claim: Hyper-training's lambda beats the untuned starting lambda when both are retrained alike
    paper: implied (the hypernetwork curve is hyper-training tuning lambda)
    evaluate: verdict_tunes
    fmt: {:.4f}
    evidence: rescored.hypernet.valid, rescored.control.valid; hypernets_local_medium_rescored.pdf

    id: medium-hg-direction
    claim: Hyper-training's lambda step points along the exact hypergradient of the 10 per-class decays
    paper: implied: Algorithm 3's lambda step descends L_V(w*(lambda)) (appendix, right)
    evaluate: verdict_cosine
    fmt: {:+.3f}
    evidence: diagnostics.cosine.mean (exact: implicit differentiation); hypernets_local_medium_diagnostics.pdf
""")

METHOD_WORDS = (("hypernet", "Hyper"), ("random", "Random"), ("bayesopt", "Bayes"), ("control", "Control"))


def tex_numbers(summary):
    """Numbers the paper text quotes from this experiment (macro name -> LaTeX)."""
    m = summary["methods"]
    out = texfmt.macros(TEX_PREFIX, summary, """
        HypernetParams     integer  hypernet_parameters
        HypernetSteps      integer  methods.hypernet.hypernet_steps
        LambdaSteps        integer  methods.hypernet.lambda_steps
        RandomEvaluations  integer  methods.random.evaluations
        BayesEvaluations   integer  methods.bayesopt.evaluations
        HyperPlateauValid  nll      methods.hypernet.plateau_valid
        HyperPlateauTest   nll      methods.hypernet.plateau_test
        HyperBestValid     nll      methods.hypernet.best_valid
        HyperBestTest      nll      methods.hypernet.test_at_best
        RandomBestValid    nll      methods.random.best_valid
        RandomBestTest     nll      methods.random.test_at_best
        BayesBestValid     nll      methods.bayesopt.best_valid
        BayesBestTest      nll      methods.bayesopt.test_at_best
        ControlSteps       integer  control.steps
        ControlValid       nll      control.plateau_valid
        ControlTest        nll      control.plateau_test
        RescoreSteps       integer  rescore_steps
    """)
    out[TEX_PREFIX + "Budget"] = (texfmt.seconds(summary["budget_seconds"]) if summary["budget_seconds"] is not None
                                  else texfmt.integer(m["hypernet"]["lambda_steps"]))
    for key, word in METHOD_WORDS:
        out |= texfmt.macros(TEX_PREFIX + "Rescored" + word, summary["rescored"][key], "Valid nll valid\nTest nll test")
    if "diagnostics" not in summary:  # results from before the exact diagnostics: their macros read n/a
        return out
    out |= texfmt.macros(TEX_PREFIX, summary, """
        CosineMean          fixed3       diagnostics.cosine.mean
        CosineFinal         fixed3       diagnostics.cosine.final
        CosineCheckpoints   integer      diagnostics.cosine.checkpoints
        LambdaShift         significant3 diagnostics.lambda_shift.l2
        LambdaShiftMax      significant3 diagnostics.lambda_shift.max_abs
        ExactGain           significant3 diagnostics.exact_gain
        ReferenceValid      nll          reference.valid
        ReferenceTest       nll          reference.test
        DiagnosticsSeconds  seconds      diagnostics.cpu_seconds
    """)
    for key, word in METHOD_WORDS:
        out |= texfmt.macros(TEX_PREFIX + "Exact" + word, summary["exact"][key], "Valid nll valid\nTest nll test")
    return out


def report(summary):
    m, r = summary["methods"], summary["rescored"]
    for method in METHODS:
        steps = (f"{m[method]['lambda_steps']} lambda steps" if method == "hypernet"
                 else f"{m[method]['evaluations']} evaluations")
        print(f"{method:>10s}: best valid {m[method]['best_valid']:.4f}, test there {m[method]['test_at_best']:.4f} "
              f"({steps}, {m[method]['runtime_seconds']:.0f} CPU s); retrained: valid {r[method]['valid']:.4f} "
              f"test {r[method]['test']:.4f}")
    c = summary["control"]
    print(f"   control: lambda_hat_0 trained {c['steps']} steps: valid {c['plateau_valid']:.4f} "
          f"test {c['plateau_test']:.4f}; retrained: valid {r['control']['valid']:.4f} test {r['control']['test']:.4f}")
    d, ref = summary["diagnostics"], summary["reference"]
    print(f"diagnostics: cosine with the exact hypergradient mean {d['cosine']['mean']:+.3f} (final "
          f"{d['cosine']['final']:+.3f}, {d['cosine']['checkpoints']} checkpoints); ||lambda_hat - lambda_hat_0|| "
          f"{d['lambda_shift']['l2']:.3g} (max class {d['lambda_shift']['max_abs']:.3g}); fixed-lambda_hat_0 reference "
          f"valid {ref['valid']:.4f} test {ref['test']:.4f}; exact gain of lambda_hat {d['exact_gain']:+.5f}; "
          f"||exact dL_V/dlambda|| {d['exact_norm']['first']:.3g} -> {d['exact_norm']['final']:.3g}; "
          f"{d['cpu_seconds']:.1f} CPU s")
    print("exact (w*(best lambda)): " + ", ".join(f"{m} {summary['exact'][m]['valid']:.4f}" for m in RESCORED))


# ------------------------------------------------------------------------------------------ plot

VALID_COLOUR, TEST_COLOUR = "red", "green"   # the published figure: red = validation, green = test
STYLES = {"hypernet": dict(linestyle="-", linewidth=1.0), "random": dict(linestyle="--", linewidth=1.2),
          "bayesopt": dict(linestyle=":", linewidth=1.5), "control": dict(linestyle="-.", linewidth=0.6)}
PUBLISHED_YLIM = (0.45, 0.9)                 # the appendix figure's y range
REFERENCE_WIDTH = 0.5                        # the fixed-lambda reference's thin lines


def plot(summary, arrays, out_dir):
    """The appendix figure (hyper-training's current losses solid, random search's best dashed, BO's best dotted,
    the control thin dash-dot; red = validation, green = test) and the common retraining's bars."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from plotting import close, despine, save_figure, set_paper_style

    set_paper_style(font_size=24)
    fig, ax = plt.subplots(figsize=(9.1, 9.1))
    end = max(float(arrays[f"{m}_seconds"][-1]) for m in (*METHODS, "control"))
    if summary["budget_seconds"] is not None:
        end = max(end, summary["budget_seconds"])
    series = [("hypernet", "valid", "test"), ("random", "best_valid", "best_test"),
              ("bayesopt", "best_valid", "best_test"), ("control", "valid", "test")]
    finals = []
    for method, valid_key, test_key in series:
        t = np.asarray(arrays[f"{method}_seconds"], float)
        for key, colour in ((valid_key, VALID_COLOUR), (test_key, TEST_COLOUR)):
            values = np.asarray(arrays[f"{method}_{key}"], float)
            finals.append(values[-1])
            if method in ("random", "bayesopt"):  # best so far: a step function held to the end of the axis
                ax.step(np.append(t, end), np.append(values, values[-1]), where="post", color=colour,
                        **STYLES[method])
            else:
                ax.plot(t, values, color=colour, **STYLES[method])
    ref = summary["reference"]  # the fixed-lambda_hat_0 reference: thin labelled lines at its converged levels
    for key, colour in (("valid", VALID_COLOUR), ("test", TEST_COLOUR)):
        ax.axhline(ref[key], color=colour, linewidth=REFERENCE_WIDTH, alpha=0.8)
        finals.append(ref[key])
    ax.text(0.99 * end, ref["valid"], r"fixed $\hat\lambda_0$, converged", color=VALID_COLOUR, ha="right",
            va="top", fontsize=12)
    low, high = min(finals), max(finals)
    if PUBLISHED_YLIM[0] <= low and high <= PUBLISHED_YLIM[1] * 0.8:
        ax.set_ylim(*PUBLISHED_YLIM)
    else:
        pad = max(high - low, 0.02)
        ax.set_ylim(low - 0.3 * pad, high + 1.5 * pad)
    ax.set_xlim(0, end)
    ax.set_xlabel("Runtime in CPU seconds")
    ax.set_ylabel(r"Loss $\mathcal{L}$")
    despine(ax)
    handles = [Line2D([], [], color="k", **STYLES[m]) for m in RESCORED]
    labels = [LABELS[m] for m in RESCORED]
    handles += [Line2D([], [], color=VALID_COLOUR), Line2D([], [], color=TEST_COLOUR)]
    labels += [r"$\mathcal{L}_{\mathrm{Valid.}}$", r"$\mathcal{L}_{\mathrm{Test}}$"]
    ax.legend(handles, labels, frameon=False, fontsize=18, loc="upper right")
    fig.tight_layout()
    paths = save_figure(fig, NAME, out_dir)
    close(fig)
    return paths + plot_rescored(summary, out_dir) + plot_diagnostics(summary, arrays, out_dir)


def plot_rescored(summary, out_dir):
    """Companion figure: validation and test loss of each method's best lambda after the common retraining."""
    import matplotlib.pyplot as plt

    from plotting import close, despine, save_figure, set_paper_style

    set_paper_style(font_size=18)
    fig, ax = plt.subplots(figsize=(9.1, 5.5))
    r = summary["rescored"]
    x = np.arange(len(RESCORED))
    valid, test = [r[m]["valid"] for m in RESCORED], [r[m]["test"] for m in RESCORED]
    ax.bar(x - 0.2, valid, 0.4, color=VALID_COLOUR, label=r"$\mathcal{L}_{\mathrm{Valid.}}$")
    ax.bar(x + 0.2, test, 0.4, color=TEST_COLOUR, label=r"$\mathcal{L}_{\mathrm{Test}}$")
    for k in range(len(RESCORED)):
        for dx, value in ((-0.2, valid[k]), (0.2, test[k])):
            ax.text(x[k] + dx, value, f"{value:.3f}", ha="center", va="bottom", fontsize=12)
    low, high = min(valid + test), max(valid + test)
    ax.set_ylim(low - 0.5 * (high - low + 0.01), high + 0.6 * (high - low + 0.01))
    ax.set_xticks(x, [LABELS[m] for m in RESCORED])
    ax.set_ylabel(r"Loss $\mathcal{L}$ after retraining")
    ax.set_title(f"Each method's best $\\lambda$ retrained for {summary['rescore_steps']:,} Adam steps "
                 "(mean of the second half)", fontsize=16)
    despine(ax)
    ax.legend(frameon=False, loc="upper center", ncol=2)
    fig.tight_layout()
    paths = save_figure(fig, f"{NAME}_rescored", out_dir)
    close(fig)
    return paths


def plot_diagnostics(summary, arrays, out_dir):
    """Companion figure (issue 10 item 2): (a) cosine of hyper-training's hypergradient with the exact one,
    (b) ||lambda_hat - lambda_hat_0|| and the exact L_V(w*(lambda_hat)), (c) each class's lambda_hat_c - lambda_hat_0
    at the end and every method's best lambda, (d) the exact levels L_V(w*(lambda)) of each method's best lambda
    beside the common retraining's, with the fixed-lambda_hat_0 reference."""
    import matplotlib.pyplot as plt

    from plotting import despine, finish_figure, set_paper_style

    set_paper_style(font_size=13)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    d, ref = summary["diagnostics"], summary["reference"]
    t = arrays["hypernet_diag_seconds"]
    ax = axes[0, 0]
    ax.plot(t, arrays["hypernet_cosine"], "o-", ms=3, color="C3",
            label=f"hyper-training (mean {d['cosine']['mean']:+.3f})")
    for level in (COSINE_ZERO, -COSINE_ZERO):
        ax.axhline(level, color="0.6", linewidth=0.6, linestyle=":")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("CPU seconds")
    ax.set_ylabel("cosine with exact hypergradient")
    ax.set_title(r"(a) $H\,\partial L_V/\partial w$ vs implicit differentiation (10 decays)", fontsize=13)
    ax.legend(frameon=False, fontsize=11, loc="lower right")
    ax = axes[0, 1]
    ax.plot(t, arrays["hypernet_lambda_shift"], "o-", ms=3, color="C3")
    ax.set_xlabel("CPU seconds")
    ax.set_ylabel(r"$\|\hat\lambda - \hat\lambda_0\|_2$", color="C3")
    twin = ax.twinx()
    twin.plot(t, arrays["hypernet_exact_valid"], "s--", ms=3, color="0.3")
    twin.axhline(ref["valid"], color=VALID_COLOUR, linewidth=REFERENCE_WIDTH)
    twin.set_ylabel(r"exact $L_V(w^*(\hat\lambda))$ (red: at $\hat\lambda_0$)", color="0.3")
    ax.set_title(r"(b) how far $\hat\lambda$ moved, and what it is worth", fontsize=13)
    ax = axes[1, 0]
    x = np.arange(N_CLASSES)
    lam0 = ref["lambda_hat"]
    ax.bar(x, arrays["hypernet_lambda_delta"], 0.6, color="C3", label=r"hyper-training: final $\hat\lambda_c$")
    for m, marker in (("random", "v"), ("bayesopt", "^")):
        ax.plot(x, np.array(summary["methods"][m]["best_lambda"]) - lam0, marker, color="k", linestyle="none",
                label=f"{LABELS[m]}: best $\\lambda_c$")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xlabel("class c")
    ax.set_ylabel(r"$\lambda_c - \hat\lambda_0$")
    ax.set_title(f"(c) per-class change (hyper-training: max |.| {d['lambda_shift']['max_abs']:.2g})", fontsize=13)
    ax.legend(frameon=False, fontsize=10)
    ax = axes[1, 1]
    r, e = summary["rescored"], summary["exact"]
    pos = np.arange(len(RESCORED))
    ax.bar(pos - 0.2, [e[m]["valid"] for m in RESCORED], 0.4, color=VALID_COLOUR, label=r"exact $L_V(w^*(\lambda))$")
    ax.bar(pos + 0.2, [r[m]["valid"] for m in RESCORED], 0.4, color="0.6", label="common retraining (Adam)")
    ax.axhline(ref["valid"], color=VALID_COLOUR, linewidth=REFERENCE_WIDTH)
    values = [e[m]["valid"] for m in RESCORED] + [r[m]["valid"] for m in RESCORED]
    low, high = min(values), max(values)
    ax.set_ylim(low - 0.5 * (high - low + 0.005), high + 0.5 * (high - low + 0.005))
    ax.set_xticks(pos, [LABELS[m] for m in RESCORED], fontsize=10)
    ax.set_ylabel(r"validation loss $\mathcal{L}$")
    ax.set_title(r"(d) each method's best $\lambda$: exact level and retrained", fontsize=13)
    ax.legend(frameon=False, fontsize=10, loc="upper right")
    despine(axes)
    return finish_figure(fig, f"{NAME}_diagnostics", out_dir)


if __name__ == "__main__":
    sys.exit(common.main(sys.modules[__name__]))
