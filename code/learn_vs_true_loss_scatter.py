"""Learned versus true validation loss (SPEC section 6, the paper's Figure 6 and its GP-vs-hypernetwork table).

Ground truth: 10,240 hyperparameter vectors lambda ~ U(-3, 3)^10 (one L2-norm penalty per class of a
linear 784-10 model); for each, a fresh model trained by Adam on minibatches and its validation loss.
n_train_tuples of the (lambda, loss) pairs train three surrogates -- A: a Gaussian process, B: a linear
hypernetwork fit on those fixed lambdas, C: the same hypernetwork trained on freshly sampled lambdas
(Algorithm 2) -- which then predict the loss of the held-out lambdas. The table repeats this for the
training budgets of table_budgets (the true loss at each surrogate's predicted best).

    python learn_vs_true_loss_scatter.py [--quick] [--seed 7] [--jobs N] [--n-train-tuples 25] [--no-table]
    python learn_vs_true_loss_scatter.py --scheduler tcp://host:8786   # ground truth on a dask cluster

Seeds: the ground truth depends on --gt-seed only and is cached in <repo>/cache/ (an .npz named by the
hash of its settings and of the data, with a SHA-256 of its arrays; ~9 min on 2 cores to rebuild). --seed
varies the surrogates over that one ground truth: the GP's restarts, the hypernetworks' initialisation and
minibatches, model C's sampled lambdas, and (with --train-tuples drawn) which tuples train the surrogates.
`make seeds` therefore costs surrogates only. Ground-truth workers (--jobs) are forked processes (forked.py) that die
with the parent however it ends (SIGKILL included) and use no temporary files. --scheduler ADDRESS (or
--backend dask with it) trains the ground-truth chunks on that dask.distributed cluster instead (scaleout.py:
the training data sent once per worker, the losses bit-identical to --jobs 1, tests/test_scaleout.py).
"""
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.linalg import blas  # loaded at import, so that a caller's BLAS thread limit also covers scipy's BLAS

import common
import forked
import scaleout
import texfmt
from common import Claim, ExperimentError, atomic_write_bytes, check_divergence, check_finite, setting, step_rng
from forked import available_cpus
from progress import Progress

REPO = Path(__file__).resolve().parent.parent
REPO_TOKEN = "<repo>"             # cache_dir may start with it: the repository's root folder
NAME = "learn_vs_true_loss_scatter"
TEX_PREFIX = "Scatter"  # every macro this script exports to the paper starts with it
DATA = "mnist"
PARALLEL = True                   # --jobs N processes train the ground truth
TABLE_TEX = "gp_vs_hypernet_table.tex"
LAYERS = [784, 10]
N_CLASSES = 10
N_HYPERS = N_CLASSES              # one regularisation strength per output class
MODELS = ("gp", "hypernet_fixed", "hypernet_stochastic")
# Random streams derived from (seed, index, stream): keep them apart.
STREAM_GT, STREAM_FIXED, STREAM_STOCHASTIC, STREAM_TUPLES = 61, 62, 63, 64
CACHE_VERSION = 2  # bump when the ground-truth computation changes (2: BLAS axpy in Adam)
CACHE_SLACK_BYTES = 1 << 20       # a cache file may exceed its arrays' size by this much (metadata, zip headers)
GT_CHECK_EVERY = 100              # ground-truth steps between divergence checks


@dataclass(frozen=True)
class Config:
    """Settings of one run; defaults follow the released code (SPEC section 6) unless a comment says otherwise."""

    seed: int = setting(7, lo=0, hi=common.SEED_MAX)  # surrogates' seed: GP restarts, hypernetwork initialisation
    # and minibatches, model C's sampled lambdas, drawn training tuples (SPEC: 7). The ground truth keeps gt_seed,
    # so `make seeds` varies the surrogates over one cached ground truth
    gt_seed: int = setting(7, lo=0, hi=common.SEED_MAX)  # ground truth's seed: its lambdas, initial model and
    # minibatches (SPEC: 7); another value trains and caches another ground truth
    train_tuples: str = setting("first", choices=("first", "drawn"))  # which ground-truth tuples train the
    # surrogates: the first n_train_tuples (released code), or n_train_tuples drawn with --seed (seed studies)
    lambda_low: float = setting(-3.0)  # lambda ~ U(lambda_low, lambda_high)^10 (released code)
    lambda_high: float = setting(3.0)  # upper end of that range (released code)
    n_models: int = setting(10240, lo=2)  # ground-truth (lambda, validation loss) pairs (released code)
    n_train_tuples: int = setting(25, lo=1)  # tuples that train the surrogates; the rest are held out (released
    # code)
    n_train_points: int = setting(50000, lo=2)  # MNIST training images 0..n-1 train every model (released code)
    n_valid_points: int = setting(10000, lo=1)  # the next n images are the validation set (released code)
    batch_size: int = setting(100, lo=1)  # consecutive training points per step, at a random offset (released
    # code)
    init_scale: float = setting(1e-5, lo=0)  # N(0, 1) * init_scale, elementary model and hypernetwork (released
    # code)
    step_size: float = setting(1e-4, lo=0, lo_open=True)  # Adam step size, everywhere (released code)
    gt_steps: int = setting(1000, lo=1)  # Adam steps per ground-truth model (released code)
    fixed_steps: int = setting(500, lo=1)  # model B: Adam steps on the fixed training lambdas (released code)
    stochastic_steps: int = setting(600, lo=1)  # model C: Adam steps, each on fresh lambdas (released code)
    stochastic_batch: int = setting(25, lo=1)  # model C: lambdas sampled per step (released code)
    gp_restarts: int = setting(1, lo=0)  # model A: n_restarts_optimizer of the RBF Gaussian process (released
    # code)
    chunk_size: int = setting(64, lo=1)  # ground-truth models trained together as one stacked problem (our
    # choice: fastest on this machine; part of the cache key, since the minibatches are drawn per chunk)
    float64: bool = setting(False)  # train the ground truth in float64 (about 2x slower). Our choice: float32,
    # whose validation losses differ from float64's by < 1e-5 (test_scatter)
    eval_batch: int = setting(1024, lo=1)  # hyperparameters per validation-loss GEMM (memory only, our choice)
    table: bool = setting(True)  # also make the GP-vs-hypernetwork table over table_budgets (the paper's
    # commented-out table; ~80 s)
    table_budgets: tuple[int, ...] = setting((10, 25, 100, 250, 1000), lo=1)  # training tuples per column of the
    # table (the paper's); budgets that leave no held-out tuple are skipped
    use_cache: bool = setting(True, flag="cache")  # load the ground truth from the cache when valid (--no-cache:
    # always recompute, then cache)
    cache_dir: str = setting(f"{REPO_TOKEN}/cache")  # ground-truth cache folder (<repo> is the repository root)
    backend: str = setting("local", choices=scaleout.BACKENDS)  # where the ground-truth chunks train: "local"
    # (this machine, --jobs processes) or "dask" (the cluster at --scheduler); same bits either way
    scheduler: str = setting("")  # dask scheduler address, e.g. tcp://host:8786 (implies --backend dask); empty
    # starts nothing. Workers need code/ on their PYTHONPATH and the same numpy/BLAS
    log_every: int = setting(20, lo=1)  # ground-truth chunks between progress lines (our choice)
    hyper_log_every: int = setting(100, lo=1)  # hypernetwork steps between progress lines (our choice)


QUICK = dict(n_models=320, n_train_points=1500, n_valid_points=500, gt_steps=40, fixed_steps=60,
             stochastic_steps=80, chunk_size=32, eval_batch=128, table_budgets=(10, 25, 100), log_every=5,
             hyper_log_every=20)


def validate(config):
    """Cross-field checks and a memory estimate, each a one-line ExperimentError."""
    if not config.lambda_low < config.lambda_high:
        raise common.UsageError(f"--lambda-low {config.lambda_low} must be below --lambda-high {config.lambda_high}")
    if config.n_train_tuples >= config.n_models:
        raise common.UsageError(f"--n-train-tuples {config.n_train_tuples} leaves no held-out tuples "
                                f"(--n-models is {config.n_models})")
    if config.batch_size >= config.n_train_points:
        raise common.UsageError(f"--batch-size {config.batch_size} must be below --n-train-points "
                                f"{config.n_train_points}")
    if config.table and not config.table_budgets:
        raise common.UsageError("--table-budgets is empty; give at least one budget or use --no-table")
    try:
        scaleout.resolve_backend(config.backend, config.scheduler)
    except ExperimentError as err:
        raise common.UsageError(str(err)) from None
    itemsize = 8 if config.float64 else 4
    weights = LAYERS[0] * N_CLASSES + N_CLASSES
    gp_points = max([config.n_train_tuples, *(b for b in config.table_budgets if config.table and b < config.n_models)])
    needed = (config.n_train_points * (LAYERS[0] + N_CLASSES) * itemsize          # training set, GT precision
              + 8 * config.chunk_size * weights * itemsize                       # one chunk's weights and buffers
              + 4 * min(config.eval_batch, config.n_models) * weights * 8        # hypernetwork evaluation
              + 8 * config.n_models * (N_HYPERS + 8)                             # lambdas, losses, predictions
              + 8 * max(config.stochastic_batch, gp_points) * config.batch_size * N_CLASSES * 12
              + 8 * 3 * gp_points * (gp_points + config.n_models))               # GP kernel matrices
    common.check_memory(needed, "the scatter experiment")


def resolve_cache_dir(config):
    """The cache folder: cache_dir with a leading <repo> replaced by the repository's root."""
    text = config.cache_dir
    if text == REPO_TOKEN or text.startswith(REPO_TOKEN + "/"):
        return REPO / text[len(REPO_TOKEN):].lstrip("/")
    return Path(text)


# ------------------------------------------------------------------------------ validation losses

class Gram(NamedTuple):
    """Sufficient statistics of a data set for the squared error of any linear model.

    With x~ = [x, 1] and w~_c = [W[:, c], b_c]:  sum_n (x~_n w~_c - t_nc)^2 = w~_c' S w~_c - 2 r_c' w~_c + t_c' t_c,
    S = X~' X~ (785, 785), R = T' X~ (10, 785), tt = sum T^2, n = number of points."""

    S: np.ndarray
    R: np.ndarray
    tt: float
    n: int


def make_gram(x, t):
    """Gram statistics of inputs x (N, 784) and one-hot targets t (N, 10), in float64."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    return Gram(xa.T @ xa, t.T @ xa, float(np.sum(t ** 2)), len(x))


def valid_losses_rows(rows, gram):
    """Gaussian NLL (SPEC section 2) on the Gram's data set of K linear models.

    rows: (K * 10, 785) float, row k*10+c = [W_k[:, c], b_k[c]] -> (K,). Exactly the mean over every
    output entry of 50 (y - t)^2 - 1.38364, at the cost of one (K*10, 785) x (785, 785) product."""
    from neural_network import LOG_SIGMA_CONST

    rows = np.asarray(rows, dtype=np.float64)
    K = rows.shape[0] // N_CLASSES
    quad = np.einsum("ij,ij->i", rows @ gram.S, rows).reshape(K, N_CLASSES).sum(1)
    cross = np.einsum("kcj,cj->k", rows.reshape(K, N_CLASSES, -1), gram.R)
    sq_error = quad - 2.0 * cross + gram.tt
    return 50.0 * sq_error / (gram.n * N_CLASSES) + LOG_SIGMA_CONST


def flat_to_rows(flat):
    """Flat elementary weights (K, 7850) (W row-major, then b) -> rows (K * 10, 785) of [W[:, c], b_c]."""
    K = flat.shape[0]
    W = flat[:, :LAYERS[0] * N_CLASSES].reshape(K, LAYERS[0], N_CLASSES)
    b = flat[:, LAYERS[0] * N_CLASSES:]
    return np.concatenate([W, b[:, None, :]], axis=1).transpose(0, 2, 1).reshape(K * N_CLASSES, LAYERS[0] + 1)


def valid_losses_flat(flat, gram, batch):
    """Validation losses of K flat weight sets (K, 7850) -> (K,), in batches of `batch` models."""
    return np.concatenate([valid_losses_rows(flat_to_rows(flat[i:i + batch]), gram)
                           for i in range(0, len(flat), batch)])


# ------------------------------------------------------------------- ground truth: the hot loop

def sample_lambdas(config):
    """All ground-truth hyperparameters (n_models, 10) ~ U(low, high), from RandomState(gt_seed)."""
    rs = np.random.RandomState(config.gt_seed)
    return rs.uniform(config.lambda_low, config.lambda_high, size=(config.n_models, N_HYPERS))


def initial_elementary(config):
    """The shared initial model: W (784, 10), b (10,) = init_scale * N(0, 1) from RandomState(gt_seed)."""
    from neural_network import init_mlp

    return init_mlp(LAYERS, config.init_scale, np.random.RandomState(config.gt_seed))[0]


def chunk_offsets(config, chunk_index):
    """Minibatch start offsets of every step of one chunk, in [0, n_train_points - batch_size)."""
    rng = step_rng(config.gt_seed, chunk_index, STREAM_GT)
    return rng.randint(0, config.n_train_points - config.batch_size, size=config.gt_steps)


def _adam_inplace(x, g, m, v, s, t, step_size, axpy, eps=1e-8, b1=0.9, b2=0.999):
    """Bias-corrected Adam step on x (flat, in place); g holds the gradient, s is scratch.

    Moments are kept rescaled, m' = m / (1 - b1) and v' = v / (1 - b2):
        m' <- b1 m' + g,  v' <- b2 v' + g^2,  x <- x - a_t m' / (sqrt(v') + e_t)   (constants below),
    as 7 passes over the arrays: the BLAS axpy y <- a x + y writes the new moments into the buffers of g
    and g^2, so the four buffers change roles. Returns the (m, v, gradient, scratch) buffers for next step.
    (A tuned variant of optimizers.adam_inplace, kept because its float32 rounding defines the cached ground
    truth; benchmark.py's scatter_model_step row times it against the autograd + textbook-Adam reference.)"""
    np.multiply(g, g, out=s)
    axpy(v, s, a=b2)                              # s <- b2 v' + g^2: the new v'
    axpy(m, g, a=b1)                              # g <- b1 m' + g:   the new m'
    m, v, g, s = g, s, m, v
    c2 = np.sqrt((1 - b2) / (1 - b2 ** t))        # sqrt(v_hat) = c2 sqrt(v')
    a_t = step_size * (1 - b1) / (1 - b1 ** t) / c2
    np.sqrt(v, out=g)
    g += eps / c2
    np.divide(m, g, out=g)
    axpy(g, x, a=-a_t)                            # x <- x - a_t m' / (sqrt(v') + e_t)
    return m, v, g, s


class ModelStack:
    """K linear 784-10 models trained as one stacked problem, with their Adam buffers.

    Weights are rows Wt (K*10, 784) (row k*10+c = W_k[:, c]) and biases b (K*10,), in `dtype`; reg (K*10,)
    holds exp(lambda_kc) / 10, the weight of each column's norm in model k's regulariser."""

    def __init__(self, lambdas, W0, b0, step_size, batch_size, dtype=np.float32):
        dtype = np.dtype(dtype)
        K, C = len(lambdas), N_CLASSES
        self.dtype, self.step_size, self.batch_size = dtype, step_size, batch_size
        self.gemm = blas.dgemm if dtype == np.float64 else blas.sgemm
        self.axpy = blas.daxpy if dtype == np.float64 else blas.saxpy
        self.Wt = np.ascontiguousarray(np.tile(W0.T, (K, 1)), dtype=dtype)
        self.b = np.tile(b0, K).astype(dtype)
        self.m, self.v = np.zeros_like(self.Wt), np.zeros_like(self.Wt)   # rescaled Adam moments
        self.G, self.S = np.empty_like(self.Wt), np.empty_like(self.Wt)   # gradient, scratch
        self.mb, self.vb, self.Sb = np.zeros_like(self.b), np.zeros_like(self.b), np.empty_like(self.b)
        self.Y = np.empty((K * C, batch_size), dtype)                     # predictions, then dL/dy
        self.reg = (np.exp(lambdas) / C).ravel().astype(dtype)
        self.scale = dtype.type(100.0 / (batch_size * C))  # d/dy of mean 50 (y - t)^2 over B*C entries

    def weights(self):
        """(Wt (K*10, 784), b (K*10,)) in float64."""
        return self.Wt.astype(np.float64), self.b.astype(np.float64)

    def data_fit(self):
        """Mean over models of the last step's minibatch data-fit term 50 mean (y - t)^2 (from dL/dy in Y)."""
        return 50.0 * float(np.vdot(self.Y, self.Y)) / float(self.scale) ** 2 / self.Y.size


def scatter_model_step(stack, xb, tb, t):
    """One hand-written Adam step, in place, of every model of stack (a ModelStack) on one minibatch.

    xb (B, 784), tb (B, 10) in stack.dtype; t the 1-based step number. Objective of model k: Gaussian NLL on
    the minibatch + (1/10) sum_c exp(lambda_kc) ||W_k[:, c]||_2 (class_norm_regulariser). Used by
    benchmark.py: build a stack with scatter_step_stack(...), time this per step and divide by K for the
    per-model cost; scatter_model_step_reference is the autograd reference it must match (test_scatter).

    Gradient (derivation): with residuals r = y - t, d/dy of mean_{B x C} 50 r^2 is (100 / (B C)) r = Y;
    d/dW_k[:, c] = X' Y_kc  (one (784, B) x (B, K*10) GEMM for all models, accumulated onto the regulariser
    part), d/db_kc = sum_n Y_kc,n, and d/dw of reg ||w|| is reg w / ||w||."""
    Wt, b, Y, K = stack.Wt, stack.b, stack.Y, len(stack.b) // N_CLASSES
    np.dot(Wt, xb.T, out=Y)                       # predictions, transposed: (K*C, B)
    Y += b[:, None]
    Y.reshape(K, N_CLASSES, stack.batch_size)[...] -= tb.T[None]   # residuals y - t
    Y *= stack.scale                              # dL/dy
    gb = Y.sum(axis=1)
    norms = np.sqrt(np.einsum("ij,ij->i", Wt, Wt))
    np.multiply(Wt, (stack.reg / norms)[:, None], out=stack.G)      # regulariser gradient ...
    stack.gemm(1.0, xb.T, Y.T, beta=1.0, c=stack.G.T, overwrite_c=True)  # ... + X' dL/dy, accumulated in place
    m, v, G, S = _adam_inplace(Wt.ravel(), stack.G.ravel(), stack.m.ravel(), stack.v.ravel(), stack.S.ravel(), t,
                               stack.step_size, stack.axpy)
    stack.m, stack.v, stack.G, stack.S = (a.reshape(Wt.shape) for a in (m, v, G, S))
    stack.mb, stack.vb, _, stack.Sb = _adam_inplace(b, gb, stack.mb, stack.vb, stack.Sb, t, stack.step_size,
                                                    stack.axpy)


def _stacked_objective(params, reg, xb, tb):
    """Sum over the K models of their training objectives (autograd-traceable); params = (Wt, b) as rows."""
    import autograd.numpy as anp

    from neural_network import gaussian_nll

    Wt, b = params
    K = Wt.shape[0] // N_CLASSES
    predictions = anp.transpose(anp.reshape(anp.dot(Wt, xb.T) + b[:, None], (K, N_CLASSES, -1)), (0, 2, 1))
    norms = anp.sqrt(anp.sum(Wt ** 2, axis=1))
    return anp.sum(gaussian_nll(predictions, tb[None])) + anp.sum(reg * norms)


class ReferenceStack:
    """The state of scatter_model_step_reference: the same K models as rows, with textbook Adam states."""

    def __init__(self, lambdas, W0, b0, step_size, batch_size, dtype=np.float64):
        from optimizers import adam_init

        K = len(lambdas)
        self.dtype, self.step_size = np.dtype(dtype), step_size
        self.params = [np.ascontiguousarray(np.tile(W0.T, (K, 1)), dtype=dtype), np.tile(b0, K).astype(dtype)]
        self.adam = [adam_init(p) for p in self.params]
        self.reg = (np.exp(lambdas) / N_CLASSES).ravel().astype(dtype)

    def weights(self):
        return self.params[0].astype(np.float64), self.params[1].astype(np.float64)


def scatter_model_step_reference(stack, xb, tb, t):
    """The reference of scatter_model_step: autograd's gradient of _stacked_objective, then
    optimizers.adam_textbook on Wt and b; stack is a ReferenceStack (scatter_step_stack(..., reference=True)).
    t is accepted for symmetry with scatter_model_step (the Adam states count their own steps)."""
    from autograd import grad

    from optimizers import adam_textbook

    gradients = grad(_stacked_objective)(tuple(stack.params), stack.reg, xb, tb)
    for i, g in enumerate(gradients):
        stack.params[i], stack.adam[i] = adam_textbook(stack.params[i], g, stack.adam[i], stack.step_size)


def scatter_step_stack(lambdas, config=None, reference=False, dtype=None):
    """A ModelStack (or, with reference=True, a ReferenceStack) of len(lambdas) models (lambdas (K, 10)) at the
    ground truth's initial weights; dtype defaults to the config's ground-truth precision.

    Benchmark recipe:  lam = sample_lambdas(Config())[:64]; s = scatter_step_stack(lam, dtype="float64");
    r = scatter_step_stack(lam, reference=True, dtype="float64"); for t, (xb, tb) in enumerate(batches, 1):
    scatter_model_step(s, xb, tb, t); scatter_model_step_reference(r, xb, tb, t); then s.weights() equals
    r.weights() to ~1e-12 (xb, tb: (batch_size, 784), (batch_size, 10) in that dtype)."""
    config = config or Config()
    dtype = np.dtype(dtype or ("float64" if config.float64 else "float32"))
    W0, b0 = initial_elementary(config)
    cls = ReferenceStack if reference else ModelStack
    return cls(lambdas, W0, b0, config.step_size, config.batch_size, dtype)


def train_ground_truth_chunk(lambdas, train_x, train_y, config, chunk_index):
    """Train K elementary models (one per row of lambdas (K, 10)) on training data only, as one stacked problem.

    All K models see the same minibatch each step, so the forward pass is one (K*10, 784) x (784, 100)
    product and the weight gradient one (784, 100) x (100, K*10) product. Returns (Wt (K*10, 784), b (K*10,))
    in float64, the weights after gt_steps."""
    stack = scatter_step_stack(lambdas, config)
    x_all, t_all = train_x.astype(stack.dtype, copy=False), train_y.astype(stack.dtype, copy=False)
    B, start_fit = config.batch_size, None
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by the checks instead
        for i, offset in enumerate(chunk_offsets(config, chunk_index)):
            scatter_model_step(stack, x_all[offset:offset + B], t_all[offset:offset + B], i + 1)
            if i == 0 or (i + 1) % GT_CHECK_EVERY == 0 or i + 1 == config.gt_steps:
                what = f"ground-truth training data fit (chunk {chunk_index})"
                check_finite(stack.Y, i, what)
                fit = stack.data_fit()
                start_fit = fit if start_fit is None else start_fit
                check_divergence(fit, start_fit, i, what)
    return stack.weights()


def ground_truth_chunk(chunk, shared):
    """scaleout's chunk function: chunk = (index, lambdas (K, 10)); shared = {"train_x", "train_y", "gram",
    "config"} -> validation losses (K,)."""
    c, lambdas = chunk
    return ground_truth_chunk_losses(lambdas, shared["train_x"], shared["train_y"], shared["gram"],
                                     shared["config"], c)


def ground_truth_chunk_losses(lambdas, train_x, train_y, gram, config, chunk_index):
    """Validation losses (K,) of one trained chunk (scored on the Gram of the validation set); runs
    single-threaded so every --jobs gives equal bits (scipy's BLAS is loaded at import, before this limit)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        Wt, b = train_ground_truth_chunk(lambdas, train_x, train_y, config, chunk_index)
        losses = valid_losses_rows(np.hstack([Wt, b[:, None]]), gram)
    check_finite(losses, config.gt_steps, f"ground-truth validation loss (chunk {chunk_index})")
    return losses


# ------------------------------------------------------------------- ground truth: worker processes

class ForkedWorkers(forked.ForkedWorkers):
    """The ground truth's worker processes (forked.ForkedWorkers, named as such in its errors)."""

    def __init__(self, n, work):
        super().__init__(n, work, role="ground-truth worker", describe="chunk {}".format,
                         hint="try --jobs 1 or a smaller --chunk-size")


def effective_jobs(jobs, n_chunks, log_note=None):
    """--jobs capped at the CPUs and at the number of chunks; a capped value is reported in one line."""
    cpus = available_cpus()
    capped = max(1, min(jobs, cpus, n_chunks))
    if capped < jobs and log_note is not None:
        log_note(f"note: --jobs {jobs} capped at {capped} ({cpus} CPUs, {n_chunks} ground-truth chunks)")
    return capped


def _note(text):
    print(text, file=sys.stderr)


def compute_ground_truth(config, splits, jobs, log=print):
    """(lambdas (n_models, 10), validation losses (n_models,)): every model trained on splits' training data,
    scored on its validation data; chunks of chunk_size models in up to `jobs` forked workers, or on the dask
    cluster at config.scheduler (scaleout.map_chunks: same bits)."""
    lambdas = sample_lambdas(config)
    dtype = np.float64 if config.float64 else np.float32
    shared = {"train_x": np.ascontiguousarray(splits.train_x, dtype=dtype),  # converted once, sent to the
              "train_y": np.ascontiguousarray(splits.train_y, dtype=dtype),  # workers once
              "gram": make_gram(splits.valid_x, splits.valid_y), "config": config}
    chunks = [(c, lambdas[s:s + config.chunk_size]) for c, s in enumerate(range(0, config.n_models, config.chunk_size))]
    backend = scaleout.resolve_backend(config.backend, config.scheduler)
    if backend == "local":
        jobs = effective_jobs(jobs, len(chunks), _note)
    else:
        log(f"ground truth: {len(chunks)} chunks on the dask cluster at {config.scheduler}")
    t0, done = time.perf_counter(), []

    def progress(c, chunk_losses):
        done.append(len(chunk_losses))
        bar.update(len(chunk_losses))
        if len(done) % config.log_every == 0 or len(done) == len(chunks):
            log(f"ground truth: {sum(done)}/{config.n_models} models, {time.perf_counter() - t0:.0f} s")

    with Progress(config.n_models, desc="ground truth", unit="model") as bar:
        losses = scaleout.map_chunks(ground_truth_chunk, chunks, shared, backend=backend,
                                     scheduler=config.scheduler, jobs=jobs, pool=ForkedWorkers, on_result=progress)
    return lambdas, np.concatenate(losses)


# ------------------------------------------------------------------------------ ground-truth cache

def data_digest(splits):
    """SHA-256 of the training and validation arrays (shapes, dtypes, bytes): the data the ground truth saw."""
    h = hashlib.sha256()
    for array in (splits.train_x, splits.train_y, splits.valid_x, splits.valid_y):
        array = np.ascontiguousarray(array)
        h.update(f"{array.shape}{array.dtype.str}".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def ground_truth_settings(config, digest):
    """The settings the ground truth depends on (its cache key), digest being data_digest of its splits."""
    return {"version": CACHE_VERSION, "gt_seed": config.gt_seed, "n_hypers": N_HYPERS,
            "lambda_low": config.lambda_low, "lambda_high": config.lambda_high, "n_models": config.n_models,
            "n_train_points": config.n_train_points, "n_valid_points": config.n_valid_points,
            "batch_size": config.batch_size, "init_scale": config.init_scale, "step_size": config.step_size,
            "gt_steps": config.gt_steps, "chunk_size": config.chunk_size,
            "gt_dtype": "float64" if config.float64 else "float32", "data_sha256": digest}


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir, settings):
    """<cache_dir>/learn_vs_true_loss_ground_truth_<first 12 hex digits of the settings' hash>.npz."""
    return Path(cache_dir) / f"learn_vs_true_loss_ground_truth_{settings_hash(settings)[:12]}.npz"


def _arrays_digest(arrays):
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def save_ground_truth(path, settings, lambdas, losses, seconds):
    """Write the cache atomically: arrays, their SHA-256 and the settings (JSON text), never pickled."""
    arrays = {"lambdas": lambdas, "valid_losses": losses}
    meta = {"settings": settings, "settings_hash": settings_hash(settings), "digest": _arrays_digest(arrays),
            "seconds": seconds}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    atomic_write_bytes(path, buf.getvalue())


CACHE_KEYS = {"meta", "lambdas", "valid_losses"}


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed in strict JSON")


def load_ground_truth(path, settings):
    """((lambdas, losses, seconds), None) from a valid cache with these settings; else (None, why it is not
    usable) -- why is None when there is no file. Every field is checked: keys, types, shapes, values."""
    if not os.path.lexists(path):
        return None, None
    n = settings["n_models"]
    expected = {"lambdas": (n, N_HYPERS), "valid_losses": (n,)}
    try:
        with zipfile.ZipFile(path) as archive:  # sizes first: a crafted file must not exhaust memory
            sizes = {info.filename.removesuffix(".npy"): info.file_size for info in archive.infolist()}
        limit = 8 * (n * (N_HYPERS + 1)) + CACHE_SLACK_BYTES
        if set(sizes) != CACHE_KEYS:
            return None, f"not a ground-truth cache (it holds {sorted(sizes)[:5]})"
        if sum(sizes.values()) > limit:
            return None, "larger than a ground-truth cache of these settings can be"
        with np.load(path, allow_pickle=False) as npz:
            meta_array = npz["meta"]
            arrays = {key: npz[key] for key in expected}
    except Exception as err:  # noqa: BLE001  any unreadable/corrupt/truncated file is simply rebuilt
        return None, f"unreadable ({type(err).__name__}: {str(err)[:80]})"
    if meta_array.shape != () or meta_array.dtype.kind != "U":
        return None, "malformed (its metadata is not a JSON text)"
    try:
        meta = json.loads(str(meta_array), parse_constant=_reject_constant)
    except ValueError:
        return None, "malformed (its metadata is not valid JSON)"
    if not isinstance(meta, dict):
        return None, "malformed (its metadata is not a JSON object)"
    if meta.get("settings") != settings or meta.get("settings_hash") != settings_hash(settings):
        return None, "made with other settings"
    for key, shape in expected.items():
        if arrays[key].dtype != np.float64 or arrays[key].shape != shape:
            return None, f"malformed ({key} is {arrays[key].dtype} {arrays[key].shape}, expected float64 {shape})"
    if meta.get("digest") != _arrays_digest(arrays):
        return None, "corrupt (its arrays do not match their checksum)"
    lambdas, losses = arrays["lambdas"], arrays["valid_losses"]
    if not (np.all(np.isfinite(losses)) and np.all(lambdas >= settings["lambda_low"])
            and np.all(lambdas <= settings["lambda_high"])):
        return None, "malformed (non-finite losses or lambdas outside their range)"
    seconds = meta.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds < 0:
        return None, "malformed (its 'seconds' is not a non-negative number)"
    return (lambdas, losses, float(seconds)), None


def get_ground_truth(config, splits, jobs, log=print):
    """(lambdas, losses, seconds, cached): from the cache when it is valid for these settings and data;
    otherwise computed and cached (a bad cache gets one warning line and is rebuilt)."""
    settings = ground_truth_settings(config, data_digest(splits))
    path = cache_path(resolve_cache_dir(config), settings)
    if config.use_cache:
        cached, problem = load_ground_truth(path, settings)
        if cached is not None:
            log(f"ground truth: loaded {path}")
            return (*cached, True)
        if problem:
            _note(f"warning: ground-truth cache {path} is {problem}; rebuilding it")
    t0 = time.perf_counter()
    lambdas, losses = compute_ground_truth(config, splits, jobs, log)
    seconds = time.perf_counter() - t0
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            raise IsADirectoryError(21, "Is a directory", str(path))
        save_ground_truth(path, settings, lambdas, losses, seconds)
    except OSError as err:  # the run goes on; only the next run pays for the ground truth again
        _note(f"warning: cannot write the ground-truth cache {path} ({err.strerror or err}); continuing without it")
    return lambdas, losses, seconds, False


# ------------------------------------------------------------------------------- hypernetworks

def hyper_objective(hyper_params, lambdas, xb, tb):
    """Mean training objective (Gaussian NLL on xb, tb + class_norm_regulariser) of the linear hypernet's
    weights at each of lambdas (K, 10). Exact, without forming the K weight sets (K * 7,850 numbers):

    w(lambda) = [lambda, 1] @ basis with basis = [H; h] (11, 7850), so the predictions are
    y_k = sum_j [lambda_k, 1]_j P_j with basis predictions P_j = x W_j + b_j (one (B, 784) x (784, 110)
    product), and the squared column norms are quadratic forms [lambda_k, 1]' G_c [lambda_k, 1] with
    G_c = W_{:, :, c} W_{:, :, c}' (11 x 11 per class c)."""
    import autograd.numpy as anp

    from neural_network import gaussian_nll

    (H, h), = hyper_params
    D, C, J = LAYERS[0], N_CLASSES, H.shape[0] + 1
    basis = anp.concatenate([H, h[None, :]], axis=0)                  # (J, 7850)
    Wb = anp.reshape(basis[:, :D * C], (J, D, C))                     # basis weight matrices
    bb = basis[:, D * C:]                                             # basis biases (J, C)
    P = anp.tensordot(xb, Wb, axes=([1], [1])) + bb[None, :, :]       # (B, J, C)
    lt = anp.concatenate([lambdas, anp.ones((lambdas.shape[0], 1))], axis=1)  # (K, J)
    predictions = anp.tensordot(lt, P, axes=([1], [1]))               # (K, B, C)
    G = anp.einsum("jdc,idc->cji", Wb, Wb)                            # (C, J, J)
    sq_norms = anp.einsum("kj,cji,ki->kc", lt, G, lt)                 # (K, C) = ||W_k[:, c]||^2
    regulariser = anp.sum(anp.exp(lambdas) * anp.sqrt(sq_norms), axis=1) / C
    return anp.mean(gaussian_nll(predictions, tb) + regulariser)


def minibatch(train_x, train_y, rng, config):
    """A minibatch of batch_size consecutive training points at an offset drawn from rng."""
    offset = rng.randint(0, config.n_train_points - config.batch_size)
    return train_x[offset:offset + config.batch_size], train_y[offset:offset + config.batch_size]


def train_hypernet(config, train_x, train_y, fixed_lambdas=None, log=print):
    """Linear hypernetwork [10, 7850] trained by Adam on training data only: on fixed_lambdas (model B) or,
    when None, on stochastic_batch fresh U(low, high) lambdas per step (model C). Returns its parameters."""
    from autograd import grad

    from neural_network import init_hypernet, num_params
    from optimizers import adam

    stochastic = fixed_lambdas is None
    stream, steps = (STREAM_STOCHASTIC, config.stochastic_steps) if stochastic else (STREAM_FIXED, config.fixed_steps)
    label = "stochastic hypernet" if stochastic else "fixed hypernet"
    objective_grad = grad(hyper_objective)
    start = []

    def batch(i):
        rng = step_rng(config.seed, i, stream)
        lambdas = (rng.uniform(config.lambda_low, config.lambda_high, (config.stochastic_batch, N_HYPERS))
                   if stochastic else fixed_lambdas)
        return (lambdas,) + minibatch(train_x, train_y, rng, config)

    def gradient(params, i):
        return objective_grad(params, *batch(i))

    def callback(params, i, g):
        if i == 0 or (i + 1) % config.hyper_log_every == 0 or i + 1 == steps:
            value = hyper_objective(params, *batch(i))
            start.append(value)
            check_divergence(value, start[0], i, f"{label} training objective")
            bar.update(0, objective=f"{value:.4f}")
            if i > 0:
                log(f"{label}: step {i + 1}/{steps}, training objective {value:.4f}")
        bar.update(1)

    init = init_hypernet("linear", N_HYPERS, num_params(LAYERS), config.init_scale,
                         np.random.RandomState(config.seed))
    with Progress(steps, desc=label, unit="step") as bar:
        return adam(gradient, init, callback, num_iters=steps, step_size=config.step_size)


def hypernet_valid_losses(hyper_params, lambdas, gram, config):
    """Inferred loss: validation loss of the hypernet's weights at each lambda (K, 10) -> (K,)."""
    from neural_network import hypernet_weights, identity

    out = []
    for i in range(0, len(lambdas), config.eval_batch):
        flat = hypernet_weights(hyper_params, lambdas[i:i + config.eval_batch], identity)  # one GEMM per batch
        out.append(valid_losses_rows(flat_to_rows(flat), gram))
    return np.concatenate(out)


def gp_predict(train_lambdas, train_losses, test_lambdas, config):
    """Model A: scikit-learn GP (RBF kernel, n_restarts_optimizer) posterior mean at test_lambdas."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF

    gp = GaussianProcessRegressor(kernel=RBF(), n_restarts_optimizer=config.gp_restarts, random_state=config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(train_lambdas, train_losses)
    return gp.predict(test_lambdas)


# ----------------------------------------------------------------------------------------- run

def tuple_order(config):
    """Indices of the ground-truth tuples in the order they join the surrogates' training set: 0, 1, 2, ...
    (train_tuples "first", the released code) or a permutation drawn with --seed ("drawn")."""
    if config.train_tuples == "first":
        return np.arange(config.n_models)
    return step_rng(config.seed, 0, STREAM_TUPLES).permutation(config.n_models)


def split_tuples(order, n):
    """(training indices, held-out indices in ascending order) for the first n of order."""
    return order[:n], np.sort(order[n:])


def summarise(inferred, true):
    """Prediction errors (inferred - true) and the true loss at the predicted-best lambda."""
    errors = inferred - true
    std = float(np.std(errors))
    skew = float(np.mean((errors - errors.mean()) ** 3) / std ** 3) if std > 0 else 0.0
    return {"error_mean": float(np.mean(errors)), "error_std": std, "error_median": float(np.median(errors)),
            "error_skew": skew, "predicted_best_loss": float(np.min(inferred)),
            "predicted_best_true_loss": float(true[np.argmin(inferred)])}


def evaluate_budget(n, order, lambdas, losses, train, gram, config, stochastic_params, log=print):
    """Inferred held-out losses {model: (n_models - n,)} of A, B, C trained on the first n tuples of order,
    and the held-out indices."""
    fit, held = split_tuples(order, n)
    log(f"gaussian process: fit on {n} tuples")
    inferred = {"gp": gp_predict(lambdas[fit], losses[fit], lambdas[held], config)}
    fixed = train_hypernet(config, *train, fixed_lambdas=lambdas[fit], log=log)
    inferred["hypernet_fixed"] = hypernet_valid_losses(fixed, lambdas[held], gram, config)
    inferred["hypernet_stochastic"] = hypernet_valid_losses(stochastic_params, lambdas[held], gram, config)
    return inferred, held


def load_splits(config, data):
    """Scatter splits of the data: train = images 0..n_train_points-1, valid = the next n_valid_points; the
    MNIST test set is not used."""
    from data_loader import scatter_splits

    return scatter_splits(data, config.n_train_points, config.n_valid_points, 0)


def run(config, data, jobs=1, log=print):
    """Ground truth, models A/B/C and their held-out predictions (and the table) -> (summary, arrays)."""
    t0 = time.perf_counter()
    splits = load_splits(config, data)
    n = config.n_train_tuples
    lambdas, losses, gt_seconds, cached = get_ground_truth(config, splits, jobs, log)
    gram = make_gram(splits.valid_x, splits.valid_y)
    train = (splits.train_x, splits.train_y)
    stochastic = train_hypernet(config, *train, None, log)
    order = tuple_order(config)
    inferred, held = evaluate_budget(n, order, lambdas, losses, train, gram, config, stochastic, log)
    true = losses[held]
    summary = {name: summarise(inferred[name], true) for name in MODELS}
    summary.update(true_best=float(true.min()), n_train_tuples=n, n_heldout=len(true),
                   ground_truth_seconds=gt_seconds, ground_truth_cached=cached)
    arrays = {"true": true, **{f"inferred_{name}": inferred[name] for name in MODELS}}
    summary["seconds"] = time.perf_counter() - t0  # this run, table excluded (ground truth too when cached)
    if config.table:
        t1 = time.perf_counter()
        summary["table"] = run_table(config, order, lambdas, losses, train, gram, stochastic, log)
        summary["table"]["seconds"] = time.perf_counter() - t1
    return summary, arrays


def run_table(config, order, lambdas, losses, train, gram, stochastic, log=print):
    """True loss at each model's predicted-best lambda for every budget in config.table_budgets."""
    budgets = [b for b in config.table_budgets if b < config.n_models]
    rows = {name: [] for name in MODELS + ("true_best",)}
    with Progress(len(budgets), desc="table", unit="budget") as bar:
        for n in budgets:
            log(f"table: budget {n}")
            inferred, held = evaluate_budget(n, order, lambdas, losses, train, gram, config, stochastic, log)
            true = losses[held]
            for name in MODELS:
                rows[name].append(summarise(inferred[name], true)["predicted_best_true_loss"])
            rows["true_best"].append(float(true.min()))
            bar.update(1, tuples=n)
    return {"budgets": budgets, "rows": rows}


def table_tex(table):
    """LaTeX tabular of the table: one row per model, one column per budget."""
    labels = {"gp": "GP (RBF kernel)", "hypernet_fixed": "Hypernetwork, fixed tuples",
              "hypernet_stochastic": "Hypernetwork, sampled $\\lambda$", "true_best": "True best"}
    cols = "l" + "r" * len(table["budgets"])
    lines = [f"\\begin{{tabular}}{{{cols}}}", "\\hline",
             "Training tuples & " + " & ".join(str(b) for b in table["budgets"]) + " \\\\", "\\hline"]
    for name, label in labels.items():
        lines.append(label + " & " + " & ".join(f"{x:.3f}" for x in table["rows"][name]) + " \\\\")
    lines += ["\\hline", "\\end{tabular}", ""]
    return "\n".join(lines)


def report(summary):
    """The headline numbers, a few lines."""
    for name in MODELS:
        s = summary[name]
        print(f"{name}: error mean {s['error_mean']:+.4f}, std {s['error_std']:.4f}, "
              f"true loss at predicted best {s['predicted_best_true_loss']:.4f}")
    print(f"true best {summary['true_best']:.4f}; {summary['seconds']:.0f} s (table excluded)")
    if "table" in summary:
        print("table budgets: " + " ".join(map(str, summary["table"]["budgets"])))
        for name, row in summary["table"]["rows"].items():
            print(f"table {name}: " + " ".join(f"{x:.3f}" for x in row))


# ---------------------------------------------------------------------------------------- plot

COLORS = {"gp": ("Reds", "r"), "hypernet_fixed": ("Greens", "g"), "hypernet_stochastic": ("Blues", "b")}
EXTENT = (0.6, 1.1)               # hexbin axes, both (released code)
LOSS_TICKS = (0.7, 0.8, 0.9, 1.0)
ERROR_RANGE = (-0.35, 0.6)        # histogram x range (released code)
ERROR_TICKS = (-0.2, 0.0, 0.2, 0.4, 0.6)
PAPER_AXES_MIN_FRACTION = 0.5     # the paper's fixed axes are kept while every panel shows at least this much
# of its points; otherwise (e.g. --quick, losses near 2.2) the axes are fitted to the data
FIT_PERCENTILES = (1.0, 99.0)     # fitted axes span these percentiles of the data (outliers would squash it)
AUTO_TICKS = 4                    # ticks on a fitted axis
PANEL_PAD = (1.05, 1.05)          # each saved panel's bounding box, scaled around the axes (x, y)
FONT_SIZE = 32
HEXBIN_GRID = 60
HIST_BINS = 50


def _save_with_panels(fig, axes, kind, out_dir):
    """Save learn_vs_true_loss_<kind> and each panel alone as ax<i>_<kind> (the paper's file names), close."""
    from plotting import close, save_figure, save_panel

    fig.tight_layout()
    written = save_figure(fig, f"learn_vs_true_loss_{kind}", out_dir)
    for i, ax in enumerate(axes):
        written += save_panel(fig, ax, f"ax{i}_{kind}", out_dir, pad=PANEL_PAD)
    close(fig)
    return written


def _inside_fraction(values, limits):
    values = np.asarray(values)
    return float(np.mean((values >= limits[0]) & (values <= limits[1]))) if values.size else 1.0


def _fitted_range(values_list):
    """(lo, hi): the FIT_PERCENTILES range of all the values, padded by plotting.fit_limits' margin."""
    from plotting import LIMIT_MARGIN

    flat = np.concatenate([np.ravel(v) for v in values_list])
    lo, hi = np.percentile(flat, FIT_PERCENTILES)
    pad = LIMIT_MARGIN * (hi - lo) if hi > lo else LIMIT_MARGIN * max(abs(lo), 1.0)
    return float(lo - pad), float(hi + pad)


def plot(summary, arrays, out_dir):
    """Figures learn_vs_true_loss_scatter / _hist (three panels each), the six single panels and, when the
    summary holds it, results/gp_vs_hypernet_table.tex. Returns the paths written."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from plotting import despine, set_paper_style

    set_paper_style(FONT_SIZE)
    true = np.asarray(arrays["true"], dtype=float)
    inferred = {name: np.asarray(arrays[f"inferred_{name}"], dtype=float) for name in MODELS}
    if any(v.shape != true.shape for v in inferred.values()) or true.ndim != 1 or true.size == 0:
        raise ValueError("the true and inferred losses must be non-empty 1-D arrays of one length")
    out_dir = Path(out_dir)
    written = []

    paper_axes = all(_inside_fraction(v, EXTENT) >= PAPER_AXES_MIN_FRACTION for v in (true, *inferred.values()))
    fig, axes = plt.subplots(1, 3, figsize=(16, 7), sharey=paper_axes)
    for ax, name in zip(axes, MODELS, strict=True):
        extent = EXTENT if paper_axes else _fitted_range([true, inferred[name]])
        ax.hexbin(true, inferred[name], gridsize=HEXBIN_GRID, cmap=COLORS[name][0], mincnt=1,
                  extent=extent + extent, linewidths=0.2)
        ax.plot(extent, extent, "k-", linewidth=1)
        ax.set_xlim(extent)
        ax.set_ylim(extent)
        if paper_axes:
            ax.set_xticks(LOSS_TICKS)
            ax.set_yticks(LOSS_TICKS)
        else:
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(MaxNLocator(AUTO_TICKS))
        ax.tick_params(length=0)
        despine(ax)
    written += _save_with_panels(fig, axes, "scatter", out_dir)

    errors = {name: inferred[name] - true for name in MODELS}
    paper_axes = all(_inside_fraction(e, ERROR_RANGE) >= PAPER_AXES_MIN_FRACTION for e in errors.values())
    error_range = ERROR_RANGE if paper_axes else _fitted_range(list(errors.values()))
    fig, axes = plt.subplots(1, 3, figsize=(16, 7), sharey=True)
    for ax, name in zip(axes, MODELS, strict=True):
        ax.hist(errors[name], bins=HIST_BINS, density=True, color=COLORS[name][1], histtype="stepfilled",
                range=None if paper_axes else error_range)
        ax.axvline(0.0, color="k", linestyle="--", linewidth=1)
        ax.set_xlim(error_range)
        if paper_axes:
            ax.set_xticks(ERROR_TICKS)
            ax.set_xticklabels([f"{t:.1f}".replace("-", "\u2212") for t in ERROR_TICKS])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(AUTO_TICKS))
        ax.set_yticks([])
        ax.tick_params(length=0)
        despine(ax)
    written += _save_with_panels(fig, axes, "hist", out_dir)

    if "table" in summary:
        path = out_dir / "results" / TABLE_TEX
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table_tex(summary["table"]))
        written.append(path)
    return written


# ------------------------------------------------------------------------------ paper numbers, claims

def _best_gap(s, model):
    return s[model]["predicted_best_true_loss"] - s["true_best"]


def tex_numbers(summary):
    """Every number main.tex quotes from this experiment: macro name -> LaTeX text."""
    s, c = summary, summary["config"]
    out = {}
    for prefix, model in (("GP", "gp"), ("Fixed", "hypernet_fixed"), ("Stoch", "hypernet_stochastic")):
        out[f"Scatter{prefix}ErrorMean"] = texfmt.err(s[model]["error_mean"])
        out[f"Scatter{prefix}ErrorStd"] = texfmt.err(s[model]["error_std"])
        out[f"Scatter{prefix}BestTrue"] = texfmt.nll(s[model]["predicted_best_true_loss"])
        out[f"Scatter{prefix}BestGap"] = texfmt.err(_best_gap(s, model))
    stds = {m: s[m]["error_std"] for m in MODELS}
    out["ScatterStochSpreadWord"] = texfmt.choose(
        stds["hypernet_stochastic"] < min(stds["gp"], stds["hypernet_fixed"]), "the smallest", "not the smallest")
    out["ScatterGPBiasWord"] = texfmt.choose(s["gp"]["error_mean"] < 0, "under-predicts", "over-predicts")
    out["ScatterFixedBiasWord"] = texfmt.choose(s["hypernet_fixed"]["error_mean"] < 0, "under-predicts",
                                                "over-predicts")
    out["ScatterTrueBest"] = texfmt.nll(s["true_best"])
    out["ScatterNTrain"] = texfmt.integer(s["n_train_tuples"])
    out["ScatterNHeldout"] = texfmt.integer(s["n_heldout"])
    out["ScatterSeconds"] = texfmt.seconds(s["seconds"])
    out["ScatterGroundTruthSeconds"] = texfmt.seconds(s["ground_truth_seconds"])
    out["ScatterGTCachedWord"] = texfmt.choose(s["ground_truth_cached"], "loaded them from the on-disk cache",
                                               "trained them itself")
    out["ScatterModels"] = texfmt.integer(c["n_models"])
    out["ScatterBatch"] = texfmt.integer(c["batch_size"])
    out["ScatterGTSteps"] = texfmt.integer(c["gt_steps"])
    out["ScatterGTDtype"] = texfmt.text("float64" if c["float64"] else "float32")
    out["ScatterFixedSteps"] = texfmt.integer(c["fixed_steps"])
    out["ScatterStochSteps"] = texfmt.integer(c["stochastic_steps"])
    return out


# Thresholds of the verdicts (NLL units; SPEC section 10).
CENTRED_TOL = 0.02       # stochastic hypernetwork: |mean error| at most this counts as centred on 0
RIGHT_TAIL_SKEW = 0.5    # fixed hypernetwork: error skewness above this counts as a long right tail (the usual
# rule of thumb: |skewness| below 0.5 is roughly symmetric)
BEST_GAP_REPRODUCED = 0.01   # true loss at the predicted best within this of the true best: close
BEST_GAP_PARTLY = 0.03
TABLE_TOL_REPRODUCED = 0.02  # a table entry within this of the paper's
TABLE_TOL_PARTLY = 0.06
# The paper's commented-out table (SPEC section 6): true loss at each model's predicted best, per budget.
PAPER_TABLE = {10: (0.90, 0.65, 0.60), 25: (0.67, 0.60, 0.61), 100: (0.60, 0.59, 0.59), 250: (0.60, 0.59, 0.59),
               1000: (0.62, 0.59, 0.59)}


def _gp_under(s):
    mean, median = s["gp"]["error_mean"], s["gp"]["error_median"]
    return mean, ("reproduced" if mean < 0 and median < 0 else "partly" if mean < 0 or median < 0
                  else "not reproduced")


def _fixed_over(s):
    f = s["hypernet_fixed"]
    verdict = ("reproduced" if f["error_mean"] > 0 and f["error_skew"] > RIGHT_TAIL_SKEW
               else "partly" if f["error_mean"] > 0 else "not reproduced")
    return f"mean {f['error_mean']:+.3f}, skew {f['error_skew']:.2f}", verdict


def _stochastic_centred(s):
    c = s["hypernet_stochastic"]
    tightest = c["error_std"] < min(s["gp"]["error_std"], s["hypernet_fixed"]["error_std"])
    centred = abs(c["error_mean"]) <= CENTRED_TOL
    verdict = "reproduced" if tightest and centred else "partly" if tightest or centred else "not reproduced"
    return f"mean {c['error_mean']:+.3f}, sd {c['error_std']:.3f}", verdict


def _stochastic_best(s):
    gap = _best_gap(s, "hypernet_stochastic")
    return gap, ("reproduced" if gap <= BEST_GAP_REPRODUCED else "partly" if gap <= BEST_GAP_PARTLY
                 else "not reproduced")


def _table_row(budget):
    def evaluate(s):
        table = s.get("table")
        if not table or budget not in table["budgets"]:
            return "not run", "not reproduced"
        j = table["budgets"].index(budget)
        ours = [table["rows"][m][j] for m in MODELS]
        worst = max(abs(a - b) for a, b in zip(ours, PAPER_TABLE[budget], strict=True))
        verdict = ("reproduced" if worst <= TABLE_TOL_REPRODUCED else "partly" if worst <= TABLE_TOL_PARTLY
                   else "not reproduced")
        return " / ".join(f"{x:.3f}" for x in ours), verdict
    return evaluate


CLAIMS = [
    Claim(id="fig6-gp-under",
          claim="The Gaussian process tends to under-predict the validation loss",
          paper="errors mostly below 0 (Figure 6, left)",
          evaluate=_gp_under, fmt="{:+.3f}",
          evidence="gp.error_mean, gp.error_median; learn_vs_true_loss_hist.pdf"),
    Claim(id="fig6-fixed-over",
          claim="The hypernetwork trained on the fixed tuples over-predicts, with a long right tail",
          paper="errors above 0, long right tail (Figure 6, middle)",
          evaluate=_fixed_over,
          evidence="hypernet_fixed.error_mean, .error_skew; learn_vs_true_loss_hist.pdf"),
    Claim(id="fig6-stochastic-centred",
          claim="The stochastically trained hypernetwork's errors are tightly centred on 0",
          paper="narrowest histogram, centred on 0 (Figure 6, right)",
          evaluate=_stochastic_centred,
          evidence="hypernet_stochastic.error_mean, .error_std; learn_vs_true_loss_hist.pdf"),
    Claim(id="fig6-stochastic-best",
          claim="The stochastic hypernetwork's predicted best has a true loss close to the true best",
          paper="0.60 vs 0.593 (table, 25 tuples: 0.61)",
          evaluate=_stochastic_best, fmt="{:.3f}",
          evidence="hypernet_stochastic.predicted_best_true_loss - true_best; learn_vs_true_loss_scatter.pdf"),
    *[Claim(id=f"table-{budget}",
            claim=f"True loss at the predicted best with {budget} evaluated tuples (GP / fixed / stochastic)",
            paper=" / ".join(f"{x:.2f}" for x in PAPER_TABLE[budget]),
            evaluate=_table_row(budget),
            evidence=f"table.rows at budget {budget}; results/{TABLE_TEX}")
      for budget in PAPER_TABLE],
]


if __name__ == "__main__":
    sys.exit(common.main(sys.modules[__name__]))
