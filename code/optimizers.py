"""Adam and SGD over parameter pytrees, autograd-style: grad(params, i), callback(params, i, g).

Adam can be resumed from an explicit AdamState whose step counter keeps advancing across calls (the
released code's counter did not, which froze bias correction at step 1; SPEC section 2). Training K
independent models at once is one stacked problem: the gradient of the sum of their losses is each
model's own gradient, and Adam acts elementwise, so it equals K separate runs.
"""
from dataclasses import dataclass
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd import grad as autograd_grad
from autograd.misc import flatten


@dataclass(frozen=True)
class AdamConfig:
    """Adam hyperparameters (Kingma & Ba defaults, as in the released code)."""

    step_size: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


class AdamState(NamedTuple):
    """First and second moment estimates (flat, like the parameters) and the number of steps taken."""

    m: np.ndarray
    v: np.ndarray
    step: int


def adam_init(flat_params):
    """Fresh Adam state for a flat parameter vector."""
    return AdamState(np.zeros_like(flat_params), np.zeros_like(flat_params), 0)


def adam_update(x, g, state, step_size, b1=0.9, b2=0.999, eps=1e-8):
    """One bias-corrected Adam step on flat arrays: returns (new x, new state)."""
    t = state.step + 1
    m = (1 - b1) * g + b1 * state.m
    v = (1 - b2) * g ** 2 + b2 * state.v
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return x - step_size * m_hat / (np.sqrt(v_hat) + eps), AdamState(m, v, t)


def adam_with_state(grad, x0, callback=None, num_iters=100, step_size=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                    state=None):
    """Adam from optional saved state; returns (params, state). grad and callback see the global step index."""
    flat_x, unflatten = flatten(x0)
    state = adam_init(flat_x) if state is None else state
    for _ in range(num_iters):
        i = state.step
        g_tree = grad(unflatten(flat_x), i)
        if callback:
            callback(unflatten(flat_x), i, g_tree)
        flat_g, _ = flatten(g_tree)
        flat_x, state = adam_update(flat_x, flat_g, state, step_size, b1, b2, eps)
    return unflatten(flat_x), state


def adam(grad, x0, callback=None, num_iters=100, step_size=1e-4, b1=0.9, b2=0.999, eps=1e-8):
    """Adam from scratch; returns the final parameters."""
    return adam_with_state(grad, x0, callback, num_iters, step_size, b1, b2, eps)[0]


def sgd(grad, x0, callback=None, num_iters=100, step_size=1e-4, start=0):
    """Plain gradient descent without momentum, x -= step_size * g; step indices start at `start`."""
    flat_x, unflatten = flatten(x0)
    for i in range(start, start + num_iters):
        g_tree = grad(unflatten(flat_x), i)
        if callback:
            callback(unflatten(flat_x), i, g_tree)
        flat_x = flat_x - step_size * flatten(g_tree)[0]
    return unflatten(flat_x)


def stacked_grad(batched_loss):
    """Gradient for K independent models trained as one problem.

    batched_loss(params, i) -> (K,) losses, model k's loss depending on model k's slice only; the
    gradient of their sum therefore holds each model's own gradient in its slice."""
    return autograd_grad(lambda params, i: anp.sum(batched_loss(params, i)))


def train_stacked(batched_loss, params0, num_iters, step_size=1e-4, callback=None, b1=0.9, b2=0.999, eps=1e-8):
    """Adam on K stacked models at once; identical to K separate Adam runs. Returns the final params."""
    return adam(stacked_grad(batched_loss), params0, callback, num_iters, step_size, b1, b2, eps)
