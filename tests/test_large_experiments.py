"""The large experiments (hypernets_local_large, compare_number_layers) and their shared module, on small
synthetic data: gradients, Algorithm 3/4, the budgeted loop, quick runs end to end, errors, replot."""
import json

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

import compare_number_layers as layers
import hypernets_local_large as large
import per_weight_decay as pwd
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


def test_budgeted_loop_counts_steps_and_excludes_evaluation():
    slow_eval = lambda s: (__import__("time").sleep(0.05), (1.0 / (s + 1), 2.0))[1]
    state, curve = pwd.run_budgeted(0, lambda s, i: s + 1, slow_eval, pwd.Budget(iters=7, eval_every=3,
                                                                                 log_every=100), log=None)
    assert state == 7 and curve.step.tolist() == [0, 3, 6, 7]
    assert curve.seconds[-1] < 0.05              # evaluations (0.05 s each) are off the clock
    assert pwd.time_to_reach(curve, 0.2) == curve.seconds[2] and pwd.time_to_reach(curve, 0.01) is None
    with pytest.raises(ValueError):
        pwd.Budget()


def test_interleaved_runs_alternate_by_method_time():
    import time as _time

    order = []

    def stepper(tag):
        def step(s, i):
            order.append(tag)
            _time.sleep(0.01)
            return s + 1
        return step
    runs = [pwd.BudgetedRun(0, stepper(t), lambda s: (1.0, 1.0), pwd.Budget(seconds=0.1, eval_every=5,
                                                                            log_every=100), t, None) for t in "ab"]
    pwd.run_interleaved(runs, 0.03)
    assert all(r.finished for r in runs)
    first_b = order.index("b")
    assert 0 < first_b < len(order) - 1 and "a" in order[first_b:]   # a ran again after b started


# ----------------------------------------------------------------------- unrolled baseline

def test_linear_decay_grad_matches_autograd():
    rs = np.random.RandomState(4)
    w, lam = 0.01 * rs.randn(7850), rs.randn(7850) - 4
    x, y = rs.rand(20, 784), rs.rand(20, 10)
    reference = grad(lambda w: pwd.decay_objective((784, 10))(w[None, :], lam[None, :], x, y)[0])(w)
    assert np.allclose(large.linear_decay_grad(w, lam, x, y), reference, rtol=1e-10, atol=1e-14)


def test_unrolled_hypergradient_matches_finite_differences(splits):
    config = large.Config(unroll_steps=3, unroll_inner="sgd", unroll_inner_step=0.5)
    w0 = 0.01 * np.random.RandomState(5).randn(7850)
    bx, by = large.unrolled_schedule(splits, config)
    loss = pwd.mse_loss((784, 10))
    f = lambda lam: loss(large.unrolled_train(lam, w0, bx, by, config)[None, :], splits.valid_x, splits.valid_y)[0]
    lam = np.full(7850, -1.0)
    g = grad(f)(lam)
    direction = np.random.RandomState(6).randn(7850)
    eps = 1e-4
    numeric = (f(lam + eps * direction) - f(lam - eps * direction)) / (2 * eps)
    assert np.isclose(np.dot(g, direction), numeric, rtol=1e-4)


# -------------------------------------------------------------------------------- end to end

class Outcome:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_script(module, *args, capsys):
    """Run module.main in-process (faster than a subprocess) like the command line: exit status and output."""
    from common import run_main

    capsys.readouterr()
    try:
        code = run_main(module.main, ["--synthetic", *args])
    except SystemExit as exit_:  # argparse rejections
        code = exit_.code
    out = capsys.readouterr()
    return Outcome(code, out.out, out.err)


def test_large_quick_end_to_end_and_replot(tmp_path, capsys):
    out = run_script(large, "--quick", "--seconds", "1", "--out-dir", str(tmp_path), capsys=capsys)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "results" / "hypernets_local_large.json").read_text())
    assert summary["budget"] == "seconds" and summary["hypernet_parameters"] == 164860
    for method in ("hyper", "unrolled"):
        s = summary[method]
        assert s["steps"] > 0 and np.isfinite(s["final_valid"]) and s["best_valid"] <= s["final_valid"]
    assert "target" in summary and isinstance(summary["target"]["met"], bool)
    png = tmp_path / "hypernets_local_large.png"
    png.unlink()
    out = run_script(large, "--replot", "--out-dir", str(tmp_path), capsys=capsys)
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 10000


def test_large_fixed_iters_reproducible(tmp_path, capsys):
    arrays = []
    for i in range(2):
        d = tmp_path / str(i)
        out = run_script(large, "--quick", "--iters", "3", "--algorithm", "simplified",
                         "--out-dir", str(d), capsys=capsys)
        assert out.returncode == 0, out.stderr
        with np.load(d / "results" / "hypernets_local_large.npz") as npz:
            arrays.append({k: npz[k] for k in npz.files})
        summary = json.loads((d / "results" / "hypernets_local_large.json").read_text())
        assert summary["budget"] == "iters" and summary["config"]["algorithm"] == "simplified"
        assert summary["hyper"]["steps"] == 3 and summary["unrolled"]["steps"] == 3
    for key in arrays[0]:
        if not key.endswith("_seconds"):                 # timing is the only run-dependent field
            assert np.array_equal(arrays[0][key], arrays[1][key]), key


def test_large_divergence_is_one_line_error(tmp_path, capsys):
    out = run_script(large, "--quick", "--iters", "2", "--init-lambda", "1000",
                     "--out-dir", str(tmp_path), capsys=capsys)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and "not finite at step" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "hypernets_local_large.json").exists()


def test_invalid_arguments_rejected(tmp_path, capsys):
    for script, args in [(large, ["--seconds", "0"]),
                         (large, ["--algorithm", "other"]),
                         (layers, ["--seconds", "1", "2"]),
                         (layers, ["--search-steps", "-3"])]:
        out = run_script(script, *args, "--out-dir", str(tmp_path), capsys=capsys)
        assert out.returncode == 2, (script, args)


def test_replot_without_results_is_clean_error(tmp_path, capsys):
    out = run_script(layers, "--replot", "--out-dir", str(tmp_path), capsys=capsys)
    assert out.returncode == 1 and out.stderr.startswith("error: no saved results")


def test_layers_quick_end_to_end_and_reproducible(tmp_path, capsys):
    results = []
    for i in range(2):
        d = tmp_path / str(i)
        out = run_script(layers, "--quick", "--iters", "3", "--out-dir", str(d), capsys=capsys)
        assert out.returncode == 0, out.stderr
        results.append(json.loads((d / "results" / "compare_number_layers.json").read_text()))
    models = results[0]["models"]
    assert list(models) == ["784-10", "784-20-10", "784-20-20-10"]
    for name, m in models.items():
        assert m["steps"] == 3 and m["hand_tuned"]["best_lambda"] in m["hand_tuned"]["lambdas"]
        assert m["hand_tuned"]["best_valid"] == min(m["hand_tuned"]["valid"])
        for key in ("final_valid", "final_test", "best_valid"):
            assert m[key] == results[1]["models"][name][key]
    assert isinstance(results[0]["target"]["deeper_models_below_linear_valid"], bool)
    assert (tmp_path / "0" / "compare_number_layers.pdf").exists()


def test_layers_default_config_matches_paper_sizes():
    assert [num_params(s) for s in layers.Config().models] == [7850, 79510, 89610]
    assert large.Config().n_train == large.Config().n_valid == large.Config().n_test == 10000
