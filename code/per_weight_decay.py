"""Shared machinery of the large experiments (SPEC section 7): splits, per-weight decay, Algorithm 3/4 and the
elementary models' hand-written backpropagation and the hypernetworks' steps (the timed loop is budget.py).

Used by hypernets_local_large.py and compare_number_layers.py (and usable by any script that hyper-trains a
hypernetwork jointly with its hyperparameters). The public API:

* `large_splits(data)`                        train / valid / test of 10,000 images each (indices below).
* `decay_objective(layer_sizes)`              per-weight decay training objective, for `HyperProblem`.
* `mse_loss(layer_sizes)`                     plain MSE of flat weights, the validation / test loss.
* `HyperProblem`, `Alg3Settings`              what to optimise and how (Algorithm 3 "joint" or 4 "simplified").
* `init_alg3(problem, settings, seed)`        -> Alg3State (hypernetwork, lambda_hat, both Adam states).
* `alg3_step(state, step, problem, settings, seed, reference=False)` -> Alg3State: one hyperparameter
                                              step; hand-written gradients (Alg3Stepper) for decay_objective /
                                              mse_loss problems with linear or factorised hypernetworks, else
                                              (and with reference=True) `alg3_step_reference`, the autograd path.
* `current_weights(state, settings)`          the hypernetwork's elementary weights at lambda_hat, (1, P).
* `StepStreams(seed)(step, *keys)`            common.step_rng's numbers from one reseeded RandomState.
* The timed loop (`Budget`, `BudgetedRun`, `run_budgeted`, `run_interleaved`, `time_to_reach`) is in budget.py.

Splits (`large_splits`): train = MNIST training images 0..9,999, valid = training images 10,000..19,999,
test = the 10,000 official test images. Everything is float64; flat elementary weights follow
neural_network.flatten_params (W row-major then b, layer after layer).
"""
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import grad

from common import check_finite, step_rng
from data_loader import small_splits
from neural_network import (
    batched_mlp_predict,
    hypernet_activation,
    hypernet_weights,
    identity,
    init_hypernet,
    mse,
    num_params,
    per_weight_l2,
    unflatten_batch,
)
from optimizers import ADAM_BLOCK, AdamState, adam_init, adam_inplace, adam_textbook

N_TRAIN, N_VALID, N_TEST = 10000, 10000, 10000  # SPEC section 7 (paper macros)

# Random-stream keys for step_rng(seed, step, key): separate, reproducible streams per purpose.
STREAM_SAMPLES, STREAM_TRAIN_BATCH, STREAM_VALID_BATCH = 1, 2, 3


# ------------------------------------------------------------------------------------------- data

class StepStreams:
    """step_rng(seed, step, *keys) without building a RandomState per call: one persistent RandomState,
    reseeded with the same entropy (rs.seed(e) reproduces RandomState(e) bit for bit, ~3 us instead of
    ~100 us). The returned generator is shared: draw from it before the next call."""

    def __init__(self, seed):
        self.seed = int(seed)
        self.rs = np.random.RandomState(0)

    def __call__(self, step, *keys):
        entropy = np.random.SeedSequence([self.seed, int(step), *map(int, keys)]).generate_state(1)[0]
        self.rs.seed(entropy)
        return self.rs


def large_splits(data, n_train=N_TRAIN, n_valid=N_VALID, n_test=N_TEST):
    """Train = training images [0, n_train), valid = [n_train, n_train + n_valid), test = first n_test test images."""
    return small_splits(data, n_train, n_valid, n_test)


def minibatch(x, y, batch_size, rs):
    """batch_size rows drawn uniformly with replacement (RandomState rs): (x (B, D), y (B, C))."""
    idx = rs.randint(0, len(x), size=batch_size)
    return x[idx], y[idx]


# ------------------------------------------------------------------------------------- objectives

def mse_loss(layer_sizes):
    """Validation/test loss of flat weights: f(flat (K, P), x (N, D), y (N, C)) -> (K,) plain MSE."""
    def loss(flat, x, y):
        return mse(batched_mlp_predict(unflatten_batch(flat, layer_sizes), x), y)
    loss.hand_gradient = ("mse", tuple(layer_sizes))  # lets alg3_step take the hand-written gradient
    return loss


def decay_objective(layer_sizes):
    """Training objective with one decay per weight and bias (SPEC section 7):
    f(flat (K, P), lambdas (K, P), x, y) = MSE(net(x), y) + sum_j exp(lambda_j) w_j^2, shape (K,)."""
    loss = mse_loss(layer_sizes)

    def objective(flat, lambdas, x, y):
        return loss(flat, x, y) + per_weight_l2(flat, lambdas)
    objective.hand_gradient = ("decay", tuple(layer_sizes))  # (as above)
    return objective


# ---------------------------------------------------------------------------------- Algorithm 3/4

class HyperProblem(NamedTuple):
    """What Algorithm 3 optimises.

    train_objective(flat (K, P), lambdas (K, H), x, y) -> (K,); valid_loss(flat (K, P), x, y) -> (K,);
    data arrays are (N, D) images and (N, C) targets; n_hypers = H, n_weights = P."""

    train_objective: Callable
    valid_loss: Callable
    train_x: np.ndarray
    train_y: np.ndarray
    valid_x: np.ndarray
    valid_y: np.ndarray
    n_hypers: int
    n_weights: int


@dataclass(frozen=True)
class Alg3Settings:
    """Hyper-training settings (defaults: SPEC section 7, the paper's text and macros)."""

    hypernet_kind: str = "factorised"  # 'factorised' [H, hidden, P] linear; 'linear' [H, P]; 'mlp' (ReLU)
    hidden: int = 10                   # bottleneck units of a factorised / mlp hypernetwork
    init_scale: float = 1e-3           # hypernetwork init: init_scale * N(0, 1) (not stated in the paper)
    init_lambda: float = -7.0          # every entry of lambda_hat at the start (not stated in the paper)
    algorithm: str = "joint"           # 'joint' = Algorithm 3 (sampled lambdas); 'simplified' = Algorithm 4
    n_samples: int = 2                 # hyperparameter samples per hypernetwork step
    sample_sd: float = 1e-5            # lambda ~ N(lambda_hat, sd^2); the paper's "variance" used as an sd
    inner_steps: int = 10              # hypernetwork Adam steps per lambda_hat Adam step
    hypernet_step: float = 1e-4        # Adam step size of the hypernetwork
    lambda_step: float = 1e-4          # Adam step size of lambda_hat
    batch_size: int = 100              # training minibatch per hypernetwork step
    valid_batch_size: int = 100        # validation minibatch per lambda_hat step
    input_offset: float = 0.0          # the hypernetwork sees lambda - input_offset (a fixed shift of its input)


class Alg3State(NamedTuple):
    """Hypernetwork parameters [(W, b), ...] and lambda_hat (H,), their per-array Adam states, steps done."""

    phi: list
    lam: np.ndarray
    phi_adam: list
    lam_adam: object
    step: int


def init_alg3(problem, settings, seed, w0=None):
    """Fresh hypernetwork (RandomState(seed)) and lambda_hat = init_lambda everywhere; fresh Adam states.

    w0 (P,), optional: elementary weights to start from, written into the hypernetwork's output bias (the
    other hypernetwork parameters stay init_scale * N(0, 1), so w_phi(lambda_hat) starts close to w0)."""
    rs = np.random.RandomState(seed)
    phi = init_hypernet(settings.hypernet_kind, problem.n_hypers, problem.n_weights, settings.init_scale, rs,
                        hidden=settings.hidden)
    if w0 is not None:
        phi[-1] = (phi[-1][0], np.array(w0, dtype=float).reshape(problem.n_weights))
    lam = np.full(problem.n_hypers, float(settings.init_lambda))
    # phi and both Adam moments as views of one flat buffer each: Alg3Stepper then takes one Adam call
    # over all hypernetwork parameters (same numbers as one call per array)
    phi = _views_like(phi, np.concatenate([a.ravel() for layer in phi for a in layer]))
    phi_adam = [(AdamState(mW, vW, 0), AdamState(mb, vb, 0)) for (mW, mb), (vW, vb)
                in zip(_views_like(phi, np.zeros(_size(phi))), _views_like(phi, np.zeros(_size(phi))), strict=True)]
    return Alg3State(phi, lam, phi_adam, adam_init(lam), 0)


def _size(pairs):
    return sum(W.size + b.size for W, b in pairs)


def _views_like(pairs, flat):
    """[(W, b), ...] shaped like pairs, as consecutive views of the 1-D array flat."""
    out, start = [], 0
    for W, b in pairs:
        out.append((flat[start:start + W.size].reshape(W.shape), flat[start + W.size:start + W.size + b.size]))
        start += W.size + b.size
    return out


def _flat_base(arrays):
    """The 1-D buffer of which arrays are consecutive views covering all of it, or None."""
    base = arrays[0].base
    if base is None or base.ndim != 1 or not base.flags.c_contiguous or base.dtype != np.float64:
        return None
    offset = base.__array_interface__["data"][0]
    for a in arrays:
        root = a.base if a.base is not None else a
        while root.base is not None:
            root = root.base
        if (root is not base and a.base is not base) or a.__array_interface__["data"][0] != offset \
                or not a.flags.c_contiguous:
            return None
        offset += a.nbytes
    return base if offset == base.__array_interface__["data"][0] + base.nbytes else None


def _hypernet_grad(problem, activation, offset=0.0):
    """d/dphi of the mean training objective over the K sampled lambdas (K, H): f(phi, lambdas, x, y).

    For linear / factorised hypernetworks (identity activation) autograd only differentiates the elementary
    objective, giving delta = dF/dw (K, P); the hypernetwork's layers are then back-propagated by hand
    (g_W = h^T delta, g_b = sum_k delta, delta <- delta W^T), which avoids autograd's overhead on arrays
    of up to 1.9M entries. Other hypernetworks use autograd throughout."""
    if activation is not identity:
        def objective(phi, lambdas, x, y):
            weights = hypernet_weights(phi, lambdas - offset, activation)
            return anp.mean(problem.train_objective(weights, lambdas, x, y))
        return grad(objective)

    elementary_grad = grad(lambda w, lambdas, x, y: anp.mean(problem.train_objective(w, lambdas, x, y)))

    def phi_grad(phi, lambdas, x, y):
        inputs = [lambdas - offset]  # inputs[i] = input of layer i, (K, width)
        for W, b in phi[:-1]:
            inputs.append(np.dot(inputs[-1], W) + b)
        W, b = phi[-1]
        delta = elementary_grad(np.dot(inputs[-1], W) + b, lambdas, x, y)  # (K, P)
        grads = []
        for (W, _), h in zip(reversed(phi), reversed(inputs), strict=True):
            grads.append((np.dot(h.T, delta), np.sum(delta, axis=0)))
            delta = np.dot(delta, W.T)
        return grads[::-1]
    return phi_grad


def _lambda_grad(problem, activation, offset=0.0):
    """d/dlambda_hat of the validation loss of the hypernetwork's weights at lambda_hat (H,)."""
    def objective(lam, phi, x, y):
        return problem.valid_loss(hypernet_weights(phi, lam[None, :] - offset, activation), x, y)[0]
    return grad(objective)


def alg3_step(state, step, problem, settings, seed, reference=False):
    """One hyperparameter step of Algorithm 3 (joint) or 4 (simplified); returns the new Alg3State.

    The state's arrays are updated IN PLACE (speed: the hypernetwork can have 1.9M parameters); keep a
    copy (copy_state) if an older state is needed.

    (1) inner_steps Adam steps of phi on mean_k f_train(w_phi(lambda_k), lambda_k) over a training minibatch,
        lambda_k ~ N(lambda_hat, sample_sd^2) (joint, n_samples draws) or lambda_k = lambda_hat (simplified);
    (2) one Adam step of lambda_hat on f_valid(w_phi(lambda_hat)) over a validation minibatch.
    Random numbers come from step_rng(seed, inner step index, stream), so runs are reproducible.

    Problems built from decay_objective / mse_loss with a linear or factorised hypernetwork take the
    hand-written gradients of Alg3Stepper (preallocated buffers); reference=True (and every other problem)
    takes the autograd path, which Alg3Stepper equals to rounding (tests/test_per_weight_decay.py)."""
    if not reference and Alg3Stepper.supports(problem, settings):
        return _stepper(problem, settings, seed).step(state, step)
    return alg3_step_reference(state, step, problem, settings, seed)


def alg3_step_reference(state, step, problem, settings, seed):
    """alg3_step through autograd (the elementary objective and the lambda_hat gradient), a new RandomState
    per draw (common.step_rng) and textbook Adam with fresh arrays: the reference of Alg3Stepper."""
    activation = hypernet_activation(settings.hypernet_kind)
    offset = settings.input_offset
    phi_grad, lam_grad = _hypernet_grad(problem, activation, offset), _lambda_grad(problem, activation, offset)
    phi, phi_adam = state.phi, state.phi_adam
    for j in range(settings.inner_steps):
        inner = step * settings.inner_steps + j
        if settings.algorithm == "joint":
            noise = step_rng(seed, inner, STREAM_SAMPLES).randn(settings.n_samples, problem.n_hypers)
            lambdas = state.lam[None, :] + settings.sample_sd * noise
        else:
            lambdas = state.lam[None, :]
        x, y = minibatch(problem.train_x, problem.train_y, settings.batch_size,
                         step_rng(seed, inner, STREAM_TRAIN_BATCH))
        g = phi_grad(phi, lambdas, x, y)
        check_finite(g[-1][1], inner, "hypernetwork gradient")
        phi_adam = [(_adam_textbook_into(W, gW, sW, settings.hypernet_step),
                     _adam_textbook_into(b, gb, sb, settings.hypernet_step))
                    for (W, b), (gW, gb), (sW, sb) in zip(phi, g, phi_adam, strict=True)]
    x, y = minibatch(problem.valid_x, problem.valid_y, settings.valid_batch_size,
                     step_rng(seed, step, STREAM_VALID_BATCH))
    g_lam = lam_grad(state.lam, phi, x, y)
    check_finite(g_lam, step, "hyperparameter gradient")
    lam_adam = _adam_textbook_into(state.lam, g_lam, state.lam_adam, settings.lambda_step)
    return Alg3State(phi, state.lam, phi_adam, lam_adam, state.step + 1)


def _adam_textbook_into(x, g, state, step_size):
    """optimizers.adam_textbook, its results written back into x, state.m and state.v; the new AdamState."""
    x_new, new = adam_textbook(x, g, state, step_size)
    x[...], state.m[...], state.v[...] = x_new, new.m, new.v
    return AdamState(state.m, state.v, new.step)


# ---------------------------------------------------------------- hand-written Algorithm 3/4 step

def layer_slices(layer_sizes):
    """Where each layer lives in a flat weight vector: [(W slice, b slice, fan_in, fan_out), ...]."""
    out, start = [], 0
    for m, n in zip(layer_sizes[:-1], layer_sizes[1:], strict=False):
        out.append((slice(start, start + m * n), slice(start + m * n, start + m * n + n), m, n))
        start += m * n + n
    return out


class MLPBackprop:
    """Hand-written gradient of the MSE of K elementary MLPs (ReLU hidden layers, linear output) on one
    batch, with buffers preallocated for K weight sets and B rows.

    Forward, per weight set k (flat w_k, layers l = 1..L):  z_l = a_{l-1} W_l + b_l,  a_0 = x,
    a_l = relu(z_l) for l < L, output z_L (B, C). With L_k = mean over (B, C) of (z_L - y)^2 and an outer
    factor s (e.g. 1/K for a mean over the K sets), the chain rule gives
        delta_L = dF/dz_L = s * 2 (z_L - y) / (B C)
        dF/dW_l = a_{l-1}^T delta_l,  dF/db_l = sum over rows of delta_l
        delta_{l-1} = (delta_l W_l^T) * [a_{l-1} > 0]         (relu'(z) = [z > 0] = [relu(z) > 0])."""

    def __init__(self, layer_sizes, n_sets, batch_size):
        self.layers = layer_slices(layer_sizes)
        self.n_sets, self.batch_size = n_sets, batch_size
        self.acts = [np.empty((batch_size, n)) for *_, n in self.layers]     # a_l (z_L for the last)
        self.deltas = [np.empty((batch_size, n)) for *_, n in self.layers]   # delta_l
        self.masks = [np.empty((batch_size, n), dtype=bool) for *_, n in self.layers[:-1]]
        # a linear model with several weight sets: all K side by side, W_wide = [W_1 ... W_K] (D, K C),
        # so the two products are one (B, D) x (D, K C) GEMM each way instead of K skinny ones
        self.wide = len(self.layers) == 1 and n_sets > 1
        if self.wide:
            D, C = layer_sizes[0], layer_sizes[-1]
            self.W_wide, self.G_wide = np.empty((D, n_sets * C)), np.empty((D, n_sets * C))
            self.Z_wide = np.empty((batch_size, n_sets * C))

    def _linear_wide_into(self, w, x, y, factor, out):
        """grad_into for one layer and K > 1 sets: Z = x W_wide, delta = factor (Z + b - y) per set,
        G_wide = x^T delta (the same sums as per set), unpacked into out."""
        (sW, sb, D, C), = self.layers
        K = w.shape[0]
        for k in range(K):
            self.W_wide[:, k * C:(k + 1) * C] = w[k, sW].reshape(D, C)
        Z = self.Z_wide
        np.dot(x, self.W_wide, out=Z)
        Z3 = Z.reshape(len(x), K, C)
        Z3 += w[:, sb]                                   # + b_k
        Z3 -= y[:, None, :]
        Z *= factor                                      # delta_k = factor (z_k - y)
        np.dot(x.T, Z, out=self.G_wide)
        for k in range(K):
            out[k, sW].reshape(D, C)[...] = self.G_wide[:, k * C:(k + 1) * C]
        np.sum(Z3, axis=0, out=out[:, sb])
        return out

    def grad_into(self, w, x, y, scale, out):
        """out[k] = scale * d MSE(net_{w_k}(x), y) / d w_k for every k: w, out (K, P); x (B, D); y (B, C)."""
        last = len(self.layers) - 1
        factor = scale * 2.0 / (y.shape[0] * y.shape[1])  # d/dz of mean((z - y)^2) is 2 (z - y) / (B C)
        if self.wide and w.shape[0] == self.n_sets:
            return self._linear_wide_into(w, x, y, factor, out)
        for k in range(w.shape[0]):
            a = x
            for i, (sW, sb, m, n) in enumerate(self.layers):   # forward
                z = self.acts[i]
                np.dot(a, w[k, sW].reshape(m, n), out=z)
                z += w[k, sb]
                if i < last:
                    np.maximum(z, 0.0, out=z)                  # a_i = relu(z_i), in place
                a = z
            delta = self.deltas[last]                          # delta_L = factor (z_L - y)
            np.subtract(a, y, out=delta)
            delta *= factor
            for i in range(last, -1, -1):                      # backward
                sW, sb, m, n = self.layers[i]
                a_prev = x if i == 0 else self.acts[i - 1]
                np.dot(a_prev.T, delta, out=out[k, sW].reshape(m, n))   # dF/dW_i = a_{i-1}^T delta_i
                np.sum(delta, axis=0, out=out[k, sb])                   # dF/db_i
                if i > 0:                                      # delta_{i-1} = (delta_i W_i^T) [a_{i-1} > 0]
                    previous = self.deltas[i - 1]
                    np.dot(delta, w[k, sW].reshape(m, n).T, out=previous)
                    np.greater(a_prev, 0.0, out=self.masks[i - 1])
                    np.multiply(previous, self.masks[i - 1], out=previous)
                    delta = previous
        return out


class LinearHypernet:
    """Hand-written forward and backward of a hypernetwork without nonlinearity ('linear' [H, P] or
    'factorised' [H, r, P]), K inputs at a time, into preallocated buffers.

    Forward: h_0 = lambda - offset (K, H), h_{i+1} = h_i A_i + c_i, w = h_last (K, P). With D = dF/dw:
        dF/dA_i = h_i^T D_i,  dF/dc_i = sum over the K rows of D_i,  D_{i-1} = D_i A_i^T  (D_last = dF/dw),
    and the derivative with respect to the input lambda is D_0 = D_1 A_0^T (the offset is a constant)."""

    def __init__(self, phi, n_sets):
        widths = [phi[0][0].shape[0]] + [W.shape[1] for W, _ in phi]
        self.h = [np.empty((n_sets, width)) for width in widths]        # h_0 .. h_last (= w)
        self.back = [np.empty((n_sets, width)) for width in widths[:-1]]  # D_0 .. D_{last-1}

    def forward(self, phi, lambdas, offset):
        """w = hypernet(lambdas - offset): (K, P), a buffer reused by the next call."""
        np.subtract(lambdas, offset, out=self.h[0])
        for i, (W, b) in enumerate(phi):
            np.dot(self.h[i], W, out=self.h[i + 1])
            self.h[i + 1] += b
        return self.h[-1]

    def backward(self, phi, d_w, grads):
        """grads[i] = (dF/dA_i, dF/dc_i) written in place, from D = dF/dw (K, P) and the last forward."""
        delta = d_w
        for i in range(len(phi) - 1, -1, -1):
            gW, gb = grads[i]
            np.dot(self.h[i].T, delta, out=gW)
            np.sum(delta, axis=0, out=gb)
            if i > 0:
                np.dot(delta, phi[i][0].T, out=self.back[i])
                delta = self.back[i]
        return grads

    def input_grad(self, phi, d_w):
        """dF/dlambda (K, H) from D = dF/dw (K, P): D_0 = D A_last^T ... A_0^T (a buffer)."""
        delta = d_w
        for i in range(len(phi) - 1, -1, -1):
            np.dot(delta, phi[i][0].T, out=self.back[i])
            delta = self.back[i]
        return delta


class Alg3Stepper:
    """alg3_step with hand-written gradients and preallocated buffers, for decay_objective / mse_loss
    problems and linear or factorised hypernetworks (alg3_step picks it; alg3_step_reference is its
    autograd reference). Same random numbers as the reference (StepStreams reseeds one RandomState).

    Hypernetwork step, K = n_samples (joint) or 1 (simplified), lambdas (K, P), w = w_phi(lambdas):
        F = (1/K) sum_k [ MSE(net_{w_k}(x), y) + sum_j exp(lambda_kj) w_kj^2 ]
        dF/dw_k = (1/K) dMSE_k/dw_k  +  (2/K) exp(lambda_k) * w_k          (MLPBackprop, then the decay)
        dF/dphi from dF/dw by LinearHypernet.backward.
    lambda_hat step: L = MSE(net_{w(lambda_hat)}(x_v), y_v), the decay does not enter the validation loss;
        dL/dlambda_hat = LinearHypernet.input_grad(dL/dw)  (w depends on lambda_hat only through phi)."""

    @staticmethod
    def supports(problem, settings):
        train = getattr(problem.train_objective, "hand_gradient", None)
        valid = getattr(problem.valid_loss, "hand_gradient", None)
        return (settings.hypernet_kind in ("linear", "factorised") and train is not None and valid is not None
                and train[0] == "decay" and valid == ("mse", train[1])
                and problem.n_hypers == problem.n_weights == num_params(train[1]))

    def __init__(self, problem, settings, seed):
        check_algorithm(settings.algorithm)
        self.problem, self.settings = problem, settings
        sizes = problem.train_objective.hand_gradient[1]
        K = settings.n_samples if settings.algorithm == "joint" else 1
        P, self.K = problem.n_weights, K
        D, C = problem.train_x.shape[1], problem.train_y.shape[1]
        self.streams = StepStreams(seed)
        self.train_net = MLPBackprop(sizes, K, settings.batch_size)
        self.valid_net = MLPBackprop(sizes, 1, settings.valid_batch_size)
        self.x, self.y = np.empty((settings.batch_size, D)), np.empty((settings.batch_size, C))
        self.vx, self.vy = np.empty((settings.valid_batch_size, D)), np.empty((settings.valid_batch_size, C))
        self.lambdas, self.decay, self.decay_grad = np.empty((K, P)), np.empty((K, P)), np.empty((K, P))
        self.d_w, self.d_w_valid = np.empty((K, P)), np.empty((1, P))
        self.hyper = self.hyper_valid = self.grads = self.scratch = None
        self._flats = (None, None)          # (the arrays _adam last saw, their flat buffers): see _adam

    def _buffers(self, phi):
        """Hypernetwork buffers, sized from phi on the first call."""
        if self.grads is None:
            self.hyper, self.hyper_valid = LinearHypernet(phi, self.K), LinearHypernet(phi, 1)
            self.grads = _views_like(phi, np.empty(_size(phi)))
            self.scratch = np.empty(min(ADAM_BLOCK, max(max(W.size for W, _ in phi), self.lambdas.shape[1])))

    def _adam(self, phi, grads, states, step_size):
        """Adam on every hypernetwork array: one adam_inplace call over flat buffers when phi, its moments
        and the gradients are each views of one buffer (init_alg3's layout), else one call per array."""
        arrays = tuple(a for tree in (phi, grads, [(sW.m, sb.m) for sW, sb in states],
                                      [(sW.v, sb.v) for sW, sb in states]) for pair in tree for a in pair)
        seen, flats = self._flats
        if seen is None or len(seen) != len(arrays) or any(a is not b for a, b in zip(seen, arrays, strict=True)):
            quarter = len(arrays) // 4      # the same array objects as last step: their buffers are unchanged
            flats = [_flat_base(list(arrays[i * quarter:(i + 1) * quarter])) for i in range(4)]
            self._flats = (arrays, flats)
        steps = {s.step for pair in states for s in pair}
        if all(f is not None for f in flats) and len(steps) == 1:
            x, g, m, v = flats
            t = adam_inplace(x, g, AdamState(m, v, steps.pop()), step_size, self.scratch).step
            return [(AdamState(sW.m, sW.v, t), AdamState(sb.m, sb.v, t)) for sW, sb in states]
        return [(adam_inplace(W, gW, sW, step_size, self.scratch), adam_inplace(b, gb, sb, step_size, self.scratch))
                for (W, b), (gW, gb), (sW, sb) in zip(phi, grads, states, strict=True)]

    def _batch(self, x, y, rs, out_x, out_y):
        """minibatch() into buffers: rows drawn uniformly with replacement (same draws as minibatch)."""
        idx = rs.randint(0, len(x), size=len(out_x))
        np.take(x, idx, axis=0, out=out_x, mode="clip")  # idx is in range; "clip" avoids a buffered copy
        np.take(y, idx, axis=0, out=out_y, mode="clip")

    def step(self, state, step):
        s, p, K = self.settings, self.problem, self.K
        phi, lam = state.phi, state.lam
        self._buffers(phi)
        joint = s.algorithm == "joint"
        if not joint:                           # lambdas = lambda_hat throughout the step
            self.lambdas[0] = lam
            np.exp(self.lambdas, out=self.decay)
            self.decay *= 2.0 / K               # decay = (2/K) exp(lambda): d/dw of (1/K) exp(lambda) w^2 is decay w
        phi_adam = state.phi_adam
        for j in range(s.inner_steps):
            inner = step * s.inner_steps + j
            if joint:                           # lambda_k = lambda_hat + sd * N(0, 1)
                noise = self.streams(inner, STREAM_SAMPLES).randn(K, p.n_hypers)
                np.multiply(noise, s.sample_sd, out=self.lambdas)
                self.lambdas += lam
                np.exp(self.lambdas, out=self.decay)
                self.decay *= 2.0 / K
            self._batch(p.train_x, p.train_y, self.streams(inner, STREAM_TRAIN_BATCH), self.x, self.y)
            w = self.hyper.forward(phi, self.lambdas, s.input_offset)
            self.train_net.grad_into(w, self.x, self.y, 1.0 / K, self.d_w)   # (1/K) dMSE_k/dw_k
            np.multiply(self.decay, w, out=self.decay_grad)                  # (2/K) exp(lambda_k) w_k
            self.d_w += self.decay_grad
            grads = self.hyper.backward(phi, self.d_w, self.grads)
            _check_sum(grads[-1][1], inner, "hypernetwork gradient")
            phi_adam = self._adam(phi, grads, phi_adam, s.hypernet_step)
        self._batch(p.valid_x, p.valid_y, self.streams(step, STREAM_VALID_BATCH), self.vx, self.vy)
        w = self.hyper_valid.forward(phi, lam[None, :], s.input_offset)
        self.valid_net.grad_into(w, self.vx, self.vy, 1.0, self.d_w_valid)
        g_lam = self.hyper_valid.input_grad(phi, self.d_w_valid)[0]
        _check_sum(g_lam, step, "hyperparameter gradient")
        lam_adam = adam_inplace(lam, g_lam, state.lam_adam, s.lambda_step, self.scratch)
        return Alg3State(phi, lam, phi_adam, lam_adam, state.step + 1)


def _check_sum(array, step, what):
    """common.check_finite of an array through its sum (a NaN or infinity makes the sum non-finite)."""
    total = float(np.sum(array))
    if not math.isfinite(total):
        check_finite(total, step, what)


_STEPPERS = {}
MAX_STEPPERS = 8  # cached Alg3Steppers (one per problem / settings / seed in use)


def _stepper(problem, settings, seed):
    """The cached Alg3Stepper of (problem, settings, seed)."""
    key = (id(problem), settings, int(seed))
    cached = _STEPPERS.get(key)
    if cached is None or cached.problem is not problem:
        if len(_STEPPERS) >= MAX_STEPPERS:
            _STEPPERS.pop(next(iter(_STEPPERS)))
        cached = _STEPPERS[key] = Alg3Stepper(problem, settings, seed)
    return cached


def copy_state(state):
    """Deep copy of an Alg3State (its arrays are otherwise updated in place by alg3_step)."""
    copy_adam = lambda a: AdamState(a.m.copy(), a.v.copy(), a.step)
    return Alg3State([(W.copy(), b.copy()) for W, b in state.phi], state.lam.copy(),
                     [(copy_adam(a), copy_adam(c)) for a, c in state.phi_adam], copy_adam(state.lam_adam),
                     state.step)


def current_weights(state, settings):
    """The hypernetwork's elementary weights at lambda_hat: (1, P)."""
    lam = state.lam[None, :] - settings.input_offset
    return hypernet_weights(state.phi, lam, hypernet_activation(settings.hypernet_kind))


def fan_in_init(layer_sizes, rs):
    """Flat elementary weights (P,): W ~ N(0, 1/fan_in) per layer, biases 0 (a standard MLP init)."""
    return np.concatenate([np.concatenate([rs.randn(m * n) / np.sqrt(m), np.zeros(n)])
                           for m, n in zip(layer_sizes[:-1], layer_sizes[1:], strict=True)])


def check_algorithm(name):
    """Raise ValueError for an unknown algorithm name."""
    if name not in ("joint", "simplified"):
        raise ValueError(f"unknown algorithm {name!r} (joint or simplified)")


def hypernet_size(kind, n_hypers, n_weights, hidden):
    """Number of hypernetwork parameters (factorised [H, hidden, P]: H*hidden + hidden + hidden*P + P)."""
    sizes = [n_hypers, n_weights] if kind == "linear" else [n_hypers, hidden, n_weights]
    return num_params(sizes)
