"""Shared pieces of the two small MNIST experiments (SPEC sections 2-4): objective, cross-validation, lambda*.

The elementary model is linear 784 -> 10; its 7,850 weights are handled as flat rows, K at a time:
flat weights (K, 7850) pair with K scalar hyperparameters lambdas (K,). Objective per row:
    gaussian_nll(predictions, targets) + exp(lambda) * ||w||_2    (training; SPEC section 2)
    gaussian_nll(predictions, targets)                             (validation / test)
Cross-validation trains K fresh elementary models at K lambdas as ONE stacked Adam problem.
"""
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np

from common import check_finite
from data_loader import Splits, load_mnist, small_splits, synthetic_mnist
from neural_network import flatten_params, gaussian_nll, init_mlp, norm_regulariser
from optimizers import adam, stacked_grad

LAYER_SIZES = (784, 10)     # the elementary linear model
N_WEIGHTS = 784 * 10 + 10   # flattened: W row-major, then b
EVAL_CHUNK = 50             # weight rows per evaluation pass: bounds the (chunk, N, 10) predictions in memory

# Sizes of the small splits. The synthetic stand-in (tests only) has 2,000 training and 500 test images.
REAL_SPLIT = dict(n_train=10, n_valid=10000, n_test=10000)
SYNTHETIC_SPLIT = dict(n_train=10, n_valid=1000, n_test=500)


# ------------------------------------------------------------------------------------------- data

def load_small_splits(data_dir=None, synthetic=False):
    """Train (10) / valid (10,000) / test (10,000) splits of SPEC section 1, images augmented to (N, 785).

    synthetic=True uses the small stand-in of data_loader (tests only), with a 1,000-image validation set."""
    if synthetic:
        return augment_splits(small_splits(synthetic_mnist(), **SYNTHETIC_SPLIT))
    return augment_splits(small_splits(load_mnist(data_dir), **REAL_SPLIT))


# -------------------------------------------------------------------------------------- objective

def augment(inputs):
    """Append a constant-1 input: (N, 784) -> (N, 785), so that the bias is the last weight row."""
    return np.hstack([inputs, np.ones((len(inputs), 1))])


def augment_splits(splits):
    """The same splits with augmented images (N, 785); the labels are unchanged."""
    return splits._replace(train_x=augment(splits.train_x), valid_x=augment(splits.valid_x),
                           test_x=augment(splits.test_x))


def predict(flat_weights, inputs_aug):
    """K linear models: flat (K, 7850), augmented inputs (N, 785) -> (K, N, 10).

    A flat row is W (784 x 10, row-major) then b (10), i.e. exactly a (785, 10) matrix whose last row is
    b; with the constant-1 input column, x @ W + b is one batched matmul, with no slicing or transposes
    (same numbers as neural_network.batched_mlp_predict(unflatten_batch(...)), several times faster)."""
    return anp.matmul(inputs_aug, anp.reshape(flat_weights, (-1, LAYER_SIZES[0] + 1, LAYER_SIZES[1])))


def prediction_loss(flat_weights, inputs_aug, targets):
    """Gaussian NLL (sigma 0.1) of K models: flat (K, 7850), inputs (N, 785), targets (N, 10) -> (K,)."""
    return gaussian_nll(predict(flat_weights, inputs_aug), targets)


def training_objective(flat_weights, lambdas, inputs_aug, targets):
    """NLL + exp(lambda) ||w||_2 per row: flat (K, 7850), lambdas (K,) -> (K,)."""
    return prediction_loss(flat_weights, inputs_aug, targets) + norm_regulariser(flat_weights, lambdas)


def evaluate_loss(flat_weights, inputs_aug, targets, chunk=EVAL_CHUNK):
    """prediction_loss for many rows without autograd, `chunk` rows at a time: (K, 7850) -> (K,) numpy."""
    flat_weights = np.asarray(flat_weights)
    return np.concatenate([np.asarray(prediction_loss(flat_weights[k:k + chunk], inputs_aug, targets))
                           for k in range(0, len(flat_weights), chunk)])


def elementary_init(init_scale, seed):
    """The flat (7850,) initial elementary weights, init_scale * N(0, 1) from RandomState(seed)."""
    return flatten_params(init_mlp(LAYER_SIZES, init_scale, np.random.RandomState(seed)))


# ------------------------------------------------------------------------------- cross-validation

def train_elementary(lambdas, train_x, train_y, init_scale, seed, step_size, num_iters):
    """K fresh models (identical init) at K lambdas, Adam on the stacked objective: (K,) -> flat (K, 7850).

    train_x: augmented (N, 785). Every model starts from the same RandomState(seed) draw (SPEC section 3)."""
    lambdas = np.asarray(lambdas, dtype=float)
    w0 = np.tile(elementary_init(init_scale, seed), (len(lambdas), 1))
    # Row k of the summed objective depends on row k only, so this is K independent Adam runs.
    grad = stacked_grad(lambda w, i: training_objective(w, lambdas, train_x, train_y))
    return adam(grad, w0, num_iters=num_iters, step_size=step_size)


class CVResult(NamedTuple):
    """Cross-validation at the SPEC points and the dense sweep that locates lambda*."""

    lambdas: np.ndarray        # (10,) linspace(-1, 3, 10)
    train_loss: np.ndarray     # (10,) training objective (with regulariser) of each optimised model
    valid_loss: np.ndarray     # (10,) validation NLL
    test_loss: np.ndarray      # (10,) test NLL
    sweep_lambdas: np.ndarray  # (S,) the dense grid
    sweep_valid: np.ndarray    # (S,) validation NLL on that grid
    lambda_star: float         # argmin of sweep_valid, refined by a parabola through its neighbours


def parabola_argmin(xs, ys):
    """Grid argmin refined by the vertex of the parabola through it and its two neighbours: float.

    Falls back to the grid point at either end of the grid or when the three points are not convex."""
    i = int(np.argmin(ys))
    if i == 0 or i == len(ys) - 1:
        return float(xs[i])
    (x0, x1, x2), (y0, y1, y2) = xs[i - 1:i + 2], ys[i - 1:i + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 ** 2 * (y0 - y1) + x1 ** 2 * (y2 - y0) + x0 ** 2 * (y1 - y2)) / denom
    if a <= 0:
        return float(xs[i])
    return float(np.clip(-b / (2 * a), x0, x2))


def cross_validate(splits: Splits, cv_lambdas, sweep_lambdas, init_scale, seed, step_size, num_iters):
    """Train one elementary model per lambda of both grids in ONE stacked run; returns CVResult.

    splits: augmented (load_small_splits). cv_lambdas (10,) give the crosses, sweep_lambdas (S,) lambda*."""
    cv_lambdas, sweep_lambdas = np.asarray(cv_lambdas, float), np.asarray(sweep_lambdas, float)
    lambdas = np.concatenate([cv_lambdas, sweep_lambdas])
    weights = train_elementary(lambdas, splits.train_x, splits.train_y, init_scale, seed, step_size, num_iters)
    n = len(cv_lambdas)
    train = np.asarray(training_objective(weights[:n], cv_lambdas, splits.train_x, splits.train_y))
    check_finite(train, num_iters, "cross-validation training objective")
    valid = evaluate_loss(weights, splits.valid_x, splits.valid_y)
    test = evaluate_loss(weights[:n], splits.test_x, splits.test_y)
    return CVResult(cv_lambdas, train, valid[:n], test, sweep_lambdas, valid[n:],
                    parabola_argmin(sweep_lambdas, valid[n:]))


def grid(lo, hi, count):
    """linspace(lo, hi, count) as float64: (count,)."""
    return np.linspace(lo, hi, count)


def mean_objective(flat_weights, lambdas, inputs, targets):
    """Mean training objective over K rows: a scalar (the hypernetwork's objective)."""
    return anp.mean(training_objective(flat_weights, lambdas, inputs, targets))
