"""references.py: closed form, exact hypergradient, hypernetwork direction, exact descent, split blocks.

Every hand-written formula is checked against autograd (float64, 1e-9) or finite differences, on tiny ridge
problems where everything is exact; the ridge tests fail if a sign, an exp or the data split were wrong."""
import sys

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad, jacobian
from threadpoolctl import threadpool_limits

from conftest import CODE

sys.path.insert(0, str(CODE))

import references as R  # noqa: E402
from budget import Budget, run_budgeted  # noqa: E402
from data_loader import Splits, synthetic_mnist  # noqa: E402
from neural_network import flatten_params, init_mlp, num_params  # noqa: E402
from per_weight_decay import (  # noqa: E402
    Alg3Settings,
    HyperProblem,
    alg3_step,
    decay_objective,
    init_alg3,
    large_splits,
    mse_loss,
)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """One BLAS thread, as the experiment driver uses (the machine is shared; threads only contend)."""
    with threadpool_limits(limits=1):
        yield


D, C = 5, 3            # tiny ridge problem: 5 features, 3 outputs, P = 18 weights and biases
P = num_params([D, C])
TOL = 1e-9


def tiny_splits(seed=0, n=40):
    """Train / valid / test of a tiny linear-regression problem with D features and C targets."""
    rs = np.random.RandomState(seed)
    W = rs.randn(D, C)
    draw = lambda: (lambda x: (x, x @ W + 0.5 * rs.randn(n, C)))(rs.rand(n, D))
    return Splits(*draw(), *draw(), *draw())


@pytest.fixture(scope="module")
def tiny():
    splits = tiny_splits()
    lam = np.random.RandomState(1).uniform(-3.0, 0.5, P)  # away from 0, so a dropped exp shows
    return splits, R.ridge_problem(splits.train_x, splits.train_y), lam


def autograd_best_response(lam, x, y):
    """w*(lambda) by a dense autograd-differentiable solve of the normal equations (independent of references)."""
    xa = anp.concatenate([x, anp.ones((len(x), 1))], axis=1)
    n = len(x) * y.shape[1]
    columns = []
    for c in range(y.shape[1]):
        lam_c = anp.concatenate([lam[c:D * C:C], lam[D * C + c:D * C + c + 1]])  # class c's decays, flat order
        columns.append(anp.linalg.solve(anp.dot(xa.T, xa) / n + anp.diag(anp.exp(lam_c)), anp.dot(xa.T, y[:, c]) / n))
    per_class = anp.stack(columns)  # (C, D+1)
    return anp.concatenate([anp.ravel(anp.transpose(per_class[:, :D])), per_class[:, D]])


def autograd_valid_loss(lam, splits):
    return mse_loss([D, C])(autograd_best_response(lam, splits.train_x, splits.train_y)[None, :],
                            splits.valid_x, splits.valid_y)[0]


# ----------------------------------------------------------------------------------------- layout

def test_layout_matches_flatten_params():
    params = init_mlp([D, C], 1.0, np.random.RandomState(0))
    flat = flatten_params(params)
    per_class = R.flat_to_classes(flat, D, C)
    W, b = params[0]
    for c in range(C):
        np.testing.assert_array_equal(per_class[c, :D], W[:, c])
        assert per_class[c, D] == b[c]
    np.testing.assert_array_equal(R.classes_to_flat(per_class), flat)


# ------------------------------------------------------------------------------------- closed form

def test_losses_match_per_weight_decay(tiny):
    splits, _, lam = tiny
    w = np.random.RandomState(2).randn(P)
    assert R.linear_loss(w, splits.valid_x, splits.valid_y) == pytest.approx(
        mse_loss([D, C])(w[None, :], splits.valid_x, splits.valid_y)[0], rel=TOL)
    assert R.training_objective(w, lam, splits.train_x, splits.train_y) == pytest.approx(
        decay_objective([D, C])(w[None, :], lam[None, :], splits.train_x, splits.train_y)[0], rel=TOL)
    g_auto = grad(lambda v: mse_loss([D, C])(v[None, :], splits.valid_x, splits.valid_y)[0])(w)
    np.testing.assert_allclose(R.linear_loss_grad(w, splits.valid_x, splits.valid_y), g_auto, rtol=TOL, atol=1e-12)


def test_best_response_zeroes_the_training_gradient(tiny):
    splits, ridge, lam = tiny
    w = R.best_response(ridge, lam)
    objective = lambda v: decay_objective([D, C])(v[None, :], lam[None, :], splits.train_x, splits.train_y)[0]
    g = grad(objective)(w)
    assert np.max(np.abs(g)) < 1e-12
    # finite differences: a minimum, and the central difference of the objective vanishes in every direction
    f0, rs = objective(w), np.random.RandomState(3)
    for _ in range(5):
        d = rs.randn(P)
        assert objective(w + 1e-3 * d) > f0 and objective(w - 1e-3 * d) > f0
        assert abs(objective(w + 1e-5 * d) - objective(w - 1e-5 * d)) / 2e-5 < 1e-9
    np.testing.assert_allclose(w, autograd_best_response(lam, splits.train_x, splits.train_y), rtol=1e-10)


def test_best_response_is_where_long_adam_training_ends(tiny):
    splits, ridge, lam = tiny
    w = np.zeros(P)
    # the training gradient, hand-written (linear_loss_grad is checked against autograd above): autograd's
    # overhead would dominate thousands of tiny steps
    g = lambda v: R.linear_loss_grad(v, splits.train_x, splits.train_y) + 2.0 * np.exp(lam) * v
    from optimizers import adam_init, adam_inplace
    state, scratch = adam_init(w), np.empty(P)
    for step_size in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):  # full-batch Adam with a falling step size
        for _ in range(2000):
            state = adam_inplace(w, g(w), state, step_size, scratch)
    np.testing.assert_allclose(w, R.best_response(ridge, lam), atol=1e-5)


def test_fixed_lambda_reference_is_the_closed_form_level(tiny):
    splits, ridge, lam = tiny
    ref = R.fixed_lambda_reference(lam, splits)
    w = R.best_response(ridge, lam)
    assert ref["valid"] == pytest.approx(R.linear_loss(w, splits.valid_x, splits.valid_y), rel=1e-12)
    assert ref["test"] == pytest.approx(R.linear_loss(w, splits.test_x, splits.test_y), rel=1e-12)
    scalar = R.fixed_lambda_reference(-2.0, splits)
    assert scalar["valid"] == pytest.approx(R.fixed_lambda_reference(np.full(P, -2.0), splits)["valid"], rel=1e-12)


def test_train_to_convergence_reaches_the_closed_form_on_a_linear_model():
    splits = tiny_splits(seed=4, n=400)
    ref = R.fixed_lambda_reference(-3.0, splits)
    trained = R.train_to_convergence([D, C], -3.0, splits, step_size=1e-2, eval_every=50, patience=5)
    assert trained["converged"] and trained["steps"] < R.CONVERGE_MAX_STEPS
    assert trained["steps"] - trained["step"] == 5 * 50  # stopped `patience` evaluations after the best one
    assert trained["valid"] == pytest.approx(ref["valid"], rel=0.02)
    assert trained["test"] == pytest.approx(ref["test"], rel=0.02)


# -------------------------------------------------------------------------------- exact hypergradient

def test_exact_hypergradient_matches_autograd_through_a_solve(tiny):
    splits, ridge, lam = tiny
    g, w, value = R.exact_hypergradient(ridge, lam, splits.valid_x, splits.valid_y)
    np.testing.assert_allclose(g, grad(autograd_valid_loss)(lam, splits), rtol=TOL, atol=1e-14)
    assert value == pytest.approx(autograd_valid_loss(lam, splits), rel=1e-12)


def test_exact_hypergradient_matches_finite_differences(tiny):
    splits, ridge, lam = tiny
    g, _, _ = R.exact_hypergradient(ridge, lam, splits.valid_x, splits.valid_y)
    loss = lambda lm: R.linear_loss(R.best_response(ridge, lm), splits.valid_x, splits.valid_y)
    h = 1e-5
    fd = np.array([(loss(lam + h * e) - loss(lam - h * e)) / (2 * h) for e in np.eye(P)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-11)


def class_indices(c):
    """Flat indices of class c's (D+1)-vector: W[i, c] at i*C + c for the D pixels, then b[c] at D*C + c."""
    return [i * C + c for i in range(D)] + [D * C + c]


def test_best_response_jacobian_matches_autograd(tiny):
    splits, ridge, lam = tiny
    J_full = jacobian(lambda lm: autograd_best_response(lm, splits.train_x, splits.train_y))(lam)  # (P, P) dw/dlambda
    blocks = R.best_response_jacobian(ridge, lam)
    off = np.ones((P, P), bool)
    for c in range(C):
        idx = np.ix_(class_indices(c), class_indices(c))
        np.testing.assert_allclose(blocks[c], J_full[idx], rtol=1e-9, atol=1e-14)
        off[idx] = False
    assert np.abs(J_full[off]).max() < 1e-14  # a decay of class c moves only class c's weights


def test_low_rank_cosines_match_a_truncated_svd_of_the_full_jacobian(tiny):
    splits, ridge, lam = tiny
    J_full = jacobian(lambda lm: autograd_best_response(lm, splits.train_x, splits.train_y))(lam)
    exact, w, _ = R.exact_hypergradient(ridge, lam, splits.valid_x, splits.valid_y)
    g = R.linear_loss_grad(w, splits.valid_x, splits.valid_y)
    U, s, Vt = np.linalg.svd(J_full)
    got = R.low_rank_cosines(ridge, lam, splits.valid_x, splits.valid_y, (1, 3, P))
    for r in (1, 3):
        direction = Vt[:r].T @ (s[:r] * (U[:, :r].T @ g))  # J_r' g
        assert got[r] == pytest.approx(R.cosine(direction, exact), abs=1e-9)
    assert got[P] == pytest.approx(1.0, abs=1e-12)


def test_exact_hypergradient_uses_validation_data_only(tiny):
    splits, ridge, lam = tiny
    g, _, _ = R.exact_hypergradient(ridge, lam, splits.valid_x, splits.valid_y)
    g_train, _, _ = R.exact_hypergradient(ridge, lam, splits.train_x, splits.train_y)
    assert R.cosine(g, g_train) < 0.99   # a different data set gives a different direction


# ---------------------------------------------------------------------- hypernetwork on a tiny ridge problem

def exact_linear_hypernet(splits, lam0):
    """A linear hypernetwork [P, P] equal to the first-order expansion of w*(lambda) at lam0 (input lambda - lam0):
    output bias w*(lam0), weight W = (dw*/dlambda)' (autograd of the dense solve), the trained optimum."""
    J = jacobian(lambda lm: autograd_best_response(lm, splits.train_x, splits.train_y))(lam0)  # (P, P) dw/dlambda
    return [(J.T.copy(), autograd_best_response(lam0, splits.train_x, splits.train_y))]


def tiny_problem(splits):
    return HyperProblem(decay_objective([D, C]), mse_loss([D, C]), splits.train_x, splits.train_y,
                        splits.valid_x, splits.valid_y, P, P)


def test_hypernet_hypergradient_is_jacobian_transpose_times_valid_gradient(tiny):
    splits, _, lam = tiny
    settings = Alg3Settings(hypernet_kind="factorised", hidden=4, input_offset=-1.0)
    phi = init_alg3(tiny_problem(splits), settings, seed=0).phi
    rs = np.random.RandomState(5)
    phi = [(W + rs.randn(*W.shape), b + rs.randn(*b.shape)) for W, b in phi]  # not near 0
    J = (phi[0][0] @ phi[1][0]).T  # dw/dlambda of w = (lambda - offset) W1 W2 + b1 W2 + b2
    w = ((lam - settings.input_offset) @ phi[0][0] + phi[0][1]) @ phi[1][0] + phi[1][1]
    g_w = R.linear_loss_grad(w, splits.valid_x, splits.valid_y)
    got = R.hypernet_hypergradient(phi, lam, settings, tiny_problem(splits), splits.valid_x, splits.valid_y)
    np.testing.assert_allclose(got, J.T @ g_w, rtol=TOL, atol=1e-13)
    # ... and equals autograd's total derivative of L_V(w_phi(lambda)), the gradient alg3_step's lambda step uses
    from neural_network import hypernet_weights, identity
    total = grad(lambda lm: mse_loss([D, C])(hypernet_weights(phi, lm[None, :] + 1.0, identity),
                                            splits.valid_x, splits.valid_y)[0])(lam)
    np.testing.assert_allclose(got, total, rtol=TOL, atol=1e-13)


def test_hypernet_hypergradient_of_a_relu_hypernetwork_is_autograds(tiny):
    splits, _, lam = tiny
    settings = Alg3Settings(hypernet_kind="mlp", hidden=6, input_offset=0.5)
    from neural_network import hypernet_weights, init_hypernet, relu
    phi = init_hypernet("mlp", P, P, 1.0, np.random.RandomState(8), hidden=6)
    got = R.hypernet_hypergradient(phi, lam, settings, tiny_problem(splits), splits.valid_x, splits.valid_y)
    total = grad(lambda lm: mse_loss([D, C])(hypernet_weights(phi, lm[None, :] - 0.5, relu),
                                             splits.valid_x, splits.valid_y)[0])(lam)
    np.testing.assert_allclose(got, total, rtol=TOL, atol=1e-13)
    assert np.abs(total).max() > 0


def test_exact_hypernet_gives_the_implicit_hypergradient(tiny):
    splits, ridge, lam = tiny
    settings = Alg3Settings(hypernet_kind="linear", input_offset=0.0)
    phi = exact_linear_hypernet(splits, lam)
    shifted = lambda lm: R.hypernet_hypergradient(phi, lm, settings, tiny_problem(splits), splits.valid_x,
                                                 splits.valid_y, offset=lam)
    exact, _, _ = R.exact_hypergradient(ridge, lam, splits.valid_x, splits.valid_y)
    np.testing.assert_allclose(shifted(lam), exact, rtol=1e-8, atol=1e-14)
    assert R.cosine(shifted(lam), exact) == pytest.approx(1.0, abs=1e-12)


def test_one_lambda_step_of_algorithm_3_goes_downhill_on_the_exact_validation_loss(tiny):
    splits, ridge, lam = tiny
    problem = tiny_problem(splits)
    settings = Alg3Settings(hypernet_kind="linear", inner_steps=0, lambda_step=1e-2, input_offset=0.0,
                            valid_batch_size=4000)  # with-replacement batch of 4,000 from 40: ~ the full set
    state = init_alg3(problem, settings, seed=0)
    phi = exact_linear_hypernet(splits, lam)
    # the hypernetwork's input is lambda (offset 0): the bias must absorb -lam0 W so that w_phi(lam) = w*(lam)
    phi = [(phi[0][0], phi[0][1] - lam @ phi[0][0])]
    state = state._replace(phi=phi, lam=lam.copy())
    before = R.fixed_lambda_reference(lam, splits, ridge)["valid"]
    after_state = alg3_step(state, 0, problem, settings, seed=0)
    exact, _, _ = R.exact_hypergradient(ridge, lam, splits.valid_x, splits.valid_y)
    step = after_state.lam - lam
    assert np.mean(np.sign(step) == -np.sign(exact)) > 0.9   # Adam's first step: -lr sign(g)
    after = R.fixed_lambda_reference(after_state.lam, splits, ridge)["valid"]
    assert before - after > 0.5 * (-exact @ step) > 0   # downhill, by about the first-order prediction


def test_exact_descent_step_is_adam_on_the_validation_hypergradient(tiny):
    splits, ridge, lam = tiny
    state, step_fn, evaluate = R.exact_hypergradient_descent(splits, lam, step_size=1e-2)
    new = step_fn(state, 0)
    g_auto = grad(autograd_valid_loss)(lam, splits)
    np.testing.assert_allclose(new.lam - lam, -1e-2 * g_auto / (np.abs(g_auto) + 1e-8), rtol=1e-6, atol=1e-12)
    assert evaluate(new)[0] < evaluate(state)[0]
    # test data never enters the lambda update
    perturbed = splits._replace(test_x=splits.test_x + 1.0, test_y=-splits.test_y)
    state2, step2, _ = R.exact_hypergradient_descent(perturbed, lam, step_size=1e-2)
    np.testing.assert_array_equal(step2(state2, 0).lam, new.lam)


def test_exact_descent_runs_under_a_budget_and_lowers_the_validation_loss():
    splits = tiny_splits(seed=6, n=100)
    state, step_fn, evaluate = R.exact_hypergradient_descent(splits, -3.0)
    _, curve = run_budgeted(state, step_fn, evaluate, Budget(iters=5, eval_every=1, log_every=100), log=None)
    assert len(curve.valid) == 6 and curve.valid[-1] < curve.valid[0]


def test_cosine():
    assert R.cosine([1.0, 0.0], [2.0, 0.0]) == pytest.approx(1.0)
    assert R.cosine([1.0, 0.0], [0.0, 3.0]) == pytest.approx(0.0)
    assert R.cosine([1.0, 1.0], [-1.0, -1.0]) == pytest.approx(-1.0)
    assert R.cosine([0.0, 0.0], [1.0, 1.0]) == 0.0


# --------------------------------------------------------- deeper models: implicit differentiation (SPEC section 9)

MLP = (6, 4, 3)          # tiny MLP: 43 weights and biases, one ReLU layer
P_MLP = num_params(MLP)
N_HIDDEN_W = MLP[0] * MLP[1]  # first-layer weights, then its MLP[1] biases


def hidden_preactivations(w, x):
    """z_1 = x W_1 + b_1 (N, 4) of the tiny MLP."""
    return x @ w[:N_HIDDEN_W].reshape(MLP[0], MLP[1]) + w[N_HIDDEN_W:N_HIDDEN_W + MLP[1]]


def teacher_data(rs, teacher, n, margin=0.3, noise=0.05):
    """n inputs whose hidden pre-activations under the teacher weights are at least margin from 0, targets =
    teacher output + noise. A ReLU net's minimum often sits on a kink (one unit exactly at 0 on some input), where
    w*(lambda) is not differentiable; data far from the teacher's kinks gives a smooth minimum near the teacher."""
    xs = []
    while len(xs) < n:
        x = rs.randn(MLP[0])
        if np.min(np.abs(hidden_preactivations(teacher, x[None]))) > margin:
            xs.append(x)
    x = np.array(xs)
    return x, R.MLPObjective(MLP, x, np.zeros((n, MLP[-1])))._forward(teacher)[-1] + noise * rs.randn(n, MLP[-1])


def newton(objective, w, tol=1e-13, max_iter=30):
    """Dense Newton polish of an L-BFGS minimum (Hessian columns from hessian products): the tight, deterministic
    convergence that finite differences of L_V(w*(lambda)) need. -> (w, max |gradient|)."""
    for _ in range(max_iter):
        g = objective.value_and_grad(w)[1]
        if np.max(np.abs(g)) < tol:
            break
        hvp = objective.hessian(w)
        w = w - np.linalg.solve(np.array([hvp(e) for e in np.eye(len(w))]), g)
    return w, float(np.max(np.abs(objective.value_and_grad(w)[1])))


def tiny_mlp_problem(rs):
    """(teacher weights, train x, y, valid x, y, lam (P,), w*(lam) converged to |gradient| < 1e-12), drawn from rs.
    With RandomState(3) the minimum is smooth (no training input on a ReLU kink)."""
    teacher = rs.randn(P_MLP)
    teacher[N_HIDDEN_W:N_HIDDEN_W + MLP[1]] = rs.randn(MLP[1])  # hidden biases of order 1
    xt, yt = teacher_data(rs, teacher, 40)
    xv, yv = teacher_data(rs, teacher, 30)
    lam = rs.uniform(-6.0, -3.0, P_MLP)
    train = R.MLPObjective(MLP, xt, yt, lam)
    w, info = R.minimise_objective(train, teacher + 0.05 * rs.randn(P_MLP), gtol=1e-10, max_evals=3000)
    w, grad_max = newton(train, w)
    assert grad_max < 1e-12
    assert np.min(np.abs(hidden_preactivations(w, xt))) > 1e-2  # the precondition: no input on a kink
    return teacher, xt, yt, xv, yv, lam, w


@pytest.fixture(scope="module")
def tiny_mlp():
    """(train x, y, valid x, y, lam (P,), w*(lam)) of tiny_mlp_problem at seed 3."""
    return tiny_mlp_problem(np.random.RandomState(3))[1:]


def autograd_objective(sizes, lam, x, y):
    return lambda v: decay_objective(sizes)(v[None, :], lam[None, :], x, y)[0]


def autograd_hvp(f, w, v):
    """Autograd's Hessian-vector product of f at w: d/dw of grad(f)(w) . v."""
    return grad(lambda u: anp.dot(grad(f)(u), v))(w)


def test_mlp_objective_value_gradient_and_hessian_products_equal_autograd(tiny_mlp):
    xt, yt, _, _, lam, _ = tiny_mlp
    rs = np.random.RandomState(11)
    for sizes in (MLP, (6, 5, 4, 3), (6, 3)):  # one, two and no hidden layers
        Pm = num_params(sizes)
        lam_s = rs.uniform(-5, -1, Pm)
        objective, f = R.MLPObjective(sizes, xt, yt, lam_s), autograd_objective(sizes, lam_s, xt, yt)
        w = 0.5 * rs.randn(Pm)
        assert objective.value(w) == pytest.approx(f(w), rel=TOL)
        value, g = objective.value_and_grad(w)
        assert value == pytest.approx(f(w), rel=TOL)
        np.testing.assert_allclose(g, grad(f)(w), rtol=TOL, atol=1e-13)
        hvp = objective.hessian(w)
        for _ in range(3):
            v = rs.randn(Pm)
            expected = autograd_hvp(f, w, v)
            np.testing.assert_allclose(hvp(v), expected, rtol=TOL, atol=1e-12)
    plain = R.MLPObjective(MLP, xt, yt)  # lam None: the plain MSE, the validation loss
    w = rs.randn(P_MLP)
    assert plain.value(w) == pytest.approx(mse_loss(MLP)(w[None, :], xt, yt)[0], rel=TOL)


def test_gauss_newton_diagonal_is_that_of_the_output_jacobian(tiny_mlp):
    xt, yt, _, _, lam, _ = tiny_mlp
    rs = np.random.RandomState(12)
    for sizes in (MLP, (6, 5, 4, 3)):
        Pm = num_params(sizes)
        lam_s = rs.uniform(-5, -1, Pm)
        w = 0.5 * rs.randn(Pm)
        from neural_network import batched_mlp_predict, unflatten_batch
        J = jacobian(lambda v, s=sizes: anp.ravel(batched_mlp_predict(unflatten_batch(v[None, :], s), xt)))(w)
        expected = 2.0 / yt.size * np.sum(J ** 2, axis=0) + 2.0 * np.exp(lam_s)
        got = R.MLPObjective(sizes, xt, yt, lam_s).gauss_newton_diagonal(w)
        np.testing.assert_allclose(got, expected, rtol=TOL, atol=1e-14)


def test_minimise_objective_reaches_a_stationary_point_from_a_warm_start(tiny_mlp):
    xt, yt, _, _, lam, w_star = tiny_mlp
    train = R.MLPObjective(MLP, xt, yt, lam)
    w, info = R.minimise_objective(train, w_star + 1e-3 * np.random.RandomState(2).randn(P_MLP), gtol=1e-7,
                                   max_evals=500)
    assert info["converged"] and info["grad_max"] < 1e-7 < info["grad_max_start"]
    assert info["value"] == pytest.approx(train.value(w_star), rel=1e-9)
    np.testing.assert_allclose(w, w_star, atol=1e-4)
    _, capped = R.minimise_objective(train, w_star + 0.1, gtol=1e-12, max_evals=3)
    assert capped["evaluations"] <= 4 and not capped["converged"]  # the cap holds (one line-search overshoot)


def test_conjugate_gradient_solves_and_damps_negative_curvature():
    rs = np.random.RandomState(4)
    Q = np.linalg.qr(rs.randn(12, 12))[0]
    b = rs.randn(12)
    spd = Q @ np.diag(np.linspace(0.1, 5.0, 12)) @ Q.T
    cg = R.conjugate_gradient(lambda v: spd @ v, b, tol=1e-12, max_iter=100)
    np.testing.assert_allclose(cg.x, np.linalg.solve(spd, b), rtol=1e-9)
    assert cg.residual < 1e-12 and cg.damping == 0.0 and cg.restarts == 0 and cg.iterations <= 13
    capped = R.conjugate_gradient(lambda v: spd @ v, b, tol=1e-12, max_iter=3)
    assert capped.iterations == 3 and capped.residual > 1e-6
    indefinite = Q @ np.diag(np.linspace(-1.0, 5.0, 12)) @ Q.T
    # Jacobi must matter: on D^1/2 S D^1/2 with D spanning 1e-3..1e3 it solves in far fewer products than plain CG
    scale = np.sqrt(np.logspace(-3, 3, 12))
    badly = scale[:, None] * spd * scale[None, :]
    plain = R.conjugate_gradient(lambda v: badly @ v, b, tol=1e-10, max_iter=500)
    preconditioned = R.conjugate_gradient(lambda v: badly @ v, b, tol=1e-10, max_iter=500, diagonal=np.diag(badly))
    np.testing.assert_allclose(preconditioned.x, np.linalg.solve(badly, b), rtol=1e-6)
    assert preconditioned.iterations < plain.iterations / 2, (preconditioned.iterations, plain.iterations)
    eight = R.conjugate_gradient(lambda v: spd @ v, b, tol=1e-12, max_iter=8)  # x_half: x after 8 // 2 products
    np.testing.assert_array_equal(eight.x_half, R.conjugate_gradient(lambda v: spd @ v, b, tol=1e-12, max_iter=4).x)
    assert cg.x_half is None  # converged in fewer than 100 // 2 products
    cg = R.conjugate_gradient(lambda v: indefinite @ v, b, tol=1e-10, max_iter=500)
    assert cg.restarts >= 1 and cg.damping > 1.0  # lifted above the most negative eigenvalue
    np.testing.assert_allclose(cg.x, np.linalg.solve(indefinite + cg.damping * np.eye(12), b), rtol=1e-7)


def test_ift_hypergradient_of_the_linear_model_is_the_exact_one(tiny):
    splits, ridge, lam = tiny
    exact, w, _ = R.exact_hypergradient(ridge, lam, splits.valid_x, splits.valid_y)
    train = R.MLPObjective([D, C], splits.train_x, splits.train_y, lam)
    ift = R.ift_hypergradient(train, R.MLPObjective([D, C], splits.valid_x, splits.valid_y), w, tol=1e-13,
                              max_iter=200)
    np.testing.assert_allclose(ift["hypergradient"], exact, rtol=1e-8, atol=1e-14)
    assert ift["cg_residual_undamped"] < 1e-12 and ift["cg_damping"] == 0.0 and ift["train_grad_max"] < 1e-12


def test_ift_hypergradient_of_an_mlp_equals_finite_differences_of_the_converged_validation_loss(tiny_mlp):
    """SPEC section 9's finite differences on a tiny model: dL_V(w*(lambda))/dlambda_j by central differences,
    w*(lambda +- h e_j) re-converged (L-BFGS warm start, Newton polish) for several coordinates of each layer."""
    xt, yt, xv, yv, lam, w = tiny_mlp
    valid = R.MLPObjective(MLP, xv, yv)
    ift = R.ift_hypergradient(R.MLPObjective(MLP, xt, yt, lam), valid, w, tol=1e-13, max_iter=500)
    assert ift["cg_residual_undamped"] < 1e-10 and ift["cg_restarts"] == 0

    def converged_valid(lm):
        w_lm, grad_max = newton(R.MLPObjective(MLP, xt, yt, lm), w)
        assert grad_max < 1e-12
        return valid.value(w_lm)

    h = 1e-3
    coords = [0, 5, 20, 27, 30, 42]  # first-layer weights, a hidden bias, output weights, an output bias
    fd = np.array([(converged_valid(lam + h * e) - converged_valid(lam - h * e)) / (2 * h)
                   for e in np.eye(P_MLP)[coords]])
    got = ift["hypergradient"][coords]
    assert np.min(np.abs(fd)) > 1e-4  # informative coordinates
    np.testing.assert_allclose(got, fd, rtol=1e-5)
    # the wrong split (training data as the outer loss) gives another hypergradient: the check above can tell
    wrong = R.ift_hypergradient(R.MLPObjective(MLP, xt, yt, lam), R.MLPObjective(MLP, xt, yt), w, tol=1e-13,
                                max_iter=500)["hypergradient"][coords]
    assert np.max(np.abs(wrong - fd) / np.abs(fd)) > 0.1


def test_ift_hypergradient_refuses_swapped_objectives(tiny_mlp):
    xt, yt, xv, yv, lam, w = tiny_mlp
    with pytest.raises(ValueError):
        R.ift_hypergradient(R.MLPObjective(MLP, xv, yv), R.MLPObjective(MLP, xt, yt, lam), w)


# ------------------------------------------------------------------------------------ split blocks

def test_block_splits():
    data = synthetic_mnist(n_train=6000, n_test=500)
    s = R.block_splits(data, 1, block=1000, n_test=500)
    ref = large_splits(data, 1000, 1000, 500)
    for a, b in zip(s, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    s3 = R.block_splits(data, 3, block=1000, n_test=500)
    np.testing.assert_array_equal(s3.valid_x, data.train_images[3000:4000])
    np.testing.assert_array_equal(s3.train_x, data.train_images[:1000])
    with pytest.raises(ValueError):
        R.block_splits(data, 0, block=1000, n_test=500)
    from data_loader import MNISTError
    with pytest.raises(MNISTError):
        R.block_splits(data, 6, block=1000, n_test=500)


def test_split_sensitivity_gap_is_valid_minus_test():
    data = synthetic_mnist(n_train=6000, n_test=500)
    rows = R.split_sensitivity(data, -4.0, blocks=(1, 2, 5), block=1000, n_test=500)
    assert [r["block"] for r in rows] == [1, 2, 5]
    for r in rows:
        ref = R.fixed_lambda_reference(-4.0, R.block_splits(data, r["block"], block=1000, n_test=500))
        assert r["valid"] == pytest.approx(ref["valid"], rel=1e-12)
        assert r["gap"] == pytest.approx(r["valid"] - r["test"], abs=1e-15)


def test_mnist_reference_level(mnist):
    """The fixed-lambda level at lambda = -7 on the large splits (the curve hyper-training plateaus at)."""
    ref = R.fixed_lambda_reference(-7.0, large_splits(mnist))
    assert 0.038 < ref["valid"] < 0.044 and 0.038 < ref["test"] < 0.044
