"""unrolled.py: the hand-written reverse pass against autograd and finite differences (default Adam inner
loop), the inner Adam's bias correction, and data separation (the hypergradient never reads test data)."""
from types import SimpleNamespace

import numpy as np
import pytest

import unrolled as ur
from common import step_rng

D, C, B, T, N = 6, 3, 5, 12, 7   # a small linear model 6 -> 3 (21 weights), 12 unrolled steps


def tiny(seed=0, steps=T):
    """(lam, w0, batches_x, batches_y, valid_x, valid_y) of a small problem."""
    rs = np.random.RandomState(seed)
    P = D * C + C
    return (-2.0 + 0.5 * rs.randn(P), 0.3 * rs.randn(P), rs.randn(steps, B, D), rs.randn(steps, B, C),
            rs.randn(N, D), rs.randn(N, C))


def textbook_inner_loop(lam, w0, bx, by, step_size, bias_correction=True):
    """w_T written out plainly in the test: Adam (Kingma & Ba, Algorithm 1) on the linear model's
    MSE + sum exp(lambda) w^2, one minibatch per step."""
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, len(bx) + 1):
        x, y = bx[t - 1], by[t - 1]
        W, b = w[:D * C].reshape(D, C), w[D * C:]
        residual = x @ W + b - y
        g = np.concatenate([(2 / residual.size * x.T @ residual).ravel(), 2 / residual.size * residual.sum(0)])
        g += 2 * np.exp(lam) * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g ** 2
        if bias_correction:
            w = w - step_size * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        else:
            w = w - step_size * m / (np.sqrt(v) + 1e-8)
    return w


def valid_mse(w, vx, vy):
    return np.mean((vx @ w[:D * C].reshape(D, C) + w[D * C:] - vy) ** 2)


@pytest.mark.parametrize("inner, step", [("adam", 1e-2), ("sgd", 5e-2)])
def test_hand_written_equals_autograd(inner, step):
    lam, w0, bx, by, vx, vy = tiny()
    value, g = ur.unrolled_hypergradient(lam, w0, bx, by, vx, vy, inner, step)
    ref_value, ref_g = ur.unrolled_hypergradient_autograd(lam, w0, bx, by, vx, vy, inner, step)
    assert value == pytest.approx(ref_value, rel=1e-12)
    np.testing.assert_allclose(g, ref_g, rtol=1e-9, atol=1e-9 * np.max(np.abs(ref_g)))
    assert np.max(np.abs(g)) > 1e-6


def test_hand_written_equals_autograd_at_mnist_width(synthetic):
    """784 -> 10 on synthetic images, a reused workspace, twice (the buffers are reset between calls)."""
    x, y = synthetic.train_images[:400], synthetic.train_labels[:400]
    bx, by = ur.unrolled_schedule(x, y, 6, 20, seed=3)
    w0 = ur.initial_weights(784, 10, 1e-3, seed=3)
    ws = ur.Workspace(6, 784, 10, 50, 20)
    vx, vy = synthetic.train_images[400:450], synthetic.train_labels[400:450]
    for lam in (np.full(7850, -7.0), np.full(7850, -3.0) + 0.1 * np.random.RandomState(0).randn(7850)):
        value, g = ur.unrolled_hypergradient(lam, w0, bx, by, vx, vy, "adam", 1e-3, ws)
        ref_value, ref_g = ur.unrolled_hypergradient_autograd(lam, w0, bx, by, vx, vy, "adam", 1e-3)
        assert value == pytest.approx(ref_value, rel=1e-12)
        np.testing.assert_allclose(g, ref_g, rtol=1e-9, atol=1e-9 * np.max(np.abs(ref_g)))


def test_finite_differences_with_the_default_adam_inner_loop():
    lam, w0, bx, by, vx, vy = tiny(1)
    _, g = ur.unrolled_hypergradient(lam, w0, bx, by, vx, vy)   # defaults: Adam, step 1e-3
    f = lambda lam_: valid_mse(textbook_inner_loop(lam_, w0, bx, by, 1e-3), vx, vy)
    rs, h = np.random.RandomState(2), 1e-5
    for _ in range(4):
        direction = rs.randn(lam.size)
        fd = (f(lam + h * direction) - f(lam - h * direction)) / (2 * h)
        assert g @ direction == pytest.approx(fd, rel=1e-5, abs=1e-12)
    for j in (0, 7, lam.size - 1):                   # single coordinates (a weight and a bias)
        e = np.zeros(lam.size)
        e[j] = 1.0
        assert g[j] == pytest.approx((f(lam + h * e) - f(lam - h * e)) / (2 * h), rel=1e-4, abs=1e-12)


def test_inner_adam_is_bias_corrected():
    lam, w0, bx, by, vx, vy = tiny(3)
    expected = textbook_inner_loop(lam, w0, bx, by, 1e-2)
    uncorrected = textbook_inner_loop(lam, w0, bx, by, 1e-2, bias_correction=False)
    assert np.max(np.abs(expected - uncorrected)) > 1e-3    # the check below can tell them apart
    np.testing.assert_allclose(ur.unrolled_weights(lam, w0, bx, by, "adam", 1e-2), expected, rtol=1e-12)
    np.testing.assert_allclose(ur.unrolled_train(lam, w0, bx, by, "adam", 1e-2), expected, rtol=1e-12)
    value, _ = ur.unrolled_hypergradient(lam, w0, bx, by, vx, vy, "adam", 1e-2)
    assert value == pytest.approx(valid_mse(expected, vx, vy), rel=1e-12)
    # Bias-corrected Adam's first step moves every weight by the step size (|g| >> eps), not 3.2x it.
    w1 = ur.unrolled_weights(lam, w0, bx[:1], by[:1], "adam", 1e-2)
    np.testing.assert_allclose(np.abs(w1 - w0), 1e-2, rtol=1e-4)   # 1e-2 |g| / (|g| + eps)


def test_sgd_inner_loop_is_plain_gradient_descent():
    lam, w0, bx, by, _, _ = tiny(4, steps=1)
    g = ur.linear_decay_grad(w0, lam, bx[0], by[0])
    np.testing.assert_allclose(ur.unrolled_weights(lam, w0, bx, by, "sgd", 0.1), w0 - 0.1 * g, rtol=1e-13)
    with pytest.raises(ValueError, match="inner optimiser"):
        ur.unrolled_weights(lam, w0, bx, by, "rmsprop")


def splits_of(synthetic, poison_test=False):
    x, y = synthetic.train_images, synthetic.train_labels
    test_x, test_y = synthetic.test_images[:100].copy(), synthetic.test_labels[:100].copy()
    if poison_test:
        test_x[:], test_y[:] = np.nan, np.nan
    return SimpleNamespace(train_x=x[:300], train_y=y[:300], valid_x=x[300:500], valid_y=y[300:500],
                           test_x=test_x, test_y=test_y)


def baseline_config(**overrides):
    fields = dict(seed=7, batch_size=20, init_lambda=-7.0, unroll_steps=8, unroll_inner="adam",
                  unroll_inner_step=1e-3, unroll_outer_step=0.2, unroll_init_scale=1e-3, unroll_valid_batch=0)
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("valid_batch", [0, 50])
def test_the_baseline_never_reads_test_data(synthetic, valid_batch):
    """Test arrays full of NaN leave every outer step bit-identical; only evaluate() sees them."""
    config = baseline_config(unroll_valid_batch=valid_batch)
    lams = []
    for poison in (False, True):
        state, step_fn, evaluate = ur.make_unrolled(splits_of(synthetic, poison), config)
        for i in range(3):
            state = step_fn(state, i)
        lams.append(state.lam)
        valid, test = evaluate(state)
        assert np.isfinite(valid) and np.isnan(test) == poison
    assert lams[0].tobytes() == lams[1].tobytes()
    assert np.max(np.abs(lams[0] + 7.0)) > 0.1          # lambda moved (outer Adam step 0.2)


def test_baseline_hand_written_equals_reference(synthetic):
    config = baseline_config(unroll_steps=4)
    states = []
    for reference in (False, True):
        state, step_fn, _ = ur.make_unrolled(splits_of(synthetic), config, reference=reference)
        for i in range(3):
            state = step_fn(state, i)
        states.append(state)
    np.testing.assert_allclose(states[0].lam, states[1].lam, rtol=1e-9)
    np.testing.assert_allclose(states[0].adam.m, states[1].adam.m, rtol=1e-8, atol=1e-12)


def test_schedule_is_the_documented_stream(synthetic):
    x, y = synthetic.train_images[:50], synthetic.train_labels[:50]
    bx, by = ur.unrolled_schedule(x, y, 3, 4, seed=9)
    idx = step_rng(9, 0, ur.STREAM_UNROLL_SCHEDULE).randint(0, 50, size=(3, 4))
    assert np.array_equal(bx, x[idx]) and np.array_equal(by, y[idx])


def test_validation_through_the_gram_matrix_equals_autograd():
    """More validation rows than inputs + 1: the loss and dL/dw_T go through the cached Gram matrix."""
    lam, w0, bx, by, _, _ = tiny(5)
    rs = np.random.RandomState(6)
    vx, vy = rs.randn(40, D), rs.randn(40, C)
    ws = ur.Workspace(T, D, C, 40, B).use_gram(vx, vy)
    for _ in range(2):
        value, g = ur.unrolled_hypergradient(lam, w0, bx, by, vx, vy, "adam", 1e-2, ws)
        ref_value, ref_g = ur.unrolled_hypergradient_autograd(lam, w0, bx, by, vx, vy, "adam", 1e-2)
        assert value == pytest.approx(ref_value, rel=1e-12)
        np.testing.assert_allclose(g, ref_g, rtol=1e-9, atol=1e-9 * np.max(np.abs(ref_g)))
    assert ws.gram_for(vx, vy) is not None
    vx2 = vx + 1.0                                       # another validation set: the direct path
    assert ws.gram_for(vx2, vy) is None
    value, _ = ur.unrolled_hypergradient(lam, w0, bx, by, vx2, vy, "adam", 1e-2, ws)
    assert value == pytest.approx(ur.unrolled_hypergradient_autograd(lam, w0, bx, by, vx2, vy, "adam", 1e-2)[0],
                                  rel=1e-12)
