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


ADAM_BLOCK = 1 << 14  # elements per block of _adam_into: a block's temporaries stay in the CPU cache


def _adam_into(x, g, m, v, t, step_size, b1, b2, eps, x_out, m_out, v_out):
    """Adam step t on 1-D float64 arrays, written into x_out, m_out, v_out block by block.

    The arithmetic is the textbook formula of adam_update, operation for operation, so the results are
    bitwise equal to it; working in cache-sized blocks without temporaries of full size makes it several
    times faster on millions of weights (it is memory-bound)."""
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    tmp = np.empty(min(ADAM_BLOCK, x.size))
    for start in range(0, x.size, ADAM_BLOCK):
        block = slice(start, start + ADAM_BLOCK)
        mb, vb, xb, gb = m_out[block], v_out[block], x_out[block], g[block]
        tb = tmp[:len(gb)]
        np.multiply(gb, 1 - b1, out=mb)        # m = (1 - b1) g + b1 m
        np.multiply(m[block], b1, out=tb)
        mb += tb
        np.square(gb, out=vb)                  # v = (1 - b2) g^2 + b2 v
        vb *= 1 - b2
        np.multiply(v[block], b2, out=tb)
        vb += tb
        np.divide(vb, c2, out=tb)              # sqrt(v_hat) + eps
        np.sqrt(tb, out=tb)
        tb += eps
        np.divide(mb, c1, out=xb)              # x - step_size * m_hat / (sqrt(v_hat) + eps)
        xb *= step_size
        xb /= tb
        np.subtract(x[block], xb, out=xb)


def adam_inplace(x, g, state, step_size, scratch, b1=0.9, b2=0.999, eps=1e-8):
    """Bias-corrected Adam step that overwrites x, state.m and state.v; scratch is a buffer with at least
    x.size entries (avoids allocating large temporaries). Returns the new AdamState. The update of
    adam_update up to rounding, rearranged as
    x -= step_size * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps * sqrt(1 - b2^t))."""
    t = state.step + 1
    m, v = state.m, state.v
    tmp = scratch[:x.size].reshape(x.shape)
    m *= b1
    np.multiply(g, 1 - b1, out=tmp)
    m += tmp
    v *= b2
    np.multiply(g, g, out=tmp)
    tmp *= 1 - b2
    v += tmp
    correction = np.sqrt(1 - b2 ** t)
    np.sqrt(v, out=tmp)
    tmp += eps * correction
    np.divide(m, tmp, out=tmp)
    tmp *= step_size * correction / (1 - b1 ** t)
    x -= tmp
    return AdamState(m, v, t)


def _is_flat_float(*arrays):
    return all(isinstance(a, np.ndarray) and a.dtype == np.float64 and a.ndim == 1 for a in arrays)


def adam_update(x, g, state, step_size, b1=0.9, b2=0.999, eps=1e-8):
    """One bias-corrected Adam step on flat arrays: returns (new x, new state); the inputs are not modified."""
    t = state.step + 1
    if _is_flat_float(x, g, state.m, state.v) and x.shape == g.shape == state.m.shape == state.v.shape:
        x_new, m, v = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        _adam_into(x, g, state.m, state.v, t, step_size, b1, b2, eps, x_new, m, v)
        return x_new, AdamState(m, v, t)
    m = (1 - b1) * g + b1 * state.m
    v = (1 - b2) * g ** 2 + b2 * state.v
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return x - step_size * m_hat / (np.sqrt(v_hat) + eps), AdamState(m, v, t)


def _leaves(tree):
    """Arrays of a list/tuple/array tree in autograd.misc.flatten's order, or None for other containers."""
    if isinstance(tree, (list, tuple)):
        leaves = []
        for item in tree:
            sub = _leaves(item)
            if sub is None:
                return None
            leaves.extend(sub)
        return leaves
    if isinstance(tree, np.ndarray):
        return [tree]
    return None


def _rebuild(tree, flat, start):
    """Container like tree whose arrays are reshaped views of flat from start on; returns (tree, end)."""
    if isinstance(tree, np.ndarray):
        return np.reshape(flat[start:start + tree.size], tree.shape), start + tree.size
    items = []
    for item in tree:
        rebuilt, start = _rebuild(item, flat, start)
        items.append(rebuilt)
    return _same_container(tree, items), start


def _same_container(template, items):
    """A list, tuple or namedtuple like template holding items."""
    return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)


def _split_like(tree):
    """Differentiable flat vector -> tree shaped like `tree` (one np.split: its gradient is one concatenate)."""
    cuts = np.cumsum([leaf.size for leaf in _leaves(tree)])[:-1]

    def rebuild(flat):
        parts = iter(anp.split(flat, cuts))

        def build(node):
            if isinstance(node, np.ndarray):
                return anp.reshape(next(parts), node.shape)
            return _same_container(node, [build(item) for item in node])
        return build(tree)
    return rebuild


def _flatten(tree):
    """(flat float64 vector, unflatten) like autograd.misc.flatten, but unflatten returns views.

    autograd's unflatten is a traced backward pass that allocates and adds full-size arrays every call;
    for list/tuple trees of float64 arrays this version is a concatenation once and slicing afterwards."""
    leaves = _leaves(tree)
    if not leaves or any(leaf.dtype != np.float64 for leaf in leaves):
        return flatten(tree)
    flat = np.concatenate([np.ravel(leaf) for leaf in leaves])
    return flat, lambda vector: _rebuild(tree, vector, 0)[0]


def _adam_tree_update(flat_x, g_tree, state, step_size, b1, b2, eps):
    """adam_update(flat_x, flatten(g_tree), state) without concatenating the gradient leaves first."""
    leaves = _leaves(g_tree)
    if (leaves is None or not _is_flat_float(flat_x, state.m, state.v)
            or any(leaf.dtype != np.float64 for leaf in leaves) or sum(leaf.size for leaf in leaves) != flat_x.size):
        return adam_update(flat_x, flatten(g_tree)[0], state, step_size, b1, b2, eps)
    t = state.step + 1
    x_new, m, v = np.empty_like(flat_x), np.empty_like(flat_x), np.empty_like(flat_x)
    start = 0
    for leaf in leaves:
        part = slice(start, start + leaf.size)
        _adam_into(flat_x[part], np.ravel(leaf), state.m[part], state.v[part], t, step_size, b1, b2, eps,
                   x_new[part], m[part], v[part])
        start += leaf.size
    return x_new, AdamState(m, v, t)


def adam_with_state(grad, x0, callback=None, num_iters=100, step_size=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                    state=None):
    """Adam from optional saved state; returns (params, state). grad and callback see the global step index."""
    flat_x, unflatten = _flatten(x0)
    state = adam_init(flat_x) if state is None else state
    for _ in range(num_iters):
        i = state.step
        g_tree = grad(unflatten(flat_x), i)
        if callback:
            callback(unflatten(flat_x), i, g_tree)
        flat_x, state = _adam_tree_update(flat_x, g_tree, state, step_size, b1, b2, eps)
    return unflatten(flat_x), state


def adam(grad, x0, callback=None, num_iters=100, step_size=1e-4, b1=0.9, b2=0.999, eps=1e-8):
    """Adam from scratch; returns the final parameters."""
    return adam_with_state(grad, x0, callback, num_iters, step_size, b1, b2, eps)[0]


def sgd(grad, x0, callback=None, num_iters=100, step_size=1e-4, start=0):
    """Plain gradient descent without momentum, x -= step_size * g; step indices start at `start`."""
    flat_x, unflatten = _flatten(x0)
    for i in range(start, start + num_iters):
        g_tree = grad(unflatten(flat_x), i)
        if callback:
            callback(unflatten(flat_x), i, g_tree)
        flat_x = flat_x - step_size * _flatten(g_tree)[0]
    return unflatten(flat_x)


def stacked_grad(batched_loss):
    """Gradient for K independent models trained as one problem.

    batched_loss(params, i) -> (K,) losses, model k's loss depending on model k's slice only; the
    gradient of their sum therefore holds each model's own gradient in its slice."""
    return autograd_grad(lambda params, i: anp.sum(batched_loss(params, i)))


def train_stacked(batched_loss, params0, num_iters, step_size=1e-4, callback=None, b1=0.9, b2=0.999, eps=1e-8):
    """Adam on K stacked models at once; identical to K separate Adam runs. Returns the final params.

    The gradient is taken with respect to one flat vector that the loss sees split into params0's shapes:
    same numbers as differentiating the parameter list, without autograd's zero-filled copies of every
    array for each container level (millions of weights each step when K is large)."""
    leaves = _leaves(params0)
    if not leaves or any(leaf.dtype != np.float64 for leaf in leaves):
        return adam(stacked_grad(batched_loss), params0, callback, num_iters, step_size, b1, b2, eps)
    flat0, unflatten = _flatten(params0)
    rebuild = _split_like(params0)
    flat_grad = stacked_grad(lambda flat, i: batched_loss(rebuild(flat), i))
    flat_callback = None if callback is None else (lambda x, i, g: callback(unflatten(x), i, unflatten(g)))
    return unflatten(adam(flat_grad, flat0, flat_callback, num_iters, step_size, b1, b2, eps))
