"""Exact references for the per-weight-decay problem (SPEC section 9; issue 10 items 1, 3 and 5).

For the linear model with plain MSE over all N x C outputs and the penalty sum_j exp(lambda_j) w_j^2 (weights and
biases), training converges to a closed form, one (D+1) x (D+1) solve per output class c:

    (X~'X~ / (C N) + diag(exp(lambda_c))) w_c = X~' y_c / (C N),   X~ = [X, 1]   (N, D+1),

where w_c = [W[:, c], b[c]] (D+1,) is class c's column of weights with its bias, and lambda_c its decays. From it:

* `fixed_lambda_reference`  valid / test loss at the closed form for a given lambda: the level plain training at
                            that lambda reaches when trained to convergence (a curve plateauing there tuned nothing);
* `exact_hypergradient`     dL_V/dlambda by implicit differentiation, exact for the linear model;
* `hypernet_hypergradient`  J_phi(lambda)' dL_V/dw, the direction hyper-training's lambda step follows; `cosine`;
* `exact_hypergradient_descent`  Adam on lambda with the exact hypergradient at the closed-form weights (Lorraine,
                            Vicol & Duvenaud 2020, in exact form), as a (state, step_fn, evaluate) triple for
                            budget.run_budgeted / BudgetedRun;
* `train_to_convergence`    the fixed-lambda reference of deeper models: Adam until the validation loss stops
                            improving for a patience window (warm-startable from w0);
* `MLPObjective`            full-batch MSE + sum_j exp(lambda_j) w_j^2 of an MLP: value, gradient and exact
                            Hessian-vector products (hand-written R-operator);
* `minimise_objective`      w*(lambda) to a gradient tolerance by full-batch L-BFGS, warm-started;
* `conjugate_gradient`      CG with damping on negative curvature and a recorded residual;
* `ift_hypergradient`       dL_V/dlambda = -(d2 L_T/dlambda dw)' H^{-1} dL_V/dw at (near-)converged MLP weights
                            (implicit differentiation; exact for the linear model, the closed form above);
* `block_splits`, `split_sensitivity`  which 10,000-image block of MNIST's training set is the validation set,
                            and the fixed-lambda reference's valid - test gap for each block.

Flat weights follow neural_network.flatten_params: W (D, C) row-major (index i*C + c), then b (index D*C + c).
Everything is float64 numpy; the hand-written gradients are checked against autograd in tests/test_references.py.
"""
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
import scipy.linalg
from autograd import grad

from common import check_finite, step_rng
from data_loader import Splits, _check_sizes
from neural_network import hypernet_activation, hypernet_weights, identity, num_params
from optimizers import adam_init, adam_inplace

BLOCK = 10000               # images per block of MNIST's training set (SPEC section 7: splits of 10,000)
VALID_BLOCKS = (1, 2, 3, 4, 5)  # the validation blocks split_sensitivity compares (train = block 0)

# train_to_convergence defaults (our choice: Adam 1e-3 on minibatches of 100 converges the 784-100-100-10 model
# within a few thousand steps; the patience window absorbs minibatch noise in the validation curve)
CONVERGE_STEP = 1e-3
CONVERGE_BATCH = 100
CONVERGE_EVAL_EVERY = 100   # steps between full validation evaluations
CONVERGE_PATIENCE = 10      # evaluations without improvement before stopping
CONVERGE_MAX_STEPS = 20000

EXACT_STEP = 0.1            # Adam step size of exact_hypergradient_descent (our choice, like the unrolled 0.2)
STREAM_CONVERGE_BATCH = 21  # step_rng stream of train_to_convergence's minibatches


# ------------------------------------------------------------------------------------ weight layout

def flat_to_classes(flat, n_in, n_out):
    """Flat linear-model weights (P,) = [W (n_in, n_out) row-major, b (n_out,)] -> per class (n_out, n_in + 1)."""
    W = np.reshape(flat[:n_in * n_out], (n_in, n_out))
    return np.concatenate([W.T, np.reshape(flat[n_in * n_out:], (n_out, 1))], axis=1)


def classes_to_flat(per_class):
    """Inverse of flat_to_classes: per class (n_out, n_in + 1) -> flat (P,) in flatten_params order."""
    return np.concatenate([per_class[:, :-1].T.ravel(), per_class[:, -1]])


def augment(x):
    """X~ = [X, 1]: (N, D) -> (N, D + 1)."""
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


# --------------------------------------------------------------------------------------- closed form

class Ridge(NamedTuple):
    """The training data's sufficient statistics: gram X~'X~/(C N) (D+1, D+1), rhs X~'Y/(C N) (D+1, C)."""

    gram: np.ndarray
    rhs: np.ndarray
    n_in: int
    n_out: int


def ridge_problem(x, y):
    """Ridge statistics of training images x (N, D) and targets y (N, C)."""
    xa = augment(x)
    scale = 1.0 / (len(x) * y.shape[1])  # MSE is a mean over N x C entries
    return Ridge(scale * xa.T @ xa, scale * xa.T @ y, x.shape[1], y.shape[1])


def as_decays(lam, ridge):
    """lambda as a flat (P,) vector: a scalar is broadcast to every weight and bias."""
    P = num_params([ridge.n_in, ridge.n_out])
    lam = np.broadcast_to(np.asarray(lam, dtype=float), (P,)) if np.ndim(lam) == 0 else np.asarray(lam, float)
    if lam.shape != (P,):
        raise ValueError(f"lambda has shape {lam.shape}, the linear model needs ({P},)")
    return lam


def _factors(ridge, lam):
    """Cholesky factors of A_c = gram + diag(exp(lambda_c)) for each class c, and exp(lambda) per class (C, D+1)."""
    decay = np.exp(flat_to_classes(as_decays(lam, ridge), ridge.n_in, ridge.n_out))
    idx = np.arange(ridge.n_in + 1)
    factors = []
    for c in range(ridge.n_out):
        A = ridge.gram.copy()
        A[idx, idx] += decay[c]
        factors.append(scipy.linalg.cho_factor(A, lower=True, check_finite=False))
    return factors, decay


def best_response(ridge, lam):
    """Closed-form minimiser w*(lambda) of MSE + sum_j exp(lambda_j) w_j^2: lam (P,) or scalar -> flat (P,).

    Setting the gradient 2 X~'(X~ w_c - y_c)/(C N) + 2 exp(lambda_c) w_c of class c's part to zero gives
    A_c w_c = X~' y_c/(C N) (the factor 2 cancels)."""
    factors, _ = _factors(ridge, lam)
    per_class = np.stack([scipy.linalg.cho_solve(f, ridge.rhs[:, c], check_finite=False)
                          for c, f in enumerate(factors)])
    return classes_to_flat(per_class)


def linear_loss(flat, x, y):
    """Plain MSE of the linear model: flat (P,), x (N, D), y (N, C) -> scalar."""
    per_class = flat_to_classes(flat, x.shape[1], y.shape[1])
    return float(np.mean((augment(x) @ per_class.T - y) ** 2))


def linear_loss_grad(flat, x, y):
    """d/dw of linear_loss: flat (P,) -> (P,). mean((X~ w_c - y_c)^2) over N x C gives 2 X~'r_c / (C N)."""
    per_class = flat_to_classes(flat, x.shape[1], y.shape[1])
    residual = augment(x) @ per_class.T - y  # (N, C)
    g_classes = (2.0 / residual.size) * (augment(x).T @ residual).T  # (C, D+1)
    return classes_to_flat(g_classes)


def training_objective(flat, lam, x, y):
    """MSE + sum_j exp(lambda_j) w_j^2 of the linear model: flat (P,), lam (P,) -> scalar."""
    return linear_loss(flat, x, y) + float(np.sum(np.exp(lam) * flat ** 2))


def exact_hypergradient(ridge, lam, x_valid, y_valid):
    """dL_V(w*(lambda))/dlambda by implicit differentiation: lam (P,) -> (hypergradient (P,), w* (P,), L_V).

    Derivation: A_c(lambda) w_c = r_c with A_c = gram + diag(exp(lambda_c)). Differentiating in lambda_cj,
    A_c dw_c/dlambda_cj + e_j exp(lambda_cj) w_cj = 0, so dw_c/dlambda_cj = -exp(lambda_cj) w_cj A_c^{-1} e_j and
    dL_V/dlambda_cj = g_c' dw_c/dlambda_cj = -exp(lambda_cj) w_cj (A_c^{-1} g_c)_j (A_c symmetric), with
    g_c = dL_V/dw_c = 2 X~_V'(X~_V w_c - y_c)/(C N_V). L_V has no direct dependence on lambda."""
    lam = as_decays(lam, ridge)
    factors, decay = _factors(ridge, lam)
    per_class = np.stack([scipy.linalg.cho_solve(f, ridge.rhs[:, c], check_finite=False)
                          for c, f in enumerate(factors)])
    w = classes_to_flat(per_class)
    g = flat_to_classes(linear_loss_grad(w, x_valid, y_valid), ridge.n_in, ridge.n_out)
    solved = np.stack([scipy.linalg.cho_solve(f, g[c], check_finite=False) for c, f in enumerate(factors)])
    return classes_to_flat(-decay * per_class * solved), w, linear_loss(w, x_valid, y_valid)


def best_response_jacobian(ridge, lam):
    """dw*_c/dlambda_c per class: (C, D+1, D+1), [c, i, j] = dw_ci/dlambda_cj = -(A_c^{-1})_ij exp(lambda_cj) w_cj.

    The full (P, P) Jacobian in flat order is block-diagonal after the flat_to_classes permutation (a decay of
    class c moves only class c's weights). From the derivation in exact_hypergradient."""
    factors, decay = _factors(ridge, lam)
    eye = np.eye(ridge.n_in + 1)
    blocks = []
    for c, f in enumerate(factors):
        w_c = scipy.linalg.cho_solve(f, ridge.rhs[:, c], check_finite=False)
        blocks.append(-scipy.linalg.cho_solve(f, eye, check_finite=False) * (decay[c] * w_c)[None, :])
    return np.stack(blocks)


def low_rank_cosines(ridge, lam, x_valid, y_valid, ranks):
    """Cosine of the exact hypergradient with J_r' dL_V/dw for the best rank-r approximations J_r of the exact
    best-response Jacobian (truncated SVD over all classes' blocks): {r: cosine}. The hypergradient of a perfectly
    trained rank-r (factorised, r hidden units) linear hypernetwork cannot point closer than this in general."""
    lam = as_decays(lam, ridge)
    blocks = best_response_jacobian(ridge, lam)
    exact, w, _ = exact_hypergradient(ridge, lam, x_valid, y_valid)
    g = flat_to_classes(linear_loss_grad(w, x_valid, y_valid), ridge.n_in, ridge.n_out)  # (C, D+1)
    # J_c = U S V' per block; J_c' g_c = V S U' g_c; the rank-r truncation keeps the r largest S over all blocks
    svds = [np.linalg.svd(J, full_matrices=False) for J in blocks]
    values = np.concatenate([s for _, s, _ in svds])
    order = np.argsort(values)[::-1]
    block_of = np.repeat(np.arange(len(svds)), [len(s) for _, s, _ in svds])
    index_in = np.concatenate([np.arange(len(s)) for _, s, _ in svds])
    out = {}
    for r in ranks:
        direction = np.zeros_like(g)
        for k in order[:r]:
            c, i = block_of[k], index_in[k]
            U, s, Vt = svds[c]
            direction[c] += Vt[i] * s[i] * (U[:, i] @ g[c])
        out[int(r)] = cosine(classes_to_flat(direction), exact)
    return out


def fixed_lambda_reference(lam, splits, ridge=None):
    """Valid / test / train MSE at the closed form w*(lambda): the converged level of plain training at lambda.

    lam: scalar or (P,); splits: data_loader.Splits; ridge: ridge_problem(train) if already computed."""
    ridge = ridge_problem(splits.train_x, splits.train_y) if ridge is None else ridge
    w = best_response(ridge, lam)
    return {"valid": linear_loss(w, splits.valid_x, splits.valid_y),
            "test": linear_loss(w, splits.test_x, splits.test_y),
            "train": linear_loss(w, splits.train_x, splits.train_y)}


# ------------------------------------------------------------------------------ hypernetwork direction

def hypernet_hypergradient(phi, lam, settings, problem, x, y, offset=None):
    """J_phi(lambda)' dL_V/dw at w_phi(lambda): the lambda direction of hyper-training. lam (H,) -> (H,).

    phi: hypernetwork [(W, b), ...]; settings: per_weight_decay.Alg3Settings (hypernet kind, input_offset);
    problem: per_weight_decay.HyperProblem (its valid_loss); x, y: the validation data to use; offset: the
    hypernetwork's input shift (default settings.input_offset; pass lambda_hat to centre on the current value).
    For linear / factorised hypernetworks w = (lambda - offset) W_1 W_2 ... + const, so J' g = W_1 (W_2 (... g))."""
    offset = settings.input_offset if offset is None else offset
    activation = hypernet_activation(settings.hypernet_kind)
    w = hypernet_weights(phi, lam[None, :] - offset, activation)
    g = grad(lambda v: problem.valid_loss(v, x, y)[0])(w)  # dL_V/dw (1, P)
    if activation is not identity:
        return grad(lambda lm: anp.sum(hypernet_weights(phi, lm[None, :] - offset, activation) * g))(lam)
    for W, _ in reversed(phi):
        g = g @ W.T
    return g[0]


def cosine(a, b):
    """Cosine of the angle between two vectors (0 when either is zero)."""
    a, b = np.ravel(a), np.ravel(b)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0


# ------------------------------------------------------------------ exact-hypergradient descent (method 3)

class ExactState(NamedTuple):
    """lambda (P,), its Adam state, steps done."""

    lam: np.ndarray
    adam: object
    step: int


def exact_hypergradient_descent(splits, lam0, step_size=EXACT_STEP, ridge=None):
    """(state, step_fn, evaluate) of Adam on lambda with the exact hypergradient on the full validation set.

    Each step solves for w*(lambda) (Cholesky per class) and takes one Adam step along exact_hypergradient;
    evaluate(state) -> (valid, test) MSE at w*(lambda). Usable with budget.run_budgeted."""
    ridge = ridge_problem(splits.train_x, splits.train_y) if ridge is None else ridge
    lam = as_decays(lam0, ridge).copy()

    def step_fn(state, i):
        g, _, value = exact_hypergradient(ridge, state.lam, splits.valid_x, splits.valid_y)
        check_finite(value, i, "exact validation loss")
        new = state.lam.copy()
        adam = adam_inplace(new, g, state.adam, step_size, np.empty(new.size))
        return ExactState(new, adam, state.step + 1)

    def evaluate(state):
        w = best_response(ridge, state.lam)
        return linear_loss(w, splits.valid_x, splits.valid_y), linear_loss(w, splits.test_x, splits.test_y)

    return ExactState(lam, adam_init(lam), 0), step_fn, evaluate


# ------------------------------------------------------------------------------- deeper models (no closed form)

def train_to_convergence(layer_sizes, lam, splits, seed=7, step_size=CONVERGE_STEP, batch_size=CONVERGE_BATCH,
                         eval_every=CONVERGE_EVAL_EVERY, patience=CONVERGE_PATIENCE, max_steps=CONVERGE_MAX_STEPS,
                         w0=None):
    """Plain training at fixed lambda until the validation MSE stops improving for `patience` evaluations.

    Adam on MSE + sum_j exp(lambda_j) w_j^2 over minibatches (step_rng(seed, step, stream)), from w0 (P,) or a
    fan-in init (RandomState(seed)); pass earlier weights as w0 to warm-start. Returns dict valid (best), test (at
    the best validation), step of the best, steps run, converged (stopped by patience, not max_steps), weights
    (P,) at the best."""
    from per_weight_decay import decay_objective, fan_in_init, mse_loss
    from progress import Progress

    P = num_params(layer_sizes)
    lam = np.broadcast_to(np.asarray(lam, float), (P,)) if np.ndim(lam) == 0 else np.asarray(lam, float)
    objective, loss = decay_objective(layer_sizes), mse_loss(layer_sizes)
    gradient = grad(lambda w, x, y: objective(w[None, :], lam[None, :], x, y)[0])
    w = fan_in_init(layer_sizes, np.random.RandomState(seed)) if w0 is None else np.array(w0, float)
    adam, scratch = adam_init(w), np.empty(P)
    best = {"valid": np.inf, "test": np.inf, "step": 0, "weights": w.copy()}
    since_best, step = 0, 0
    with Progress(total=max_steps, desc="train to convergence", unit="step") as bar:
        while step < max_steps and since_best < patience:
            for _ in range(eval_every):
                idx = step_rng(seed, step, STREAM_CONVERGE_BATCH).randint(0, len(splits.train_x), size=batch_size)
                g = gradient(w, splits.train_x[idx], splits.train_y[idx])
                check_finite(g, step, "training gradient")
                adam = adam_inplace(w, g, adam, step_size, scratch)
                step += 1
            valid = float(loss(w[None, :], splits.valid_x, splits.valid_y)[0])
            if valid < best["valid"]:
                best = {"valid": valid, "test": float(loss(w[None, :], splits.test_x, splits.test_y)[0]),
                        "step": step, "weights": w.copy()}
                since_best = 0
            else:
                since_best += 1
            bar.set(step, valid=f"{valid:.5f}")
    return {**best, "steps": step, "converged": since_best >= patience}


# ------------------------------------------------------------ deeper models: implicit differentiation

# Defaults of the implicit-differentiation pieces (our choice; compare_number_layers sets its own in its Config).
IFT_CG_ITERS = 50         # CG iteration cap: each iteration is one full-batch Hessian-vector product
IFT_CG_TOL = 1e-3         # CG stops once its relative residual ||b - (H + mu I) x|| / ||b|| is below this
DAMPING_GROWTH = 2.0      # on negative curvature q = p'(H + mu I)p / p'p <= 0, CG restarts with mu + 2 |q| + floor
DAMPING_FLOOR = 1e-8      # (the floor: a q of exactly 0 still raises mu)
MINIMISE_GTOL = 1e-8      # minimise_objective stops once max_j |dF/dw_j| is below this ...
MINIMISE_MAX_EVALS = 200  # ... or after this many objective-and-gradient evaluations (each one full batch)
MINIMISE_FTOL = float(np.finfo(float).eps)  # L-BFGS-B's relative-decrease test, at rounding (gtol decides)


class MLPObjective:
    """F(w) = mean over (N, C) of (net_w(x) - y)^2 + sum_j exp(lambda_j) w_j^2 of one MLP on a full batch: the
    training objective of per_weight_decay.decay_objective for one weight set (its validation loss mse_loss when
    lam is None), with hand-written gradient and exact Hessian-vector products.

    layer_sizes [D, ..., C] (ReLU hidden layers, linear output); x (N, D); y (N, C); lam (P,), a scalar or None;
    weights w (P,) in flatten_params order.

    Forward (layers l = 1..L): a_0 = x, z_l = a_{l-1} W_l + b_l, a_l = relu(z_l) for l < L, a_L = z_L.
    Gradient (chain rule; s = 2 / (N C) from the mean over N x C entries):
        delta_L = s (z_L - y),  dF/dW_l = a_{l-1}' delta_l,  dF/db_l = sum_rows delta_l,
        delta_{l-1} = (delta_l W_l') [z_{l-1} > 0],  plus 2 exp(lambda) w from the decay.
    Hessian-vector product H v (Pearlmutter's R-operator: R{f} = d/dt f(w + t v) at t = 0, v = (V_l, c_l)):
        R{a_0} = 0,  R{z_l} = R{a_{l-1}} W_l + a_{l-1} V_l + c_l,  R{a_l} = R{z_l} [z_l > 0]  (relu'' = 0 off the
        kink, so the mask is constant along t), R{a_L} = R{z_L};
        R{delta_L} = s R{z_L},  R{dF/dW_l} = R{a_{l-1}}' delta_l + a_{l-1}' R{delta_l},  R{dF/db_l} = sum R{delta_l},
        R{delta_{l-1}} = (R{delta_l} W_l' + delta_l V_l') [z_{l-1} > 0],  plus 2 exp(lambda) v from the decay."""

    def __init__(self, layer_sizes, x, y, lam=None):
        from per_weight_decay import layer_slices

        self.layer_sizes = tuple(int(s) for s in layer_sizes)
        self.layers = layer_slices(self.layer_sizes)
        self.P = num_params(self.layer_sizes)
        self.x, self.y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        self.scale = 2.0 / self.y.size
        if lam is None:
            self.lam, self.decay = None, np.zeros(self.P)
        else:
            self.lam = np.broadcast_to(np.asarray(lam, dtype=float), (self.P,)).copy()
            self.decay = np.exp(self.lam)

    def _forward(self, w):
        """[a_0 = x, a_1, ..., a_L = z_L]."""
        acts, last = [self.x], len(self.layers) - 1
        for i, (sW, sb, m, n) in enumerate(self.layers):
            z = acts[-1] @ w[sW].reshape(m, n) + w[sb]
            acts.append(np.maximum(z, 0.0) if i < last else z)
        return acts

    def _backward(self, w, acts):
        """(dMSE/dw (P,), [delta_1, ..., delta_L]) from the activations of _forward(w)."""
        out, deltas = np.empty(self.P), [None] * len(self.layers)
        delta = self.scale * (acts[-1] - self.y)
        for i in range(len(self.layers) - 1, -1, -1):
            sW, sb, m, n = self.layers[i]
            deltas[i] = delta
            out[sW] = (acts[i].T @ delta).ravel()
            out[sb] = delta.sum(axis=0)
            if i > 0:
                delta = (delta @ w[sW].reshape(m, n).T) * (acts[i] > 0)
        return out, deltas

    def value(self, w):
        """F(w), a float."""
        w = np.asarray(w, dtype=float)
        return float(np.mean((self._forward(w)[-1] - self.y) ** 2) + np.sum(self.decay * w ** 2))

    def value_and_grad(self, w):
        """(F(w), dF/dw (P,))."""
        w = np.asarray(w, dtype=float)
        acts = self._forward(w)
        g, _ = self._backward(w, acts)
        g += 2.0 * self.decay * w
        return float(np.mean((acts[-1] - self.y) ** 2) + np.sum(self.decay * w ** 2)), g

    def gauss_newton_diagonal(self, w):
        """diag of the Gauss-Newton matrix plus the decay, (P,): the Jacobi preconditioner of the Hessian solves.

        MSE = (1/(N C)) sum_{n,c} (z_nc - y_nc)^2 has Gauss-Newton matrix s sum_n J_n' J_n (J_n = dz_n/dw, C x P,
        s = 2 / (N C)), so diag_j = s sum_{n,c} (dz_nc/dw_j)^2. For W_l[i, k], dz_nc/dW_l[i, k] = a_{l-1,ni} B_c[n, k]
        with B_c = dz_{.c}/dz_l, back-propagated from the one-hot e_c like delta (B_c <- (B_c W_l') [z_{l-1} > 0]):
        diag(W_l) = s sum_c (a_{l-1}^2)' B_c^2, diag(b_l) = s sum_c sum_n B_c^2; plus 2 exp(lambda)."""
        w = np.asarray(w, dtype=float)
        acts = self._forward(w)
        squares = [a ** 2 for a in acts[:-1]]
        out = np.zeros(self.P)
        for c in range(self.y.shape[1]):
            B = np.zeros_like(acts[-1])
            B[:, c] = 1.0
            for i in range(len(self.layers) - 1, -1, -1):
                sW, sb, m, n = self.layers[i]
                B2 = B ** 2
                out[sW] += (squares[i].T @ B2).ravel()
                out[sb] += B2.sum(axis=0)
                if i > 0:
                    B = (B @ w[sW].reshape(m, n).T) * (acts[i] > 0)
        return self.scale * out + 2.0 * self.decay

    def hessian(self, w):
        """v (P,) -> H v (P,), H = d2F/dw2 at w; one forward and backward pass at w, shared by every product."""
        w = np.array(w, dtype=float)
        acts = self._forward(w)
        _, deltas = self._backward(w, acts)
        last = len(self.layers) - 1
        masks = [None] + [acts[i] > 0 for i in range(1, last + 1)]  # masks[i] = [z_i > 0] of hidden layer i

        def hvp(v):
            v = np.asarray(v, dtype=float)
            r_acts = [None]                                   # R{a_0} = 0
            for i, (sW, sb, m, n) in enumerate(self.layers):
                rz = acts[i] @ v[sW].reshape(m, n) + v[sb]
                if i > 0:
                    rz += r_acts[i] @ w[sW].reshape(m, n)
                r_acts.append(rz * masks[i + 1] if i < last else rz)
            out = np.empty(self.P)
            r_delta = self.scale * r_acts[-1]
            for i in range(last, -1, -1):
                sW, sb, m, n = self.layers[i]
                gW = acts[i].T @ r_delta
                if i > 0:
                    gW += r_acts[i].T @ deltas[i]
                out[sW] = gW.ravel()
                out[sb] = r_delta.sum(axis=0)
                if i > 0:
                    r_delta = (r_delta @ w[sW].reshape(m, n).T + deltas[i] @ v[sW].reshape(m, n).T) * masks[i]
            out += 2.0 * self.decay * v
            return out
        return hvp


def minimise_objective(objective, w0, gtol=MINIMISE_GTOL, max_evals=MINIMISE_MAX_EVALS, desc="minimise"):
    """w*(lambda): full-batch L-BFGS (scipy L-BFGS-B, hand-written gradient) on objective (an MLPObjective)
    from the warm start w0 (P,), until max_j |dF/dw_j| < gtol or max_evals evaluations.

    Returns (w (P,), info dict: value, grad_max (at w), grad_max_start (at w0), evaluations, iterations,
    converged (gtol reached), message)."""
    import scipy.optimize

    from progress import Progress

    w0 = np.array(w0, dtype=float)
    start = {}
    with Progress(total=max_evals, desc=desc, unit="eval") as bar:
        def fun(w):
            value, g = objective.value_and_grad(w)
            check_finite(value, bar.n, f"{desc} objective")
            start.setdefault("grad_max", float(np.max(np.abs(g))))
            bar.update(1, F=f"{value:.6g}")
            return value, g

        result = scipy.optimize.minimize(fun, w0, jac=True, method="L-BFGS-B",
                                         options=dict(maxiter=max_evals, maxfun=max_evals, gtol=gtol,
                                                      ftol=MINIMISE_FTOL, maxcor=10))
    grad_max = float(np.max(np.abs(result.jac)))
    return result.x, {"value": float(result.fun), "grad_max": grad_max, "grad_max_start": start["grad_max"],
                      "evaluations": int(result.nfev), "iterations": int(result.nit),
                      "converged": bool(grad_max < gtol), "message": str(result.message)}


class CGResult(NamedTuple):
    """x (P,) solving (A + damping I) x = b; residual = ||b - (A + damping I) x|| / ||b|| (recurrence);
    iterations (matrix-vector products); damping used at the end; restarts after negative curvature; x_half: x
    after half of max_iter products (a convergence check of what x is used for), or None if CG stopped earlier."""

    x: np.ndarray
    residual: float
    iterations: int
    damping: float
    restarts: int
    x_half: np.ndarray = None


def conjugate_gradient(matvec, b, tol=IFT_CG_TOL, max_iter=IFT_CG_ITERS, damping=0.0, diagonal=None, desc="CG"):
    """(Preconditioned) conjugate gradient on (A + damping I) x = b from x = 0, A symmetric given as
    matvec(v) -> A v (P,); diagonal (P,), positive, optional: Jacobi preconditioner M = diag(diagonal + damping).

    Stops at relative residual ||b - (A + mu I) x|| / ||b|| below tol or after max_iter products. A is not assumed
    positive definite: when a search direction p has curvature q = p'(A + mu I)p / p'p <= 0, mu grows by
    DAMPING_GROWTH |q| + DAMPING_FLOOR and CG restarts from x = 0 (the product is counted; what was built along
    the non-positive direction is discarded)."""
    from progress import Progress

    b = np.asarray(b, dtype=float)
    b_norm, mu, restarts, it = float(np.linalg.norm(b)), float(damping), 0, 0
    x = np.zeros_like(b)
    if b_norm == 0.0:
        return CGResult(x, 0.0, 0, mu, 0)
    x_half = None

    def precondition(r):
        return r if diagonal is None else r / (diagonal + mu)

    r = b.copy()
    z = precondition(r)
    p, rz = z.copy(), float(r @ z)
    with Progress(total=max_iter, desc=desc, unit="product") as bar:
        while it < max_iter and np.linalg.norm(r) > tol * b_norm:
            Ap = matvec(p) + mu * p
            it += 1
            pAp = float(p @ Ap)
            if pAp <= 0.0:  # not positive definite along p: damp more and start again
                mu += DAMPING_GROWTH * abs(pAp) / float(p @ p) + DAMPING_FLOOR
                restarts += 1
                x, r = np.zeros_like(b), b.copy()
                z = precondition(r)
                p, rz = z.copy(), float(r @ z)
                continue
            alpha = rz / pAp
            x += alpha * p
            r -= alpha * Ap
            z = precondition(r)
            rz_new = float(r @ z)
            p *= rz_new / rz
            p += z
            rz = rz_new
            if it == max_iter // 2:
                x_half = x.copy()
            bar.update(1, residual=f"{np.linalg.norm(r) / b_norm:.2e}")
    return CGResult(x, float(np.linalg.norm(r) / b_norm), it, mu, restarts, x_half)


def ift_hypergradient(train, valid, w, tol=IFT_CG_TOL, max_iter=IFT_CG_ITERS, damping=0.0, precondition=False,
                      desc="IFT CG"):
    """dL_V(w*(lambda))/dlambda by implicit differentiation at (near-)converged weights w (P,) of one MLP.

    train: MLPObjective on the training set at lambda (its decays), valid: MLPObjective on the validation set with
    lam=None (plain MSE). Derivation: at a stationary point dL_T/dw (w*(lambda), lambda) = 0; differentiating in
    lambda, H dw*/dlambda + d2L_T/dw dlambda = 0, with H = d2L_T/dw2. The penalty exp(lambda_j) w_j^2 has
    dL_T/dw_j = ... + 2 exp(lambda_j) w_j, so d2L_T/dw_i dlambda_j = 2 exp(lambda_j) w_j [i = j] (diagonal), and
        dL_V/dlambda = (dw*/dlambda)' dL_V/dw = -2 exp(lambda) * w * (H^{-1} dL_V/dw)   (H symmetric),
    L_V having no direct dependence on lambda. H^{-1} dL_V/dw by conjugate_gradient (damped on negative curvature;
    Jacobi-preconditioned by the Gauss-Newton diagonal if precondition).

    Returns dict: hypergradient (P,), valid_loss, train_grad_max (max |dL_T/dw| at w: how stationary w is),
    cg_iterations, cg_residual (of the damped system, recomputed), cg_residual_undamped (||g - H x|| / ||g||),
    cg_damping, cg_restarts, half_cosine (cosine of the hypergradient after half the CG products with the final
    one: near 1 when the direction has settled even if the residual has not; None if CG stopped before)."""
    w = np.asarray(w, dtype=float)
    if train.lam is None or valid.lam is not None:
        raise ValueError("ift_hypergradient needs the training objective with decays and the plain validation MSE")
    valid_loss, g_valid = valid.value_and_grad(w)
    _, g_train = train.value_and_grad(w)
    hvp = train.hessian(w)
    diagonal = train.gauss_newton_diagonal(w) if precondition else None
    cg = conjugate_gradient(hvp, g_valid, tol, max_iter, damping, diagonal, desc)
    Hx = hvp(cg.x)
    g_norm = max(float(np.linalg.norm(g_valid)), np.finfo(float).tiny)
    mixed = 2.0 * train.decay * w  # d2L_T/dw_j dlambda_j
    half = None if cg.x_half is None else cosine(-mixed * cg.x_half, -mixed * cg.x)
    return {"hypergradient": -mixed * cg.x, "valid_loss": valid_loss, "half_cosine": half,
            "train_grad_max": float(np.max(np.abs(g_train))), "cg_iterations": cg.iterations,
            "cg_residual": float(np.linalg.norm(g_valid - Hx - cg.damping * cg.x)) / g_norm,
            "cg_residual_undamped": float(np.linalg.norm(g_valid - Hx)) / g_norm,
            "cg_damping": cg.damping, "cg_restarts": cg.restarts}


# ------------------------------------------------------------------------------------- split sensitivity

def block_splits(data, valid_block, train_block=0, block=BLOCK, n_test=BLOCK):
    """Train = training-image block train_block, valid = block valid_block (blocks of `block` images:
    block k = images [k*block, (k+1)*block)), test = the first n_test test images. valid_block 1 with
    train_block 0 is per_weight_decay.large_splits."""
    if valid_block == train_block:
        raise ValueError(f"the validation block {valid_block} is the training block")
    for k in (valid_block, train_block):
        if k < 0:
            raise ValueError(f"block index {k} is negative")
        _check_sizes("training images", len(data.train_images), (k + 1) * block)
    _check_sizes("test images", len(data.test_images), n_test)
    tr = slice(train_block * block, (train_block + 1) * block)
    va = slice(valid_block * block, (valid_block + 1) * block)
    return Splits(data.train_images[tr], data.train_labels[tr], data.train_images[va], data.train_labels[va],
                  data.test_images[:n_test], data.test_labels[:n_test])


def split_sensitivity(data, lam=-7.0, blocks=VALID_BLOCKS, train_block=0, block=BLOCK, n_test=BLOCK):
    """Fixed-lambda reference per validation block: list of dicts block, valid, test, gap (= valid - test).

    The training block (and so w*(lambda) and the test loss) is the same for every entry; only which 10,000
    training images are scored as validation changes."""
    splits = block_splits(data, blocks[0], train_block, block, n_test)
    ridge = ridge_problem(splits.train_x, splits.train_y)
    w = best_response(ridge, lam)
    test = linear_loss(w, splits.test_x, splits.test_y)
    rows = []
    for k in blocks:
        s = block_splits(data, k, train_block, block, n_test)
        valid = linear_loss(w, s.valid_x, s.valid_y)
        rows.append({"block": int(k), "valid": valid, "test": test, "gap": valid - test})
    return rows
