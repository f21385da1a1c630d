"""Shared pieces of the two small MNIST experiments (SPEC sections 2-4): objective, cross-validation, lambda*.

The elementary model is linear 784 -> 10; its 7,850 weights are handled as flat rows, K at a time:
flat weights (K, 7850) pair with K scalar hyperparameters lambdas (K,). Objective per row:
    gaussian_nll(predictions, targets) + exp(lambda) * ||w||_2    (training; SPEC section 2)
    gaussian_nll(predictions, targets)                             (validation / test)
Cross-validation trains K fresh elementary models at K lambdas as ONE stacked Adam problem.

Hot loops (issue 13; benchmark.py times them): global_step / global_step_reference (GlobalProblem) and
local_step / local_step_reference (LocalProblem): hand-written gradients with preallocated buffers, and the
autograd versions they equal to 1e-9. Each takes (problem, flat params, ...) and overwrites the parameters.
"""
import time
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad

from common import check_finite
from data_loader import Splits, small_splits
from neural_network import (
    LOG_SIGMA_CONST,
    flatten_params,
    gaussian_nll,
    init_mlp,
    mlp_predict,
    norm_regulariser,
    relu,
)
from optimizers import adam, adam_init, adam_inplace, adam_textbook, stacked_grad
from progress import Progress

LAYER_SIZES = (784, 10)     # the elementary linear model
N_WEIGHTS = 784 * 10 + 10   # flattened: W row-major, then b
EVAL_CHUNK = 50             # weight rows per evaluation pass: bounds the (chunk, N, 10) predictions in memory

# Sizes of the small splits. The synthetic stand-in (tests only) has 2,000 training and 500 test images.
REAL_SPLIT = dict(n_train=10, n_valid=10000, n_test=10000)
SYNTHETIC_SPLIT = dict(n_train=10, n_valid=1000, n_test=500)


# ------------------------------------------------------------------------------------------- data

def splits_of(data):
    """The small splits of loaded data (data_loader.MNIST), augmented: SPEC sizes for MNIST; for the synthetic
    stand-in of the tests (fewer training images than the SPEC split needs) the smaller SYNTHETIC_SPLIT."""
    needed = REAL_SPLIT["n_train"] + REAL_SPLIT["n_valid"]
    sizes = REAL_SPLIT if len(data.train_images) >= needed else SYNTHETIC_SPLIT
    return augment_splits(small_splits(data, **sizes))


class StepNormals:
    """Standard normal draws of common.step_rng(seed, step): the same numbers, from one generator reseeded per
    step (building a RandomState per step cost 0.1-0.3 ms, several percent of a fast step)."""

    def __init__(self, seed):
        self.seed, self.rng = int(seed), np.random.RandomState()

    def __call__(self, step, size):
        """(size,) draws of step `step`."""
        self.rng.seed(np.random.SeedSequence([self.seed, int(step)]).generate_state(1)[0])
        return self.rng.randn(size)


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
    with cv_progress(num_iters, len(lambdas)) as bar:
        return adam(grad, w0, callback=lambda w, i, g: bar.update(1), num_iters=num_iters, step_size=step_size)


def cv_progress(num_iters, n_models):
    """The progress.Progress of a cross-validation training run (num_iters Adam steps of n_models models)."""
    return Progress(total=num_iters, desc=f"cross-validation ({n_models} models)", unit="step")


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


GRADIENTS = ("handwritten", "autograd")  # the hot loops' two implementations (autograd: the slow reference)


def cross_validate(splits: Splits, cv_lambdas, sweep_lambdas, init_scale, seed, step_size, num_iters,
                   gradients="handwritten"):
    """Train one elementary model per lambda of both grids in ONE stacked run; returns CVResult.

    splits: augmented (splits_of). cv_lambdas (10,) give the crosses, sweep_lambdas (S,) lambda*.
    gradients: "handwritten" (train_elementary_handwritten) or "autograd" (train_elementary)."""
    cv_lambdas, sweep_lambdas = np.asarray(cv_lambdas, float), np.asarray(sweep_lambdas, float)
    lambdas = np.concatenate([cv_lambdas, sweep_lambdas])
    train = train_elementary_handwritten if gradients == "handwritten" else train_elementary
    weights = train(lambdas, splits.train_x, splits.train_y, init_scale, seed, step_size, num_iters)
    n = len(cv_lambdas)
    train = np.asarray(training_objective(weights[:n], cv_lambdas, splits.train_x, splits.train_y))
    check_finite(train, num_iters, "cross-validation training objective")
    valid = evaluate_loss(weights, splits.valid_x, splits.valid_y)
    test = evaluate_loss(weights[:n], splits.test_x, splits.test_y)
    return CVResult(cv_lambdas, train, valid[:n], test, sweep_lambdas, valid[n:],
                    parabola_argmin(sweep_lambdas, valid[n:]))


def cross_validate_config(splits, config):
    """cross_validate with a small script's Config (cv_lo/cv_hi/cv_count grid, sweep grid, cv_step_size,
    cv_iters, init_scale, seed, gradients); prints one summary line."""
    start = time.perf_counter()
    cv = cross_validate(splits, grid(config.cv_lo, config.cv_hi, config.cv_count),
                        grid(config.sweep_lo, config.sweep_hi, config.sweep_size),
                        config.init_scale, config.seed, config.cv_step_size, config.cv_iters, config.gradients)
    print(f"cross-validation: {config.cv_count} + {config.sweep_size} models x {config.cv_iters} steps, "
          f"lambda* = {cv.lambda_star:.3f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return cv


def interpolate(xs, ys, x):
    """ys(x) read off a grid by linear interpolation (xs increasing): float."""
    return float(np.interp(x, xs, ys))


def grid(lo, hi, count):
    """linspace(lo, hi, count) as float64: (count,)."""
    return np.linspace(lo, hi, count)


def mean_objective(flat_weights, lambdas, inputs, targets):
    """Mean training objective over K rows: a scalar (the hypernetwork's objective)."""
    return anp.mean(training_objective(flat_weights, lambdas, inputs, targets))


# ------------------------------------------------------------------- hot loops (SPEC sections 3, 4)
#
# Both small experiments spend their time in one step each; each step below has a hand-written, buffer-reusing
# version and the autograd version it must match (tests: to 1e-9 in float64 over several steps; benchmark.py
# times both). Notation for one batch of K lambdas:
#   X (N, 785) augmented training images, T (N, 10) one-hot targets, C = 10 outputs;
#   w_k (7850,) = the elementary weights at lambda_k, read as the (785, 10) matrix M_k (flat row = W then b);
#   R_k = X M_k - T (N, 10) the residuals;  J = (1/K) sum_k [50 mean(R_k^2) + const + exp(lambda_k) ||w_k||_2].
# Gradient of J with respect to w_k (the common start of both backward passes):
#   dJ/dM_k = (1/K) (100 / (N C)) X' R_k          (d/dR of 50 sum R^2 / (N C) is 100 R / (N C); R = X M - T)
#           + (1/K) exp(lambda_k) w_k / ||w_k||   (d||w|| / dw = w / ||w||)


class _TrainingTerm:
    """The K per-row training objectives J_k and the gradient of their weighted sum in the K weight rows,
    every buffer allocated once. row_weight 1/K: the gradient of the batch mean J (the hypernetworks);
    row_weight 1: each row's own gradient (K stacked elementary models, cross-validation)."""

    def __init__(self, train_x, train_y, batch_size, row_weight):
        self.x, self.t = np.ascontiguousarray(train_x), np.ascontiguousarray(train_y)
        n, c = self.t.shape
        self.k, self.row_weight = batch_size, row_weight
        self.loss_scale = 50.0 / (n * c)                    # 50 mean(R^2) = loss_scale * sum(R^2)
        self.grad_scale = row_weight * 100.0 / (n * c)      # row weight times 100 / (N C)
        self.residual = np.empty((batch_size, n, c))        # R_k, k = 0..K-1
        self.square = np.empty((batch_size, n, c))
        self.norms = np.empty(batch_size)
        self.coef = np.empty(batch_size)
        self.decay_grad = np.empty((batch_size, (LAYER_SIZES[0] + 1) * LAYER_SIZES[1]))   # coef_k w_k

    def value_and_weight_grad(self, weights, lambdas, weight_grad):
        """J_k (K,) for weights (K, 7850) at lambdas (K,); writes d(sum_k row_weight J_k)/dweights into
        weight_grad (K, 7850)."""
        k, (n_in, n_out) = self.k, (LAYER_SIZES[0] + 1, LAYER_SIZES[1])
        matrices = weights.reshape(k, n_in, n_out)
        np.matmul(self.x, matrices, out=self.residual)      # X M_k
        self.residual -= self.t                             # R_k = X M_k - T
        np.square(self.residual, out=self.square)
        nll = self.loss_scale * self.square.sum(axis=(1, 2)) + LOG_SIGMA_CONST   # (K,)
        np.sqrt(np.einsum("ij,ij->i", weights, weights), out=self.norms)          # ||w_k||
        exp_lambdas = np.exp(lambdas)
        objectives = nll + exp_lambdas * self.norms
        # dJ/dM_k = row_weight [(100 / (N C)) X' R_k + (exp(lambda_k) / ||w_k||) w_k]
        grad_matrices = weight_grad.reshape(k, n_in, n_out)
        np.matmul(self.x.T, self.residual, out=grad_matrices)
        grad_matrices *= self.grad_scale
        np.divide(exp_lambdas, self.norms, out=self.coef)
        self.coef *= self.row_weight
        np.multiply(self.coef[:, None], weights, out=self.decay_grad)
        weight_grad += self.decay_grad
        return objectives


def train_elementary_handwritten(lambdas, train_x, train_y, init_scale, seed, step_size, num_iters):
    """train_elementary with the hand-written gradient of _TrainingTerm and the in-place Adam: (K,) -> (K, 7850).

    Same arguments and, up to rounding, the same numbers (tests: 1e-9); no autograd trace per step."""
    lambdas = np.asarray(lambdas, dtype=float)
    weights = np.tile(elementary_init(init_scale, seed), (len(lambdas), 1))
    term = _TrainingTerm(train_x, train_y, len(lambdas), row_weight=1.0)
    grad, scratch, state = np.empty_like(weights), np.empty(weights.size), adam_init(weights)
    with cv_progress(num_iters, len(lambdas)) as bar:
        for _ in range(num_iters):
            term.value_and_weight_grad(weights, lambdas, grad)
            state = adam_inplace(weights, grad, state, step_size, scratch)
            bar.update(1)
    return weights


# ----------------------------------------------------------------- global step (Algorithm 2, SPEC 3)
#
# Hypernetwork [1, H, 7850], ReLU (flat parameters in autograd.misc.flatten order: W1 (1, H), b1 (H,),
# W2 (H, 7850), b2 (7850,)). Forward for lambdas l (K,):
#   Z = l W1 + b1 (K, H);   A = relu(Z);   w = A W2 + b2 (K, 7850)
# Backward from G = dJ/dw (K, 7850) (see _TrainingTerm):
#   dW2 = A' G;   db2 = sum_k G_k;   dA = G W2';   dZ = dA * [Z > 0];   dW1 = l' dZ;   db1 = sum_k dZ_k
# then one Adam step on the flat parameters (optimizers.adam_inplace).

def global_param_shapes(hidden_units):
    """Shapes of the global hypernetwork's parameters, in flat order: [(1, H), (H,), (H, 7850), (7850,)]."""
    return [(1, hidden_units), (hidden_units,), (hidden_units, N_WEIGHTS), (N_WEIGHTS,)]


def _views(flat, shapes):
    """Reshaped views of consecutive pieces of a flat vector."""
    views, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        views.append(flat[start:start + size].reshape(shape))
        start += size
    return views


class GlobalProblem:
    """Data and preallocated buffers of the global step for one batch size: build once, step many times.

    train_x: augmented (N, 785); train_y (N, 10); hidden_units H; batch_size K."""

    def __init__(self, train_x, train_y, hidden_units, batch_size):
        self.shapes = global_param_shapes(hidden_units)
        self.size = sum(int(np.prod(s)) for s in self.shapes)
        self.train_x, self.train_y, self.hidden_units, self.batch_size = train_x, train_y, hidden_units, batch_size
        self.term = _TrainingTerm(train_x, train_y, batch_size, row_weight=1.0 / batch_size)
        self.grad = np.empty(self.size)                      # dJ/dparams, flat
        self.scratch = np.empty(self.size)                   # adam_inplace's work buffer
        self.pre = np.empty((batch_size, hidden_units))      # Z
        self.hidden = np.empty((batch_size, hidden_units))   # A
        self.hidden_t = np.empty((hidden_units, batch_size))  # A' (contiguous: a faster GEMM for dW2)
        self.active = np.empty((batch_size, hidden_units), dtype=bool)  # [Z > 0]
        self.dhidden = np.empty((batch_size, hidden_units))  # dA, then dZ
        self.weights = np.empty((batch_size, N_WEIGHTS))     # w
        self.weight_grad = np.empty((batch_size, N_WEIGHTS))  # G


def global_flat_params(hyper_params):
    """[(W1, b1), (W2, b2)] -> flat (P,) float64 in autograd.misc.flatten order (a copy)."""
    return np.concatenate([np.ravel(p) for layer in hyper_params for p in layer]).astype(float)


def global_params_list(problem, flat):
    """Flat (P,) -> [(W1, b1), (W2, b2)] as views (the shapes of neural_network.init_hypernet)."""
    W1, b1, W2, b2 = _views(flat, problem.shapes)
    return [(W1, b1), (W2, b2)]


def global_step(problem, params, state, lambdas, step_size):
    """One hand-written global step: objective and gradient at lambdas (K,), then Adam, all in place.

    problem: GlobalProblem; params: flat (P,) float64, overwritten with the new parameters; state:
    optimizers.AdamState (its m, v are overwritten). Returns (objective before the step: float, new state).
        problem = GlobalProblem(splits.train_x, splits.train_y, 50, 10)
        params = global_flat_params(init_hypernet(...)); state = adam_init(params)
        objective, state = global_step(problem, params, state, lambdas, 1e-4)"""
    p = problem
    W1, b1, W2, b2 = _views(params, p.shapes)
    gW1, gb1, gW2, gb2 = _views(p.grad, p.shapes)
    # forward: Z = l W1 + b1, A = relu(Z), w = A W2 + b2
    np.multiply(lambdas[:, None], W1, out=p.pre)
    p.pre += b1
    np.maximum(p.pre, 0.0, out=p.hidden)
    np.dot(p.hidden, W2, out=p.weights)
    p.weights += b2
    objective = float(np.mean(p.term.value_and_weight_grad(p.weights, lambdas, p.weight_grad)))
    # backward: dW2 = A' G, db2 = sum_k G_k, dZ = (G W2') * [Z > 0], dW1 = l' dZ, db1 = sum_k dZ_k
    np.copyto(p.hidden_t, p.hidden.T)
    np.dot(p.hidden_t, p.weight_grad, out=gW2)
    np.sum(p.weight_grad, axis=0, out=gb2)
    np.dot(p.weight_grad, W2.T, out=p.dhidden)
    np.greater(p.pre, 0.0, out=p.active)
    p.dhidden *= p.active
    np.dot(lambdas[None, :], p.dhidden, out=gW1)
    np.sum(p.dhidden, axis=0, out=gb1)
    return objective, adam_inplace(params, p.grad, state, step_size, p.scratch)


def global_step_reference(problem, params, state, lambdas, step_size):
    """The same step with autograd's gradient and optimizers.adam_textbook: same contract as
    global_step (params overwritten; returns (objective, new state)); slow, the reference of the tests."""
    def objective(flat):
        W1, b1, W2, b2 = [anp.reshape(piece, shape) for piece, shape in
                          zip(anp.split(flat, np.cumsum([int(np.prod(s)) for s in problem.shapes])[:-1]),
                              problem.shapes, strict=True)]
        weights = mlp_predict([(W1, b1), (W2, b2)], anp.reshape(lambdas, (-1, 1)), relu)
        return mean_objective(weights, lambdas, problem.train_x, problem.train_y)

    value, grad = value_and_grad(objective)(params)
    new_params, state = adam_textbook(params, grad, state, step_size)
    params[...] = new_params
    return float(value), state


# ---------------------------------------------------------------- local step (Algorithm 3, SPEC 4)
#
# Linear hypernetwork w(l) = l a + c (flat parameters: a (7850,) then c (7850,), i.e. [(a (1, 7850), c)]).
# 1. SGD on J at the sampled lambdas l (K,): from G = dJ/dw (K, 7850), da = l' G, dc = sum_k G_k;
#    a -= s da, c -= s dc.
# 2. Validation loss at lambda_hat and its slope, through the Gram matrix of the validation set.
#    With V (Nv, 785) the augmented validation images, Y (Nv, 10) the targets, M = reshape(w(lambda_hat)),
#    D = reshape(a) = dM/dlambda_hat, S = V'V (785, 785), P = V'Y (785, 10), yy = sum(Y^2):
#      sum (V M - Y)^2 = tr(M' S M) - 2 tr(M' P) + yy          so  L = 50 / (Nv C) * that + const;
#      dL/dlambda_hat = 100 / (Nv C) sum((V M - Y) * (V D)) = 100 / (Nv C) tr(D' (S M - P)).
#    One (785, 785) @ (785, 10) product per step instead of (Nv, 785) @ (785, 20): the same numbers up to
#    rounding, 785 / Nv of the work. S, P, yy are computed once per run.
# 3. One Adam step of lambda_hat on that slope (state carried across steps; optimizers.adam_inplace).

class LocalProblem:
    """Data, validation Gram matrix and buffers of the local step: build once per run, step many times.

    train_x, valid_x: augmented (N, 785); train_y, valid_y (N, 10); batch_size K (lambdas per step)."""

    def __init__(self, train_x, train_y, valid_x, valid_y, batch_size):
        self.train_x, self.train_y, self.valid_x, self.valid_y = train_x, train_y, valid_x, valid_y
        self.batch_size = batch_size
        self.term = _TrainingTerm(train_x, train_y, batch_size, row_weight=1.0 / batch_size)
        self.gram = valid_x.T @ valid_x                     # S (785, 785)
        self.cross = valid_x.T @ valid_y                    # P (785, 10)
        self.target_square = float(np.sum(valid_y ** 2))    # yy
        self.valid_scale = 50.0 / valid_y.size              # L = valid_scale * sum(...) + const
        self.weights = np.empty((batch_size, N_WEIGHTS))    # w(l_k)
        self.weight_grad = np.empty((batch_size, N_WEIGHTS))  # G
        self.grad = np.empty(2 * N_WEIGHTS)                 # (da, dc)
        self.matrix = np.empty((N_WEIGHTS // 10, 10))       # M
        self.product = np.empty((N_WEIGHTS // 10, 10))      # S M
        self.slope = np.empty(1)                            # dL/dlambda_hat, Adam's gradient
        self.scratch = np.empty(1)                          # adam_inplace's work buffer for lambda_hat


def local_valid_loss_and_slope(problem, params, lambda_hat):
    """Validation loss of w(lambda_hat) and its derivative in lambda_hat, through the Gram matrix: two floats.

    params: flat (15700,) = (a, c); lambda_hat: float. See step 2 of the comment above."""
    p, (n_in, n_out) = problem, (LAYER_SIZES[0] + 1, LAYER_SIZES[1])
    a, c = params[:N_WEIGHTS], params[N_WEIGHTS:]
    np.multiply(a, lambda_hat, out=p.matrix.reshape(-1))
    p.matrix.reshape(-1)[...] += c                          # M = lambda_hat a + c
    np.dot(p.gram, p.matrix, out=p.product)                 # S M
    quadratic = np.vdot(p.matrix, p.product) - 2.0 * np.vdot(p.matrix, p.cross) + p.target_square
    p.product -= p.cross                                    # S M - P
    slope = 2.0 * p.valid_scale * np.vdot(a.reshape(n_in, n_out), p.product)   # 100 / (Nv C) tr(D'(SM - P))
    return float(p.valid_scale * quadratic + LOG_SIGMA_CONST), float(slope)


def local_step(problem, params, lambda_hat, state, lambdas, hypernet_step_size, hyper_step_size):
    """One hand-written outer step of Algorithm 3: hypernetwork SGD at lambdas (K,), then Adam on lambda_hat.

    problem: LocalProblem; params: flat (15700,) = (a, c), overwritten; lambda_hat: (1,) float64, overwritten;
    state: optimizers.AdamState of lambda_hat. Returns (training objective before the SGD step, validation loss
    at lambda_hat after it, its slope, new state).
        problem = LocalProblem(splits.train_x, splits.train_y, splits.valid_x, splits.valid_y, 10)
        params = local_flat_params(init_hypernet("linear", ...)); lambda_hat = np.array([-3.5])
        state = adam_init(lambda_hat)
        objective, valid, slope, state = local_step(problem, params, lambda_hat, state, lambdas, 1e-4, 0.01)"""
    p = problem
    a, c = params[:N_WEIGHTS], params[N_WEIGHTS:]
    np.multiply(lambdas[:, None], a, out=p.weights)
    p.weights += c                                          # w(l_k) = l_k a + c
    objective = float(np.mean(p.term.value_and_weight_grad(p.weights, lambdas, p.weight_grad)))
    da, dc = p.grad[:N_WEIGHTS], p.grad[N_WEIGHTS:]
    np.dot(lambdas, p.weight_grad, out=da)                  # da = l' G
    np.sum(p.weight_grad, axis=0, out=dc)                   # dc = sum_k G_k
    p.grad *= hypernet_step_size
    params -= p.grad                                        # SGD, no momentum
    valid, slope = local_valid_loss_and_slope(p, params, float(lambda_hat[0]))
    p.slope[0] = slope
    state = adam_inplace(lambda_hat, p.slope, state, hyper_step_size, p.scratch)
    return objective, valid, slope, state


def local_flat_params(hyper_params):
    """[(a (1, 7850), c (7850,))] -> flat (15700,) float64 (a copy)."""
    (a, c), = hyper_params
    return np.concatenate([np.ravel(a), np.ravel(c)]).astype(float)


def local_step_reference(problem, params, lambda_hat, state, lambdas, hypernet_step_size, hyper_step_size):
    """The same step with autograd: the SGD gradient of J, the validation loss and its slope through the full
    (Nv, 785) validation set, and optimizers.adam_textbook. Same contract as local_step; slow (the reference)."""
    def training(flat):
        weights = anp.reshape(lambdas, (-1, 1)) * flat[:N_WEIGHTS] + flat[N_WEIGHTS:]
        return mean_objective(weights, lambdas, problem.train_x, problem.train_y)

    def validation(lam, flat):
        weights = anp.reshape(lam * flat[:N_WEIGHTS] + flat[N_WEIGHTS:], (1, N_WEIGHTS))
        return prediction_loss(weights, problem.valid_x, problem.valid_y)[0]

    objective, grad = value_and_grad(training)(params)
    params[...] = params - hypernet_step_size * grad
    valid, slope = value_and_grad(validation)(float(lambda_hat[0]), params)
    new_lambda, state = adam_textbook(lambda_hat, np.array([slope]), state, hyper_step_size)
    lambda_hat[...] = new_lambda
    return float(objective), float(valid), float(slope), state
