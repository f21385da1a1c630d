"""Learned versus true validation loss (SPEC section 6, the paper's Figure 6).

Ground truth: 10,240 hyperparameter vectors lambda ~ U(-3, 3)^10 (one L2-norm penalty per class of a
linear 784-10 model); for each, a fresh model trained by Adam on minibatches and its validation loss.
The first n_train_tuples (lambda, loss) pairs train three surrogates -- A: a Gaussian process, B: a
linear hypernetwork fit on those fixed lambdas, C: the same hypernetwork trained on freshly sampled
lambdas (Algorithm 2) -- which then predict the loss of the held-out lambdas.

    python learn_vs_true_loss_scatter.py [--quick] [--seed 7] [--jobs N] [--n-train-tuples 25] [--table]

The ground truth is cached in <repo>/cache/ (.npz with the settings' hash and a SHA-256 of its arrays).
"""
import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common import (
    ExperimentError,
    atomic_write_bytes,
    check_finite,
    experiment_parser,
    load_results,
    positive_int,
    run_main,
    save_results,
    step_rng,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO / "cache"
NAME = "learn_vs_true_loss_scatter"
TABLE_NAME = "gp_vs_hypernet_table"
LAYERS = [784, 10]
N_CLASSES = 10
MODELS = ("gp", "hypernet_fixed", "hypernet_stochastic")
# Random streams derived from (seed, index, stream): keep them apart.
STREAM_GT, STREAM_FIXED, STREAM_STOCHASTIC = 61, 62, 63
CACHE_VERSION = 2  # bump when the ground-truth computation changes (2: BLAS axpy in Adam)


@dataclass(frozen=True)
class Config:
    """Settings of the experiment; defaults follow the released code (SPEC section 6)."""

    seed: int = 7
    n_hypers: int = 10                 # one regularisation strength per output class
    lambda_low: float = -3.0           # lambda ~ U(lambda_low, lambda_high)^n_hypers
    lambda_high: float = 3.0
    n_models: int = 10240              # ground-truth (lambda, validation loss) pairs
    n_train_tuples: int = 25           # the first ones train the surrogates; the rest are held out
    n_train_points: int = 50000        # MNIST training images 0..49,999
    n_valid_points: int = 10000        # validation images 50,000..59,999
    batch_size: int = 100              # consecutive training points per step, at a random offset
    init_scale: float = 1e-5           # N(0, 1) * init_scale, elementary model and hypernetwork
    step_size: float = 1e-4            # Adam step, everywhere
    gt_steps: int = 1000               # Adam steps per ground-truth model
    fixed_steps: int = 500             # model B: Adam steps on the fixed training lambdas
    stochastic_steps: int = 600        # model C: Adam steps, each on fresh lambdas
    stochastic_batch: int = 25         # model C: lambdas sampled per step
    gp_restarts: int = 1               # model A: n_restarts_optimizer of the RBF Gaussian process
    chunk_size: int = 64               # ground-truth models trained together as one stacked problem
    gt_dtype: str = "float32"          # ground-truth training precision (see README: speed)
    eval_batch: int = 1024             # hyperparameters per validation-loss GEMM
    table_budgets: tuple = (10, 25, 100, 250, 1000)  # --table: n_train_tuples per column
    synthetic: bool = False            # tests: synthetic stand-in data instead of MNIST
    log_every: int = 20                # ground-truth chunks between progress lines
    hyper_log_every: int = 100         # hypernetwork steps between progress lines


QUICK = dict(n_models=320, n_train_points=1500, n_valid_points=500, gt_steps=40, fixed_steps=60,
             stochastic_steps=80, chunk_size=32, eval_batch=128, table_budgets=(10, 25, 100), log_every=5,
             hyper_log_every=20)


def ground_truth_settings(config):
    """The settings the ground truth depends on (its cache key)."""
    keys = ("seed", "n_hypers", "lambda_low", "lambda_high", "n_models", "n_train_points", "n_valid_points",
            "batch_size", "init_scale", "step_size", "gt_steps", "chunk_size", "gt_dtype", "synthetic")
    return {"version": CACHE_VERSION, **{k: getattr(config, k) for k in keys}}


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


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


# ------------------------------------------------------------------------------- ground truth

def sample_lambdas(config):
    """All ground-truth hyperparameters (n_models, n_hypers) ~ U(low, high), from RandomState(seed)."""
    rs = np.random.RandomState(config.seed)
    return rs.uniform(config.lambda_low, config.lambda_high, size=(config.n_models, config.n_hypers))


def initial_elementary(config):
    """The shared initial model: W (784, 10), b (10,) = init_scale * N(0, 1) from RandomState(seed)."""
    from neural_network import init_mlp

    return init_mlp(LAYERS, config.init_scale, np.random.RandomState(config.seed))[0]


def chunk_offsets(config, chunk_index):
    """Minibatch start offsets of every step of one chunk, in [0, n_train_points - batch_size)."""
    rng = step_rng(config.seed, chunk_index, STREAM_GT)
    return rng.randint(0, config.n_train_points - config.batch_size, size=config.gt_steps)


def _adam_inplace(x, g, m, v, s, t, config, axpy, eps=1e-8, b1=0.9, b2=0.999):
    """Bias-corrected Adam step on x (flat, in place); g holds the gradient, s is scratch.

    Moments are kept rescaled, m' = m / (1 - b1) and v' = v / (1 - b2):
        m' <- b1 m' + g,  v' <- b2 v' + g^2,  x <- x - a_t m' / (sqrt(v') + e_t)   (constants below),
    as 7 passes over the arrays: the BLAS axpy y <- a x + y writes the new moments into the buffers of g
    and g^2, so the four buffers change roles. Returns the (m, v, gradient, scratch) buffers for next step."""
    np.multiply(g, g, out=s)
    axpy(v, s, a=b2)                              # s <- b2 v' + g^2: the new v'
    axpy(m, g, a=b1)                              # g <- b1 m' + g:   the new m'
    m, v, g, s = g, s, m, v
    c2 = np.sqrt((1 - b2) / (1 - b2 ** t))        # sqrt(v_hat) = c2 sqrt(v')
    a_t = config.step_size * (1 - b1) / (1 - b1 ** t) / c2
    np.sqrt(v, out=g)
    g += eps / c2
    np.divide(m, g, out=g)
    axpy(g, x, a=-a_t)                            # x <- x - a_t m' / (sqrt(v') + e_t)
    return m, v, g, s


def train_ground_truth_chunk(lambdas, train_x, train_y, config, chunk_index, return_weights=False):
    """Train K elementary models (one per row of lambdas (K, 10)) as one stacked problem.

    All K models see the same minibatch each step, so the forward pass is one (K*10, 784) x (784, 100)
    product and the weight gradient one (784, 100) x (100, K*10) product. Weights are held as rows
    Wt (K*10, 784) (row k*10+c = W_k[:, c]) with biases b (K*10,). Objective per model: Gaussian NLL on
    the minibatch + class_norm_regulariser. Returns (Wt, b) (float64), the weights after gt_steps."""
    from scipy.linalg import blas

    dtype = np.dtype(config.gt_dtype)
    gemm = blas.dgemm if dtype == np.float64 else blas.sgemm
    K, C, B = len(lambdas), N_CLASSES, config.batch_size
    W0, b0 = initial_elementary(config)
    Wt = np.ascontiguousarray(np.tile(W0.T, (K, 1)), dtype=dtype)
    b = np.tile(b0, K).astype(dtype)
    m, v, G, S = np.zeros_like(Wt), np.zeros_like(Wt), np.empty_like(Wt), np.empty_like(Wt)  # moments, grad, scratch
    mb, vb, Sb = np.zeros_like(b), np.zeros_like(b), np.empty_like(b)
    axpy = blas.daxpy if dtype == np.float64 else blas.saxpy
    Y = np.empty((K * C, B), dtype)
    reg = (np.exp(lambdas) / C).ravel().astype(dtype)  # d/dw_c of exp(l_c)/C ||w_c|| = reg_c w_c / ||w_c||
    x_all, t_all = train_x.astype(dtype, copy=False), train_y.astype(dtype, copy=False)
    scale = dtype.type(100.0 / (B * C))  # d/dy of mean 50 (y - t)^2 over B*C entries
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by check_finite instead
        for i, offset in enumerate(chunk_offsets(config, chunk_index)):
            xb, tb = x_all[offset:offset + B], t_all[offset:offset + B]
            np.dot(Wt, xb.T, out=Y)                       # predictions, transposed: (K*C, B)
            Y += b[:, None]
            Y.reshape(K, C, B)[...] -= tb.T[None]         # residuals y - t
            if (i + 1) % 100 == 0 or i + 1 == config.gt_steps:
                check_finite(np.sum(Y), i, f"ground-truth training residual (chunk {chunk_index})")
            Y *= scale                                    # dL/dy
            gb = Y.sum(axis=1)
            norms = np.sqrt(np.einsum("ij,ij->i", Wt, Wt))
            np.multiply(Wt, (reg / norms)[:, None], out=G)  # regulariser gradient ...
            gemm(1.0, xb.T, Y.T, beta=1.0, c=G.T, overwrite_c=True)  # ... + X' dL/dy, accumulated in place
            m, v, G, S = _adam_inplace(Wt.ravel(), G.ravel(), m.ravel(), v.ravel(), S.ravel(), i + 1, config, axpy)
            m, v, G, S = (a.reshape(Wt.shape) for a in (m, v, G, S))
            mb, vb, gb, Sb = _adam_inplace(b, gb, mb, vb, Sb, i + 1, config, axpy)
    return Wt.astype(np.float64), b.astype(np.float64)


def ground_truth_chunk_losses(lambdas, train_x, train_y, gram, config, chunk_index):
    """Validation losses (K,) of one trained chunk; runs single-threaded so every --jobs gives equal bits."""
    from scipy.linalg import blas  # noqa: F401  scipy's own BLAS must be loaded before the limit is set,
    from threadpoolctl import threadpool_limits  # or the first chunk in a process runs it multi-threaded

    with threadpool_limits(limits=1):
        Wt, b = train_ground_truth_chunk(lambdas, train_x, train_y, config, chunk_index)
        losses = valid_losses_rows(np.hstack([Wt, b[:, None]]), gram)
    check_finite(losses, config.gt_steps, f"ground-truth validation loss (chunk {chunk_index})")
    return losses


def compute_ground_truth(config, splits, jobs, log=print):
    """(lambdas (n_models, 10), validation losses (n_models,)) by training every model; chunks via joblib."""
    from joblib import Parallel, delayed

    lambdas = sample_lambdas(config)
    gram = make_gram(splits.valid_x, splits.valid_y)
    starts = list(range(0, config.n_models, config.chunk_size))
    dtype = np.dtype(config.gt_dtype)
    t0, losses = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="gt-data-") as tmp:
        # The training set goes to the workers once, as read-only memory maps in the training precision
        # (joblib passes np.memmap by file name instead of hashing and copying 300 MB per chunk).
        data = []
        for name, array in (("x", splits.train_x), ("y", splits.train_y)):
            array = np.ascontiguousarray(array, dtype=dtype)
            if jobs > 1:
                np.save(Path(tmp) / f"{name}.npy", array)
                array = np.load(Path(tmp) / f"{name}.npy", mmap_mode="r")
            data.append(array)
        tasks = (delayed(ground_truth_chunk_losses)(lambdas[s:s + config.chunk_size], *data, gram, config, c)
                 for c, s in enumerate(starts))
        for c, chunk in enumerate(Parallel(n_jobs=jobs, return_as="generator")(tasks)):
            losses.append(chunk)
            if (c + 1) % config.log_every == 0 or c + 1 == len(starts):
                done = sum(map(len, losses))
                log(f"ground truth: {done}/{config.n_models} models, {time.perf_counter() - t0:.0f} s")
    return lambdas, np.concatenate(losses)


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


def load_ground_truth(path, settings):
    """(lambdas, losses, seconds) from a valid cache with these settings, else None and the reason why."""
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {"lambdas": npz["lambdas"], "valid_losses": npz["valid_losses"]}
    except Exception as err:  # any unreadable/corrupt/truncated file is simply rebuilt
        return None, f"unreadable ({type(err).__name__}: {str(err)[:80]})"
    if meta.get("settings_hash") != settings_hash(settings):
        return None, "made with other settings"
    if meta.get("digest") != _arrays_digest(arrays):
        return None, "its arrays do not match their checksum (corrupt)"
    n = settings["n_models"]
    if arrays["lambdas"].shape != (n, settings["n_hypers"]) or arrays["valid_losses"].shape != (n,):
        return None, "wrong shapes"
    return (arrays["lambdas"], arrays["valid_losses"], float(meta.get("seconds", 0.0))), None


def cache_path(cache_dir, config):
    tag = ("_synthetic" if config.synthetic else "") + ("" if config.n_models == Config.n_models else
                                                          f"_{config.n_models}")
    return Path(cache_dir) / f"learn_vs_true_loss_ground_truth{tag}.npz"


def get_ground_truth(config, splits, jobs, cache_dir, use_cache=True, log=print):
    """Ground truth from the cache when it is valid for these settings; otherwise computed and cached."""
    settings = ground_truth_settings(config)
    path = cache_path(cache_dir, config)
    if use_cache:
        cached, problem = load_ground_truth(path, settings)
        if cached is not None:
            log(f"ground truth: loaded {path}")
            return (*cached, True)
        if problem:
            print(f"warning: ground-truth cache {path} is {problem}; rebuilding it", file=sys.stderr)
    t0 = time.perf_counter()
    lambdas, losses = compute_ground_truth(config, splits, jobs, log)
    seconds = time.perf_counter() - t0
    save_ground_truth(path, settings, lambdas, losses, seconds)
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
    offset = rng.randint(0, config.n_train_points - config.batch_size)
    return train_x[offset:offset + config.batch_size], train_y[offset:offset + config.batch_size]


def train_hypernet(config, splits, fixed_lambdas=None, log=print):
    """Linear hypernetwork [10, 7850] trained by Adam: on fixed_lambdas (model B) or, when None, on
    stochastic_batch fresh U(low, high) lambdas per step (model C). Returns its parameters."""
    from autograd import grad

    from neural_network import init_hypernet, num_params
    from optimizers import adam

    stochastic = fixed_lambdas is None
    stream, steps = (STREAM_STOCHASTIC, config.stochastic_steps) if stochastic else (STREAM_FIXED, config.fixed_steps)
    label = "stochastic hypernet" if stochastic else "fixed hypernet"
    objective_grad = grad(hyper_objective)

    def batch(i):
        rng = step_rng(config.seed, i, stream)
        lambdas = (rng.uniform(config.lambda_low, config.lambda_high, (config.stochastic_batch, config.n_hypers))
                   if stochastic else fixed_lambdas)
        return (lambdas,) + minibatch(splits.train_x, splits.train_y, rng, config)

    def gradient(params, i):
        return objective_grad(params, *batch(i))

    def callback(params, i, g):
        if (i + 1) % config.hyper_log_every == 0 or i + 1 == steps:
            value = hyper_objective(params, *batch(i))
            check_finite(value, i, f"{label} training objective")
            log(f"{label}: step {i + 1}/{steps}, training objective {value:.4f}")

    init = init_hypernet("linear", config.n_hypers, num_params(LAYERS), config.init_scale,
                         np.random.RandomState(config.seed))
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

def load_splits(config, data_dir):
    from data_loader import load_mnist, scatter_splits, synthetic_mnist

    data = synthetic_mnist() if config.synthetic else load_mnist(data_dir)
    return scatter_splits(data, config.n_train_points, config.n_valid_points, 0)


def summarise(inferred, true):
    """error_mean, error_std (inferred - true) and the true loss at the predicted-best lambda."""
    errors = inferred - true
    return {"error_mean": float(np.mean(errors)), "error_std": float(np.std(errors)),
            "predicted_best_true_loss": float(true[np.argmin(inferred)])}


def evaluate_budget(n, lambdas, losses, splits, gram, config, stochastic_params, log=print):
    """Inferred held-out losses {model: (n_heldout,)} of A, B, C with the first n tuples for training."""
    held = slice(n, None)
    log(f"gaussian process: fit on {n} tuples")
    inferred = {"gp": gp_predict(lambdas[:n], losses[:n], lambdas[held], config)}
    fixed = train_hypernet(config, splits, fixed_lambdas=lambdas[:n], log=log)
    inferred["hypernet_fixed"] = hypernet_valid_losses(fixed, lambdas[held], gram, config)
    inferred["hypernet_stochastic"] = hypernet_valid_losses(stochastic_params, lambdas[held], gram, config)
    return inferred


def run(config, splits, jobs=1, cache_dir=DEFAULT_CACHE_DIR, use_cache=True, table=False, log=print):
    """Ground truth, models A/B/C and their held-out predictions -> (summary dict, arrays dict[, table])."""
    t0 = time.perf_counter()
    n = config.n_train_tuples
    if n >= config.n_models:
        raise ExperimentError(f"--n-train-tuples {n} leaves no held-out tuples (n_models is {config.n_models})")
    lambdas, losses, gt_seconds, cached = get_ground_truth(config, splits, jobs, cache_dir, use_cache, log)
    gram = make_gram(splits.valid_x, splits.valid_y)
    stochastic = train_hypernet(config, splits, None, log)
    inferred = evaluate_budget(n, lambdas, losses, splits, gram, config, stochastic, log)
    true = losses[n:]
    summary = {name: summarise(inferred[name], true) for name in MODELS}
    summary.update(true_best=float(true.min()), n_train_tuples=n, n_heldout=len(true),
                   ground_truth_seconds=gt_seconds, ground_truth_cached=cached, config=config)
    arrays = {"true": true, **{f"inferred_{name}": inferred[name] for name in MODELS}}
    summary["seconds"] = time.perf_counter() - t0  # this run, table excluded (ground truth too when cached)
    table_result = None
    if table:
        t1 = time.perf_counter()
        table_result = run_table(config, splits, lambdas, losses, gram, stochastic, log)
        table_result["seconds"] = time.perf_counter() - t1
    return summary, arrays, table_result


def run_table(config, splits, lambdas, losses, gram, stochastic, log=print):
    """True loss at each model's predicted-best lambda for every budget in config.table_budgets."""
    budgets = [b for b in config.table_budgets if b < config.n_models]
    rows = {name: [] for name in MODELS + ("true_best",)}
    for n in budgets:
        log(f"table: budget {n}")
        inferred = evaluate_budget(n, lambdas, losses, splits, gram, config, stochastic, log)
        true = losses[n:]
        for name in MODELS:
            rows[name].append(summarise(inferred[name], true)["predicted_best_true_loss"])
        rows["true_best"].append(float(true.min()))
    return {"budgets": budgets, "rows": rows, "config": config}


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


def save_table(out_dir, table):
    from common import _to_jsonable

    results = Path(out_dir) / "results"
    atomic_write_bytes(results / f"{TABLE_NAME}.json",
                       (json.dumps(_to_jsonable(table), indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(results / f"{TABLE_NAME}.tex", table_tex(table).encode())


# ---------------------------------------------------------------------------------------- plot

COLORS = {"gp": ("Reds", "r"), "hypernet_fixed": ("Greens", "g"), "hypernet_stochastic": ("Blues", "b")}
EXTENT = (0.6, 1.1)               # hexbin axes, both
LOSS_TICKS = (0.7, 0.8, 0.9, 1.0)
ERROR_RANGE = (-0.35, 0.6)        # histogram x range
ERROR_TICKS = (-0.2, 0.0, 0.2, 0.4, 0.6)
FONT_SIZE = 32
HEXBIN_GRID = 60
HIST_BINS = 50


def _clean_axes(ax):
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot(summary, arrays, out_dir):
    """Figures learn_vs_true_loss_scatter / _hist (three panels each) and the six single panels."""
    import matplotlib.pyplot as plt

    from plotting import close, save_figure, save_panel, set_paper_style

    set_paper_style(FONT_SIZE)
    true = arrays["true"]
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 7), sharey=True)
    for ax, name in zip(axes, MODELS, strict=True):
        ax.hexbin(true, arrays[f"inferred_{name}"], gridsize=HEXBIN_GRID, cmap=COLORS[name][0], mincnt=1,
                  extent=EXTENT + EXTENT, linewidths=0.2)
        ax.plot(EXTENT, EXTENT, "k-", linewidth=1)
        ax.set_xlim(EXTENT)
        ax.set_ylim(EXTENT)
        ax.set_xticks(LOSS_TICKS)
        ax.set_yticks(LOSS_TICKS)
        ax.tick_params(length=0)
        _clean_axes(ax)
    fig.tight_layout()
    written += save_figure(fig, "learn_vs_true_loss_scatter", out_dir)
    for i, ax in enumerate(axes):
        written += save_panel(fig, ax, f"ax{i}_scatter", out_dir, pad=(1.05, 1.05))
    close(fig)

    errors = {name: arrays[f"inferred_{name}"] - true for name in MODELS}
    fig, axes = plt.subplots(1, 3, figsize=(16, 7), sharey=True)
    for ax, name in zip(axes, MODELS, strict=True):
        ax.hist(errors[name], bins=HIST_BINS, density=True, color=COLORS[name][1], histtype="stepfilled")
        ax.axvline(0.0, color="k", linestyle="--", linewidth=1)
        ax.set_xlim(ERROR_RANGE)
        ax.set_xticks(ERROR_TICKS)
        ax.set_xticklabels([f"{t:.1f}".replace("-", "\u2212") for t in ERROR_TICKS])
        ax.set_yticks([])
        ax.tick_params(length=0)
        _clean_axes(ax)
    fig.tight_layout()
    written += save_figure(fig, "learn_vs_true_loss_hist", out_dir)
    for i, ax in enumerate(axes):
        written += save_panel(fig, ax, f"ax{i}_hist", out_dir, pad=(1.05, 1.05))
    close(fig)
    return written


# ----------------------------------------------------------------------------------------- CLI

def build_config(args):
    overrides = dict(QUICK) if args.quick else {}
    overrides.update(seed=args.seed, synthetic=args.synthetic)
    if args.n_train_tuples is not None:
        overrides["n_train_tuples"] = args.n_train_tuples
    if args.n_models is not None:
        overrides["n_models"] = args.n_models
    if args.gt_steps is not None:
        overrides["gt_steps"] = args.gt_steps
    if args.float64:
        overrides["gt_dtype"] = "float64"
    if args.log_every is not None:
        overrides["log_every"] = args.log_every
    return dataclasses.replace(Config(), **overrides)


def parse_args(argv):
    parser = experiment_parser("Learned versus true validation loss: GP and hypernetworks (paper Figure 6).")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                        help="processes for the ground truth (joblib; results identical for any N; default: all cores)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the ground truth, ignoring its cache")
    parser.add_argument("--cache-dir", default=None, help=f"ground-truth cache folder (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--n-train-tuples", type=positive_int, default=None,
                        help="(lambda, loss) tuples that train the surrogates (default 25)")
    parser.add_argument("--n-models", type=positive_int, default=None, help="ground-truth models (default 10240)")
    parser.add_argument("--gt-steps", type=positive_int, default=None, help="Adam steps per ground-truth model (1000)")
    parser.add_argument("--float64", action="store_true", help="train the ground truth in float64 (about 2x slower)")
    parser.add_argument("--table", action="store_true",
                        help="also run the budgets 10/25/100/250/1000 -> results/gp_vs_hypernet_table.json/.tex")
    return parser.parse_args(argv)


def main(argv=None):
    from plotting import resolve_out_dir

    args = parse_args(argv)
    out_dir = resolve_out_dir(args.out_dir)
    if args.replot:
        summary, arrays = load_results(out_dir, NAME)
        for path in plot(summary, arrays, out_dir):
            print(f"wrote {path}")
        return 0
    config = build_config(args)
    splits = load_splits(config, args.data_dir)
    summary, arrays, table = run(config, splits, jobs=args.jobs, cache_dir=args.cache_dir or DEFAULT_CACHE_DIR,
                                 use_cache=not args.no_cache, table=args.table)
    save_results(out_dir, NAME, summary, arrays)
    if table is not None:
        save_table(out_dir, table)
    for name in MODELS:
        s = summary[name]
        print(f"{name}: error mean {s['error_mean']:+.4f}, std {s['error_std']:.4f}, "
              f"true loss at predicted best {s['predicted_best_true_loss']:.4f}")
    print(f"true best {summary['true_best']:.4f}; {summary['seconds']:.0f} s in total")
    if table is not None:
        for name, row in table["rows"].items():
            print(f"table {name}: " + " ".join(f"{x:.3f}" for x in row))
    plot(summary, arrays, out_dir)
    print(f"figures in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
