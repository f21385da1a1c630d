"""hypernets_local_medium.py: hand-written gradients against autograd, the three methods' pieces, the control and
the common retraining, data separation, and end-to-end runs through common.main."""
import dataclasses
import json

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from threadpoolctl import threadpool_limits

import common
import hypernets_local_medium as med
from conftest import assert_one_line_error
from data_loader import scatter_splits
from per_weight_decay import Alg3Settings, HyperProblem, alg3_step, init_alg3

TINY = dataclasses.replace(med.Config(), **med.QUICK)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """As the driver runs experiments: one BLAS thread (two spin and stall on a busy 2-core machine)."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def splits(synthetic):
    return scatter_splits(synthetic, TINY.n_train, TINY.n_valid, TINY.n_test)


def run(capsys, *argv):
    capsys.readouterr()
    code = common.main(med, ["--synthetic", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_reference_objective_matches_its_definition():
    rs = np.random.RandomState(0)
    K = 3
    flat, lams = rs.randn(K, 7850) * 0.01, rs.randn(K, 10)
    x, y = rs.rand(5, 784), np.eye(10)[rs.randint(10, size=5)]
    W, b = flat[:, :7840].reshape(K, 784, 10), flat[:, 7840:]
    pred = np.einsum("nd,kdc->knc", x, W) + b[:, None, :]
    nll = np.mean(50 * (pred - y) ** 2, axis=(1, 2)) + np.log(0.1) + 0.5 * np.log(2 * np.pi)
    reg = np.mean(np.exp(lams) * np.linalg.norm(W, axis=1), axis=1)  # (1/10) sum over the 10 columns
    np.testing.assert_allclose(med.class_decay_objective(flat, lams, x, y), nll + reg, rtol=1e-10)
    np.testing.assert_allclose(med.nll_reference(flat, x, y), nll, rtol=1e-10)
    np.testing.assert_allclose(med.nll(flat, x, y), nll, rtol=1e-12)


def test_hand_written_gradients_equal_autograd():
    rs = np.random.RandomState(1)
    K = 4
    flat, lams = rs.randn(K, 7850) * 0.01, rs.randn(K, 10)
    x, y = rs.rand(7, 784), np.eye(10)[rs.randint(10, size=7)]
    out = np.empty_like(flat)
    expected = grad(lambda f: anp.sum(med.class_decay_objective(f, lams, x, y)))(flat)
    np.testing.assert_allclose(med.class_decay_grad(flat, lams, x, y, out), expected, rtol=1e-9, atol=1e-14)
    expected = grad(lambda f: anp.sum(med.nll_reference(f, x, y)))(flat)
    np.testing.assert_allclose(med.nll_grad(flat, x, y, out), expected, rtol=1e-9, atol=1e-14)


def test_hyper_trainer_equals_the_autograd_algorithm_3_step(splits):
    """Several steps of HyperTrainer = per_weight_decay.alg3_step on the same problem through autograd."""
    config = dataclasses.replace(TINY, sample_sd=0.5, lambda_step=0.05)
    problem = HyperProblem(med.class_decay_objective, med.nll_reference, splits.train_x, splits.train_y,
                           splits.valid_x, splits.valid_y, 10, 7850)
    settings = Alg3Settings(hypernet_kind="linear", init_scale=config.init_scale, init_lambda=config.lambda_init,
                            n_samples=config.n_samples, sample_sd=config.sample_sd, inner_steps=config.inner_steps,
                            hypernet_step=config.hypernet_step, lambda_step=config.lambda_step,
                            batch_size=config.batch_size, valid_batch_size=config.batch_size)
    ref = init_alg3(problem, settings, config.seed)
    ours, trainer = med.init_hypernet(config), med.HyperTrainer(splits, config)
    np.testing.assert_array_equal(ours.H, ref.phi[0][0])
    for i in range(4):
        ref = alg3_step(ref, i, problem, settings, config.seed)
        ours = trainer.step(ours, i)
    np.testing.assert_allclose(ours.H, ref.phi[0][0], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(ours.h, ref.phi[0][1], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(ours.lam, ref.lam, rtol=1e-9, atol=1e-15)
    assert not np.allclose(ours.lam, config.lambda_init)  # lambda_hat took steps


def test_stacked_evaluations_equal_separate_runs_and_decay_shrinks_its_class(splits):
    lams = np.zeros((2, 10))
    lams[1, 3] = 4.0  # a strong decay on class 3 only
    both, _, _ = med.train_elementary(lams, splits, TINY, (99, 0), 30, 1e-2)
    alone = np.vstack([med.train_elementary(lams[k:k + 1], splits, TINY, (99, 0), 30, 1e-2)[0] for k in range(2)])
    np.testing.assert_allclose(both, alone, rtol=1e-9, atol=1e-12)
    col_norms = np.linalg.norm(both[:, :7840].reshape(2, 784, 10), axis=1)
    assert col_norms[1, 3] < 0.5 * col_norms[0, 3]
    np.testing.assert_allclose(np.delete(col_norms[1], 3), np.delete(col_norms[0], 3), rtol=1e-6)


def perturbed(splits, part, rs):
    """A copy of splits with the images and labels of `part` ("valid" or "test") replaced by noise."""
    return splits._replace(**{f"{part}_x": rs.rand(*getattr(splits, f"{part}_x").shape),
                              f"{part}_y": np.eye(10)[rs.randint(10, size=len(getattr(splits, f"{part}_y")))]})


def test_training_never_reads_validation_or_test_data(splits):
    """Elementary training (baselines, control, retraining) ignores validation and test data; hyper-training's
    hypernetwork and lambda_hat ignore the test data."""
    rs = np.random.RandomState(3)
    lams = np.zeros((2, 10))
    base = med.train_elementary(lams, splits, TINY, (7,), 20, 1e-3)[0]
    for part in ("valid", "test"):
        np.testing.assert_array_equal(base, med.train_elementary(lams, perturbed(splits, part, rs), TINY, (7,), 20,
                                                                 1e-3)[0])
    state, step_fn, _ = med.make_control(splits, TINY)
    other, other_fn, _ = med.make_control(perturbed(splits, "valid", rs), TINY)
    for i in range(5):
        state, other = step_fn(state, i), other_fn(other, i)
    np.testing.assert_array_equal(state.w, other.w)
    a, b = med.HyperTrainer(splits, TINY), med.HyperTrainer(perturbed(splits, "test", rs), TINY)
    sa, sb = med.init_hypernet(TINY), med.init_hypernet(TINY)
    for i in range(3):
        sa, sb = a.step(sa, i), b.step(sb, i)
    np.testing.assert_array_equal(sa.H, sb.H)
    np.testing.assert_array_equal(sa.lam, sb.lam)


def test_control_is_plain_training_at_the_start_lambda_on_the_hypernetworks_minibatches(splits):
    from per_weight_decay import STREAM_TRAIN_BATCH

    state, step_fn, evaluate = med.make_control(splits, TINY)
    for i in range(6):
        state = step_fn(state, i)
    lams = np.full((1, 10), TINY.lambda_init)
    expected, valid, _ = med.train_elementary(lams, splits, TINY, (STREAM_TRAIN_BATCH,), 6, TINY.hypernet_step,
                                              record=(6,))
    np.testing.assert_allclose(state.w, expected, rtol=1e-12)
    assert evaluate(state)[0] == pytest.approx(valid[-1, 0], rel=1e-12)


def test_expected_improvement_values():
    best = 1.0
    # At mean == best, EI = std * pdf(0); far below best it tends to best - mean; far above, to 0.
    assert med.expected_improvement(np.array([1.0]), np.array([0.5]), best)[0] == pytest.approx(0.5 * 0.3989423, 1e-6)
    assert med.expected_improvement(np.array([0.2]), np.array([1e-9]), best)[0] == pytest.approx(0.8)
    assert med.expected_improvement(np.array([5.0]), np.array([0.1]), best)[0] == pytest.approx(0.0, abs=1e-12)
    ei = med.expected_improvement(np.array([0.9, 1.0, 1.1]), np.full(3, 0.2), best)
    assert ei[0] > ei[1] > ei[2] > 0


def test_best_so_far_tracks_test_at_the_running_argmin():
    valid, test = [3.0, 2.0, 2.5, 1.0, 1.5], [30.0, 20.0, 1.0, 10.0, 0.0]
    bv, bt = med.best_so_far(valid, test)
    np.testing.assert_array_equal(bv, [3.0, 2.0, 2.0, 1.0, 1.0])
    np.testing.assert_array_equal(bt, [30.0, 20.0, 20.0, 10.0, 10.0])


def test_suggest_returns_distinct_points_in_the_box_near_a_known_minimum():
    config = dataclasses.replace(TINY, bo_batch=3, bo_candidates=500, bo_local_candidates=200)
    rs = np.random.RandomState(1)
    X = rs.uniform(-3, 3, size=(40, 10))
    y = np.sum((X - 1.0) ** 2, axis=1) / 10  # minimum at lambda = 1 everywhere
    picks = med.suggest(X, y, config, np.random.RandomState(2))
    assert picks.shape == (3, 10)
    assert np.all((picks >= -3) & (picks <= 3))
    assert len({tuple(p) for p in picks}) == 3
    assert np.sum((picks[0] - 1.0) ** 2) / 10 < np.median(y)  # far better than a typical random point


def test_hypernetwork_has_86350_parameters_and_starts_near_the_initial_model(splits):
    lams = []
    state, step_fn, evaluate = med.make_hypernet(splits, TINY, lams)
    assert state.H.size + state.h.size == 86350
    np.testing.assert_allclose(evaluate(state), med.init_losses(splits, TINY), rtol=1e-3)
    assert len(lams) == 1


def summary_with(hyper, random, bayes, control, figure=(0.5, 0.6, 0.6)):
    """A minimal summary for the claims: re-scored validation losses and the figure's end values."""
    rescored = {m: {"valid": v, "test": v + 0.05} for m, v in zip(med.RESCORED, (hyper, random, bayes, control),
                                                                   strict=True)}
    methods = {"hypernet": {"plateau_valid": figure[0]}, "random": {"best_valid": figure[1]},
               "bayesopt": {"best_valid": figure[2]}}
    return {"rescored": rescored, "methods": methods}


def test_claims_follow_the_numbers():
    claims = {c.id: c for c in med.CLAIMS}
    untuned = summary_with(0.50, 0.49, 0.48, 0.50)  # hyper-training's lambda no better than lambda_hat_0
    assert claims["medium-tunes-lambda"].evaluate(untuned)[1] == "refuted"
    assert claims["medium-beats-bo-random"].evaluate(untuned)[1] == "not reproduced"
    tuned = summary_with(0.45, 0.49, 0.48, 0.50)
    assert claims["medium-tunes-lambda"].evaluate(tuned)[1] == "reproduced"
    assert claims["medium-beats-bo-random"].evaluate(tuned)[1] == "reproduced"
    assert claims["medium-figure"].evaluate(tuned)[1] == "reproduced"
    assert claims["medium-figure"].evaluate(summary_with(0.45, 0.49, 0.48, 0.5, (0.59, 0.6, 0.6)))[1] == "partly"
    behind = summary_with(0.45, 0.49, 0.48, 0.5, (0.61, 0.6, 0.6))
    assert claims["medium-figure"].evaluate(behind)[1] == "not reproduced"


def test_end_to_end_quick_run_with_control_retraining_and_replot(tmp_path, capsys):
    code, out, err = run(capsys, "--quick", "--out-dir", str(tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "results" / "hypernets_local_medium.json").read_text())
    assert summary["hypernet_parameters"] == 86350 and summary["budget_seconds"] == TINY.seconds
    with np.load(tmp_path / "results" / "hypernets_local_medium.npz") as npz:
        for method in med.METHODS:
            seconds, best = npz[f"{method}_seconds"], npz[f"{method}_best_valid"]
            assert seconds[0] == 0 and np.all(seconds <= TINY.seconds) and np.all(np.diff(seconds) >= 0)
            assert np.all(np.diff(best) <= 0)  # best so far never rises
            assert summary["methods"][method]["best_valid"] == pytest.approx(best[-1])
        assert summary["methods"]["random"]["evaluations"] == len(npz["random_eval_valid"]) > 0
        # the control: lambda_hat_0, as many Adam steps as the hypernetwork took
        steps = summary["methods"]["hypernet"]["hypernet_steps"]
        assert summary["control"]["steps"] == steps == npz["control_step"][-1]
        # the common retraining: one row per method and the control, the same steps for all
        assert npz["rescore_valid"].shape == (TINY.rescore_points, len(med.RESCORED))
        assert npz["rescore_steps"][-1] == TINY.rescore_steps
        np.testing.assert_array_equal(npz["rescore_lambdas"][-1], np.full(10, TINY.lambda_init))
        for k, method in enumerate(("hypernet", "random", "bayesopt")):
            np.testing.assert_array_equal(npz["rescore_lambdas"][k], summary["methods"][method]["best_lambda"])
        for method in ("random", "bayesopt"):  # the best lambda is picked on validation data
            best = npz[f"{method}_lambdas"][np.argmin(npz[f"{method}_eval_valid"])]
            np.testing.assert_array_equal(summary["methods"][method]["best_lambda"], best)
    assert "common retraining" in out or "retrained" in out
    for stem in ("hypernets_local_medium", "hypernets_local_medium_rescored", "hypernets_local_medium_diagnostics"):
        assert (tmp_path / f"{stem}.pdf").exists()
    d, ref = summary["diagnostics"], summary["reference"]
    assert med.tex_numbers(summary)["MediumCosineMean"] and "MediumExactBayesValid" in med.tex_numbers(summary)
    older = {k: v for k, v in summary.items() if k not in ("diagnostics", "reference", "exact")}
    assert "MediumCosineMean" not in med.tex_numbers(older) and "MediumRescoredHyperValid" in med.tex_numbers(older)
    assert -1 <= d["cosine"]["mean"] <= 1 and d["cosine"]["checkpoints"] >= 2 and d["cpu_seconds"] > 0
    assert len(d["lambda_shift"]["per_class"]) == 10 and ref["stationarity"] < 1e-10
    assert summary["exact"]["control"]["valid"] == ref["valid"] < summary["rescored"]["control"]["valid"]
    with np.load(tmp_path / "results" / "hypernets_local_medium.npz") as npz:
        steps = npz["hypernet_diag_step"]
        assert steps[0] == 0 and np.all(np.diff(steps) > 0) and steps[-1] <= npz["hypernet_step"][-1]
        assert np.all(np.abs(npz["hypernet_cosine"]) <= 1)
        np.testing.assert_allclose(np.linalg.norm(npz["hypernet_lambda_delta"]), d["lambda_shift"]["l2"])
    png = tmp_path / "hypernets_local_medium.png"
    assert png.stat().st_size > 10000
    png.unlink()
    code, _, err = run(capsys, "--replot", "--out-dir", str(tmp_path))
    assert code == 0, err
    assert png.exists()


def test_iters_runs_are_bit_reproducible(tmp_path, capsys):
    keys = ("methods", "control", "rescored")
    results = []
    for i in range(2):
        code, _, err = run(capsys, "--quick", "--iters", "6", "--search-iters", "2",
                           "--out-dir", str(tmp_path / str(i)))
        assert code == 0, err
        summary = json.loads((tmp_path / str(i) / "results" / "hypernets_local_medium.json").read_text())
        for method in med.METHODS:
            summary["methods"][method].pop("runtime_seconds")
        summary["control"].pop("runtime_seconds")
        results.append({k: summary[k] for k in keys})
    assert results[0] == results[1]
    assert results[0]["methods"]["hypernet"]["lambda_steps"] == 6
    assert results[0]["methods"]["random"]["batches"] == results[0]["methods"]["bayesopt"]["batches"] == 2


@pytest.mark.parametrize("argv", [["--bo-batch", "300", "--bo-candidates", "200", "--bo-local-candidates", "50"],
                                  ["--random-batch", str(10**8)], ["--slice-seconds", "1e-300"],
                                  ["--seconds", "1e-6"], ["--lambda-low", "3", "--lambda-high", "-3"],
                                  ["--paper-budgets", "--seconds", "5"], ["--seconds", "-1"], ["--bo-batch", "0"],
                                  ["--iters", "0"], ["--backend", "dask"], ["--backend", "ray"]])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv):
    code, _, err = run(capsys, "--out-dir", str(tmp_path), *argv)
    assert_one_line_error(code, err, 2, tmp_path)


def test_a_budget_that_lets_a_baseline_finish_nothing_is_an_error(tmp_path, capsys):
    code, _, err = run(capsys, "--quick", "--seconds", "0.01", "--slice-seconds", "0.01", "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, 1, tmp_path, contains=("finished no evaluation",))


def test_missing_results_and_divergence_are_one_line_errors(tmp_path, capsys):
    code, _, err = run(capsys, "--replot", "--out-dir", str(tmp_path))
    assert code == 1 and err.startswith("error: no saved results") and err.count("\n") == 1
    code, _, err = run(capsys, "--quick", "--iters", "3", "--search-iters", "1", "--hypernet-step", "1e3",
                       "--lambda-step", "10", "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, 1, tmp_path, contains=("diverged",))


@pytest.mark.mnist
def test_quick_run_on_real_mnist_improves_on_the_initial_model(mnist):
    config = dataclasses.replace(TINY, seconds=2.0, slice_seconds=0.5, elementary_steps=20)
    splits = scatter_splits(mnist, config.n_train, config.n_valid, config.n_test)
    summary, arrays = med.run(config, mnist, log=lambda line: None)
    start = med.init_losses(splits, config)[0]
    assert start == pytest.approx(3.616, abs=0.02)  # ~0 predictions: 50 * mean(t^2) - 1.384 = 5 - 1.384
    for method in med.METHODS:
        assert arrays[f"{method}_best_valid"][0] == pytest.approx(start, rel=1e-3)  # untrained model
        assert summary["methods"][method]["best_valid"] < start


# ------------------------------------------------------------------ exact references and diagnostics (issue 10)

LAM_EXACT = np.array([-2.0, -1.0, -0.5, 0.0, 0.3, 0.6, 1.0, -1.5, 8.0, 0.1])  # class 8: decay strong enough for W_8 = 0


@pytest.fixture(scope="module")
def exact(splits):
    problem = med.class_problem(splits.train_x, splits.train_y)
    response = med.best_response(problem, LAM_EXACT)
    g = med.nll_grad(response.flat, splits.valid_x, splits.valid_y, np.empty((1, med.N_WEIGHTS)))
    return problem, response, g


def exact_valid(problem, lam, splits):
    return med.nll(med.best_response(problem, lam).flat, splits.valid_x, splits.valid_y)[0]


def test_best_response_is_the_exact_minimiser_of_the_scripts_objective(splits, exact):
    problem, response, _ = exact
    x, y = splits.train_x, splits.train_y
    objective = lambda f: med.class_decay_objective(f, LAM_EXACT[None, :], x, y)[0]
    live = np.ones(med.N_WEIGHTS, bool)
    W, _ = med.split_weights(response.flat)
    assert np.all(W[0][:, 8] == 0) and np.all(np.linalg.norm(W[0], axis=0)[np.arange(10) != 8] > 0)
    live[:7840] = np.tile(np.arange(10) != 8, 784)  # the norm is not differentiable at W_8 = 0
    with np.errstate(invalid="ignore", divide="ignore"):  # autograd's norm derivative at W_8 = 0 is nan (unused)
        g = grad(objective)(response.flat)
    assert np.max(np.abs(g[0, live])) < 1e-11  # autograd: stationary wherever differentiable
    # W_8 = 0 is optimal: the data gradient there is inside the norm's subdifferential ball of radius mu_8
    data = grad(lambda f: med.nll_reference(f, x, y)[0])(response.flat)[0, :7840].reshape(784, 10)
    assert np.linalg.norm(data[:, 8]) < med.decay_weights(LAM_EXACT)[8]
    rs = np.random.RandomState(5)
    f0 = objective(response.flat)
    for _ in range(3):  # and every nearby point is worse
        assert objective(response.flat + 1e-4 * rs.randn(*response.flat.shape)) > f0


def test_exact_hypergradient_equals_central_finite_differences_of_the_converged_loss(splits, exact):
    problem, response, g = exact
    hg = med.exact_hypergradient(problem, response, g)
    h, fd = 1e-4, np.zeros(10)
    for c in range(10):
        e = np.zeros(10)
        e[c] = h
        fd[c] = (exact_valid(problem, LAM_EXACT + e, splits) - exact_valid(problem, LAM_EXACT - e, splits)) / (2 * h)
    assert hg[8] == 0 and abs(fd[8]) < 1e-12  # W_8 stays at 0 around lambda_8 = 8
    assert np.min(np.abs(fd[np.arange(10) != 8])) > 1e-6  # a test with teeth: the other classes move L_V
    np.testing.assert_allclose(hg, fd, rtol=1e-6, atol=1e-11)


def test_exact_hypergradient_equals_autograd_implicit_differentiation(splits, exact):
    """-(d grad_w F / d lambda)' H^-1 g in the full weight space (biases included), every derivative by autograd:
    the adjoint solves H y = g (autograd Hessian-vector product), and the mixed derivative is autograd's."""
    problem, response, g = exact
    x, y = splits.train_x, splits.train_y
    w, lam = response.flat, LAM_EXACT[None, :]
    v = med.adjoint(problem, response, g)
    keep = np.ones(med.N_WEIGHTS, bool)
    keep[np.arange(8, 7840, 10)] = False  # class 8: W_8 = 0, outside the differentiable part
    keep[7848] = False
    v[0, ~keep] = 0.0
    grad_w = grad(lambda f, decays: med.class_decay_objective(f, decays, x, y)[0])
    with np.errstate(invalid="ignore", divide="ignore"):  # autograd's norm derivative at W_8 = 0 is nan (unused)
        Hv = grad(lambda f: anp.sum(grad_w(f, lam) * v))(w)
        hg = -grad(lambda decays: anp.sum(grad_w(w, decays) * v))(lam)[0]
    np.testing.assert_allclose(Hv[0, keep], g[0, keep], rtol=1e-8, atol=1e-12)
    live = np.arange(10) != 8
    np.testing.assert_allclose(med.exact_hypergradient(problem, response, g)[live], hg[live], rtol=1e-8, atol=1e-14)


def tangent_hypernet(problem, lam, config, h=1e-5):
    """A HyperState whose hypernetwork is the exact best response's tangent at lam: H = dw*/dlambda (central
    differences), h = w*(lam) - lam H. Its hypergradient H dL_V/dw is then the exact one."""
    rows = []
    for c in range(10):
        e = np.zeros(10)
        e[c] = h
        up, down = med.best_response(problem, lam + e).flat[0], med.best_response(problem, lam - e).flat[0]
        rows.append((up - down) / (2 * h))
    H = np.array(rows)
    state = med.init_hypernet(config)
    return state._replace(H=H, h=med.best_response(problem, lam).flat[0] - lam @ H, lam=lam.copy(), step=1)


def test_diagnostics_give_cosine_one_for_the_exact_tangent_and_minus_one_for_its_reverse(splits):
    problem = med.class_problem(splits.train_x, splits.train_y)
    lam = np.linspace(-1.0, 0.5, 10)
    diag = med.HyperDiagnostics(problem, splits, np.zeros(10))
    state = tangent_hypernet(problem, lam, TINY)
    diag.record(state)
    diag.record(state._replace(H=-state.H, h=state.h + 2 * lam @ state.H, step=2))  # the same w_phi(lam), reversed
    out = diag.arrays()
    np.testing.assert_allclose(out["hypernet_cosine"], [1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(out["hypernet_lambda_shift"], np.linalg.norm(lam))
    np.testing.assert_allclose(out["hypernet_exact_valid"], exact_valid(problem, lam, splits))
    assert diag.cpu_seconds > 0


def test_diagnostics_direction_is_the_hypernetworks_lambda_gradient_by_autograd(splits):
    """What the cosine measures is d/dlambda L_V(lambda H + h) at lambda_hat on the full validation set."""
    state = med.init_hypernet(TINY)
    rs = np.random.RandomState(4)
    state = state._replace(H=rs.randn(10, med.N_WEIGHTS) * 1e-3, h=rs.randn(med.N_WEIGHTS) * 1e-2,
                           lam=rs.randn(10), step=1)
    expected = grad(lambda decays: med.nll_reference((decays @ state.H + state.h)[None, :], splits.valid_x,
                                                     splits.valid_y)[0])(state.lam)
    w = (state.lam @ state.H + state.h)[None, :]
    ours = state.H @ med.nll_grad(w, splits.valid_x, splits.valid_y, np.empty((1, med.N_WEIGHTS)))[0]
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-15)
    problem = med.class_problem(splits.train_x, splits.train_y)
    diag = med.HyperDiagnostics(problem, splits, np.zeros(10))
    diag.record(state)
    response = med.best_response(problem, state.lam)
    exact = med.exact_hypergradient(problem, response, med.nll_grad(response.flat, splits.valid_x, splits.valid_y,
                                                                    np.empty((1, med.N_WEIGHTS))))
    assert diag.rows[0][2] == pytest.approx(ours @ exact / np.linalg.norm(ours) / np.linalg.norm(exact), abs=1e-12)


def test_cosine_claim_follows_the_mean_cosine():
    claim = {c.id: c for c in med.CLAIMS}["medium-hg-direction"]
    verdict = lambda c: claim.evaluate({"diagnostics": {"cosine": {"mean": c}}})[1]
    assert verdict(0.6) == "reproduced" and verdict(0.3) == verdict(med.COSINE_ALIGNED) == "partly"
    assert verdict(med.COSINE_ZERO) == verdict(0.05) == verdict(-0.05) == verdict(-0.7) == "refuted"


# ------------------------------------------------------------------------ batches across workers (issue 12)

def test_a_batch_split_across_chunks_gives_the_bits_of_one_stacked_batch(splits):
    lams = np.random.RandomState(2).uniform(-3, 3, (10, 10))
    config = dataclasses.replace(TINY, elementary_steps=25)
    valid, test = med.evaluate_batch(lams, splits, config, (med.STREAM_RANDOM, 3))
    for parts in ([5, 5], [3, 4, 3], [1] * 10):
        bounds = np.cumsum([0] + parts)
        out = [med.evaluation_chunk((lams[a:b], (med.STREAM_RANDOM, 3)), {"splits": splits, "config": config})
               for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        assert np.concatenate([o[0] for o in out]).tobytes() == valid.tobytes()
        assert np.concatenate([o[1] for o in out]).tobytes() == test.tobytes()
        assert all(o[2] > 0 for o in out)  # each chunk reports the CPU seconds it took


def test_charged_run_counts_the_workers_cpu_seconds():
    from budget import Budget

    run = med.ChargedRun(0, lambda state, i: (state + 1, 2.5), lambda state: (1.0, 1.0), Budget(seconds=6.0),
                         "charged", log=None)
    run.advance()
    assert run.i == 3 and run.charged == 7.5 and 7.5 <= run.elapsed < 8.0  # 2.5 per step: the budget of 6 s stops it


def test_jobs_2_gives_the_bits_of_jobs_1_and_charges_the_workers(synthetic):
    import forked

    config = dataclasses.replace(TINY, num_iters=4, search_iters=2, rescore_steps=30)
    results = {jobs: med.run(config, synthetic, jobs=jobs, log=lambda line: None) for jobs in (1, 2)}
    (one, one_arrays), (two, two_arrays) = results[1], results[2]
    assert one["workers"] == 1 and two["workers"] == min(2, forked.available_cpus())
    for method in ("random", "bayesopt"):
        a, b = dict(one["methods"][method]), dict(two["methods"][method])
        assert a.pop("worker_cpu_seconds") == 0 and (b.pop("worker_cpu_seconds") > 0 or two["workers"] == 1)
        a.pop("runtime_seconds"), b.pop("runtime_seconds")
        assert a == b
        for key in ("lambdas", "eval_valid", "eval_test"):
            assert one_arrays[f"{method}_{key}"].tobytes() == two_arrays[f"{method}_{key}"].tobytes()
    assert one["rescored"] == two["rescored"]
    for d in (one["diagnostics"], two["diagnostics"]):
        d.pop("cpu_seconds")
    assert one["diagnostics"] == two["diagnostics"] and one["exact"] == two["exact"]
