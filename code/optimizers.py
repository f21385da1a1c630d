"""Adam and SGD over parameter pytrees, autograd-style: grad(params, i), callback(params, i, g).

One fused in-place Adam step (adam_inplace, numpy ufuncs with out=) serves every numpy caller;
adam_textbook is its plain reference and adam_step_differentiable the autograd-traceable form.
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


ADAM_BLOCK = 1 << 16  # elements per block of adam_inplace: a block's working set stays in L3 cache; 2^16 was
# faster than 2^15 (numpy call overhead per block) on 165k- and 400k-entry arrays (issue 13), the same numbers


def adam_inplace(x, g, state, step_size, scratch=None, b1=0.9, b2=0.999, eps=1e-8):
    """One bias-corrected Adam step that overwrites x, state.m and state.v (same shape as x); returns the new
    AdamState. scratch: a float64 buffer of >= min(x.size, ADAM_BLOCK) entries (allocated when None).

    The fused form of the textbook step (Kingma & Ba, Algorithm 1), equal to it up to rounding:
        m <- b1 m + (1 - b1) g                         computed as  m = b1 (m - g) + g
        v <- b2 v + (1 - b2) g^2                       computed as  v = b2 (v - g^2) + g^2
        x <- x - a (m / c1) / (sqrt(v / c2) + eps),    c1 = 1 - b1^t, c2 = 1 - b2^t,
          =  x - [a sqrt(c2) / c1] m / (sqrt(v) + eps sqrt(c2))   (numerator and denominator times sqrt(c2)).
    Twelve numpy passes with out=, block by block so each block's operands stay in cache; no temporaries
    beyond `scratch` (it is memory-bound on large arrays: 7 float64 reads/writes per element)."""
    if not all(a.flags.c_contiguous for a in (x, state.m, state.v)):
        raise ValueError("adam_inplace needs C-contiguous x, m and v (it writes through flat views)")
    t = state.step + 1
    root_c2 = np.sqrt(1.0 - b2 ** t)
    alpha, eps_t = step_size * root_c2 / (1.0 - b1 ** t), eps * root_c2
    xf, gf, mf, vf = (np.reshape(a, -1) for a in (x, g, state.m, state.v))  # views (x, m, v are contiguous)
    n = xf.size
    if scratch is None or scratch.size < min(n, ADAM_BLOCK):
        scratch = np.empty(min(n, ADAM_BLOCK))
    for start in range(0, n, ADAM_BLOCK):
        block = slice(start, start + ADAM_BLOCK)
        xb, gb, mb, vb = xf[block], gf[block], mf[block], vf[block]
        tb = scratch[:len(xb)]
        mb -= gb                      # m = b1 (m - g) + g
        mb *= b1
        mb += gb
        np.multiply(gb, gb, out=tb)   # v = b2 (v - g^2) + g^2
        vb -= tb
        vb *= b2
        vb += tb
        np.sqrt(vb, out=tb)           # x -= alpha m / (sqrt(v) + eps_t)
        tb += eps_t
        np.divide(mb, tb, out=tb)
        tb *= alpha
        xb -= tb
    return AdamState(state.m, state.v, t)


def adam_textbook(x, g, state, step_size, b1=0.9, b2=0.999, eps=1e-8):
    """The textbook bias-corrected Adam step with fresh arrays (the reference of adam_inplace); returns
    (new x, new state), inputs unmodified."""
    t = state.step + 1
    m = (1 - b1) * g + b1 * state.m
    v = (1 - b2) * g ** 2 + b2 * state.v
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return x - step_size * m_hat / (np.sqrt(v_hat) + eps), AdamState(m, v, t)


def adam_step_differentiable(x, g, m, v, t, step_size, b1=0.9, b2=0.999, eps=1e-8):
    """Adam step t (1-based) written with autograd.numpy so autograd can trace it (unrolled differentiation):
    returns (x, m, v) after the textbook bias-corrected update; any array shapes."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return x - step_size * m_hat / (anp.sqrt(v_hat) + eps), m, v


def _is_flat_float(*arrays):
    return all(isinstance(a, np.ndarray) and a.dtype == np.float64 and a.ndim == 1 for a in arrays)


def adam_update(x, g, state, step_size, b1=0.9, b2=0.999, eps=1e-8):
    """One bias-corrected Adam step: returns (new x, new state); the inputs are not modified.
    float64 arrays take adam_inplace on copies; anything else the textbook formula."""
    arrays = (x, g, state.m, state.v)
    if all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in arrays) and \
            x.shape == g.shape == state.m.shape == state.v.shape:
        x_new, m, v = np.array(x), np.array(state.m), np.array(state.v)
        return x_new, adam_inplace(x_new, g, AdamState(m, v, state.step), step_size, None, b1, b2, eps)
    return adam_textbook(x, g, state, step_size, b1, b2, eps)


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
    x_new, m, v = flat_x.copy(), state.m.copy(), state.v.copy()
    scratch, start = np.empty(min(flat_x.size, ADAM_BLOCK)), 0
    for leaf in leaves:
        part = slice(start, start + leaf.size)
        adam_inplace(x_new[part], np.ravel(leaf), AdamState(m[part], v[part], state.step), step_size, scratch,
                     b1, b2, eps)
        start += leaf.size
    return x_new, AdamState(m, v, state.step + 1)


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
