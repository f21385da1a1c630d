"""Unrolled reverse-mode hypergradient baseline (Maclaurin et al. 2015; SPEC section 7, Figure 5 top).

w_T(lambda) = T inner steps of Adam (bias-corrected, the default) or SGD from a fixed init w0 on a fixed
schedule of training minibatches, for the linear model x W + b with one decay per weight and bias:
    f_t(w, lambda) = MSE(x_t W + b, y_t) + sum_j exp(lambda_j) w_j^2       (training objective of step t)
    L(lambda)      = MSE(x_v W_T + b_T, y_v)                              (validation loss of w_T(lambda))
Flat weights w (P,) = [W row-major (D*C), b (C)], P = D*C + C; lambda (P,). Only training and validation
arrays enter the hypergradient (its functions take no test data).

Usage (hypernets_local_large.py):

    import unrolled
    state0, step_fn, evaluate = unrolled.make_unrolled(splits, config)   # config: seed, batch_size,
        # init_lambda, unroll_steps, unroll_inner, unroll_inner_step, unroll_outer_step,
        # unroll_init_scale, unroll_valid_batch (the Config fields of hypernets_local_large)
    # lower level:
    bx, by = unrolled.unrolled_schedule(train_x, train_y, steps, batch_size, seed)      # (T,B,D), (T,B,C)
    w0 = unrolled.initial_weights(D, C, init_scale, seed)                               # (P,)
    ws = unrolled.Workspace(steps, D, C, len(valid_x))
    ws.use_gram(valid_x, valid_y)     # optional, for a fixed validation set: the loss through its Gram matrix
    value, g = unrolled.unrolled_hypergradient(lam, w0, bx, by, valid_x, valid_y, "adam", 1e-3, ws)
    value, g = unrolled.unrolled_hypergradient_autograd(lam, w0, bx, by, valid_x, valid_y, "adam", 1e-3)
    w_T = unrolled.unrolled_train(lam, w0, bx, by, "adam", 1e-3)      # autograd-traceable forward
"""
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad

from common import check_finite, step_rng
from neural_network import flatten_params, init_mlp
from optimizers import AdamConfig, adam_init, adam_inplace, adam_step_differentiable

STREAM_UNROLL_SCHEDULE, STREAM_UNROLL_VALID = 11, 12  # step_rng streams of the baseline (as before the move)
INNER = ("adam", "sgd")
GRAM_CHUNK = 2000  # validation rows per block when forming the Gram matrix
B1, B2, EPS = AdamConfig.b1, AdamConfig.b2, AdamConfig.eps  # inner Adam: Kingma & Ba defaults


# ------------------------------------------------------------------------------------ shared pieces

def unrolled_schedule(train_x, train_y, steps, batch_size, seed):
    """The fixed training minibatches of the inner loop (rows with replacement): (T, B, D), (T, B, C)."""
    idx = step_rng(seed, 0, STREAM_UNROLL_SCHEDULE).randint(0, len(train_x), size=(steps, batch_size))
    return train_x[idx], train_y[idx]


def initial_weights(n_inputs, n_outputs, init_scale, seed):
    """The fixed elementary init w0 = init_scale * N(0, 1) (RandomState(seed), W then b): (P,)."""
    return flatten_params(init_mlp((n_inputs, n_outputs), init_scale, np.random.RandomState(seed)))


def check_inner(inner):
    """Raise ValueError for an unknown inner optimiser."""
    if inner not in INNER:
        raise ValueError(f"unknown inner optimiser {inner!r} (adam or sgd)")


# ----------------------------------------------------------------------- autograd reference

def linear_decay_grad(w, lam, x, y):
    """Gradient of MSE(x W + b, y) + sum_j exp(lambda_j) w_j^2 of the linear model, written out so the
    unrolled loop stays cheap: flat w (P,), lam (P,), x (B, D), y (B, C) -> (P,); autograd-traceable."""
    D, C = x.shape[1], y.shape[1]
    W = anp.reshape(w[:D * C], (D, C))
    b = w[D * C:]
    residual = anp.dot(x, W) + b - y            # (B, C)
    scale = 2.0 / (x.shape[0] * C)              # d/dz of mean((z - y)^2)
    g_W = scale * anp.dot(x.T, residual)
    g_b = scale * anp.sum(residual, axis=0)
    return anp.concatenate([anp.ravel(g_W), g_b]) + 2.0 * anp.exp(lam) * w


def unrolled_train(lam, w0, batches_x, batches_y, inner="adam", inner_step=1e-3):
    """w_T(lambda): T inner steps of Adam (textbook, bias-corrected) or SGD from w0 on the minibatches
    (T, B, D), (T, B, C): (P,). Autograd-traceable in lambda."""
    check_inner(inner)
    w, m, v = w0, anp.zeros_like(w0), anp.zeros_like(w0)
    for t in range(len(batches_x)):
        g = linear_decay_grad(w, lam, batches_x[t], batches_y[t])
        if inner == "sgd":
            w = w - inner_step * g
        else:
            w, m, v = adam_step_differentiable(w, g, m, v, t + 1, inner_step, B1, B2, EPS)
    return w


def linear_mse(w, x, y):
    """MSE(x W + b, y) of flat linear weights w (P,): x (N, D), y (N, C) -> scalar; autograd-traceable."""
    D, C = x.shape[1], y.shape[1]
    return anp.mean((anp.dot(x, anp.reshape(w[:D * C], (D, C))) + w[D * C:] - y) ** 2)


def unrolled_hypergradient_autograd(lam, w0, batches_x, batches_y, valid_x, valid_y, inner="adam",
                                    inner_step=1e-3):
    """(L(lambda), dL/dlambda (P,)) by autograd through the whole unrolled loop: the reference."""
    objective = lambda lam_: linear_mse(unrolled_train(lam_, w0, batches_x, batches_y, inner, inner_step),
                                        valid_x, valid_y)
    value, g = value_and_grad(objective)(lam)
    return float(value), g


# ------------------------------------------------------------------------ hand-written reverse pass

class Workspace:
    """Preallocated buffers of unrolled_hypergradient: the trajectory of T inner steps (T+1 weights,
    T gradients, two Adam coefficients per step; 4 x T x P float64) and per-step scratch."""

    def __init__(self, steps, n_inputs, n_outputs, n_valid, batch_size=None):
        D, C = n_inputs, n_outputs
        P = D * C + C
        self.shape = (steps, D, C, n_valid)
        self.w = np.empty((steps + 1, P))   # w[t] = weights before inner step t + 1; w[T] = w_T
        self.g = np.empty((steps, P))       # g[t] = gradient of inner step t + 1
        self.coef_m = np.empty((steps, P))  # Adam: A_t = dw_t/dm_t = -(a / c1) / d_t
        self.coef_v = np.empty((steps, P))  # Adam: Q_t = 2 (1 - b2) dw_t/dv_t (see unrolled_hypergradient)
        self.m_run, self.v_run = np.empty(P), np.empty(P)   # the moments of the current inner step
        self.tmp, self.tmp2, self.tmp3, self.hv = (np.empty(P) for _ in range(4))
        self.decay2 = np.empty(P)           # 2 exp(lambda)
        self.w_bar, self.m_bar, self.v_bar, self.g_bar, self.lam_bar = (np.empty(P) for _ in range(5))
        self.residual = None if batch_size is None else np.empty((batch_size, C))
        self.valid_residual = np.empty((n_valid, C))
        self._gram = self.gram_product = None

    def use_gram(self, valid_x, valid_y):
        """Compute and keep the Gram statistics (S = X_a^T X_a (D+1, D+1), Q = X_a^T y_v (D+1, C), yy) of a
        FIXED validation set X_a = [valid_x, 1]; later calls with these very arrays (identity; the workspace
        holds them, and they must not be changed in place) take the validation loss through them."""
        N, D = valid_x.shape
        S, Q = np.zeros((D + 1, D + 1)), np.zeros((D + 1, valid_y.shape[1]))
        for start in range(0, N, GRAM_CHUNK):            # X_a in chunks: no (N, D+1) copy of the set
            rows = slice(start, start + GRAM_CHUNK)
            xa = np.hstack([valid_x[rows], np.ones((len(valid_x[rows]), 1))])
            S += xa.T @ xa
            Q += xa.T @ valid_y[rows]
        self._gram = (valid_x, valid_y, S, Q, float(np.vdot(valid_y, valid_y)))
        self.gram_product = np.empty_like(Q)
        return self

    def gram_for(self, valid_x, valid_y):
        """(S, Q, yy) if use_gram was given these arrays, else None."""
        g = self._gram
        return g[2:] if g is not None and g[0] is valid_x and g[1] is valid_y else None

    def fits(self, steps, n_inputs, n_outputs, n_valid):
        return self.shape == (steps, n_inputs, n_outputs, n_valid)


def _data_grad_into(x, residual, out, D, C):
    """out = [x^T residual (row-major), column sums of residual]: the data gradient of the linear model
    given residual = (2 / (B C)) (x W + b - y), or its Hessian-vector product given residual = (2/(B C)) x V."""
    np.dot(x.T, residual, out=out[:D * C].reshape(D, C))
    np.sum(residual, axis=0, out=out[D * C:])


def _workspace_for(workspace, T, D, C, N, B):
    """workspace if it fits these sizes, else a new Workspace."""
    if workspace is None or not workspace.fits(T, D, C, N):
        workspace = Workspace(T, D, C, N, B)
    if workspace.residual is None or workspace.residual.shape[0] != B:
        workspace.residual = np.empty((B, C))
    return workspace


def _forward(lam, w0, batches_x, batches_y, inner, inner_step, ws):
    """The inner loop in numpy, storing w_0..w_T, g_t, m_t, v_t in ws (see unrolled_hypergradient): w_T,
    a view of ws.w[T]."""
    T, B, D = batches_x.shape
    C = batches_y.shape[2]
    a, adam = inner_step, inner == "adam"
    DC, factor = D * C, 2.0 / (B * C)
    e, tmp, tmp2, tmp3, r = ws.decay2, ws.tmp, ws.tmp2, ws.tmp3, ws.residual
    np.exp(lam, out=e)
    e *= 2.0
    ws.w[0] = w0
    for t in range(T):                                   # ---- forward, storing the trajectory
        x, w, g = batches_x[t], ws.w[t], ws.g[t]
        np.dot(x, w[:DC].reshape(D, C), out=r)           # r = (2 / (B C)) (x W + b - y)
        r += w[DC:]
        r -= batches_y[t]
        r *= factor
        _data_grad_into(x, r, g, D, C)                   # g = G_t(w) + e w
        np.multiply(e, w, out=tmp)
        g += tmp
        if not adam:
            np.multiply(g, a, out=tmp)
            np.subtract(w, tmp, out=ws.w[t + 1])
            continue
        m, v, c1, c2 = ws.m_run, ws.v_run, 1.0 - B1 ** (t + 1), 1.0 - B2 ** (t + 1)
        if t == 0:
            m[:] = 0.0
            v[:] = 0.0
        m *= B1                                          # m_t = b1 m_{t-1} + (1 - b1) g_t
        np.multiply(g, 1.0 - B1, out=tmp)
        m += tmp
        v *= B2                                          # v_t = b2 v_{t-1} + (1 - b2) g_t^2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - B2
        v += tmp
        np.divide(v, c2, out=tmp3)                       # s_t = sqrt(v_t / c2)
        np.sqrt(tmp3, out=tmp3)
        np.add(tmp3, EPS, out=tmp2)                      # d_t = s_t + eps
        A, Q = ws.coef_m[t], ws.coef_v[t]
        np.divide(-a / c1, tmp2, out=A)                  # A_t = -(a / c1) / d_t
        np.multiply(m, A, out=tmp)                       # u_t = A_t m_t = -a (m_t / c1) / d_t
        np.add(w, tmp, out=ws.w[t + 1])                  # w_t = w_{t-1} + u_t
        tmp3 *= tmp2                                     # Q_t = u_t / (d_t s_t) * (-(1 - b2) / c2)
        np.divide(tmp, tmp3, out=Q)
        Q *= -(1.0 - B2) / c2
    return ws.w[T]


def unrolled_weights(lam, w0, batches_x, batches_y, inner="adam", inner_step=1e-3, workspace=None):
    """w_T(lambda) in numpy (the forward of unrolled_hypergradient; equals unrolled_train): a copy, (P,)."""
    check_inner(inner)
    T, B, D = batches_x.shape
    ws = _workspace_for(workspace, T, D, batches_y.shape[2], 0 if workspace is None else workspace.shape[3], B)
    return _forward(lam, w0, batches_x, batches_y, inner, inner_step, ws).copy()


def _valid_loss_and_grad(ws, w, valid_x, valid_y, out):
    """L = MSE(x_v W + b, y_v) of flat w (P,) and dL/dw written into out (P,); returns L.

    For a fixed validation set given to ws.use_gram, through the Gram matrix of the augmented inputs
    X_a = [x_v, 1] (N, D+1): with M = [W; b] (D+1, C) (the flat layout reshaped), S = X_a^T X_a,
    Q = X_a^T y_v, yy = sum y_v^2,
        sum (X_a M - y_v)^2 = <M, S M> - 2 <M, Q> + yy,     dL/dM = 2 (S M - Q) / (N C),
    the same numbers up to rounding for (D+1)^2 C instead of 2 N (D+1) C multiply-adds per call."""
    N, D = valid_x.shape
    C = valid_y.shape[1]
    gram = ws.gram_for(valid_x, valid_y)
    if gram is None:                                     # direct: residual r = X_a M - y_v
        if ws.valid_residual.shape != (N, C):
            ws.valid_residual = np.empty((N, C))
        rv = ws.valid_residual
        np.dot(valid_x, w[:D * C].reshape(D, C), out=rv)
        rv += w[D * C:]
        rv -= valid_y
        value = float(np.vdot(rv, rv)) / (N * C)
        rv *= 2.0 / (N * C)
        _data_grad_into(valid_x, rv, out, D, C)
        return value
    S, Q, yy = gram
    M, SM = w.reshape(D + 1, C), ws.gram_product
    np.dot(S, M, out=SM)
    value = (float(np.vdot(M, SM)) - 2.0 * float(np.vdot(M, Q)) + yy) / (N * C)
    SM -= Q
    np.multiply(SM.reshape(-1), 2.0 / (N * C), out=out)
    return value


def unrolled_hypergradient(lam, w0, batches_x, batches_y, valid_x, valid_y, inner="adam", inner_step=1e-3,
                           workspace=None):
    """(L(lambda), dL/dlambda (P,)) by a hand-written reverse pass through the T inner steps; equals
    unrolled_hypergradient_autograd to rounding. workspace: a Workspace to reuse (allocated when None).

    Forward (stored in the workspace), inner step t = 1..T on batch (x_t, y_t), B rows, C outputs:
        g_t = G_t(w_{t-1}) + e * w_{t-1},    e = 2 exp(lambda),   G_t(w) = data gradient of MSE (linear in w)
        Adam:  m_t = b1 m_{t-1} + (1 - b1) g_t,   v_t = b2 v_{t-1} + (1 - b2) g_t^2,
               s_t = sqrt(v_t / c2_t),  d_t = s_t + eps,  w_t = w_{t-1} - a (m_t / c1_t) / d_t
               (c1_t = 1 - b1^t, c2_t = 1 - b2^t, m_0 = v_0 = 0)
        SGD:   w_t = w_{t-1} - a g_t
    Reverse, with adjoints w_bar = dL/dw_t, m_bar = dL/dm_t, v_bar = dL/dv_t (from later steps) and
    w_bar_T = dL/dw_T, m_bar = v_bar = 0, for t = T..1 (all products elementwise):
        Adam:  dw_t/dm_t = -a / (c1 d_t) = A_t;   dw_t/dv_t = (a m_t / c1) / d_t^2 * 1 / (2 s_t c2)   (d s/dv)
               m_bar += w_bar * A_t;   v_bar += w_bar * a m_t / (2 c1 c2 d_t^2 s_t)
               g_bar  = (1 - b1) m_bar + 2 (1 - b2) g_t v_bar      (m_t and v_t depend on g_t)
               m_bar *= b1;  v_bar *= b2                         (m_t -> m_{t-1}, v_t -> v_{t-1})
           Stored by the forward: A_t and Q_t = 2 (1 - b2) dw_t/dv_t = (1 - b2) a m_t / (c1 c2 d_t^2 s_t)
           = u_t / (d_t s_t) * (-(1 - b2) / c2) with the update u_t = A_t m_t; the reverse carries
           2 (1 - b2) v_bar, so that v_bar += w_bar Q_t and g_bar = (1 - b1) m_bar + g_t v_bar.
        SGD:   g_bar  = -a w_bar
        then   w_bar += H_t g_bar + e g_bar                       (g_t depends on w_{t-1}; H_t symmetric)
               lambda_bar += e * w_{t-1} * g_bar                  (d g_t / d lambda = e w_{t-1})
    H_t V for the linear model = the data gradient with residual (2 / (B C)) (x_t V_W + V_b) (no target).
    The identity path w_t -> w_{t-1} keeps w_bar, so w_bar is only added to."""
    check_inner(inner)
    T, B, D = batches_x.shape
    C, N = batches_y.shape[2], len(valid_x)
    ws = _workspace_for(workspace, T, D, C, N, B)
    a, adam = inner_step, inner == "adam"
    DC, factor = D * C, 2.0 / (B * C)
    e, tmp, hv, r = ws.decay2, ws.tmp, ws.hv, ws.residual
    _forward(lam, w0, batches_x, batches_y, inner, inner_step, ws)
    value = _valid_loss_and_grad(ws, ws.w[T], valid_x, valid_y, ws.w_bar)   # ---- L and dL/dw_T
    w_bar, m_bar, v_bar, g_bar, lam_bar = ws.w_bar, ws.m_bar, ws.v_bar, ws.g_bar, ws.lam_bar
    m_bar[:] = 0.0
    v_bar[:] = 0.0
    lam_bar[:] = 0.0
    for t in range(T - 1, -1, -1):                       # ---- reverse
        if adam:                                         # v_bar holds 2 (1 - b2) dL/dv_t
            np.multiply(w_bar, ws.coef_m[t], out=tmp)    # m_bar += w_bar A_t
            m_bar += tmp
            np.multiply(w_bar, ws.coef_v[t], out=tmp)    # v_bar += w_bar Q_t
            v_bar += tmp
            np.multiply(ws.g[t], v_bar, out=g_bar)       # g_bar = (1 - b1) m_bar + g_t v_bar
            np.multiply(m_bar, 1.0 - B1, out=tmp)
            g_bar += tmp
            m_bar *= B1
            v_bar *= B2
        else:
            np.multiply(w_bar, -a, out=g_bar)            # g_bar = -a w_bar
        x = batches_x[t]                                 # w_bar += H_t g_bar + e g_bar
        np.dot(x, g_bar[:DC].reshape(D, C), out=r)
        r += g_bar[DC:]
        r *= factor
        _data_grad_into(x, r, hv, D, C)
        w_bar += hv
        np.multiply(e, g_bar, out=tmp)
        w_bar += tmp
        np.multiply(ws.w[t], g_bar, out=tmp)             # lambda_bar += e w_{t-1} g_bar (e applied below)
        lam_bar += tmp
    return value, lam_bar * e


# ------------------------------------------------------------------------------- the baseline method

class UnrolledState(NamedTuple):
    """Outer state of the baseline: lambda (P,), its Adam state, steps done."""

    lam: np.ndarray
    adam: object
    step: int


def make_unrolled(splits, config, reference=False):
    """(initial state, step_fn(state, i), evaluate(state) -> (valid, test)) of the unrolled baseline.

    splits: train_x/train_y/valid_x/valid_y/test_x/test_y; config: seed, batch_size, init_lambda and the
    unroll_* fields (see the module docstring). step_fn reads only training and validation data; outer
    Adam (unroll_outer_step) on lambda. reference=True takes the autograd hypergradient."""
    check_inner(config.unroll_inner)
    D, C = splits.train_x.shape[1], splits.train_y.shape[1]
    w0 = initial_weights(D, C, config.unroll_init_scale, config.seed)
    batches_x, batches_y = unrolled_schedule(splits.train_x, splits.train_y, config.unroll_steps,
                                             config.batch_size, config.seed)
    n_valid = config.unroll_valid_batch or len(splits.valid_x)
    workspace = Workspace(config.unroll_steps, D, C, n_valid, config.batch_size)
    if not config.unroll_valid_batch and len(splits.valid_x) > D + 1:
        workspace.use_gram(splits.valid_x, splits.valid_y)   # the full validation set, fixed: its Gram matrix
    scratch = np.empty(w0.size)
    valid_x, valid_y = splits.valid_x, splits.valid_y     # the schedule holds the training rows it needs

    def hypergradient(lam, vx, vy):
        if reference:
            return unrolled_hypergradient_autograd(lam, w0, batches_x, batches_y, vx, vy, config.unroll_inner,
                                                   config.unroll_inner_step)
        return unrolled_hypergradient(lam, w0, batches_x, batches_y, vx, vy, config.unroll_inner,
                                      config.unroll_inner_step, workspace)

    def step_fn(state, i):
        if config.unroll_valid_batch:
            rs = step_rng(config.seed, i, STREAM_UNROLL_VALID)
            idx = rs.randint(0, len(valid_x), size=config.unroll_valid_batch)
            vx, vy = valid_x[idx], valid_y[idx]
        else:
            vx, vy = valid_x, valid_y
        value, g = hypergradient(state.lam, vx, vy)
        check_finite(value, i, "unrolled validation loss")
        check_finite(g, i, "unrolled hypergradient")
        lam = state.lam.copy()
        adam = adam_inplace(lam, g, state.adam, config.unroll_outer_step, scratch)
        return UnrolledState(lam, adam, state.step + 1)

    def evaluate(state):
        w = unrolled_weights(state.lam, w0, batches_x, batches_y, config.unroll_inner, config.unroll_inner_step,
                             workspace)
        return linear_mse(w, splits.valid_x, splits.valid_y), linear_mse(w, splits.test_x, splits.test_y)

    lam0 = np.full(w0.size, float(config.init_lambda))
    return UnrolledState(lam0, adam_init(lam0), 0), step_fn, evaluate
