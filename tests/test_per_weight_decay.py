"""per_weight_decay on small synthetic data: splits, objectives, in-place Adam, hand-written hypernetwork
backprop against autograd, Algorithm 3/4."""
import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

import per_weight_decay as pwd
from common import step_rng
from data_loader import synthetic_mnist
from neural_network import hypernet_weights, identity, num_params
from optimizers import adam_init, adam_inplace, adam_update


@pytest.fixture(scope="module")
def splits():
    return pwd.large_splits(synthetic_mnist(n_train=600, n_test=200), 300, 300, 200)


def small_problem(splits, sizes=(784, 10)):
    P = num_params(sizes)
    return pwd.HyperProblem(pwd.decay_objective(sizes), pwd.mse_loss(sizes), splits.train_x, splits.train_y,
                            splits.valid_x, splits.valid_y, P, P)


# ------------------------------------------------------------------------------- shared module

def test_large_splits_are_the_documented_indices():
    data = synthetic_mnist(n_train=50, n_test=20)
    s = pwd.large_splits(data, 20, 30, 10)
    assert np.array_equal(s.train_x, data.train_images[:20])
    assert np.array_equal(s.valid_x, data.train_images[20:50])
    assert np.array_equal(s.test_y, data.test_labels[:10])


def test_decay_objective_is_mse_plus_per_weight_l2():
    rs = np.random.RandomState(0)
    sizes = (784, 3, 10)
    P = num_params(sizes)
    w, lam = 0.1 * rs.randn(2, P), rs.randn(2, P)
    x, y = rs.rand(5, 784), rs.rand(5, 10)
    value = pwd.decay_objective(sizes)(w, lam, x, y)
    expected = pwd.mse_loss(sizes)(w, x, y) + np.sum(np.exp(lam) * w ** 2, axis=1)
    assert np.allclose(value, expected)


def test_inplace_adam_matches_textbook_adam():
    rs = np.random.RandomState(1)
    x = rs.randn(40)
    x_ref, s_ref, s = x.copy(), adam_init(x), adam_init(x)
    for _ in range(25):
        g = rs.randn(40)
        x_ref, s_ref = adam_update(x_ref, g, s_ref, 0.01)
        s = adam_inplace(x, g, s, 0.01, np.empty(50))
    assert s.step == 25 and np.allclose(x, x_ref, rtol=1e-12, atol=1e-14)


def test_hand_written_hypernet_backprop_matches_autograd(splits):
    problem = small_problem(splits)
    settings = pwd.Alg3Settings(init_scale=1e-2)
    state = pwd.init_alg3(problem, settings, 0)
    rs = np.random.RandomState(2)
    lambdas = -5 + rs.randn(2, problem.n_hypers)
    x, y = splits.train_x[:50], splits.train_y[:50]
    ours = pwd._hypernet_grad(problem, identity)(state.phi, lambdas, x, y)
    reference = grad(lambda phi: anp.mean(problem.train_objective(hypernet_weights(phi, lambdas, identity),
                                                                  lambdas, x, y)))(state.phi)
    for (gW, gb), (rW, rb) in zip(ours, reference, strict=True):
        assert np.allclose(gW, rW, rtol=1e-9, atol=1e-15) and np.allclose(gb, rb, rtol=1e-9, atol=1e-15)


def test_factorised_hypernet_sizes():
    assert pwd.hypernet_size("factorised", 7850, 7850, 10) == 164860
    assert num_params((784, 100, 10)) == 79510 and num_params((784, 100, 100, 10)) == 89610


@pytest.mark.parametrize("algorithm", ["joint", "simplified"])
def test_alg3_reduces_validation_loss_and_is_reproducible(splits, algorithm):
    problem = small_problem(splits)
    settings = pwd.Alg3Settings(algorithm=algorithm, lambda_step=0.05)
    loss = pwd.mse_loss((784, 10))

    def go():
        state = pwd.init_alg3(problem, settings, 3)
        before = loss(pwd.current_weights(state, settings), splits.valid_x, splits.valid_y)[0]
        lam0 = state.lam.copy()
        for i in range(4):
            state = pwd.alg3_step(state, i, problem, settings, 3)
        return before, loss(pwd.current_weights(state, settings), splits.valid_x, splits.valid_y)[0], lam0, state

    before, after, lam0, state = go()
    assert after < 0.5 * before                 # the hypernetwork learns quickly
    assert not np.allclose(state.lam, lam0)     # lambda_hat moved
    assert state.step == 4
    assert go()[3].lam.tolist() == state.lam.tolist()


def test_joint_and_simplified_differ(splits):
    problem = small_problem(splits)
    lams = []
    for algorithm in ("joint", "simplified"):
        settings = pwd.Alg3Settings(algorithm=algorithm, sample_sd=0.1)
        state = pwd.init_alg3(problem, settings, 0)
        lams.append(pwd.alg3_step(state, 0, problem, settings, 0).phi[0][0].copy())
    assert not np.allclose(*lams)


# ------------------------------------------------------- hand-written step against the autograd reference

def problem_of(splits, sizes):
    """A decay_objective / mse_loss problem on the first sizes[0] pixels (small P keeps a linear
    hypernetwork [P, P] affordable)."""
    D, P = sizes[0], num_params(sizes)
    return pwd.HyperProblem(pwd.decay_objective(sizes), pwd.mse_loss(sizes), splits.train_x[:, :D].copy(),
                            splits.train_y, splits.valid_x[:, :D].copy(), splits.valid_y, P, P)


def assert_states_close(a, b, rtol=1e-9):
    pairs = [(a.lam, b.lam), (a.lam_adam.m, b.lam_adam.m), (a.lam_adam.v, b.lam_adam.v)]
    for (W, c), (W2, c2) in zip(a.phi, b.phi, strict=True):
        pairs += [(W, W2), (c, c2)]
    for (sW, sc), (sW2, sc2) in zip(a.phi_adam, b.phi_adam, strict=True):
        pairs += [(sW.m, sW2.m), (sW.v, sW2.v), (sc.m, sc2.m), (sc.v, sc2.v)]
        assert sW.step == sW2.step
    for x, y in pairs:
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.max(np.abs(y)))
    assert a.step == b.step and a.lam_adam.step == b.lam_adam.step


@pytest.mark.parametrize("sizes", [(20, 10), (20, 8, 10), (20, 8, 6, 10)])
@pytest.mark.parametrize("kind", ["linear", "factorised"])
@pytest.mark.parametrize("algorithm", ["joint", "simplified"])
def test_hand_written_step_equals_autograd_reference(splits, sizes, kind, algorithm):
    problem = problem_of(splits, sizes)
    settings = pwd.Alg3Settings(hypernet_kind=kind, hidden=4, init_scale=0.05, algorithm=algorithm,
                                sample_sd=0.3, inner_steps=3, hypernet_step=1e-2, lambda_step=0.05,
                                batch_size=16, valid_batch_size=24, input_offset=-7.0 if kind == "linear" else 0.0)
    assert pwd.Alg3Stepper.supports(problem, settings)
    w0 = pwd.fan_in_init(sizes, np.random.RandomState(1))
    fast, ref = pwd.init_alg3(problem, settings, 5, w0), pwd.init_alg3(problem, settings, 5, w0)
    separate = pwd.copy_state(fast)       # its arrays are not views of one buffer: one Adam call per array
    assert pwd._flat_base([a for pair in fast.phi for a in pair]) is not None
    assert pwd._flat_base([a for pair in separate.phi for a in pair]) is None
    lam0 = fast.lam.copy()
    for i in range(4):
        fast = pwd.alg3_step(fast, i, problem, settings, 5)
        separate = pwd.alg3_step(separate, i, problem, settings, 5)
        ref = pwd.alg3_step(ref, i, problem, settings, 5, reference=True)
        assert_states_close(fast, ref)
        assert_states_close(separate, ref)
    assert np.max(np.abs(fast.lam - lam0)) > 1e-3      # lambda_hat moved: its gradient was exercised


def test_hand_written_step_at_full_size(splits):
    """784-100-100-10 with the factorised hypernetwork (1.8M parameters), as compare_number_layers runs it."""
    sizes = (784, 100, 100, 10)
    problem = small_problem(splits, sizes)
    settings = pwd.Alg3Settings(inner_steps=2, sample_sd=1e-2, lambda_step=1e-2, input_offset=-7.0)
    w0 = pwd.fan_in_init(sizes, np.random.RandomState(2))
    fast, ref = pwd.init_alg3(problem, settings, 1, w0), pwd.init_alg3(problem, settings, 1, w0)
    for i in range(2):
        fast = pwd.alg3_step(fast, i, problem, settings, 1)
        ref = pwd.alg3_step(ref, i, problem, settings, 1, reference=True)
    assert_states_close(fast, ref)


def test_other_problems_take_the_reference_path(splits):
    problem = small_problem(splits)
    assert not pwd.Alg3Stepper.supports(problem, pwd.Alg3Settings(hypernet_kind="mlp"))
    plain = problem._replace(train_objective=lambda w, lam, x, y: pwd.decay_objective((784, 10))(w, lam, x, y))
    assert not pwd.Alg3Stepper.supports(plain, pwd.Alg3Settings())


def test_mlp_backprop_equals_autograd(splits):
    sizes = (784, 7, 5, 10)
    rs = np.random.RandomState(3)
    w = 0.3 * rs.randn(3, num_params(sizes))
    x, y = splits.train_x[:9], splits.train_y[:9]
    out = pwd.MLPBackprop(sizes, 3, 9).grad_into(w, x, y, 0.5, np.empty_like(w))
    expected = grad(lambda w_: 0.5 * anp.sum(pwd.mse_loss(sizes)(w_, x, y)))(w)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-14)


def test_step_streams_reproduce_step_rng_bit_for_bit():
    streams = pwd.StepStreams(7)
    for step, keys in [(0, (1,)), (5, (2,)), (123456, (3,)), (3, ()), (2**31, (11, 4))]:
        expected = step_rng(7, step, *keys)
        got = streams(step, *keys)
        a, b = expected.randn(3, 5), got.randn(3, 5)   # 15 normals: the cached second gaussian is reset too
        assert a.tobytes() == b.tobytes()
        assert expected.randint(0, 1000, size=50).tolist() == got.randint(0, 1000, size=50).tolist()
        assert expected.random_sample(7).tobytes() == got.random_sample(7).tobytes()


def test_hand_written_step_stops_on_a_non_finite_gradient(splits):
    """A NaN in the training data makes the hypernetwork gradient non-finite: a DivergenceError, not NaN weights."""
    from common import DivergenceError

    bad_x = splits.train_x.copy()
    bad_x[:, 0] = np.nan
    problem = small_problem(splits)._replace(train_x=bad_x)
    settings = pwd.Alg3Settings(inner_steps=2, batch_size=8, valid_batch_size=8)
    state = pwd.init_alg3(problem, settings, 3)
    with pytest.raises(DivergenceError, match="hypernetwork gradient is not finite at step 0"):
        pwd.alg3_step(state, 0, problem, settings, 3)
