"""hypergradient_study.py: its Algorithm 3 variant equals per_weight_decay's, its gradients equal autograd's, its
lambda step goes downhill when the hypernetwork knows the true direction, it never reads test data, and the
protocol run (synthetic, --quick) writes complete results, figure and table."""
import json
import sys

import numpy as np
import pytest
from autograd import grad

from conftest import CODE

sys.path.insert(0, str(CODE))

import common  # noqa: E402
import hypergradient_study as hs  # noqa: E402
import references as ref  # noqa: E402
from data_loader import synthetic_mnist  # noqa: E402
from large_fixtures import one_blas_thread  # noqa: F401, E402  (fixture)
from per_weight_decay import Alg3Settings, HyperProblem, alg3_step, decay_objective, init_alg3, mse_loss  # noqa: E402

LAYERS = [784, 10]
P = 7850


@pytest.fixture(scope="module")
def splits():
    data = synthetic_mnist(n_train=600, n_test=200)
    return ref.block_splits(data, 1, block=200, n_test=200)


def small_config(**kw):
    return hs.Config(**{**dict(batch_size=20, n_samples=2), **kw})


def test_decay_grad_matches_autograd(splits):
    rs = np.random.RandomState(0)
    w, lambdas = 0.1 * rs.randn(3, P), rs.uniform(-3, 0, (3, P))
    x, y = splits.train_x[:20], splits.train_y[:20]
    objective = lambda v: np.mean(decay_objective(LAYERS)(v, lambdas, x, y))
    np.testing.assert_allclose(hs.decay_grad(w, lambdas, x, y), grad(objective)(w), rtol=1e-9, atol=1e-15)


def test_study_step_equals_per_weight_decay_alg3_step(splits):
    variant = hs.PAPER._replace(sample_sd=0.1, inner_steps=3, hypernet_step=1e-3, lambda_step=1e-2, hidden=3)
    config = small_config()
    settings = Alg3Settings(hypernet_kind="factorised", hidden=3, init_scale=config.init_scale,
                            init_lambda=config.init_lambda, n_samples=2, sample_sd=0.1, inner_steps=3,
                            hypernet_step=1e-3, lambda_step=1e-2, batch_size=20, valid_batch_size=20,
                            input_offset=config.init_lambda)
    problem = HyperProblem(decay_objective(LAYERS), mse_loss(LAYERS), splits.train_x, splits.train_y,
                           splits.valid_x, splits.valid_y, P, P)
    theirs, ours = init_alg3(problem, settings, config.seed), hs.init_study(variant, config)
    for step in range(3):
        theirs = alg3_step(theirs, step, problem, settings, config.seed)
        ours = hs.study_step(ours, step, variant, config, splits)
    for (Wa, ba), (Wb, bb) in zip(theirs.phi, ours.phi, strict=True):
        np.testing.assert_allclose(Wb, Wa, rtol=1e-8, atol=1e-13)
        np.testing.assert_allclose(bb, ba, rtol=1e-8, atol=1e-13)
    np.testing.assert_allclose(ours.lam, theirs.lam, rtol=1e-12)
    assert np.abs(ours.lam - config.init_lambda).max() > 1e-3  # lambda did move


def test_lambda_direction_is_the_hypernetwork_hypergradient(splits):
    rs = np.random.RandomState(1)
    config = small_config()
    state = hs.init_study(hs.PAPER._replace(hidden=4), config)
    phi = [(W + 0.01 * rs.randn(*W.shape), b + 0.01 * rs.randn(*b.shape)) for W, b in state.phi]
    lam = state.lam + 0.1 * rs.randn(P)
    settings = Alg3Settings(hypernet_kind="factorised", hidden=4)
    problem = HyperProblem(decay_objective(LAYERS), mse_loss(LAYERS), splits.train_x, splits.train_y,
                           splits.valid_x, splits.valid_y, P, P)
    expected = ref.hypernet_hypergradient(phi, lam, settings, problem, splits.valid_x, splits.valid_y, offset=-6.5)
    got = hs.lambda_direction(phi, lam, np.full(P, -6.5), splits.valid_x, splits.valid_y)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-16)


def test_antithetic_pairs_and_centring(splits):
    config = small_config(n_samples=4)
    state = hs.init_study(hs.PAPER, config)
    state = state._replace(lam=state.lam + 0.5)
    v = hs.PAPER._replace(antithetic=True, sample_sd=0.1)
    lambdas = hs.sample_lambdas(state, v, 4, np.random.RandomState(0))
    np.testing.assert_allclose(lambdas[:2] + lambdas[2:], np.tile(2 * state.lam, (2, 1)), rtol=1e-14)
    assert np.std(lambdas - state.lam) == pytest.approx(0.1, rel=0.05)
    np.testing.assert_array_equal(hs.offset_of(state, v._replace(centre="current")), state.lam)
    np.testing.assert_array_equal(hs.offset_of(state, v), state.lam0)


def aligned_state(splits, config, variant):
    """A hypernetwork whose lambda step follows the exact hypergradient u: w_phi(lambda_hat) = w*(lambda_hat) and
    J_phi' g = u (g/|g|^2) . g_batch, with W1[:, 0] = u and W2[0] = g/|g|^2 (g the full-validation gradient)."""
    ridge = ref.ridge_problem(splits.train_x, splits.train_y)
    state = hs.init_study(variant, config)
    u, w_star, _ = ref.exact_hypergradient(ridge, state.lam, splits.valid_x, splits.valid_y)
    g = ref.linear_loss_grad(w_star, splits.valid_x, splits.valid_y)
    (W1, b1), (W2, b2) = state.phi
    W1[:], b1[:], W2[:], b2[:] = 0.0, 0.0, 0.0, w_star
    W1[:, 0], W2[0] = u, g / (g @ g)
    return state, ridge, u


@pytest.mark.parametrize("centre", ["initial", "current"])
def test_lambda_step_goes_downhill_on_the_exact_validation_loss(splits, centre):
    config = small_config(batch_size=2000)  # a with-replacement validation batch of 2,000 from 200: ~ the full set
    variant = hs.PAPER._replace(inner_steps=0, lambda_step=1e-2, hidden=2, centre=centre)
    state, ridge, u = aligned_state(splits, config, variant)
    lam0 = state.lam.copy()
    cos = ref.cosine(hs.lambda_direction(state.phi, lam0, hs.offset_of(state, variant), splits.valid_x,
                                         splits.valid_y), u)
    assert cos == pytest.approx(1.0, abs=1e-9)
    before = ref.fixed_lambda_reference(lam0, splits, ridge)["valid"]
    new = hs.study_step(state, 0, variant, config, splits)
    assert np.mean(np.sign(new.lam - lam0) == -np.sign(u)) > 0.99
    assert ref.fixed_lambda_reference(new.lam, splits, ridge)["valid"] < before


def test_data_separation(splits):
    """Perturbing test data changes nothing; perturbing validation data leaves phi unchanged (only lambda moves)."""
    config = small_config()
    variant = hs.PAPER._replace(sample_sd=0.1, inner_steps=2, hypernet_step=1e-3, lambda_step=1e-2, hidden=2)
    base = hs.study_step(hs.init_study(variant, config), 0, variant, config, splits)
    test_perturbed = splits._replace(test_x=splits.test_x[::-1] * 0.5, test_y=splits.test_y[::-1])
    t = hs.study_step(hs.init_study(variant, config), 0, variant, config, test_perturbed)
    valid_perturbed = splits._replace(valid_x=splits.valid_x * 0.5, valid_y=splits.valid_y[::-1])
    v = hs.study_step(hs.init_study(variant, config), 0, variant, config, valid_perturbed)
    np.testing.assert_array_equal(t.lam, base.lam)
    for (W, b), (Wt, bt), (Wv, bv) in zip(base.phi, t.phi, v.phi, strict=True):
        np.testing.assert_array_equal(Wt, W)
        np.testing.assert_array_equal(bt, b)
        np.testing.assert_array_equal(Wv, W)
        np.testing.assert_array_equal(bv, b)
    assert not np.array_equal(v.lam, base.lam)


def test_protocol_quick_run_and_replot(tmp_path, capsys):
    out = tmp_path / "out"
    assert common.main(hs, ["--quick", "--synthetic", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "results" / f"{hs.NAME}.json").read_text())
    for name in hs.QUICK["variants"]:
        s = summary["variants"][name]
        assert -1 <= s["cosine_mean"] <= 1 and s["dlambda_norm"] >= 0
        assert s["gain_lambda"] == pytest.approx(summary["reference"]["valid"] - s["closed_form_valid"])
    with np.load(out / "results" / f"{hs.NAME}.npz") as npz:
        seconds, valid = npz["exact_seconds"], npz["exact_valid"]
    for s in summary["variants"].values():  # exact descent read off its VALIDATION curve at the variant's time
        done = np.nonzero(seconds <= s["seconds"])[0]
        assert s["exact_valid_same_time"] == valid[done[-1] if len(done) else 0]
    assert summary["exact"]["gain"] == pytest.approx(summary["reference"]["valid"] - valid[-1])
    assert (out / "hypergradient_study.png").exists() and (out / "results" / f"{hs.TABLE_NAME}.tex").exists()
    assert r"\begin{tabular}" in (out / "results" / f"{hs.TABLE_NAME}.tex").read_text()
    for claim in hs.CLAIMS:
        value, verdict = claim.evaluate(summary)
        assert verdict in common.VERDICTS
    assert all(isinstance(v, str) for v in hs.tex_numbers(summary).values())
    assert common.main(hs, ["--replot", "--out-dir", str(out)]) == 0


def test_value_at_time():
    t, v = np.array([0.0, 1.0, 2.0]), np.array([5.0, 4.0, 3.0])
    assert [hs.value_at_time(t, v, x) for x in (-1.0, 0.0, 0.5, 1.0, 9.0)] == [5.0, 5.0, 5.0, 4.0, 3.0]


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    assert common.main(hs, ["--quick", "--synthetic", "--valid-block", "9", "--out-dir", str(tmp_path)]) == 2
    assert common.main(hs, ["--quick", "--synthetic", "--variants", "nope", "--out-dir", str(tmp_path)]) == 2
    assert common.main(hs, ["--quick", "--synthetic", "--variants", "antithetic", "--n-samples", "3",
                            "--out-dir", str(tmp_path)]) == 1
    assert common.main(hs, ["--quick", "--synthetic", "--valid-block", "4", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 4


def test_run_variant_scores_on_validation_data(splits):
    """The recorded cosine and closed-form loss at step 0 are the validation-set ones, recomputed independently."""
    config = small_config(hypernet_steps=20, eval_points=2)
    variant = hs.PAPER._replace(sample_sd=0.1, inner_steps=10, hidden=2)
    ridge = ref.ridge_problem(splits.train_x, splits.train_y)
    summary, arrays = hs.run_variant(variant, config, splits, ridge, log=None)
    state = hs.init_study(variant, config)
    exact, _, valid = ref.exact_hypergradient(ridge, state.lam, splits.valid_x, splits.valid_y)
    direction = hs.lambda_direction(state.phi, state.lam, state.lam0, splits.valid_x, splits.valid_y)
    assert arrays["paper_cosine"][0] == pytest.approx(ref.cosine(direction, exact), abs=1e-12)
    assert arrays["paper_closed_valid"][0] == pytest.approx(valid, rel=1e-12)
    assert list(arrays["paper_steps"]) == [0, 2]
    assert summary["dlambda_norm"] == pytest.approx(np.linalg.norm(arrays["paper_dlambda"]))
