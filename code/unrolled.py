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
    T gradients, first and second moments; 4 x T x P float64) and per-step scratch."""

    def __init__(self, steps, n_inputs, n_outputs, n_valid, batch_size=None):
        D, C = n_inputs, n_outputs
        P = D * C + C
        self.shape = (steps, D, C, n_valid)
        self.w = np.empty((steps + 1, P))   # w[t] = weights before inner step t + 1; w[T] = w_T
        self.g = np.empty((steps, P))       # g[t] = gradient of inner step t + 1
        self.m = np.empty((steps, P))       # moments after inner step t + 1 (Adam)
        self.v = np.empty((steps, P))
        self.tmp, self.tmp2, self.tmp3, self.hv = (np.empty(P) for _ in range(4))
        self.decay2 = np.empty(P)           # 2 exp(lambda)
        self.w_bar, self.m_bar, self.v_bar, self.g_bar, self.lam_bar = (np.empty(P) for _ in range(5))
        self.residual = None if batch_size is None else np.empty((batch_size, C))
        self.valid_residual = np.empty((n_valid, C))

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
    e, tmp, tmp2, r = ws.decay2, ws.tmp, ws.tmp2, ws.residual
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
        m, v = ws.m[t], ws.v[t]
        c1, c2 = 1.0 - B1 ** (t + 1), 1.0 - B2 ** (t + 1)
        np.multiply(g, 1.0 - B1, out=m)                  # m_t = b1 m_{t-1} + (1 - b1) g_t
        np.multiply(g, g, out=v)                         # v_t = b2 v_{t-1} + (1 - b2) g_t^2
        v *= 1.0 - B2
        if t > 0:
            np.multiply(ws.m[t - 1], B1, out=tmp)
            m += tmp
            np.multiply(ws.v[t - 1], B2, out=tmp)
            v += tmp
        np.divide(v, c2, out=tmp)                        # d_t = sqrt(v_t / c2) + eps
        np.sqrt(tmp, out=tmp)
        tmp += EPS
        np.divide(m, c1, out=tmp2)                       # w_t = w_{t-1} - a (m_t / c1) / d_t
        tmp2 *= a
        tmp2 /= tmp
        np.subtract(w, tmp2, out=ws.w[t + 1])
    return ws.w[T]


def unrolled_weights(lam, w0, batches_x, batches_y, inner="adam", inner_step=1e-3, workspace=None):
    """w_T(lambda) in numpy (the forward of unrolled_hypergradient; equals unrolled_train): a copy, (P,)."""
    check_inner(inner)
    T, B, D = batches_x.shape
    ws = _workspace_for(workspace, T, D, batches_y.shape[2], 0 if workspace is None else workspace.shape[3], B)
    return _forward(lam, w0, batches_x, batches_y, inner, inner_step, ws).copy()


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
        Adam:  dw_t/dm_t = -a / (c1 d_t);   dw_t/dv_t = (a m_t / c1) / d_t^2 * 1 / (2 s_t c2)   (d s/dv)
               m_bar += w_bar * (-a / (c1 d_t));   v_bar += w_bar * a m_t / (2 c1 c2 d_t^2 s_t)
               g_bar  = (1 - b1) m_bar + 2 (1 - b2) g_t v_bar      (m_t and v_t depend on g_t)
               m_bar *= b1;  v_bar *= b2                         (m_t -> m_{t-1}, v_t -> v_{t-1})
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
    e, tmp, tmp2, tmp3, hv, r = ws.decay2, ws.tmp, ws.tmp2, ws.tmp3, ws.hv, ws.residual
    _forward(lam, w0, batches_x, batches_y, inner, inner_step, ws)
    w_T, rv = ws.w[T], ws.valid_residual                 # ---- validation loss and dL/dw_T
    np.dot(valid_x, w_T[:DC].reshape(D, C), out=rv)
    rv += w_T[DC:]
    rv -= valid_y
    value = float(np.vdot(rv, rv)) / (N * C)
    rv *= 2.0 / (N * C)
    w_bar, m_bar, v_bar, g_bar, lam_bar = ws.w_bar, ws.m_bar, ws.v_bar, ws.g_bar, ws.lam_bar
    _data_grad_into(valid_x, rv, w_bar, D, C)
    m_bar[:] = 0.0
    v_bar[:] = 0.0
    lam_bar[:] = 0.0
    for t in range(T - 1, -1, -1):                       # ---- reverse
        if adam:
            c1, c2 = 1.0 - B1 ** (t + 1), 1.0 - B2 ** (t + 1)
            np.divide(ws.v[t], c2, out=tmp3)             # s_t = sqrt(v_t / c2)
            np.sqrt(tmp3, out=tmp3)
            np.add(tmp3, EPS, out=tmp2)                  # d_t = s_t + eps
            np.divide(w_bar, tmp2, out=tmp)              # m_bar += w_bar * (-a / c1) / d_t
            tmp *= -a / c1
            m_bar += tmp
            np.multiply(w_bar, ws.m[t], out=tmp)         # v_bar += w_bar m_t a / (2 c1 c2) / (d_t^2 s_t)
            tmp /= tmp2
            tmp /= tmp2
            tmp /= tmp3
            tmp *= a / (2.0 * c1 * c2)
            v_bar += tmp
            np.multiply(m_bar, 1.0 - B1, out=g_bar)      # g_bar = (1 - b1) m_bar + 2 (1 - b2) g_t v_bar
            np.multiply(ws.g[t], v_bar, out=tmp)
            tmp *= 2.0 * (1.0 - B2)
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
