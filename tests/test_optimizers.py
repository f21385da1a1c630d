"""Adam and SGD against hand-computed steps, resumable Adam, and K stacked models against K separate runs."""
import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

import neural_network as nn
from common import step_rng
from optimizers import (
    AdamConfig,
    AdamState,
    adam,
    adam_init,
    adam_inplace,
    adam_step_differentiable,
    adam_textbook,
    adam_update,
    adam_with_state,
    sgd,
    train_stacked,
)

# Quadratic f(x) = 1/2 sum a (x - c)^2, gradient a (x - c).
A = np.array([2.0, 0.5])
C = np.array([0.5, 1.0])
X0 = np.array([1.0, -2.0])


def quad_grad(x, i):
    return A * (x - C)


def test_adam_equals_hand_computed_steps():
    alpha, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    # step 1: m = (1-b1) g, v = (1-b2) g^2; bias correction divides by (1-b1) and (1-b2), so the step is
    # alpha * g / (|g| + eps): about alpha in the direction of -sign(g).
    g1 = A * (X0 - C)                                   # [1, -1.5]
    m1, v1 = 0.1 * g1, 0.001 * g1 ** 2
    x1 = X0 - alpha * (m1 / 0.1) / (np.sqrt(v1 / 0.001) + eps)
    np.testing.assert_allclose(x1, [0.9, -1.9], atol=1e-8)
    # step 2: 1 - b1^2 = 0.19, 1 - b2^2 = 0.001999
    g2 = A * (x1 - C)
    m2, v2 = 0.9 * m1 + 0.1 * g2, 0.999 * v1 + 0.001 * g2 ** 2
    x2 = x1 - alpha * (m2 / 0.19) / (np.sqrt(v2 / 0.001999) + eps)
    # step 3: 1 - b1^3 = 0.271, 1 - b2^3 = 0.002997001
    g3 = A * (x2 - C)
    m3, v3 = 0.9 * m2 + 0.1 * g3, 0.999 * v2 + 0.001 * g3 ** 2
    x3 = x2 - alpha * (m3 / 0.271) / (np.sqrt(v3 / 0.002997001) + eps)

    for n, expected in ((1, x1), (2, x2), (3, x3)):
        np.testing.assert_allclose(adam(quad_grad, X0, num_iters=n, step_size=alpha, b1=b1, b2=b2, eps=eps),
                                   expected, rtol=1e-13, atol=1e-15)
    x, state = X0, adam_init(X0)
    for _ in range(3):
        x, state = adam_update(x, quad_grad(x, 0), state, alpha)
    np.testing.assert_allclose(x, x3, rtol=1e-13)
    np.testing.assert_allclose(state.m, m3, rtol=1e-13)
    np.testing.assert_allclose(state.v, v3, rtol=1e-13)
    assert state.step == 3


def test_adam_config_defaults_are_kingma_ba():
    assert AdamConfig() == AdamConfig(step_size=1e-4, b1=0.9, b2=0.999, eps=1e-8)


def params_tree():
    return [(np.array([[1.0, -2.0], [0.5, 3.0]]), np.array([0.1, -0.4])), (np.array([[2.0], [-1.0]]), np.array([0.3]))]


def tree_grad(params, i):
    """Gradient of a loss whose minibatch depends on the step index, so the index matters."""
    def loss(p):
        x = step_rng(5, i).randn(4, 2)
        return anp.sum(nn.mlp_predict(p, x) ** 2) + 0.1 * anp.sum(nn.flatten_params(p) ** 4)
    return grad(loss)(params)


def test_resumed_adam_equals_uninterrupted_run():
    seen = []
    callback = lambda params, i, g: seen.append(i)
    full, full_state = adam_with_state(tree_grad, params_tree(), num_iters=7, step_size=0.05)
    part, state = adam_with_state(tree_grad, params_tree(), callback, num_iters=3, step_size=0.05)
    assert state.step == 3
    # resume from a copy of the saved state (as if written to disk and read back)
    saved = AdamState(state.m.copy(), state.v.copy(), int(state.step))
    resumed, resumed_state = adam_with_state(tree_grad, part, callback, num_iters=4, step_size=0.05, state=saved)
    assert resumed_state.step == 7 and full_state.step == 7
    assert seen == list(range(7))  # the callback (and the gradient) saw the global step index
    np.testing.assert_allclose(nn.flatten_params(resumed), nn.flatten_params(full), rtol=0, atol=1e-14)
    np.testing.assert_allclose(resumed_state.m, full_state.m, atol=1e-14)
    np.testing.assert_allclose(resumed_state.v, full_state.v, atol=1e-14)
    # The released code's frozen counter (bias correction stuck at step 1) gives different numbers.
    frozen, _ = adam_with_state(tree_grad, part, num_iters=4, step_size=0.05, state=saved._replace(step=0))
    assert np.max(np.abs(nn.flatten_params(frozen) - nn.flatten_params(full))) > 1e-4


def test_adam_callback_sees_params_index_and_gradient():
    calls = []
    adam(tree_grad, params_tree(), lambda p, i, g: calls.append((nn.flatten_params(p), i, nn.flatten_params(g))),
         num_iters=3, step_size=0.05)
    assert [i for _, i, _ in calls] == [0, 1, 2]
    np.testing.assert_array_equal(calls[0][0], nn.flatten_params(params_tree()))
    for params, i, g in calls:
        unflat = [(params[:4].reshape(2, 2), params[4:6]), (params[6:8].reshape(2, 1), params[8:])]
        np.testing.assert_allclose(g, nn.flatten_params(tree_grad(unflat, i)), rtol=1e-14)
    assert not np.allclose(calls[1][0], calls[0][0])


def test_sgd_equals_hand_steps():
    lr = 0.1
    x = sgd(quad_grad, X0, num_iters=5, step_size=lr)
    # x_{k+1} - c = (1 - lr a) (x_k - c)
    np.testing.assert_allclose(x, C + (1 - lr * A) ** 5 * (X0 - C), rtol=1e-14)
    one = sgd(quad_grad, X0, num_iters=1, step_size=lr)
    np.testing.assert_allclose(one, X0 - lr * A * (X0 - C), rtol=1e-15)


def test_sgd_step_indices_start_where_asked():
    seen = []
    sgd(lambda x, i: seen.append(("grad", i)) or np.zeros_like(x), X0, lambda p, i, g: seen.append(("cb", i)),
        num_iters=2, start=10)
    assert seen == [("grad", 10), ("cb", 10), ("grad", 11), ("cb", 11)]


# ---------------------------------------------------------------------------------- stacked models

@pytest.mark.parametrize("layers", [[6, 3], [6, 4, 3]])
def test_train_stacked_equals_separate_adam_runs(layers):
    K, N, batch = 4, 30, 8
    rs = np.random.RandomState(1)
    x_all, y_all = rs.randn(N, layers[0]), np.eye(3)[rs.randint(3, size=N)]
    lams = rs.uniform(-3, 3, size=(K, 3))
    params_k = [nn.init_mlp(layers, 0.3, rs) for _ in range(K)]

    def batch_at(i):
        rows = step_rng(7, i).choice(N, size=batch, replace=False)
        return x_all[rows], y_all[rows]

    def batched_loss(params, i):
        x, y = batch_at(i)
        return nn.gaussian_nll(nn.batched_mlp_predict(params, x), y) + nn.class_norm_regulariser(params[-1][0], lams)

    def single_loss(k):
        def loss(params, i):
            x, y = batch_at(i)
            W = params[-1][0]
            reg = anp.sum(anp.exp(lams[k]) * anp.sqrt(anp.sum(W ** 2, axis=0))) / 3
            return anp.mean(50.0 * (nn.mlp_predict(params, x) - y) ** 2) + nn.LOG_SIGMA_CONST + reg
        return loss

    steps = []
    stacked = train_stacked(batched_loss, nn.stack_params(params_k), num_iters=6, step_size=0.01,
                            callback=lambda p, i, g: steps.append(i))
    assert steps == list(range(6))
    for k in range(K):
        separate = adam(grad(single_loss(k)), params_k[k], num_iters=6, step_size=0.01)
        for (Ws, bs), (W, b) in zip(stacked, separate, strict=True):
            np.testing.assert_allclose(Ws[k], W, rtol=0, atol=1e-12)
            np.testing.assert_allclose(bs[k], b, rtol=0, atol=1e-12)
    # and the models really moved, differently
    moved = [np.abs(stacked[0][0][k] - params_k[k][0][0]).max() for k in range(K)]
    assert min(moved) > 1e-3


def hand_worked_adam(x, gs, step_size, b1=0.9, b2=0.999, eps=1e-8):
    """Adam written out from Kingma & Ba's Algorithm 1, one scalar at a time in Python floats: x (n,),
    gs = gradients of successive steps -> (x, m, v) after len(gs) steps."""
    x, m, v = [float(a) for a in x], [0.0] * len(x), [0.0] * len(x)
    for t, g in enumerate(gs, start=1):
        for j, gj in enumerate(g):
            m[j] = b1 * m[j] + (1 - b1) * gj
            v[j] = b2 * v[j] + (1 - b2) * gj * gj
            x[j] -= step_size * (m[j] / (1 - b1 ** t)) / ((v[j] / (1 - b2 ** t)) ** 0.5 + eps)
    return np.array(x), np.array(m), np.array(v)


def check_against_hand_worked(adam_step, n=7, steps=6, step_size=1e-2, rtol=1e-12):
    """adam_step(x, g, state, step_size, scratch) -> AdamState, updating x in place, must match
    hand_worked_adam after each of `steps` steps (ragged gradients of mixed signs and scales)."""
    rs = np.random.RandomState(11)
    x0 = rs.randn(n)
    x, state, gs = x0.copy(), adam_init(x0), []
    for _ in range(steps):
        gs.append(rs.randn(n) * np.logspace(-3, 2, n))
        state = adam_step(x, gs[-1], state, step_size, np.empty(3))
        ex, em, ev = hand_worked_adam(x0, gs, step_size)
        np.testing.assert_allclose(x, ex, rtol=rtol, atol=0)
        np.testing.assert_allclose(state.m, em, rtol=rtol, atol=0)
        np.testing.assert_allclose(state.v, ev, rtol=rtol, atol=0)
    assert state.step == steps


def test_fused_inplace_adam_equals_hand_worked_steps():
    check_against_hand_worked(adam_inplace)


def test_fused_adam_blocks_and_shapes(monkeypatch):
    import optimizers
    monkeypatch.setattr(optimizers, "ADAM_BLOCK", 5)        # several blocks and a ragged end
    check_against_hand_worked(adam_inplace, n=23)
    W, g = np.arange(6.0).reshape(2, 3), np.ones((2, 3))     # 2-D arrays are updated through flat views
    state = adam_inplace(W, g, adam_init(W), 0.1)
    np.testing.assert_allclose(W, np.arange(6.0).reshape(2, 3) - 0.1 / (1 + 1e-8), rtol=1e-12)
    assert state.m.shape == (2, 3) and state.step == 1
    with pytest.raises(ValueError, match="contiguous"):
        big = np.zeros((3, 4))
        adam_inplace(big[:, :2], np.ones((3, 2)), adam_init(np.zeros((3, 2))), 0.1)


def _mutant(kind):
    """adam_inplace with one deliberate error, to show the hand-worked test catches it."""
    def step(x, g, state, step_size, scratch):
        t = state.step + 1
        m = 0.9 * state.m + 0.1 * g
        v = 0.999 * state.v + 0.001 * g ** 2
        if kind == "no bias correction":
            x -= step_size * m / (np.sqrt(v) + 1e-8)
        elif kind == "wrong sign":
            x += step_size * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        elif kind == "frozen counter":
            x -= step_size * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
        state.m[:], state.v[:] = m, v
        return AdamState(state.m, state.v, t)
    return step


@pytest.mark.parametrize("kind", ["no bias correction", "wrong sign", "frozen counter"])
def test_hand_worked_check_catches_mutations(kind):
    with pytest.raises(AssertionError):
        check_against_hand_worked(_mutant(kind))


def test_pure_adam_update_and_textbook_reference():
    rs = np.random.RandomState(2)
    n = 3 * 2 ** 15 + 17  # several blocks and a ragged end
    x, g, m, v = rs.randn(n), rs.randn(n), rs.randn(n) * 0.1, rs.rand(n) * 0.01
    copies = [a.copy() for a in (x, g, m, v)]
    state = AdamState(m, v, 4)
    new_x, new_state = adam_update(x, g, state, 1e-3)
    ex, es = adam_textbook(x, g, state, 1e-3)
    np.testing.assert_allclose(new_x, ex, rtol=1e-12)
    np.testing.assert_allclose(new_state.m, es.m, rtol=1e-12, atol=1e-14)  # cancellation: error ~ eps |g|
    np.testing.assert_allclose(new_state.v, es.v, rtol=1e-12)
    assert new_state.step == 5 == es.step
    for a, copy in zip((x, g, m, v), copies, strict=True):
        np.testing.assert_array_equal(a, copy)  # pure: inputs untouched
    # other dtypes take the textbook formula
    x32 = np.ones((2, 3), np.float32)
    out, st = adam_update(x32, x32, AdamState(np.zeros((2, 3)), np.zeros((2, 3)), 0), 0.1)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, 0.9, rtol=1e-6)


def test_differentiable_adam_step_is_textbook_and_traceable():
    rs = np.random.RandomState(4)
    x, g, m, v = rs.randn(5), rs.randn(5), rs.randn(5) * 0.1, rs.rand(5)
    x1, m1, v1 = adam_step_differentiable(x, g, m, v, 3, 1e-2)
    ex, es = adam_textbook(x, g, AdamState(m, v, 2), 1e-2)
    np.testing.assert_array_equal(x1, ex)
    np.testing.assert_array_equal(m1, es.m)
    # d x1 / d g through autograd against central differences
    f = lambda g_: anp.sum(np.arange(5) * adam_step_differentiable(x, g_, m, v, 3, 1e-2)[0])
    h, e = 1e-6, np.eye(5)
    fd = np.array([(f(g + h * e[j]) - f(g - h * e[j])) / (2 * h) for j in range(5)])
    np.testing.assert_allclose(grad(f)(g), fd, rtol=1e-6, atol=1e-10)


def test_adam_on_a_tree_is_bitwise_flat_adam():
    tree = [(np.arange(6.0).reshape(2, 3), np.ones(3)), (np.full((3, 1), 2.0), np.zeros(1))]
    g = lambda p, i: [(np.cos(W + i), np.sin(b)) for W, b in p]
    flat_g = lambda x, i: nn.flatten_params(g([(x[:6].reshape(2, 3), x[6:9]), (x[9:12].reshape(3, 1), x[12:])], i))
    tree_out, tree_state = adam_with_state(g, tree, num_iters=3, step_size=0.1)
    flat_out, flat_state = adam_with_state(flat_g, nn.flatten_params(tree), num_iters=3, step_size=0.1)
    np.testing.assert_array_equal(nn.flatten_params(tree_out), flat_out)
    np.testing.assert_array_equal(tree_state.v, flat_state.v)


def test_train_stacked_callback_sees_the_tree_gradient():
    rs = np.random.RandomState(3)
    x, lams = rs.randn(5, 3), rs.randn(2, 2)
    params0 = nn.stack_params([nn.init_mlp([3, 2], 0.5, rs) for _ in range(2)])

    def batched_loss(params, i):
        return nn.mse(nn.batched_mlp_predict(params, x * (i + 1)), 0.0 * x[:, :2]) + nn.class_norm_regulariser(
            params[0][0], lams)

    seen = []
    final = train_stacked(batched_loss, params0, 3, step_size=0.1, callback=lambda p, i, g: seen.append((p, i, g)))
    assert [i for _, i, _ in seen] == [0, 1, 2]
    params1, _, g1 = seen[1]
    assert isinstance(params1, list) and isinstance(params1[0], tuple) and params1[0][0].shape == (2, 3, 2)
    expected = grad(lambda p: anp.sum(batched_loss(p, 1)))(params1)
    np.testing.assert_allclose(nn.flatten_params(g1), nn.flatten_params(expected), rtol=1e-13)
    reference = adam(grad(lambda p, i: anp.sum(batched_loss(p, i))), params0, num_iters=3, step_size=0.1)
    np.testing.assert_array_equal(nn.flatten_params(final), nn.flatten_params(reference))


def test_fused_adam_numbers_do_not_depend_on_the_block_size(monkeypatch):
    """Every pass is elementwise, so ADAM_BLOCK changes the speed, never a bit of the result."""
    import optimizers
    rs = np.random.RandomState(8)
    n = 3 * optimizers.ADAM_BLOCK + 11
    x0, g, m0, v0 = rs.randn(n), rs.randn(n), rs.randn(n) * 0.1, rs.rand(n) * 0.01
    results = []
    for block in (optimizers.ADAM_BLOCK, 1000, 7):
        monkeypatch.setattr(optimizers, "ADAM_BLOCK", block)
        x, m, v = x0.copy(), m0.copy(), v0.copy()
        adam_inplace(x, g, AdamState(m, v, 3), 1e-3)
        results.append(b"".join(a.tobytes() for a in (x, m, v)))
    assert results[0] == results[1] == results[2]
