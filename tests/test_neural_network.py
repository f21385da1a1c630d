"""Losses, regularisers, hypernetworks: gradients against finite differences, batched code against loops."""
import autograd.numpy as anp
import numpy as np
import pytest
import scipy.stats
from autograd import grad
from autograd.test_util import check_grads

import neural_network as nn

TOL = 1e-10


@pytest.fixture
def rs():
    return np.random.RandomState(0)


# ------------------------------------------------------------------------- gradients (finite diffs)

@pytest.mark.parametrize("loss", [nn.gaussian_nll, nn.mse, nn.softmax_cross_entropy])
def test_loss_gradients(loss, rs):
    predictions = rs.randn(2, 3, 4)
    targets = np.eye(4)[rs.randint(4, size=(2, 3))]
    weights = rs.randn(2)  # weight the K losses differently so every output matters
    check_grads(lambda y: anp.sum(weights * loss(y, targets)), modes=["rev"], order=1)(predictions)


def test_norm_regulariser_gradient(rs):
    flat, lam = rs.randn(3, 7), rs.randn(3)
    check_grads(lambda w, lam_: anp.sum(nn.norm_regulariser(w, lam_)), modes=["rev"])(flat, lam)


def test_class_norm_regulariser_gradient(rs):
    W, lam = rs.randn(3, 5, 4), rs.randn(3, 4)
    check_grads(lambda W_, lam_: anp.sum(nn.class_norm_regulariser(W_, lam_)), modes=["rev"])(W, lam)


def test_per_weight_l2_gradient(rs):
    flat, lam = rs.randn(3, 7), rs.randn(3, 7)
    check_grads(lambda w, lam_: anp.sum(nn.per_weight_l2(w, lam_)), modes=["rev"])(flat, lam)


@pytest.mark.parametrize("kind, n_hypers, hidden", [("mlp", 1, 6), ("linear", 3, None), ("factorised", 4, 2)])
def test_hypernet_gradients(kind, n_hypers, hidden, rs):
    layers = [5, 3]  # elementary model 5 -> 3 (18 weights)
    n_weights = nn.num_params(layers)
    hyper = nn.init_hypernet(kind, n_hypers, n_weights, 0.5, rs, hidden=hidden)
    lambdas = rs.randn(4, n_hypers)
    x, t = rs.randn(6, 5), np.eye(3)[rs.randint(3, size=6)]
    act = nn.hypernet_activation(kind)

    def objective(hyper_params, lams):
        """Mean training objective over the K sampled hyperparameters (SPEC section 3 form)."""
        flat = nn.hypernet_weights(hyper_params, lams, act)
        predictions = nn.batched_mlp_predict(nn.unflatten_batch(flat, layers), x)
        return anp.mean(nn.gaussian_nll(predictions, t) + nn.norm_regulariser(flat, lams[:, 0]))

    check_grads(objective, modes=["rev"])(hyper, lambdas)


def test_deep_batched_mlp_gradient(rs):
    layers = [4, 3, 3, 2]
    flat = rs.randn(2, nn.num_params(layers))
    x, t = rs.randn(5, 4), rs.randn(5, 2)
    check_grads(lambda f: anp.sum(nn.mse(nn.batched_mlp_predict(nn.unflatten_batch(f, layers), x), t)),
                modes=["rev"])(flat)


# ----------------------------------------------------------------------------------- loss values

def test_gaussian_nll_is_the_gaussian_log_likelihood(rs):
    y, t = rs.randn(3, 5, 10), rs.randn(3, 5, 10)
    expected = -np.mean(scipy.stats.norm.logpdf(t, y, 0.1), axis=(1, 2))
    np.testing.assert_allclose(nn.gaussian_nll(y, t), expected, rtol=1e-12)
    np.testing.assert_allclose(nn.gaussian_nll(y, t), 50 * nn.mse(y, t) - 1.38364, atol=1e-5)
    assert nn.LOG_SIGMA_CONST == pytest.approx(-1.3836465597893728, abs=1e-15)
    assert nn.gaussian_nll(t, t)[0] == pytest.approx(nn.LOG_SIGMA_CONST)


def test_mse_and_cross_entropy_values(rs):
    y, t = rs.randn(2, 4, 3), np.eye(3)[rs.randint(3, size=(2, 4))]
    np.testing.assert_allclose(nn.mse(y, t), [np.mean((y[k] - t[k]) ** 2) for k in range(2)], rtol=1e-14)
    probs = np.exp(y) / np.exp(y).sum(-1, keepdims=True)
    expected = [-np.mean(np.log(np.sum(probs[k] * t[k], axis=1))) for k in range(2)]
    np.testing.assert_allclose(nn.softmax_cross_entropy(y, t), expected, rtol=1e-12)
    # numerically stable for huge logits
    assert np.isfinite(nn.softmax_cross_entropy(np.array([[[1000.0, -1000.0]]]), np.array([[[1.0, 0.0]]])))


# --------------------------------------------------------------------------- batched == per-sample

def test_batched_mlp_predict_shared_inputs_equals_loop(rs):
    layers = [6, 5, 4, 3]
    K = 4
    params_k = [nn.init_mlp(layers, 1.0, rs) for _ in range(K)]
    x = rs.randn(7, 6)
    batched = nn.batched_mlp_predict(nn.stack_params(params_k), x)
    assert batched.shape == (K, 7, 3)
    for k in range(K):
        np.testing.assert_allclose(batched[k], nn.mlp_predict(params_k[k], x), rtol=0, atol=TOL)
    assert np.all(nn.mlp_predict(params_k[0], x) != nn.mlp_predict(params_k[1], x))


def test_batched_mlp_predict_3d_inputs_equals_loop(rs):
    layers = [6, 5, 3]
    K = 3
    params_k = [nn.init_mlp(layers, 1.0, rs) for _ in range(K)]
    x = rs.randn(K, 7, 6)  # a different input batch per network
    batched = nn.batched_mlp_predict(nn.stack_params(params_k), x)
    for k in range(K):
        np.testing.assert_allclose(batched[k], nn.mlp_predict(params_k[k], x[k]), rtol=0, atol=TOL)


def test_batched_linear_2d_and_3d_paths_agree(rs):
    W, b, x = rs.randn(3, 4, 2), rs.randn(3, 2), rs.randn(5, 4)
    np.testing.assert_allclose(nn.batched_linear(x, W, b), nn.batched_linear(np.stack([x] * 3), W, b), atol=TOL)
    np.testing.assert_allclose(nn.batched_linear(x, W, b)[1], x @ W[1] + b[1], atol=TOL)


def test_identity_activation_makes_mlp_linear(rs):
    params = nn.init_mlp([3, 4, 2], 1.0, rs)
    x = rs.randn(5, 3)
    (W1, b1), (W2, b2) = params
    np.testing.assert_allclose(nn.mlp_predict(params, x, nn.identity), (x @ W1 + b1) @ W2 + b2, atol=TOL)
    np.testing.assert_allclose(nn.mlp_predict(params, x), np.maximum(x @ W1 + b1, 0) @ W2 + b2, atol=TOL)


def test_regularisers_equal_loops(rs):
    K, D, C = 4, 6, 10
    W, lam_c = rs.randn(K, D, C), rs.randn(K, C)
    expected = [np.sum([np.linalg.norm(W[k][:, i] * np.exp(lam_c[k, i])) for i in range(C)]) / 10 for k in range(K)]
    np.testing.assert_allclose(nn.class_norm_regulariser(W, lam_c), expected, rtol=1e-12)
    flat, lam = rs.randn(K, 9), rs.randn(K)
    np.testing.assert_allclose(nn.norm_regulariser(flat, lam),
                               [np.exp(lam[k]) * np.linalg.norm(flat[k]) for k in range(K)], rtol=1e-12)
    lam_w = rs.randn(K, 9)
    np.testing.assert_allclose(nn.per_weight_l2(flat, lam_w),
                               [sum(np.exp(lam_w[k, j]) * flat[k, j] ** 2 for j in range(9)) for k in range(K)],
                               rtol=1e-12)


def test_norm_regulariser_is_unsquared_and_includes_bias():
    flat = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])  # the last entry plays the bias
    np.testing.assert_allclose(nn.norm_regulariser(flat, np.log([2.0, 1.0])), [10.0, 2.0], rtol=1e-14)


def test_class_norm_regulariser_takes_column_norms():
    W = np.zeros((1, 2, 10))
    W[0, :, 3] = [3.0, 4.0]  # column 3 has norm 5
    lam = np.zeros((1, 10))
    lam[0, 3] = np.log(2.0)
    np.testing.assert_allclose(nn.class_norm_regulariser(W, lam), [1.0], rtol=1e-14)  # 2 * 5 / 10


# ------------------------------------------------------------------------------ flatten / unflatten

def test_flatten_order_is_W_row_major_then_b():
    W = np.arange(6.0).reshape(2, 3)
    b = np.array([10.0, 11.0, 12.0])
    W2, b2 = np.array([[20.0], [21.0], [22.0]]), np.array([30.0])
    flat = nn.flatten_params([(W, b), (W2, b2)])
    np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 5, 10, 11, 12, 20, 21, 22, 30])
    assert nn.num_params([2, 3, 1]) == 13


def test_unflatten_batch_round_trip_and_loop(rs):
    layers = [4, 3, 2]
    params_k = [nn.init_mlp(layers, 1.0, rs) for _ in range(3)]
    flat = np.stack([nn.flatten_params(p) for p in params_k])
    batched = nn.unflatten_batch(flat, layers)
    for (W, b), (Ws, bs) in zip(batched, nn.stack_params(params_k), strict=True):
        np.testing.assert_array_equal(W, Ws)
        np.testing.assert_array_equal(b, bs)
    for k in range(3):
        np.testing.assert_array_equal(nn.flatten_params([(W[k], b[k]) for W, b in batched]), flat[k])
    with pytest.raises(ValueError, match="need 23"):
        nn.unflatten_batch(flat[:, :-1], layers)


def test_unflatten_batch_is_differentiable(rs):
    layers = [3, 2]
    flat = rs.randn(2, 8)
    g = grad(lambda f: anp.sum(nn.unflatten_batch(f, layers)[0][0] * np.arange(12.0).reshape(2, 3, 2)))(flat)
    np.testing.assert_array_equal(g[:, :6], np.arange(12.0).reshape(2, 6))
    np.testing.assert_array_equal(g[:, 6:], 0.0)


# ----------------------------------------------------------------------------------- initialisation

def test_init_mlp_draws_W_then_b_from_the_given_state():
    params = nn.init_mlp([3, 2], 0.01, np.random.RandomState(7))
    draws = np.random.RandomState(7).randn(8)
    np.testing.assert_array_equal(params[0][0], 0.01 * draws[:6].reshape(3, 2))
    np.testing.assert_array_equal(params[0][1], 0.01 * draws[6:])


@pytest.mark.parametrize("kind, n_hypers, hidden, count", [
    ("mlp", 1, 50, 400_450),          # global experiment [1, 50, 7850]
    ("linear", 1, None, 15_700),      # local experiment [1, 7850]
    ("factorised", 7850, 10, 164_860),  # per-weight decay, 10 linear hidden units
    ("linear", 10, None, 86_350),     # one decay per class
])
def test_spec_hypernet_parameter_counts(kind, n_hypers, hidden, count):
    params = nn.init_hypernet(kind, n_hypers, 7850, 0.01, np.random.RandomState(7), hidden=hidden)
    assert sum(W.size + b.size for W, b in params) == count
    assert nn.num_params([784, 10]) == 7850


def test_hypernet_kinds_and_errors(rs):
    assert nn.hypernet_activation("mlp") is nn.relu
    assert nn.hypernet_activation("linear") is nn.identity
    assert nn.hypernet_activation("factorised") is nn.identity
    with pytest.raises(ValueError, match="hidden"):
        nn.init_hypernet("mlp", 1, 10, 0.1, rs)
    with pytest.raises(ValueError, match="unknown"):
        nn.init_hypernet("conv", 1, 10, 0.1, rs)
    hyper = nn.init_hypernet("factorised", 3, 5, 1.0, rs, hidden=2)
    lams = rs.randn(4, 3)
    (A, a), (B, b) = hyper
    np.testing.assert_allclose(nn.hypernet_weights(hyper, lams, nn.identity), (lams @ A + a) @ B + b, atol=TOL)


# ------------------------------------------------------------------------------------- wide layout

def test_wide_layout_equals_stacked_layout(rs):
    K, D, C = 5, 7, 3
    W, b, lam, x = rs.randn(K, D, C), rs.randn(K, C), rs.randn(K, C), rs.randn(4, D)
    W_wide, b_wide = nn.to_wide(W, b)
    assert W_wide.shape == (D, K * C) and b_wide.shape == (K * C,)
    np.testing.assert_array_equal(W_wide[:, 2 * C:3 * C], W[2])  # model k's columns sit side by side
    W_back, b_back = nn.from_wide(W_wide, b_wide, C)
    np.testing.assert_array_equal(W_back, W)
    np.testing.assert_array_equal(b_back, b)
    np.testing.assert_allclose(nn.wide_linear(x, W_wide, b_wide, C), nn.batched_linear(x, W, b), rtol=0, atol=TOL)
    np.testing.assert_allclose(nn.wide_class_norm_regulariser(W_wide, lam), nn.class_norm_regulariser(W, lam),
                               rtol=1e-14)


def test_wide_layout_gradients(rs):
    K, D, C = 3, 4, 2
    W_wide, b_wide, lam = rs.randn(D, K * C), rs.randn(K * C), rs.randn(K, C)
    x, t = rs.randn(5, D), rs.randn(5, C)
    check_grads(lambda W_, b_, lam_: anp.sum(nn.gaussian_nll(nn.wide_linear(x, W_, b_, C), t)
                                             + nn.wide_class_norm_regulariser(W_, lam_)),
                modes=["rev"])(W_wide, b_wide, lam)
